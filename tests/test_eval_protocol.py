"""The eval stage puts lm-eval's own prompts in front of the model: checked against `simple_evaluate` run directly.

The reference runs are lm-eval with its defaults (seeds, few-shot split rule, dtype) on the same offline files,
declared the way lm-eval documents local data: the official task YAML `include`d, with `dataset_kwargs.data_files`.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import yaml
from omegaconf import open_dict

from im_repro.run import execute
from im_repro.config import AlpacaEvalConfig, HarnessTask, JudgeConfig, MTBenchConfig
from im_repro.evaluate import harness
from tests.conftest import compose_with
from tests.test_open_ended import INSTRUCTIONS, closed_port, write_mt_bench_files

OFFLINE = ["model=tiny", "method=base", "eval=smoke"]  # the tiny model as it is: its random initialisation
LM_EVAL_TASKS = harness.official_tasks()  # where lm-eval's own task YAMLs are (indexed once)


def run_stage(run_dir: Path, *overrides: str, tasks: dict | None = None):
    cfg = compose_with(*OFFLINE, *overrides)
    with open_dict(cfg):
        for name, task in (tasks or {}).items():
            cfg.eval.harness.tasks[name] = HarnessTask(**task)
    execute(cfg, run_dir, ["eval"])
    return cfg, json.loads((run_dir / "eval" / cfg.eval.name / "metrics.json").read_text())


def reference_task(folder: Path, name: str, official: str, data_files: dict, **extra) -> None:
    """A local-data copy of an official lm-eval task as an lm-eval user writes one; splits without data off."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"include": str(LM_EVAL_TASKS[official].yaml_path), "task": name, "tag": [], "dataset_path": "arrow",
              "dataset_name": None, "dataset_kwargs": {"data_files": data_files},
              "training_split": "train" if "train" in data_files else None,
              "validation_split": "validation" if "validation" in data_files else None,
              "test_split": "test" if "test" in data_files else None, **extra}
    write_yaml(folder / f"{name}.yaml", config)


