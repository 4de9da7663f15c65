"""The eval stage: suites as configs, lm-eval on the real offline benchmark data, per-benchmark keys (reuse, refuse),
missing reasons."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf, open_dict

from im_repro.evaluate import suite as evaluate
from im_repro.common import UserError
from im_repro.config import HarnessTask
from im_repro.evaluate import harness
from im_repro.run import execute
from im_repro.runs import StaleOutput
from tests.conftest import compose_with

OFFLINE = ["model=tiny", "method=base", "eval=smoke"]  # the tiny model as it is: its random initialisation


def run_eval(tmp_path: Path, *overrides: str, tasks: dict | None = None) -> dict:
    cfg = compose_with(*OFFLINE, *overrides)
    with open_dict(cfg):
        for name, task in (tasks or {}).items():
            cfg.eval.harness.tasks[name] = HarnessTask(**task)
    execute(cfg, tmp_path, ["eval"])
    return json.loads((tmp_path / "eval" / "smoke" / "metrics.json").read_text())


@pytest.mark.parametrize("suite", ["paper", "paper_text"])
def test_paper_suites_name_real_lm_eval_tasks(suite):
    from lm_eval.tasks import TaskManager

    cfg = compose_with(f"eval={suite}")
    index = TaskManager()._index
    tasks = cfg.eval.harness.tasks
    assert not [t.task for t in tasks.values() if t.task not in index]
    categories = {t.category for t in tasks.values()}
    assert categories == {"knowledge", "multilinguality", "commonsense", "math_coding", "bbh", "safety"}
    benchmarks = evaluate.suite(cfg)
    # The code's 17 NLP entries (16 through lm-eval + HumanEval), the text's 18 (WMT14 and WMT16 apart), then
    # AlpacaEval (1.0 and 2.0 in one benchmark) and MT-Bench
    assert len(benchmarks) == (19 if suite == "paper" else 20)
    assert {"humaneval", "alpaca_eval", "mt_bench"} <= set(benchmarks)


def declared_metrics(task: str) -> set[str]:
    """The "metric,filter" keys lm-eval's official `task` reports, read from its YAMLs: a task's metric_list under each
    of its filters ("none" without any), a group's aggregate_metric_list, and for a tag what every member reports."""
    entry = harness.official_tasks()[task]
    if entry.yaml_path is None:  # a tag
        members = [e.name for e in harness.official_tasks().values() if task in (e.tags or ())]
        return set.intersection(*map(declared_metrics, members))
    config = harness.official_config(Path(entry.yaml_path))
    if config.get("aggregate_metric_list"):
        return {f"{m['metric']},{m.get('filter_list', 'none')}" for m in config["aggregate_metric_list"]}
    filters = [f["name"] for f in config.get("filter_list") or []] or ["none"]
    return {f"{m['metric']},{f}" for m in config.get("metric_list", []) for f in filters}


@pytest.mark.parametrize("suite", sorted(p.stem for p in (Path(__file__).parents[1] / "conf" / "eval").glob("*.yaml")))
def test_every_configured_metric_is_one_the_official_task_reports(suite):
    """Most of these tasks read the Hub, so no run here can show that lm-eval reports the metric a suite names; a
    wrong name would fail only after a benchmark had run on a GPU (harness.score's KeyError)."""
    tasks = compose_with(f"eval={suite}").eval.harness.tasks
    wrong = {name: (metric, sorted(declared_metrics(spec.task))) for name, spec in tasks.items()
             for metric in [spec.metric, *spec.extra_metrics] if metric not in declared_metrics(spec.task)}
    assert not wrong


def test_code_and_text_variants_differ_where_the_paper_does():
    code, text = (compose_with(f"eval={s}").eval.harness.tasks for s in ("paper", "paper_text"))
    assert (code.bbh.task, code.bbh.num_fewshot) == ("bbh_cot_fewshot", None)
    assert (text.bbh.task, text.bbh.num_fewshot) == ("bbh_zeroshot", 0)
    assert code.wmt.scale == 0.01 and code.wmt.higher_is_better  # the released code's TER / 100 "accuracy"
    assert not text.wmt.higher_is_better and not text.wmt16.higher_is_better


def test_select_by_name_and_category():
    benchmarks = evaluate.suite(compose_with("eval=paper"))
    assert set(evaluate.select(benchmarks, ["commonsense"])) == {"wsc273", "winogrande", "arc", "coqa"}
    assert set(evaluate.select(benchmarks, ["arc", "humaneval"])) == {"arc", "humaneval"}
    assert evaluate.select(benchmarks, None) == benchmarks
    with pytest.raises(UserError, match=r"\['arcc'\] is neither a benchmark nor a category"):
        evaluate.select(benchmarks, ["arcc"])


