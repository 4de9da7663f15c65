"""Every registered benchmark keeps the protocol (im_repro/evaluate/benchmark.py) on the tiny model: one eval stage
runs a suite holding each of them; each one's suite entry, key, marker, headline metrics, per-item scores (averaging
to the reported number) and standard error are then read back through the registry alone."""

from __future__ import annotations

import json
import math

import pytest
from omegaconf import open_dict

from im_repro import keys, stages
from im_repro.common import read_json
from im_repro.config import HarnessTask
from im_repro.evaluate import alpaca, arena_hard, harness, humaneval, mtbench, suite
from im_repro.evaluate.benchmark import Benchmark
from im_repro.evaluate.judges import Judge
from im_repro.run import execute
from im_repro.runs import read_record
from tests.conftest import ARTIFACTS, compose_with
from tests.test_open_ended import write_mt_bench_files


class RatingJudge(Judge):
    """MT-Bench's and Arena-Hard's judge stand-in: a fixed rating and verdict, so the protocol, not a 135M judge's
    formatting, is under test."""

    def __init__(self):
        super().__init__("rating-7")

    def complete(self, prompts, max_new_tokens):
        return ["Rating: [[7]]. Verdict: [[A>B]]" for _ in prompts]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """The tiny model as it is (method=base) through eval=tiny plus HumanEval, MT-Bench, Arena-Hard and an lm-eval
    entry with extra metrics (IFEval's), every benchmark small."""
    tmp = tmp_path_factory.mktemp("benchmarks")
    cfg = compose_with("model=tiny", "method=base", "eval=tiny", "eval.humaneval.enabled=true",
                       "eval.humaneval.execute=true", "eval.humaneval.allow_unisolated=true", "eval.humaneval.limit=2",
                       "eval.humaneval.n=2", "eval.humaneval.temperatures=[0.1]", "eval.humaneval.max_new_tokens=8")
    with open_dict(cfg):
        cfg.eval.mt_bench = write_mt_bench_files(tmp)
        cfg.eval.arena_hard.update(enabled=True, data_dir=str(ARTIFACTS / "benchmarks" / "arena_hard_v2"), limit=2,
                                   max_new_tokens=4)
        cfg.eval.harness.tasks["ifeval"] = HarnessTask(
            task="ifeval", metric="prompt_level_strict_acc,none", category="instruction_following", limit=2,
            extra_metrics=["inst_level_loose_acc,none"], gen_kwargs="max_gen_toks=8", dataset_path="json",
            data_files={"test": str(ARTIFACTS / "benchmarks" / "ifeval" / "test.jsonl")})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IM_REPRO_CACHE", str(tmp / "cache"))
        mp.setattr(mtbench, "make_judge", lambda _: RatingJudge())
        mp.setattr(arena_hard, "make_judge", lambda _: RatingJudge())
        execute(cfg, tmp / "run", ["eval"])
    return cfg, tmp / "run"


def test_the_registry_holds_every_benchmark_module_once():
    modules = (harness, humaneval, alpaca, mtbench, arena_hard)
    assert list(suite.BENCHMARKS.values()) == [m.BENCHMARK for m in modules]
    assert all(isinstance(b, Benchmark) and kind == b.kind for kind, b in suite.BENCHMARKS.items())


@pytest.mark.parametrize("kind", list(suite.BENCHMARKS))
def test_each_benchmark_keeps_the_protocol_on_the_tiny_model(evaluated, kind):
    cfg, run = evaluated
    benchmark, out = suite.BENCHMARKS[kind], run / "eval" / "tiny"
    names = benchmark.names(cfg.eval)
    recorded = read_json(out / "suite.json")["benchmarks"]
    metrics = read_json(out / "metrics.json")
    units = {u.path.name: u for u in stages.plan(cfg, run, ["eval"]).units["eval"]}
    assert names
    assert metrics["generation"]["backend"] == "hf"  # the engine the generating benchmarks' keys name
    for name in names:
        entry = benchmark.entry(cfg.eval, name)
        assert recorded[name] == json.loads(json.dumps(entry))  # what the report reads, without the config
        assert entry["kind"] == kind and entry["headlines"]
        assert all(k in metrics for k in entry["headlines"]), metrics["missing"]  # (AE's LC needs all 805: missing)
        settings = benchmark.settings(cfg, name)
        json.dumps(settings)  # plain data
        assert read_record(out / name / "_COMPLETE")["key"] == units[name].key  # marked under its key
        own = keys.flat(settings[kind])  # its own settings: what cannot change its output is in no key
        assert ("generation" in settings) == benchmark.generates
        assert own and not [path for path in benchmark.excluded if path in own]
        for key in entry["headlines"] + list(entry["columns"].values()):
            assert benchmark.owns(name, key) and suite.owner(out, key)[0] == name
            scores = suite.items(out, key)  # refuses items that do not average to the reported number
            assert scores and math.isfinite(suite.stderr(out, key)) and suite.stderr(out, key) >= 0
        if entry["score"]:
            assert entry["score"] in entry["headlines"]
