"""The eval stage: a suite (the registered benchmarks an eval config enables) run on one model, every number into
`<run>/eval/<suite>/metrics.json`.

    im-repro stages=[prepare,train,eval] eval=paper eval.only=[commonsense,humaneval]
    im-repro stages=[eval] eval=smoke eval.checkpoint=runs/<run>/train/final     # a checkpoint as it is

`BENCHMARKS` is the registry: adding a benchmark is one module implementing `evaluate.benchmark.Benchmark` (or one
lm-eval entry under `eval.harness.tasks`) and one line here. Results are stored per suite (`eval.name`), so two
suites of one model live side by side; each benchmark writes under its own folder `<suite>/<name>/`, a unit with its
own key (the model scored + the benchmark's own settings), marked complete the moment its numbers are in. The
entrypoint passes only the benchmarks not yet done under their key; open-ended ones resume their generations and
judgments. A benchmark that cannot finish here (no judge key, code execution not opted in) is listed with its reason
under `missing`, never given a number.
"""

from __future__ import annotations

import functools
import gc
import json
import logging
from pathlib import Path

import numpy as np
import torch

from im_repro import keys
from im_repro.common import UserError, is_main, read_json, write_json
from im_repro.config import StatsConfig
from im_repro.evaluate import alpaca, arena_hard, harness, humaneval, mtbench
from im_repro.evaluate.benchmark import Benchmark, Context
from im_repro.evaluate.generate import Generator, LazyGenerator, engine, hf_generator, make_generator
from im_repro.model import load_inference
from im_repro.runs import MARKER, Job, Unit, read_record

log = logging.getLogger("im_repro")

# In running order: lm-eval first, so the generating benchmarks reuse the model it loaded.
BENCHMARKS: dict[str, Benchmark] = {b.kind: b for b in (harness.BENCHMARK, humaneval.BENCHMARK, alpaca.BENCHMARK,
                                                        mtbench.BENCHMARK, arena_hard.BENCHMARK)}


def suite(cfg) -> dict[str, dict]:
    """Every benchmark the eval config enables: {name: its entry (evaluate.benchmark)}."""
    return {name: b.entry(cfg.eval, name) for b in BENCHMARKS.values() for name in b.names(cfg.eval)}


def select(benchmarks: dict[str, dict], only) -> dict[str, dict]:
    """The benchmarks named in `eval.only` by name or category (all when unset); unknown names are an error."""
    if not only:
        return benchmarks
    known = set(benchmarks) | {b["category"] for b in benchmarks.values()}
    unknown = sorted(set(only) - known)
    if unknown:
        raise UserError(f"eval.only={list(only)}: {unknown} is neither a benchmark nor a category of this suite; "
                        f"choose from {sorted(known)}")
    return {n: b for n, b in benchmarks.items() if n in only or b["category"] in only}


def folder(cfg, run_dir: Path) -> Path:
    return run_dir / "eval" / cfg.eval.name


def units(cfg, run_dir: Path, model) -> list[Unit]:
    """One unit per chosen benchmark, keyed by the model scored and the benchmark's own settings."""
    common = {"format": keys.FORMAT, "model": model.identity, "seed": cfg.seed}
    return [Unit(f"eval/{cfg.eval.name}/{name}", folder(cfg, run_dir) / name,
                 {**common, **BENCHMARKS[entry["kind"]].settings(cfg, name)})
            for name, entry in select(suite(cfg), cfg.eval.only).items()]


def run(job: Job) -> None:
    """Evaluate the job's benchmarks, marking each complete as its numbers come in, then write the suite's
    metrics.json with every chosen benchmark (those done before read from their markers)."""
    cfg, out = job.cfg, folder(job.cfg, job.run_dir)
    chosen = select(suite(cfg), cfg.eval.only)
    todo = [unit.path.name for unit in job.units]
    out.mkdir(parents=True, exist_ok=True)
    model_path, tokenizer_path = job.model.paths(cfg, job.run_dir)
    log.info("eval: %s on %d benchmarks: %s", model_path, len(todo), ", ".join(todo))
    if is_main():
        write_json(out / "suite.json", {"suite": cfg.eval.name, "checkpoint": model_path, "benchmarks": chosen})

    def done(name: str, metrics: dict) -> None:  # a partial result (say, no win rate) is not done
        if all(key in metrics for key in chosen[name]["headlines"]):
            job.finish(f"eval/{cfg.eval.name}/{name}", {"metrics": metrics, "checkpoint": model_path})

    lm = functools.cache(lambda: harness.load_lm(cfg, model_path, tokenizer_path))
    context = Context(cfg, out, model_path, tokenizer_path, lm, LazyGenerator(lambda: generator(context)), done)
    found: dict[str, dict] = {}
    for kind, benchmark in BENCHMARKS.items():
        names = [n for n in todo if chosen[n]["kind"] == kind]
        if names and (benchmark.all_ranks or is_main()):
            found |= benchmark.run(context, names)
    release(lm)
    if not is_main():  # generation runs in one process; lm-eval alone is data parallel
        return
    for name in set(chosen) - set(todo):  # finished under their keys by an earlier command
        found[name] = (read_record(out / name / MARKER) or {}).get("metrics", {})
    metrics = {k: v for m in found.values() for k, v in m.items()}
    missing = missing_reasons(chosen, metrics, out)
    protocols = {}
    for kind, benchmark in BENCHMARKS.items():
        protocols |= benchmark.protocol(out, [n for n, e in chosen.items() if e["kind"] == kind])
    if any(BENCHMARKS[entry["kind"]].generates for entry in chosen.values()):
        protocols["generation"] = engine(cfg.eval.generation)  # the engine every generating benchmark's key names
    write_json(out / "metrics.json", {**metrics, "missing": missing, **protocols})
    summary(chosen, metrics, missing, out)


