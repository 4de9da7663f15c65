"""Uncertainty for the report, from per-item scores: bootstrap standard errors, paired bootstrap intervals of the
difference between two runs, and the quadratic fit of score against the prompt-loss weight (Huerta-Enochian & Ko,
arXiv 2401.13586). Nothing here reads files or re-runs an evaluation: each benchmark reads its own per-item scores
(`Benchmark.items`), *contributions* whose plain mean is the number it reported.

The bootstrap is scipy.stats.bootstrap (BCa by default); a paired difference resamples the per-item differences of
the items both runs scored, and a mean of several cells (a category) resamples each cell's items apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
from scipy import stats as sps

from im_repro.config import StatsConfig

Items = Mapping[str, float]  # item id -> contribution; the plain mean is the cell


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


# --- along the prompt-loss weight ------------------------------------------------------------------

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
