"""Loading, validation errors that name file/line/field, skip accounting, converters and Table 5 statistics."""

from __future__ import annotations

import codecs
import json

import pytest
from omegaconf import OmegaConf

from im_repro.config import DataConfig
from im_repro.data import DataError, length_stats, load_examples
from tests.conftest import shared_file

GOOD = {"id": "a", "dataset": "toy", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}


def cfg_for(path, **kw) -> DataConfig:
    cfg = OmegaConf.structured(DataConfig)
    cfg.name, cfg.paper_name, cfg.path = "toy", "toy", str(path)
    for key, value in kw.items():
        cfg[key] = value
    return cfg


def write_jsonl(path, lines):
    path.write_text("".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines))
    return path


BAD_ROWS = [
    ("{not json", "<json>", "bad JSON"),
    ({"messages": []}, "messages", "empty conversation"),
    ({"text": "hi"}, "messages", "missing"),
    ({"messages": [{"role": "human", "content": "x"}]}, "messages[0].role", "unknown role 'human'"),
    ({"messages": [{"content": "x"}]}, "messages[0].role", "missing"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content", "expected a string, got int"),
    ({"messages": [{"role": "user", "content": None}]}, "messages[0].content", "expected a string, got NoneType"),
    ({"messages": [{"role": "user", "content": "x", "name": "bob"}]}, "messages[0]", "unknown keys"),
    ({"messages": "hello"}, "messages", "expected a list"),
]


@pytest.mark.parametrize("row,field,problem", BAD_ROWS)
def test_invalid_row_names_file_line_and_field(tmp_path, row, field, problem):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD, row])
    with pytest.raises(DataError) as err:
        load_examples(cfg_for(path), tmp_path)
    assert err.value.where == f"{path}:3" and err.value.field == field
    assert problem in str(err.value) and f"{path}:3" in str(err.value)


def test_skip_counts_and_reports_every_dropped_row(tmp_path):
    rows = [GOOD] + [r for r, _, _ in BAD_ROWS] + [GOOD]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    examples, report = load_examples(cfg_for(path, on_invalid="skip"), tmp_path)
    assert len(examples) == 2 and report.kept == 2
    assert report.skipped == len(BAD_ROWS) and report.rows_read == len(rows)
    assert report.skipped_by_field["messages"] == 3 and report.skipped_by_field["messages[0].role"] == 2
    assert report.skipped_examples[0].startswith(f"{path}:2: field '<json>'")


def test_json_list_files_limit_and_kept_fields(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([GOOD, {**GOOD, "id": "b", "extra": 1}, {**GOOD, "id": "c"}]))
    examples, report = load_examples(cfg_for(path, limit=2), tmp_path)
    assert [e["id"] for e in examples] == ["a", "b"] and report.rows_read == 2
    assert set(examples[1]) == {"id", "dataset", "messages"}


def test_bad_json_file_and_unknown_suffix(tmp_path):
    bad = tmp_path / "d.json"
    bad.write_text('[{"messages": [}]')
    with pytest.raises(DataError, match=r"d.json:1: field '<json>'"):
        load_examples(cfg_for(bad), tmp_path)
    with pytest.raises(DataError, match="expected a .json or .jsonl"):
        load_examples(cfg_for(tmp_path / "d.csv"), tmp_path)


@pytest.mark.parametrize(
    "converter,row,expected",
    [
        ("alpaca", {"instruction": "Sum", "input": "1 2", "output": "3"}, ["Sum\n\n1 2", "3"]),
        ("alpaca", {"instruction": "Say hi", "input": "", "output": "hi"}, ["Say hi", "hi"]),
        ("dolly", {"instruction": "Q?", "context": "C.", "response": "A."}, ["Q?\n\nC.", "A."]),
        ("lima", {"conversations": ["q1", "a1", "q2"]}, ["q1", "a1", "q2"]),
        ("sharegpt", {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, ["q", "a"]),
    ],
)
def test_converters(tmp_path, converter, row, expected):
    path = write_jsonl(tmp_path / "d.jsonl", [row])
    (example,), _ = load_examples(cfg_for(path, converter=converter), tmp_path)
    assert [m["content"] for m in example["messages"]] == expected
    assert example["messages"][0]["role"] == "user" and example["messages"][1]["role"] == "assistant"


def test_converter_errors_name_the_field(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "x", "input": "", "output": 5}])
    with pytest.raises(DataError, match=r"d.jsonl:1: field 'output': expected a string"):
        load_examples(cfg_for(path, converter="alpaca"), tmp_path)


def test_length_stats_by_hand():
    examples = [
        {"messages": [{"role": "user", "content": "a b c"}, {"role": "assistant", "content": "d"}]},  # 4 / 2
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "a"},  # 2 + 2
                      {"role": "assistant", "content": "x y z w"}, {"role": "user", "content": ""},  # + 1 = 5
                      {"role": "assistant", "content": "q"}]},  # output 5 + 2 = 7
    ]
    stats = length_stats(examples)
    assert stats["size"] == 2
    assert stats["instruction"] == 4.5 and stats["instruction_std"] == 0.5
    assert stats["output"] == 4.5 and stats["output_std"] == 2.5
    assert stats["total"] == 9.0 and stats["output_over_instruction"] == 1.0


