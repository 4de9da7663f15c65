"""What a benchmark is: the one protocol the eval stage, the run store's keys, the statistics and the report read.

A benchmark module implements `Benchmark` once (its settings and key, how it runs, its headline metrics, how to read
its per-item scores) and is listed in `evaluate/suite.py`'s registry; no other module spells its name or its metric
names. One `Benchmark` may stand for several benchmarks of a suite (every lm-eval task of `eval.harness.tasks`); each
has its own folder `eval/<suite>/<name>/` and its own key.

What the suite records of each benchmark (`entry`, in `eval/<suite>/suite.json`, which the report reads without
importing configs): its kind, its Table 1 category and direction, the metrics it must produce to count as done
(`headlines`), the one its category averages (`score`), the Table 1 columns it fills on its own (`columns`), and the
other numbers it reports that a suite's own table shows beside its headlines (`more`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from im_repro import keys, stats
from im_repro.config import StatsConfig, plain
from im_repro.evaluate.generate import engine


@dataclass
class Context:
    """What a benchmark gets to run: the config, the suite's folder (a benchmark writes under `out/<name>/`), the
    model to score, lm-eval's model (`lm()`) and a generator (`eval.generation`'s engine), each loaded on first use
    and once (an HF generator reuses lm-eval's HF model when it is loaded), and `done(name, metrics)`, which marks a benchmark complete the moment
    its numbers are in."""

    cfg: Any
    out: Path
    model_path: str
    tokenizer_path: str
    lm: Callable[[], Any]
    generator: Any
    done: Callable[[str, dict], None]

    @property
    def template(self) -> str:
        return plain(self.cfg.prepare.template)

    @property
    def model_name(self) -> str:
        """The label judges and leaderboards show for the model."""
        return Path(self.model_path).name


class Benchmark:
    """One kind of benchmark. A subclass sets `kind` (its registry name, its config group `eval.<kind>` and, when it
    stands for one benchmark, that benchmark's name and folder) and implements `run` and `items`."""

    kind: str = ""
    excluded: tuple[str, ...] = ()  # its own settings that cannot change its output: left out of its key
    all_ranks: bool = False  # runs in every process of a launch (lm-eval is data parallel); else in rank 0 alone
    generates: bool = False  # generates through `context.generator`: the engine (eval.generation) is in its key

    def names(self, eval_cfg) -> list[str]:
        """The benchmarks of this kind the suite holds: itself when `eval.<kind>.enabled`."""
        return [self.kind] if eval_cfg[self.kind].enabled else []

    def entry(self, eval_cfg, name: str) -> dict:
        """What the suite records of the benchmark (module docstring); a subclass adds its headlines."""
        return {"kind": self.kind, "category": eval_cfg[self.kind].category, "higher_is_better": True,
                "headlines": [], "score": None, "columns": {}, "more": []}

    def settings(self, cfg, name: str) -> dict:
        """Its own resolved settings less `excluded`, how prompts are rendered and, for a benchmark that generates,
        the engine that generates (greedy outputs of two engines may differ in the last bits): part of its key."""
        found = {self.kind: keys.without(keys.plain_dict(cfg.eval[self.kind]), self.excluded),
                 **keys.template_settings(cfg)}
        return {**found, "generation": engine(cfg.eval.generation)} if self.generates else found

    def owns(self, name: str, key: str) -> bool:
        """Whether `key` of the suite's metrics.json is one of this benchmark's numbers."""
        return key == name or key.startswith(f"{name}/")

    def run(self, context: Context, names: list[str]) -> dict[str, dict[str, float]]:
        """Evaluate `names` into `context.out/<name>/`, calling `context.done` as each finishes; returns each one's
        flat metrics (those it has: a benchmark that cannot finish here says why in its folder's metrics.json). By
        default the benchmark stands alone: `evaluate` it, then mark it done."""
        metrics = self.evaluate(context, context.cfg.eval[self.kind], context.out / self.kind)
        context.done(self.kind, metrics)
        return {self.kind: metrics}

    def evaluate(self, context: Context, settings, out: Path) -> dict[str, float]:
        """A benchmark that stands alone: evaluate it with its `settings` (eval.<kind>) into `out`."""
        raise NotImplementedError

    def items(self, folder: Path, key: str, entry: dict) -> dict[str, float]:
        """Per-item scores behind `key`, read from the benchmark's folder: one number per item (a document, a problem,
        an instruction, a question), in the metric's unit, whose plain mean is the reported number."""
        raise NotImplementedError

    def stderr(self, folder: Path, key: str, entry: dict, settings: StatsConfig) -> float:
        """The standard error of `key`: a bootstrap over its items unless the benchmark's tool reports its own."""
        return stats.bootstrap_stderr(list(self.items(folder, key, entry).values()), settings)

    def protocol(self, out: Path, names: list[str]) -> dict:
        """How its numbers were made, for the suite's metrics.json (lm-eval's version and seeds, say)."""
        return {}


class Judged(Benchmark):
    """A benchmark whose answers a judge grades (AlpacaEval, MT-Bench, Arena-Hard): its module's `run(settings,
    generator, tokenizer, template, out, *, model_name)` generates in the model's chat format and asks the judge
    (`eval.<kind>.judge`, whose credentials cannot change a verdict)."""

    excluded = ("enabled", "category", "judge.api_key_env", "judge.max_retries")
    generates = True

    def evaluate(self, context: Context, settings, out: Path) -> dict[str, float]:
        run = sys.modules[type(self).__module__].run  # looked up per call: a test may replace the module's run
        return run(settings, context.generator, context.generator.tokenizer, context.template, out,
                   model_name=context.model_name)
