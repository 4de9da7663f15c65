"""The modern suite's numbers equal their reference tools' on the same inputs (conf/eval/modern.yaml).

IFEval: the eval stage's per-prompt verdicts and its four accuracies against lm-eval's own `ifeval` task run by
`simple_evaluate` on the same generations. The generations are fixed answers (`Replay`, an lm-eval model that answers
each prompt with a written text), some following their instructions and some not, so a verdict can go either way.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from im_repro.common import read_json
from im_repro.evaluate import harness, suite
from im_repro.run import execute
from tests.conftest import ARTIFACTS, compose_with
from tests.test_eval_protocol import LM_EVAL_TASKS, write_yaml

# IFEval prompts by key, each with an answer: verdicts in the comments (strict; loose where it differs).
IFEVAL_ANSWERS = {
    1000: "*Raymond* was a count\n*His rule* began young\n*His legacy* endured",  # no comma, 3 highlights; < 300 words
    1001: "Thou shalt first see Tokyo and then Kyoto and at last Nara.",  # no comma: followed
    1005: "Name: [name]\nAddress: [address]",  # 2 placeholders of 12: not followed
    1012: ("Write an email to my boss telling him that I am quitting. The email must contain a title wrapped in "
           "double angular brackets, i.e. <<title>>.\n<<Leaving>>\nDear boss, I quit."),  # repeated, titled
    102: "Here they are:\n* Ball gown\n* Sweats\n* The event\n* Goodbye",  # 4 bullets; loose (last line cut): 3
}


class Replay:
    """An lm-eval model answering each IFEval prompt with IFEVAL_ANSWERS' text (lm-eval's LM interface)."""

    def __new__(cls, prompts: dict[str, str]):
        from lm_eval.api.model import LM

        class _Replay(LM):
            def generate_until(self, requests, disable_tqdm=False):
                return [next(a for p, a in prompts.items() if p in r.args[0]) for r in requests]

            def loglikelihood(self, requests, disable_tqdm=False):
                raise NotImplementedError

            def loglikelihood_rolling(self, requests, disable_tqdm=False):
                raise NotImplementedError

        return _Replay()


def ifeval_file(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """The offline IFEval rows of IFEVAL_ANSWERS' keys (real prompts), and {prompt: answer}."""
    source = ARTIFACTS / "benchmarks" / "ifeval" / "test.jsonl"
    if not source.exists():
        pytest.fail(f"{source} is missing: run `make setup` (scripts/fetch_artifacts.py builds it)")
    rows = [r for r in map(json.loads, source.read_text().splitlines()) if r["key"] in IFEVAL_ANSWERS]
    path = tmp_path / "ifeval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, {r["prompt"]: IFEVAL_ANSWERS[r["key"]] for r in rows}


def test_ifeval_verdicts_equal_lm_eval_ifeval_task(tmp_path, monkeypatch):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    data, prompts = ifeval_file(tmp_path)
    monkeypatch.setattr(harness, "load_lm", lambda *args: Replay(prompts))
    cfg = compose_with("model=tiny", "method=base", "eval=modern", "eval.only=[ifeval]",
                       "eval.harness.apply_chat_template=false", f"eval.harness.tasks.ifeval.data_files.test={data}")
    execute(cfg, tmp_path / "run", ["eval"])
    out = tmp_path / "run" / "eval" / "modern"

    # lm-eval alone: its official ifeval task on the same file, as lm-eval documents local data
    (tmp_path / "ref").mkdir()
    write_yaml(tmp_path / "ref" / "ifeval_ref.yaml", {
        "include": str(LM_EVAL_TASKS["ifeval"].yaml_path), "task": "ifeval_ref", "dataset_path": "json",
        "dataset_name": None, "dataset_kwargs": {"data_files": {"test": str(data)}}, "test_split": "test"})
    harness.offline_nltk_data()
    reference = simple_evaluate(model=Replay(prompts), tasks=["ifeval_ref"], log_samples=True,
                                task_manager=TaskManager(include_path=str(tmp_path / "ref"), include_defaults=False))
    ref_rows = {row["doc_id"]: row for row in reference["samples"]["ifeval_ref"]}
    ref_results = reference["results"]["ifeval_ref"]

    metrics = read_json(out / "metrics.json")
    assert metrics["missing"] == {}
    for key, metric in harness.metric_keys("ifeval", cfg.eval.harness.tasks.ifeval).items():
        assert metrics[key] == pytest.approx(100 * ref_results[metric], abs=1e-9)
    verdicts = suite.items(out, "ifeval")  # per prompt, strict: 100 followed all its instructions, 0 not
    assert verdicts == {f"ifeval_local/{d}": 100.0 * row["prompt_level_strict_acc"] for d, row in ref_rows.items()}
    ours = [json.loads(line) for line in (out / "ifeval" / "samples_ifeval_local.jsonl").read_text().splitlines()]
    for row in ours:  # every instruction's verdict, strict and loose
        for metric in ("inst_level_strict_acc", "inst_level_loose_acc", "prompt_level_loose_acc"):
            assert row[metric] == ref_rows[row["doc_id"]][metric]
    # the answers do not all pass or all fail: a flipped verdict moves a number
    assert 0 < metrics["ifeval"] < 100 and metrics["ifeval/prompt_level_loose_acc"] > metrics["ifeval"]
