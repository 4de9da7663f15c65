"""Offline tests of im_repro.rebuild: the seed-42 template stream against the paper's own files, and both recipes
end to end on small local upstream files."""

from __future__ import annotations

import json
import logging
import random
import re
import zipfile
from itertools import islice
from pathlib import Path

import pytest

from im_repro import rebuild
from im_repro.common import file_sha256
from im_repro.rebuild import WITH_INPUT, WITHOUT_INPUT, build, template_stream

PAPER = Path(__file__).resolve().parents[2] / "shared" / "data" / "paper"
CLAUDE, NINE_K = 5305, 9229  # draws the paper's script made before each later file


def paper_records(name: str) -> list[dict]:
    path = PAPER / name
    if not path.exists():
        pytest.skip(f"the paper's processed file {path} is not available")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def pattern(template: str) -> re.Pattern:
    """`template` as a regex whose placeholders capture any stripped text (named groups), as encode() fills them."""
    parts = re.split(r"\{(instruction|input|output)\}", template)
    # re.split puts the placeholder names at the odd positions.
    field = r"(?:\S(?:.*\S)?)?"
    return re.compile("".join(f"(?P<{p}>{field})" if k % 2 else re.escape(p) for k, p in enumerate(parts)), re.DOTALL)


def decompose(record: dict, index: int) -> dict | None:
    """instruction / input / output if `record` could come from template `index` of either list, else None."""
    user, assistant = (m["content"] for m in record["messages"])
    for templates in (WITH_INPUT, WITHOUT_INPUT):
        prompt, completion, _ = templates[index]
        p, c = pattern(prompt).fullmatch(user), pattern(completion).fullmatch(assistant)
        if p and c:
            return {"input": "", **p.groupdict(), **c.groupdict()}
    return None


def misfits(records: list[dict], start: int) -> int:
    return sum(decompose(r, i) is None for r, i in zip(records, islice(template_stream(42), start, None)))


def test_template_lists_share_weights():
    assert [w for *_, w in WITH_INPUT] == [w for *_, w in WITHOUT_INPUT] == rebuild.WEIGHTS


def test_template_stream_equals_global_random_choices():
    state = random.getstate()
    try:
        random.seed(42)
        expected = [WITH_INPUT.index(random.choices(WITH_INPUT, weights=rebuild.WEIGHTS)[0]) for _ in range(2000)]
    finally:
        random.setstate(state)
    assert list(islice(template_stream(42), 2000)) == expected


@pytest.mark.parametrize(("name", "start", "rows"), [
    ("alpagasus_claude_t45_alpaca.jsonl", 0, CLAUDE),
    ("alpagasus_3k_dolly.jsonl", CLAUDE + NINE_K, 2996),
])
def test_seed42_stream_fits_the_papers_files(name, start, rows):
    records = paper_records(name)
    assert len(records) == rows
    assert misfits(records, start) == 0
    # Control: one draw off, the templates stop fitting, so the check above can fail.
    assert misfits(records, start + 1) > 0.2 * rows


def recovered_upstream(name: str, start: int) -> list[dict]:
    """instruction / input / output recovered from the paper's file via the templates its draws picked."""
    records = paper_records(name)
    return [decompose(r, i) for r, i in zip(records, islice(template_stream(42), start, None))]


@pytest.mark.parametrize("which", ["claude_t45_alpaca", "3k_dolly"])
def test_rebuild_from_recovered_upstream_is_byte_identical(tmp_path, caplog, which):
    """Run the full recipe on upstream files recovered from the paper's outputs and get the paper's bytes back.

    chatgpt_9k.json is unavailable, so it is stood in for by 9,229 dummy records: only its draw count matters.
    """
    upstream = {
        "claude_t45_url": recovered_upstream("alpagasus_claude_t45_alpaca.jsonl", 0),
        "chatgpt_9k_url": [{"instruction": "i", "input": "", "output": "o"}] * NINE_K,
        "dolly_3k_url": recovered_upstream("alpagasus_3k_dolly.jsonl", CLAUDE + NINE_K),
    }
    for arg, rows in upstream.items():
        (tmp_path / f"{arg}.json").write_text(json.dumps(rows))
    urls = {arg: str(tmp_path / f"{arg}.json") for arg in upstream}
    with caplog.at_level(logging.INFO, logger="im_repro.rebuild"):
        out = build("alpagasus", tmp_path / "cache", which=which, **urls)
    assert file_sha256(out) == rebuild.PAPER_SHA256[which]
    assert f"alpagasus_{which}.jsonl is byte-identical" in caplog.text


