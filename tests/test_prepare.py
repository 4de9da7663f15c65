"""The prepare stage's accounting: examples that truncation leaves without an output token, and data_stats.json
written even when nothing is left to train on."""

from __future__ import annotations

import json

import datasets
import pytest

from im_repro.run import execute
from tests.conftest import compose_with

MAX_LEN = 64


def conversation(instruction: str, output: str) -> dict:
    return {"messages": [{"role": "user", "content": instruction}, {"role": "assistant", "content": output}]}


@pytest.fixture
def files(tmp_path, monkeypatch, llama2):
    monkeypatch.setenv("IM_REPRO_CACHE", str(tmp_path / "cache"))
    long = " ".join(f"word{k}" for k in range(60))
    assert len(llama2(long)["input_ids"]) > MAX_LEN  # the instruction alone fills the window: no output token fits
    rows = [conversation(f"Short question {k}?", f"Short answer {k}.") for k in range(3)]
    rows += [conversation(f"{long} {k}", f"Unreachable answer {k}.") for k in range(2)]
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("".join(json.dumps({"id": str(k), **r}) + "\n" for k, r in enumerate(rows)))
    only_long = tmp_path / "long.jsonl"
    only_long.write_text("".join(json.dumps(r) + "\n" for r in rows[3:]))
    invalid = tmp_path / "invalid.jsonl"
    invalid.write_text(json.dumps({"messages": [{"role": "user", "content": "no answer"}]}) + "\n{oops\n")
    return {"mixed": mixed, "long": only_long, "invalid": invalid}


def prepared(run_dir, path, *overrides):
    execute(compose_with("data=lima", f"data.path={path}", "model=tiny", f"train.max_seq_length={MAX_LEN}",
                         *overrides), run_dir, ["prepare"])
    return datasets.load_from_disk(str(run_dir / "prepare" / "dataset")), stats_of(run_dir)


def stats_of(run_dir) -> dict:
    return json.loads((run_dir / "prepare" / "data_stats.json").read_text())


@pytest.mark.parametrize("mask", ["it", "im", "im_released", "full", "weighted"])
def test_output_less_examples_are_dropped_in_every_mode(tmp_path, files, mask):
    extra = ("method.prompt_loss_weight=0.5",) if mask == "weighted" else ()
    ds, stats = prepared(tmp_path, files["mixed"], f"method={mask}", *extra)
    tok = stats["tokenization"]
    assert sorted(ds["id"]) == ["0", "1", "2"]
    assert tok["dropped_truncated_no_output"] == 2 and tok["dropped_no_supervision"] == 0 and tok["kept"] == 3
    assert tok["dropped_no_supervision_per_mode"]["it"] == 0  # not counted twice


def test_keep_output_less_is_the_papers_behaviour(tmp_path, files):
    ds, stats = prepared(tmp_path / "im", files["mixed"], "method=im", "data.keep_output_less=true")
    assert sorted(ds["id"]) == ["0", "1", "2", "3", "4"]  # IM still supervises their instructions
    assert stats["tokenization"]["truncated_no_output"] == 2
    assert stats["tokenization"]["dropped_truncated_no_output"] == 0
    ds, stats = prepared(tmp_path / "it", files["mixed"], "method=it", "data.keep_output_less=true")
    assert sorted(ds["id"]) == ["0", "1", "2"] and stats["tokenization"]["dropped_no_supervision"] == 2


def test_data_stats_is_written_when_nothing_is_left(tmp_path, files):
    with pytest.raises(ValueError, match="no example has a supervised token and an output token"):
        prepared(tmp_path / "long", files["long"], "method=im")
    stats = stats_of(tmp_path / "long")
    assert stats["tokenization"]["dropped_truncated_no_output"] == 2 and stats["tokenization"]["kept"] == 0

    with pytest.raises(ValueError, match="no valid examples"):
        prepared(tmp_path / "invalid", files["invalid"], "method=im", "data.on_invalid=skip")
    reasons = stats_of(tmp_path / "invalid")["data"]["skipped_by_reason"]
    assert reasons["no_assistant_turn"] == 1 and reasons["bad_json"] == 1 and sum(reasons.values()) == 2
