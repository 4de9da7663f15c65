"""The eval stage: a checkpoint through the chosen suite, every number into `<run>/eval/<suite>/metrics.json`.

    im-repro stages=[eval] eval=smoke model.path=<checkpoint>
    im-repro stages=[prepare,train,eval] eval=paper eval.only=[commonsense,humaneval]

Results are stored per suite (`eval.name`), so two suites of one checkpoint live side by side. Each benchmark
writes under its own folder `<run>/eval/<suite>/<benchmark>/` (lm-eval's results and samples, generations, judge
annotations), a unit with its own key (im_repro/keys.py): the entrypoint passes only the benchmarks not yet done
under this key. Open-ended benchmarks resume: only missing generations and judgments are produced. A benchmark
that cannot finish here (no judge key, code execution not opted in) is listed with its reason in `metrics.json`
under `missing`, never given a number.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from im_repro.config import plain
from im_repro.runs import MARKER, StageOutput, read_record, write_json

log = logging.getLogger("im_repro")
OPEN_ENDED = ("humaneval", "alpaca_eval", "mt_bench")


def suite(cfg) -> dict[str, dict]:
    """Every benchmark the eval config enables: {name: {kind, category, higher_is_better, ...}}."""
    e = cfg.eval
    benchmarks = {
        name: {"kind": "harness", "category": t.category, "higher_is_better": t.higher_is_better, "task": t.task,
               "metric": t.metric, "num_fewshot": t.num_fewshot, "scale": t.scale}
        for name, t in e.harness.tasks.items()
    }
    if e.humaneval.enabled:
        benchmarks["humaneval"] = {"kind": "humaneval", "category": e.humaneval.category, "higher_is_better": True}
    if e.alpaca_eval.enabled:
        benchmarks["alpaca_eval"] = {"kind": "alpaca_eval", "category": "llm_judged", "higher_is_better": True}
    if e.mt_bench.enabled:
        benchmarks["mt_bench"] = {"kind": "mt_bench", "category": "llm_judged", "higher_is_better": True}
    return benchmarks


def select(benchmarks: dict[str, dict], only) -> dict[str, dict]:
    """The benchmarks named in `eval.only` by name or category (all when unset); unknown names are an error."""
    if not only:
        return benchmarks
    known = set(benchmarks) | {b["category"] for b in benchmarks.values()}
    unknown = sorted(set(only) - known)
    if unknown:
        raise ValueError(f"eval.only={list(only)}: {unknown} is neither a benchmark nor a category of this suite; "
                         f"choose from {sorted(known)}")
    return {n: b for n, b in benchmarks.items() if n in only or b["category"] in only}


def suite_dir(cfg, run_dir: Path) -> Path:
    return run_dir / "eval" / cfg.eval.name


def checkpoint(cfg, run_dir: Path) -> tuple[str, str]:
    """(model, tokenizer) to evaluate: eval.checkpoint, else this run's trained model, else the base model
    (keys.evaluated_model keys the result the same way)."""
    if cfg.eval.checkpoint:
        return cfg.eval.checkpoint, cfg.eval.checkpoint
    if StageOutput(run_dir / "train").complete:
        final = str(run_dir / "train" / "final")
        return final, final
    if "train" in cfg.stages and "train" not in cfg.skip_stages:  # the base model's numbers would pass for its own
        raise FileNotFoundError(f"{run_dir / 'train'} is not complete: this run trains, so train before evaluating")
    from im_repro import model as model_lib

    tokenizer = cfg.model.tokenizer or cfg.model.path
    if cfg.model.chat_template and cfg.model.init == "pretrained":
        # The untuned model prompted through the template it borrows, saved so every backend loads it.
        tokenizer = str(run_dir / "eval" / "base_tokenizer")
        if not (Path(tokenizer) / "tokenizer_config.json").exists():
            model_lib.load_tokenizer(cfg.model).save_pretrained(tokenizer)
    if cfg.model.init == "pretrained":
        return cfg.model.path, tokenizer
    # An untrained random model: evaluated only as a smoke test of the pipeline, saved so every backend loads it.
    from transformers import set_seed

    path = run_dir / "eval" / "random_init"
    if not (path / "config.json").exists():
        log.warning("eval: model.init=random and no trained checkpoint: evaluating the random initialisation")
        set_seed(cfg.seed)
        tok = model_lib.load_tokenizer(cfg.model)
        model_lib.load_model(cfg.model, len(tok)).save_pretrained(str(path))
        tok.save_pretrained(str(path))
    return str(path), str(path)


class LazyGenerator:
    """Loads the model on the first generation, so a re-run with every generation cached loads nothing."""

    def __init__(self, load):
        self._load, self._generator = load, None

    def __getattr__(self, name):
        if self._generator is None:
            self._generator = self._load()
        return getattr(self._generator, name)


def run(cfg, run_dir: Path, todo: list[str]) -> dict[str, dict]:
    """Evaluate the benchmarks in `todo`, then write the suite's metrics.json with every chosen benchmark (the others
    read from their completion markers). Returns {benchmark: summary} for each of `todo` that has its numbers."""
    from im_repro.evaluate import harness
    from im_repro.evaluate.generate import Generator

    out = suite_dir(cfg, run_dir)
    chosen = select(suite(cfg), cfg.eval.only)
    out.mkdir(parents=True, exist_ok=True)
    model_path, tokenizer_path = checkpoint(cfg, run_dir)
    log.info("eval: %s on %d benchmarks: %s", model_path, len(todo), ", ".join(todo))
    write_json(out / "suite.json", {"suite": cfg.eval.name, "checkpoint": model_path, "benchmarks": chosen})

    found: dict[str, dict[str, float]] = {}  # benchmark -> its flat metrics
    lm = None
    names = [n for n in todo if chosen[n]["kind"] == "harness"]
    if names:
        lm = harness.load_lm(cfg, model_path, tokenizer_path)
        values = harness.run(cfg, lm, names, out)
        found |= {n: {n: values[n]} for n in names if n in values}

    if int(os.environ.get("RANK", 0)) != 0:  # generation runs in one process; lm-eval alone is data-parallel
        return {}

    def load_generator():
        if lm is not None and hasattr(lm, "model"):  # the HF model lm-eval already holds
            return Generator(lm.model, lm.tokenizer, cfg.eval.generation_batch_size)
        return Generator(*load_for_generation(cfg, model_path, tokenizer_path), cfg.eval.generation_batch_size)

    generator = LazyGenerator(load_generator)
    template = plain(cfg.prepare.template)
    e, name = cfg.eval, Path(model_path).name
    if "humaneval" in todo:
        from im_repro.evaluate import humaneval

        found["humaneval"] = humaneval.run(e.humaneval, generator, out / "humaneval", seed=cfg.seed)
    if "alpaca_eval" in todo:
        from im_repro.evaluate import alpaca

        found["alpaca_eval"] = alpaca.run(e.alpaca_eval, generator, generator.tokenizer, template,
                                          out / "alpaca_eval", model_name=name)
    if "mt_bench" in todo:
        from im_repro.evaluate import mtbench

        found["mt_bench"] = mtbench.run(e.mt_bench, generator, generator.tokenizer, template, out / "mt_bench",
                                        model_name=name)
    for done in set(chosen) - set(todo):  # finished under this key by an earlier command
        found[done] = (read_record(out / done / MARKER) or {}).get("metrics", {})
    metrics = {k: v for m in found.values() for k, v in m.items()}
    missing = missing_reasons(cfg, chosen, metrics, out)
    # How the lm-eval numbers were made (version, seeds, aggregation), next to them
    scored = [n for n, b in chosen.items() if b["kind"] == "harness"]
    protocol = {"lm_eval": harness.protocol(scored, out)} if scored else {}
    write_json(out / "metrics.json", {**metrics, "missing": missing, **protocol})
    if missing:
        log.warning("eval: no result for %s (see %s)", ", ".join(missing), out / "metrics.json")
    return {n: {"metrics": found[n], "checkpoint": model_path} for n in todo if n in found and n not in missing}


def load_for_generation(cfg, model_path: str, tokenizer_path: str):
    import torch

    from im_repro.evaluate.generate import load_inference

    dtype = cfg.eval.dtype
    return load_inference(model_path, tokenizer_path, dtype if dtype == "auto" else getattr(torch, dtype))


def headline_keys(name: str, cfg) -> list[str]:
    """The metrics a benchmark must produce to count as done (a partial result, say no win rate, is not)."""
    if name == "humaneval":
        return ["humaneval/pass@1"]
    if name == "alpaca_eval":
        return [f"alpaca_eval_{v}/win_rate" for v in cfg.eval.alpaca_eval.versions]
    if name == "mt_bench":
        return ["mt_bench/score"]
    return [name]


def missing_reasons(cfg, chosen: dict, metrics: dict, eval_dir: Path) -> dict[str, str]:
    """Why a chosen benchmark has no number: the reason its own folder recorded, or 'no result'."""
    missing = {}
    for name in chosen:
        absent = [key for key in headline_keys(name, cfg) if key not in metrics]
        if absent:
            own = eval_dir / name / "metrics.json"
            reasons = json.loads(own.read_text()).get("missing") if own.exists() else None
            missing[name] = json.dumps(reasons) if reasons else f"no result for {', '.join(absent)}"
    return missing