def write_upstream(tmp_path: Path) -> dict:
    """build() arguments for tiny claude / 9k / 3k files (local paths and a file:// URL), plus their rows."""

    def rows(tag: str, n: int) -> list[dict]:
        # Odd rows have an input, even rows a blank one; padding and a non-ASCII quote exercise strip and escaping.
        return [
            {"instruction": f" {tag} task {k} ", "input": f"ctx {k}\n" if k % 2 else "  ", "output": f"\u201cout {k}\n"}
            for k in range(n)
        ]

    files = {"claude_t45_url": rows("c", 3), "chatgpt_9k_url": rows("n", 4), "dolly_3k_url": rows("d", 2)}
    args = {"expected_sizes": {"claude_t45_alpaca": 3, "9k_dolly": 4, "3k_dolly": 2}}
    for arg, data in files.items():
        path = tmp_path / f"{arg}.json"
        path.write_text(json.dumps(data))
        args[arg] = path.as_uri() if arg == "dolly_3k_url" else str(path)
    args["upstream"] = list(files.values())
    return args


def paper_script(upstream: list[list[dict]]) -> list[list[tuple[str, str]]]:
    """The paper's reformat loop, written independently: global RNG, random.choices over the template tuples."""
    state, out = random.getstate(), []
    try:
        random.seed(42)
        for rows in upstream:
            out.append([])
            for row in rows:
                templates = WITH_INPUT if row["input"].strip() else WITHOUT_INPUT
                prompt, completion, _ = random.choices(templates, weights=[w for *_, w in templates])[0]
                kwargs = {"instruction": row["instruction"].strip(), "input": row["input"].strip()}
                out[-1].append((prompt.format(**kwargs), completion.format(output=row["output"].strip())))
    finally:
        random.setstate(state)
    return out


def contents(path: Path) -> list[tuple[str, ...]]:
    return [tuple(m["content"] for m in json.loads(line)["messages"]) for line in path.read_text().splitlines()]


def test_alpagasus_end_to_end(tmp_path):
    args = write_upstream(tmp_path)
    expected = paper_script(args.pop("upstream"))
    files = [("claude_t45_alpaca", "alpagasus_"), ("9k_dolly", "alpagasus_9k_"), ("3k_dolly", "alpagasus_3k_")]
    for (which, prefix), want in zip(files, expected):
        out = build("alpagasus", tmp_path / "cache", which=which, **args)
        assert out.is_relative_to(tmp_path / "cache" / "rebuild")
        lines = out.read_text(encoding="utf-8").splitlines()
        assert all(line.isascii() for line in lines)
        records = [json.loads(line) for line in lines]
        assert [list(r) for r in records] == [["dataset", "id", "messages"]] * len(want)
        assert {r["dataset"] for r in records} == {f"alpagasus_{which}"}
        assert [r["id"] for r in records] == [f"{prefix}{i}" for i in range(len(want))]
        assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in records)
        assert contents(out) == want


def test_alpagasus_3k_alone_replays_earlier_files_and_is_idempotent(tmp_path):
    args = write_upstream(tmp_path)
    expected = paper_script(args.pop("upstream"))[2]
    out = build("alpagasus", tmp_path / "cache", which="3k_dolly", **args)
    assert contents(out) == expected
    mtime = out.stat().st_mtime_ns
    assert build("alpagasus", tmp_path / "cache", which="3k_dolly", **args) == out
    assert out.stat().st_mtime_ns == mtime