# Table 5 (PAPER.md §2.3): size, total, output, output std, instruction, instruction std, out/instr, instr/out.
TABLE5 = {
    "lima_data.jsonl": (1030, 484.47, 442.75, 491.34, 41.72, 79.28, 10.6124, 0.0942),
    "alpagasus_3k_dolly.jsonl": (2996, 111.91, 68.08, 106.38, 43.83, 107.53, 1.5530, 0.6439),
    "alpagasus_claude_t45_alpaca.jsonl": (5305, 48.29, 30.81, 34.44, 17.48, 12.45, 1.7631, 0.5672),
}
KEYS = ("size", "total", "output", "output_std", "instruction", "instruction_std",
        "output_over_instruction", "instruction_over_output")


@pytest.mark.shared_data
@pytest.mark.parametrize("name", sorted(TABLE5))
def test_table5_reproduced_from_the_papers_files(tmp_path, name):
    examples, report = load_examples(cfg_for(shared_file(name)), tmp_path)
    stats = length_stats(examples)
    assert report.skipped == 0
    for key, paper in zip(KEYS, TABLE5[name]):
        assert round(stats[key], 2) == round(paper, 2), (key, stats[key], paper)


# ------------------------------------------------------------------------------ bytes: invalid UTF-8, BOM ----


def test_invalid_utf8_names_file_line_and_byte_offset(tmp_path):
    path = tmp_path / "d.jsonl"
    good = (json.dumps(GOOD) + "\n").encode()
    path.write_bytes(good + good.replace(b'"Hi"', b'"H\xffi"') + good)
    with pytest.raises(DataError) as err:
        load_examples(cfg_for(path), tmp_path)
    offset = path.read_bytes().index(b"\xff")
    assert err.value.where == f"{path}:2" and err.value.reason == "invalid_utf8"
    assert f"byte offset {offset}" in str(err.value)

    examples, report = load_examples(cfg_for(path, on_invalid="skip"), tmp_path)
    assert len(examples) == 2 and report.skipped == 1 and report.rows_read == 3
    assert report.as_dict()["skipped_by_reason"]["invalid_utf8"] == 1


def test_invalid_utf8_in_a_json_list_spoils_only_its_record(tmp_path):
    path = tmp_path / "d.json"
    records = [GOOD, {**GOOD, "id": "b"}, {**GOOD, "id": "c"}]
    text = json.dumps(records, indent=1).encode()
    second = text.index(b'"b"')
    path.write_bytes(text[:second] + b'"\xc3("' + text[second + 3:])  # a truncated two-byte sequence
    line = len(text[:second].splitlines())  # the last of which holds the bad byte
    with pytest.raises(DataError, match=rf"record 1: field '<utf-8>': invalid UTF-8 at byte offset {second + 1} "
                                        rf"\(line {line}\)"):
        load_examples(cfg_for(path), tmp_path)
    examples, report = load_examples(cfg_for(path, on_invalid="skip"), tmp_path)
    assert [e["id"] for e in examples] == ["a", "c"] and report.skipped_by_reason["invalid_utf8"] == 1


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_leading_bom_is_accepted(tmp_path, suffix):
    rows = [GOOD, {**GOOD, "id": "b"}]
    text = json.dumps(rows) if suffix == ".json" else "".join(json.dumps(r) + "\n" for r in rows)
    path = tmp_path / f"d{suffix}"
    path.write_bytes(codecs.BOM_UTF8 + text.encode())
    examples, report = load_examples(cfg_for(path), tmp_path)
    assert [e["id"] for e in examples] == ["a", "b"] and report.skipped == 0


# ------------------------------------------------------------------------------ conversation structure -------


def turns(*roles):
    return {"messages": [{"role": r, "content": f"{r} says"} for r in roles]}


STRUCTURE = [
    (turns("user"), "no_assistant_turn", "messages"),
    (turns("system", "user", "user"), "no_assistant_turn", "messages"),
    (turns("assistant", "user", "assistant"), "first_turn_not_user", "messages[0].role"),
    (turns("system", "assistant", "user"), "first_turn_not_user", "messages[1].role"),
    (turns("user", "user", "assistant"), "roles_not_alternating", "messages[1].role"),
    (turns("user", "assistant", "assistant"), "roles_not_alternating", "messages[2].role"),
    (turns("system", "user", "assistant", "system", "user", "assistant"), "roles_not_alternating", "messages[3].role"),
]


@pytest.mark.parametrize("row,reason,field", STRUCTURE)
def test_structure_rules_name_their_reason(tmp_path, row, reason, field):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, row])
    with pytest.raises(DataError) as err:
        load_examples(cfg_for(path), tmp_path)
    assert (err.value.where, err.value.reason, err.value.field) == (f"{path}:2", reason, field)
    assert f"[{reason}]" in str(err.value)


def test_structure_skip_counts_and_lenient_accepts_and_counts(tmp_path):
    rows = [GOOD, turns("system", "user", "assistant", "user", "assistant")] + [r for r, _, _ in STRUCTURE]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    examples, report = load_examples(cfg_for(path, on_invalid="skip"), tmp_path)
    assert len(examples) == 2
    assert report.as_dict()["skipped_by_reason"] == {
        "invalid_utf8": 0, "bad_json": 0, "invalid_field": 0,
        "no_assistant_turn": 2, "first_turn_not_user": 2, "roles_not_alternating": 3,
    }
    examples, report = load_examples(cfg_for(path, on_invalid="skip", structure="lenient"), tmp_path)
    assert len(examples) == 2 + 5  # only the conversations without an assistant turn are still skipped
    assert report.skipped_by_reason == {"no_assistant_turn": 2}
    assert report.as_dict()["accepted_by_reason"] == {"first_turn_not_user": 2, "roles_not_alternating": 3}