def test_local_task_yaml_swaps_only_the_data_source(tmp_path):
    spec = OmegaConf.create({"task": "mmlu_anatomy", "dataset_path": "arrow",
                             "data_files": {"test": "t.arrow", "dev": "d.arrow"}})
    official = Path(harness.official_tasks()["mmlu_anatomy"].yaml_path)
    config = harness.local_task_yaml("anatomy", spec, official)
    assert config["include"] == str(official) and config["task"] == "anatomy_local"
    assert (config["test_split"], config["validation_split"], config["training_split"]) == ("test", None, None)
    assert config["fewshot_split"] == "dev"
    with pytest.raises(ValueError, match=r"data_files: unknown splits \['valid'\]"):
        harness.local_task_yaml("x", OmegaConf.create({**spec, "data_files": {"valid": "v"}}), Path("y"))


def test_score_reads_the_metric_and_aggregates_tags():
    spec = OmegaConf.create({"task": "ai2_arc", "metric": "acc_norm,none", "scale": 1.0, "data_files": None})
    # lm-eval >= 0.4.3 reports a tag's members only (the size weighting is checked against lm-eval's own group
    # in test_eval_protocol.py)
    results = {"results": {"arc_easy": {"acc_norm,none": 0.5}, "arc_challenge": {"acc_norm,none": 0.25}},
               "n-samples": {"arc_easy": {"effective": 3}, "arc_challenge": {"effective": 1}}}
    assert harness.score(results, "arc", spec)[0] == pytest.approx(100 * (3 * 0.5 + 0.25) / 4)
    results["results"]["ai2_arc"] = {"acc_norm,none": 0.4}  # a real group's aggregate wins
    assert harness.score(results, "arc", spec) == (pytest.approx(40.0), "lm-eval's own score of ai2_arc")
    ter = OmegaConf.create({"task": "wmt", "metric": "ter,none", "scale": 0.01, "data_files": None})
    assert harness.score({"results": {"wmt": {"ter,none": 80.0}}}, "wmt", ter)[0] == pytest.approx(80.0)
    with pytest.raises(KeyError, match="no metric 'acc,none'"):
        harness.score(results, "arc", OmegaConf.create({**spec, "metric": "acc,none"}))


def test_smoke_suite_on_real_offline_data_then_reuses_and_refuses_other_settings(tmp_path, monkeypatch):
    only = "eval.only=[arc_easy,arc_challenge,hellaswag,mmlu_high_school_geography]"
    metrics = run_eval(tmp_path, only, "eval.harness.limit=4")
    assert set(metrics) == {"arc_easy", "arc_challenge", "hellaswag", "mmlu_high_school_geography", "missing", "lm_eval"}
    assert metrics["missing"] == {}
    assert all(0 <= metrics[k] <= 100 for k in metrics if k not in ("missing", "lm_eval"))
    arc = tmp_path / "eval" / "smoke" / "arc_easy"
    results = json.loads((arc / "results.json").read_text())
    assert results["n-samples"]["arc_easy_local"]["effective"] == 4
    assert results["results"]["arc_easy_local"]["acc_norm,none"] * 100 == pytest.approx(metrics["arc_easy"])
    assert len((arc / "samples_arc_easy_local.jsonl").read_text().splitlines()) == 4
    assert (tmp_path / "eval" / "random_init" / "config.json").exists()  # the untrained tiny model, saved

    def no_model(*_, **__):
        raise AssertionError("a finished suite must not load the model again")

    monkeypatch.setattr(harness, "load_lm", no_model)
    assert run_eval(tmp_path, only, "eval.harness.limit=4") == metrics
    assert run_eval(tmp_path, "eval.only=[arc_easy]", "eval.harness.limit=4", "eval.harness.batch_size=2")["arc_easy"] \
        == metrics["arc_easy"]  # a subset of the suite, and a batch size, change no result: reused
    # One benchmark's setting changed: refused before any work, naming the setting; the others stay reusable.
    with pytest.raises(StaleOutput, match=r"eval/smoke/arc_easy: .* task\.limit: 4(\.0)? -> 3(\.0)?") as refused:
        run_eval(tmp_path, only, "eval.harness.limit=4", "eval.harness.tasks.arc_easy.limit=3")
    assert "hellaswag" not in str(refused.value)
    assert json.loads((arc / "results.json").read_text()) == results  # untouched