def reference_run(model_path: Path, folder: Path, tasks: list[str], **kwargs) -> dict:
    """lm-eval's `simple_evaluate` with its defaults, samples as the eval stage stores them (JSON)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable

    manager = TaskManager(include_path=str(folder), include_defaults=False)  # the official YAMLs come by `include`
    results = simple_evaluate(model="hf", model_args=f"pretrained={model_path}", tasks=tasks, device="cpu",
                              task_manager=manager, log_samples=True, **kwargs)
    return json.loads(json.dumps(results, default=handle_non_serializable))


def stage_samples(run_dir: Path, name: str) -> list[dict]:
    path = run_dir / "eval" / "smoke" / name / f"samples_{name}_local.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


SAMPLE_FIELDS = ("doc_id", "doc", "target", "arguments", "resps", "filtered_resps", "acc", "acc_norm")


def test_prompts_loglikelihoods_and_metrics_equal_lm_eval_simple_evaluate(tmp_path):
    """HellaSwag 0-shot and ARC-Easy 3-shot through the eval stage, and through lm-eval alone."""
    shots = {"hellaswag": 0, "arc_easy": 3}
    cfg, metrics = run_stage(tmp_path, "eval.only=[hellaswag,arc_easy]", "eval.harness.limit=8",
                             "eval.harness.tasks.arc_easy.num_fewshot=3")
    for name, n in shots.items():
        spec = cfg.eval.harness.tasks[name]
        reference_task(tmp_path / "ref", f"{name}_local", spec.task, dict(spec.data_files), num_fewshot=n)
    # The suite's batch size too: it is no part of the protocol, but batched and unbatched float32 log-likelihoods
    # differ in the last bits.
    ref = reference_run(tmp_path / "eval" / "random_init", tmp_path / "ref", [f"{n}_local" for n in shots], limit=8,
                        batch_size=cfg.eval.harness.batch_size)
    for name, n in shots.items():
        ours, theirs = stage_samples(tmp_path, name), ref["samples"][f"{name}_local"]
        assert len(ours) == len(theirs) == 8
        if n:  # the prompts really hold few-shot examples
            assert all(s["arguments"][0][0].count("Question:") == n + 1 for s in ours)
        for a, b in zip(ours, theirs):
            assert {k: a[k] for k in SAMPLE_FIELDS} == {k: b[k] for k in SAMPLE_FIELDS}
        stage = json.loads((tmp_path / "eval" / "smoke" / name / "results.json").read_text())
        task = f"{name}_local"
        assert stage["results"][task] == ref["results"][task]
        assert metrics[name] == 100 * ref["results"][task][cfg.eval.harness.tasks[name].metric]


def test_a_checkpoint_evaluated_by_eval_checkpoint_gives_simple_evaluates_log_likelihoods(tmp_path, monkeypatch):
    """The README's way to evaluate a checkpoint: `stages=[eval] eval.checkpoint=<folder>` scores that folder's model
    (here: one trained for two steps, not the random initialisation the defaults would build)."""
    from tests.conftest import CONVERSATIONS

    monkeypatch.setenv("IM_REPRO_CACHE", str(tmp_path / "cache"))
    trained = tmp_path / "trained"
    execute(compose_with("data=lima", f"data.path={CONVERSATIONS}", "data.limit=8", "model=tiny", "train=smoke",
                         "train.max_steps=2", "train.max_seq_length=128", "train.global_batch_size=4",
                         "train.per_device_batch_size=4", "train.save_strategy=no", "train.learning_rate=0.05",
                         "method=it"), trained, ["prepare", "train"])
    final = trained / "train" / "final"
    run = tmp_path / "scored"
    cfg = compose_with("eval=smoke", "stages=[eval]", f"eval.checkpoint={final}", "eval.only=[arc_easy]",
                       "eval.harness.limit=6")
    execute(cfg, run, ["eval"])
    spec = cfg.eval.harness.tasks.arc_easy
    reference_task(tmp_path / "ref", "arc_easy_local", spec.task, dict(spec.data_files), num_fewshot=0)
    ref = reference_run(final, tmp_path / "ref", ["arc_easy_local"], limit=6, batch_size=cfg.eval.harness.batch_size)
    ours, theirs = stage_samples(run, "arc_easy"), ref["samples"]["arc_easy_local"]
    assert [s["resps"] for s in ours] == [s["resps"] for s in theirs] and len(ours) == 6
    assert not (run / "eval" / "random_init").exists()
    # what the switch guards against: the untrained initialisation scores otherwise
    execute(compose_with(*OFFLINE, "eval.only=[arc_easy]", "eval.harness.limit=6"), tmp_path / "base", ["eval"])
    assert [s["resps"] for s in stage_samples(tmp_path / "base", "arc_easy")] != [s["resps"] for s in ours]


def test_seeds_are_lm_evals_defaults_and_not_the_run_seed(tmp_path):
    from lm_eval import simple_evaluate

    defaults = {k: p.default for k, p in inspect.signature(simple_evaluate).parameters.items() if k.endswith("seed")}
    assert harness.seeds(compose_with(*OFFLINE, "seed=7")) == defaults
    assert harness.seeds(compose_with(*OFFLINE, "eval.harness.seeds.fewshot_random_seed=3"))["fewshot_random_seed"] == 3
    _, metrics = run_stage(tmp_path, "seed=7", "eval.only=[arc_easy]", "eval.harness.limit=2")
    recorded = metrics["lm_eval"]["arc_easy"]
    assert recorded["seeds"] == defaults and recorded["lm_eval_version"] == harness.version()
    assert recorded["aggregation"] == "lm-eval's own score of arc_easy_local" and recorded["limit"] == 2


def arc_file(path: Path, n: int) -> Path:
    """n ARC-schema questions, none a substring of another."""
    rows = [{"id": f"q{i}", "question": f"Question number {i:03d}: which colour is item {i:03d}?",
             "choices": {"text": ["red", "green", "blue", "black"], "label": ["A", "B", "C", "D"]},
             "answerKey": "ABCD"[i % 4]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_25_shot_local_task_never_shows_a_document_its_own_question(tmp_path):
    data = arc_file(tmp_path / "arc.jsonl", 26)
    task = {"task": "arc_easy", "metric": "acc_norm,none", "category": "commonsense", "num_fewshot": 25,
            "dataset_path": "json", "data_files": {"validation": str(data)}}
    run_stage(tmp_path / "run", "eval.only=[arc25]", tasks={"arc25": task})
    rows = [json.loads(x) for x in (tmp_path / "run/eval/smoke/arc25/samples_arc25_local.jsonl").open()]
    assert len(rows) == 26
    for row in rows:
        prompt, own = row["arguments"][0][0], row["doc"]["question"]
        assert prompt.count(own) == 1 and prompt.endswith(f"Question: {own}\nAnswer:")
        assert prompt.count("Question: ") == 26  # the 25 other documents, each once, then its own


def test_few_shot_split_follows_lm_evals_rule(tmp_path):
    index = LM_EVAL_TASKS

    def split(task: str, files: dict) -> str | None:
        spec = HarnessTask(task=task, metric="acc,none", category="x", data_files=files)
        return harness.local_task_yaml("t", spec, Path(index[task].yaml_path))["fewshot_split"]

    assert split("mmlu_anatomy", {"test": "t", "dev": "d"}) == "dev"  # the official task's own
    assert split("arc_easy", {"validation": "v"}) is None  # lm-eval's rule, which leaves the scored doc out
    assert split("arc_easy", {"test": "t"}) == "test"  # named, so lm-eval leaves the scored doc out
    assert split("gsm8k_cot", {"test": "t"}) is None  # the official fixed CoT examples
    with pytest.raises(ValueError, match="without leaving the scored document out"):
        harness.local_task_yaml("t", HarnessTask(task="x", metric="m", category="c", data_files={"validation": "v"}),
                                write_yaml(tmp_path / "x.yaml", {"task": "x", "fewshot_split": "validation"}))


def test_a_tag_is_aggregated_as_lm_evals_size_weighted_group(tmp_path):
    """Two tasks of different sizes as an lm-eval group (the reference aggregate) and as a tag (ours)."""
    cfg = compose_with(*OFFLINE)
    run_stage(tmp_path, "eval.only=[arc_easy]", "eval.harness.limit=1")  # saves the random model
    folder = tmp_path / "ref"
    for name in ("arc_easy", "arc_challenge"):
        reference_task(folder, f"{name}_ref", name, dict(cfg.eval.harness.tasks[name].data_files))
    write_yaml(folder / "group.yaml", {"group": "arc_ref", "task": ["arc_easy_ref", "arc_challenge_ref"],
                                       "aggregate_metric_list": [{"metric": "acc_norm", "weight_by_size": True}]})
    ref = reference_run(tmp_path / "eval" / "random_init", folder, ["arc_ref"], limit=7)
    group = ref["groups"]["arc_ref"]["acc_norm,none"]
    tag = {"results": {t: ref["results"][t] for t in ("arc_easy_ref", "arc_challenge_ref")},
           "n-samples": ref["n-samples"]}
    spec = HarnessTask(task="ai2_arc", metric="acc_norm,none", category="commonsense")
    value, how = harness.score(tag, "arc", spec)
    assert value == pytest.approx(100 * group) and how.startswith("size-weighted mean")
    plain = sum(r["acc_norm,none"] for r in tag["results"].values()) / 2
    assert harness.score(tag, "arc", spec, weight_by_size=False)[0] == pytest.approx(100 * plain)


def test_limit_is_an_integer_and_hub_checkpoints_evaluate_in_their_own_dtype():
    cfg = compose_with("model=llama2_7b", "eval=paper")
    assert cfg.eval.dtype == "auto" and cfg.model.dtype == "bfloat16"  # training's dtype stays bf16
    with pytest.raises(Exception, match="limit"):
        compose_with(*OFFLINE, "eval.harness.limit=0.5")


def test_openai_judge_without_network_finishes_with_the_reason_in_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("IM_REPRO_TEST_KEY", "sk-test")
    prompts, mt = tmp_path / "prompts.json", write_mt_bench_files(tmp_path)
    prompts.write_text(json.dumps([{"instruction": x, "output": "The sky is blue."} for x in INSTRUCTIONS[:2]]))
    judge = JudgeConfig(kind="openai", base_url=f"http://127.0.0.1:{closed_port()}/v1", api_key_env="IM_REPRO_TEST_KEY",
                        max_retries=1, timeout_s=5)
    cfg = compose_with(*OFFLINE, "eval.only=[alpaca_eval,mt_bench]")
    cfg.eval.alpaca_eval = AlpacaEvalConfig(enabled=True, prompts=str(prompts), versions=["1.0"], max_new_tokens=4,
                                            reference_outputs={"1.0": str(prompts)}, judge=judge)
    cfg.eval.mt_bench = MTBenchConfig(**{**vars(mt), "max_new_tokens": 4, "judge": judge})
    execute(cfg, tmp_path / "run", ["eval"])
    run = tmp_path / "run" / "eval" / "smoke"
    metrics = json.loads((run / "metrics.json").read_text())
    for benchmark in ("alpaca_eval", "mt_bench"):
        assert "APIConnectionError" in metrics["missing"][benchmark] and "rerun to resume" in metrics["missing"][benchmark]
    assert len(json.loads((run / "alpaca_eval" / "model_outputs.json").read_text())) == 2  # generations stay
    assert (run / "mt_bench" / "answers_turn2.jsonl").exists()
    assert not any(run.glob("*/_COMPLETE"))  # neither is finished: a re-run resumes the judging