def generator(context: Context) -> Generator:
    """The generating benchmarks' engine (eval.generation): HF on the model lm-eval already holds (its HF backend),
    else on the model scored in eval.dtype; or vLLM in its worker, after lm-eval's model has left the GPU."""
    cfg = context.cfg
    held = context.lm.cache_info().currsize and hasattr(context.lm(), "model")
    if engine(cfg.eval.generation)["backend"] == "vllm":
        release(context.lm)
        gc.collect()
        torch.cuda.empty_cache()
    elif held:
        lm = context.lm()
        g = cfg.eval.generation
        return hf_generator(lm.model, lm.tokenizer, g.batch_size, g.hf_batching == "continuous")
    return make_generator(cfg.eval.generation, context.model_path, context.tokenizer_path, dtype=cfg.eval.dtype,
                          seed=cfg.seed,
                          load_hf=lambda: load_inference(context.model_path, context.tokenizer_path, cfg.eval.dtype))


def release(lm) -> None:
    """Free the suite's lm-eval model (`lm`: its cached loader), if it was loaded."""
    if lm.cache_info().currsize:
        harness.release(lm())
    lm.cache_clear()


def missing_reasons(chosen: dict, metrics: dict, out: Path) -> dict[str, str]:
    """Why a chosen benchmark lacks a number: the reasons its own folder recorded (a headline's or any other metric's,
    e.g. AlpacaEval's LC win rate beside a raw one), else 'no result' for its absent headlines."""
    missing = {}
    for name, entry in chosen.items():
        absent = [key for key in entry["headlines"] if key not in metrics]
        reasons = (read_json(out / name / "metrics.json") or {}).get("missing")
        if reasons:
            missing[name] = json.dumps(reasons)
        elif absent:
            missing[name] = f"no result for {', '.join(absent)}"
    return missing


def summary(chosen: dict, metrics: dict, missing: dict, out: Path) -> None:
    """The stage's last lines: each benchmark's headline numbers and why any of its metrics has none, and where they
    are."""
    for name, entry in chosen.items():
        scored = [f"{k} {metrics[k]:.2f}" for k in entry["headlines"] if k in metrics]
        if not scored:
            log.warning("eval: %s: no result (%s)", name, missing.get(name, "")[:200])
        elif name in missing:
            log.warning("eval: %s: %s; missing: %s", name, ", ".join(scored), missing[name][:200])
        else:
            log.info("eval: %s: %s", name, ", ".join(scored))
    log.info("eval: metrics in %s", out / "metrics.json")


# ------------------------------------------------------------------------------------------ for the report ------


def owner(eval_dir: Path, key: str) -> tuple[str, dict]:
    """(benchmark name, its entry) of the suite in `eval_dir` that reported `key`."""
    benchmarks = read_json(Path(eval_dir) / "suite.json")["benchmarks"]
    for name, entry in benchmarks.items():
        if BENCHMARKS[entry["kind"]].owns(name, key):
            return name, entry
    raise KeyError(f"{eval_dir}/suite.json: no benchmark reports {key!r}")


def items(eval_dir: Path, key: str) -> dict[str, float]:
    """Per-item scores behind `key` of `<run>/eval/<suite>/metrics.json`, checked to average to the reported value."""
    eval_dir = Path(eval_dir)
    reported = read_json(eval_dir / "metrics.json").get(key)
    if not isinstance(reported, (int, float)):
        raise KeyError(f"{eval_dir / 'metrics.json'}: no number for {key!r}")
    name, entry = owner(eval_dir, key)
    scores = BENCHMARKS[entry["kind"]].items(eval_dir / name, key, entry)
    mean = float(np.mean(list(scores.values())))
    if not np.isclose(mean, reported, rtol=1e-9, atol=1e-9):
        raise ValueError(f"{eval_dir}: the {len(scores)} per-item scores of {key!r} average {mean!r}, but "
                         f"metrics.json reports {reported!r}")
    return scores


def stderr(eval_dir: Path, key: str, settings: StatsConfig = StatsConfig()) -> float:
    """The standard error of `key`: the benchmark tool's own where it reports one, else a bootstrap over its items."""
    name, entry = owner(eval_dir, key)
    return BENCHMARKS[entry["kind"]].stderr(Path(eval_dir) / name, key, entry, settings)