def test_generation_task_on_local_files_in_the_real_schema(tmp_path):
    # GSM8K is not available offline: the paper's gsm8k_cot task on a file in GSM8K's own schema
    problems = [{"question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
                 "answer": f"He has {a} + {b} = {a + b} apples.\n#### {a + b}"} for a, b in [(2, 3), (4, 5), (1, 6)]]
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in problems))
    run_dir = tmp_path / "run"
    task = {"task": "gsm8k_cot", "metric": "exact_match,flexible-extract", "category": "math_coding",
            "num_fewshot": 2, "dataset_path": "json", "data_files": {"test": str(data), "train": str(data)}}
    metrics = run_eval(run_dir, "eval.only=[gsm8k]", "eval.harness.limit=2", tasks={"gsm8k": task})
    assert 0 <= metrics["gsm8k"] <= 100
    rows = [json.loads(x) for x in (run_dir / "eval/smoke/gsm8k/samples_gsm8k_local.jsonl").read_text().splitlines()]
    assert {r["doc_id"] for r in rows} == {0, 1} and {r["filter"] for r in rows} == {"strict-match", "flexible-extract"}
    assert rows[0]["doc"]["question"] == problems[0]["question"]
    # gsm8k_cot's own fixed chain-of-thought examples (lm-eval's rule), then the question from the file
    prompt = rows[0]["arguments"][0][0]
    assert prompt.count("Q: ") == 3 and prompt.count("Q: Tom has") == 1 and prompt.endswith("A:")


def test_missing_data_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"eval.harness.tasks.arc_easy.data_files: /nope.arrow"):
        run_eval(tmp_path, "eval.only=[arc_easy]", "eval.harness.tasks.arc_easy.data_files={validation: /nope.arrow}")


def test_an_offline_copy_setup_could_not_build_is_missing_with_its_reason(tmp_path):
    """fetch_artifacts leaves an UNAVAILABLE note where a source could not be downloaded (BIG-bench's sdist, refused
    with 403 on 2026-12-04): the task is listed missing with the note; a missing file without one stays an error."""
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "UNAVAILABLE").write_text("make setup could not download the source (HTTP Error 403: Forbidden)\n")
    metrics = run_eval(tmp_path / "run", "eval.only=[arc_easy]",
                       f"eval.harness.tasks.arc_easy.data_files={{validation: {copy}/validation.jsonl}}")
    assert "arc_easy" not in metrics and "HTTP Error 403" in metrics["missing"]["arc_easy"]
    (copy / "UNAVAILABLE").unlink()
    with pytest.raises(FileNotFoundError, match="validation.jsonl does not exist"):
        run_eval(tmp_path / "again", "eval.only=[arc_easy]",
                 f"eval.harness.tasks.arc_easy.data_files={{validation: {copy}/validation.jsonl}}")


@pytest.mark.slow
def test_smoke_suite_with_smollm2(tmp_path):
    # every task on a few documents (the suite runs end to end on a real model); ARC-Easy on enough to beat chance
    metrics = run_eval(tmp_path, "model=smollm2", "eval.harness.limit=4", "eval.harness.tasks.nq_open.limit=4",
                       "eval.harness.tasks.arc_easy.limit=20")
    assert metrics["missing"] == {}
    # SmolLM2-135M-Instruct is a real model: it beats chance (25%) on ARC-Easy's 20 first questions
    assert metrics["arc_easy"] > 25


def test_code_execution_is_opt_in_and_reported_missing(tmp_path):
    metrics = run_eval(tmp_path, "eval.only=[humaneval]", "eval.humaneval.enabled=true", "eval.humaneval.limit=1",
                       "eval.humaneval.n=1", "eval.humaneval.temperatures=[0.1]", "eval.humaneval.max_new_tokens=4")
    assert "humaneval/pass@1" not in metrics and "execute" in metrics["missing"]["humaneval"]
    assert (tmp_path / "eval" / "smoke" / "humaneval" / "samples_t0.1.jsonl").exists()  # generation still ran
    assert not (tmp_path / "eval" / "smoke" / "humaneval" / "_COMPLETE").exists()  # never marked done


def test_a_scored_benchmark_keeps_the_reason_one_of_its_other_metrics_is_missing(tmp_path):
    """AlpacaEval on a subset has a raw win rate but no LC win rate: the reason reaches metrics.json and the table."""
    from im_repro.common import write_json
    from im_repro.report.tables import metric_cell

    why = "the length-controlled win rate needs the full official 805 instructions"
    (tmp_path / "alpaca_eval").mkdir()
    write_json(tmp_path / "alpaca_eval" / "metrics.json",
               {"metrics": {"alpaca_eval_2.0/win_rate": 40.0}, "missing": {"alpaca_eval_2.0/lc_win_rate": why}})
    scored = {"alpaca_eval_2.0/win_rate": 40.0}
    missing = evaluate.missing_reasons({"alpaca_eval": {"headlines": ["alpaca_eval_2.0/win_rate"]}}, scored, tmp_path)
    assert metric_cell({**scored, "missing": missing}, {}, "alpaca_eval", "alpaca_eval_2.0/lc_win_rate").why == why
    assert metric_cell({**scored, "missing": missing}, {}, "alpaca_eval", "alpaca_eval_2.0/win_rate").value == 40.0