def test_alpagasus_wrong_count_and_unknown_file(tmp_path):
    args = write_upstream(tmp_path)
    del args["upstream"]
    args["expected_sizes"] = {**args["expected_sizes"], "claude_t45_alpaca": 5}
    with pytest.raises(ValueError, match="has 3 records, expected 5"):
        build("alpagasus", tmp_path / "cache", which="9k_dolly", **args)
    with pytest.raises(ValueError, match="not one of"):
        build("alpagasus", tmp_path / "cache", which="52k_alpaca")


def test_alpagasus_9k_falls_back_to_the_hub_mirror(tmp_path, monkeypatch, caplog):
    datasets = pytest.importorskip("datasets")
    args = write_upstream(tmp_path)
    mirror = args.pop("upstream")[1]
    monkeypatch.setattr(datasets, "load_dataset", lambda hub_id, split: {("m/x", "train"): mirror}[hub_id, split])
    args.update(chatgpt_9k_url=str(tmp_path / "missing.json"), chatgpt_9k_hub_id="m/x")
    with caplog.at_level(logging.WARNING, logger="im_repro.rebuild"):
        out = build("alpagasus", tmp_path / "cache", which="9k_dolly", **args)
    assert len(contents(out)) == 4
    assert "UNVERIFIED" in caplog.text


def make_zip(path: Path, members: dict[str, list[dict]]) -> str:
    with zipfile.ZipFile(path, "w") as zf:
        for name, rows in members.items():
            zf.writestr(name, "".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def chat(user: str, assistant: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


LESS_ROWS = [{"dataset": "flan_v2", "id": "flan_v2_7", "messages": chat("q", "a")}, {"prompt": "p", "completion": "c"}]


def test_less_extracts_and_converts(tmp_path):
    url = make_zip(tmp_path / "less-data.zip", {
        "selected_data/tydiqa/top_p0.05.jsonl": LESS_ROWS,
        "selected_data/mmlu/top_p0.05.jsonl": LESS_ROWS[:1],
        "x/bbh-icl_adam_sim_trainp0.05_seed3_p0.05.jsonl": LESS_ROWS * 2,
    })
    out = build("less", tmp_path / "cache", task="tydiqa", url=url, expected_rows=2)
    assert out.name == "tydiqa_adam_sim_trainp0.05_seed3_p0.05.jsonl"
    assert [json.loads(line) for line in out.read_text().splitlines()] == [
        LESS_ROWS[0],
        {"dataset": "less_tydiqa", "id": "less_tydiqa_1", "messages": chat("p", "c")},
    ]
    mtime = out.stat().st_mtime_ns
    assert build("less", tmp_path / "cache", task="tydiqa", url=url, expected_rows=2).stat().st_mtime_ns == mtime
    # mmlu-chat is found under LESS's short name, bbh-icl by the paper's file name.
    assert len(contents(build("less", tmp_path / "cache", task="mmlu-chat", url=url, expected_rows=1))) == 1
    assert len(contents(build("less", tmp_path / "cache", task="bbh-icl", url=url, expected_rows=4))) == 4
    with pytest.raises(ValueError, match="has 2 rows, expected 13533"):
        build("less", tmp_path / "other", task="tydiqa", url=url)


def test_less_missing_member_lists_selected_data(tmp_path):
    url = make_zip(tmp_path / "less-data.zip", {"less-data/selected_data/gsm8k/top_p0.05.jsonl": LESS_ROWS})
    with pytest.raises(FileNotFoundError, match="less-data/selected_data/gsm8k/top_p0.05.jsonl"):
        build("less", tmp_path / "cache", task="bbh-icl", url=url)


def test_unknown_recipe():
    with pytest.raises(ValueError, match=r"known: \['alpagasus', 'less'\]"):
        build("tulu", "/nonexistent")
