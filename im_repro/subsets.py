"""Figure 2's Tulu V2 subsets (PAPER.md §4.2): fixed size at a chosen instruction/output length ratio, and nested
sizes at a fixed ratio. Pure and seeded: the same examples and seed give the same indices.

Lengths are Table 5's (`data.message_length`: whitespace words + 1 per message; instruction = user and system
messages, output = assistant messages), the unit `data.length_stats` reports.

The selection rule. The paper says only "3,000 examples each with ratio ≈5, 10 and 15" (App. C) and, for the sizes,
"selected randomly" at a ratio "approximately 10". The released `select_data.py` shuffles (unseeded), then sorts by
|per-example ratio - target| and keeps the first `target_count`. Here:

* `ratio_controlled`: the same rule with a seeded shuffle (which only breaks ties): the n examples whose own ratio is
  closest to the target. All of them must lie within `tolerance` (relative: |r - target| <= tolerance x target),
  otherwise a `SubsetError` says how many do. The ratio of the subset's means (Table 5's and Figure 2's x axis) is
  a weighted mean of the per-example ratios, so it lies within the same tolerance.
* `size_controlled`: the pool is `ratio_controlled`'s selection for the largest size; each size is the first `size`
  examples of one seeded permutation of that pool. The subsets are nested, each a uniform random sample of the same
  pool, so they differ in size only, not in length profile.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from im_repro.data import example_lengths, length_stats

PAPER_RATIOS = (5, 10, 15)
# Figure 2 (right) spans 1,000 to 35,000 examples on a log axis; the sizes in between are not given (PAPER.md §4.2).
PAPER_SIZES = (1000, 2000, 5000, 10000, 20000, 35000)


class SubsetError(ValueError):
    """Not enough examples near the requested ratio."""


@dataclass(frozen=True)
class Subset:
    indices: list[int]  # into the examples given, in file order
    stats: dict  # the rule's settings and what was achieved


def per_example_ratios(examples: list[dict]) -> np.ndarray:
    """instruction / output length; inf for an example without an assistant message (never selected)."""
    instruction, output = example_lengths(examples)
    return np.where(output > 0, instruction / np.maximum(output, 1), np.inf)


def _closest(ratios: np.ndarray, target: float, n: int, seed: int, tolerance: float) -> tuple[np.ndarray, int]:
    """(the n indices closest to the target, ties broken by a seeded shuffle; how many lie within tolerance)."""
    if target <= 0 or tolerance < 0 or n < 1:
        raise ValueError(f"need target_ratio > 0, tolerance >= 0 and n >= 1; got {target}, {tolerance}, {n}")
    distance = np.abs(ratios - target)
    within = int(np.count_nonzero(distance <= tolerance * target))
    if within < n:
        raise SubsetError(
            f"only {within} of {len(ratios)} examples have an instruction/output length ratio within "
            f"{tolerance:.0%} of {target} ([{target * (1 - tolerance):g}, {target * (1 + tolerance):g}]); "
            f"{n} are needed: widen the tolerance, lower n or use a larger dataset"
        )
    shuffled = np.random.default_rng(seed).permutation(len(ratios))
    return shuffled[np.argsort(distance[shuffled], kind="stable")[:n]], within


def _stats(examples: list[dict], ratios: np.ndarray, chosen: np.ndarray, target: float) -> dict:
    r = ratios[chosen]
    lengths = length_stats([examples[i] for i in chosen])
    return {
        "size": len(chosen),
        "ratio_of_means": lengths["instruction_over_output"],  # Figure 2's x axis
        "per_example_ratio": {"mean": float(r.mean()), "median": float(np.median(r)), "min": float(r.min()),
                              "max": float(r.max())},
        "max_abs_deviation": float(np.abs(r - target).max()),
        "length_stats": lengths,
    }


def ratio_controlled(examples: list[dict], target_ratio: float, n: int = 3000, seed: int = 42,
                     tolerance: float = 0.1) -> Subset:
    """The n examples whose instruction/output ratio is closest to `target_ratio` (see the module docstring)."""
    ratios = per_example_ratios(examples)
    chosen, within = _closest(ratios, target_ratio, n, seed, tolerance)
    settings = {"rule": "closest_per_example_ratio", "target_ratio": target_ratio, "n": n, "seed": seed,
                "tolerance": tolerance, "examples": len(examples), "within_tolerance": within}
    return Subset(sorted(chosen.tolist()), {**settings, **_stats(examples, ratios, chosen, target_ratio)})


def size_controlled(examples: list[dict], sizes: tuple[int, ...] = PAPER_SIZES, target_ratio: float = 10.0,
                    seed: int = 42, tolerance: float = 0.1) -> dict[int, Subset]:
    """Nested subsets {size: Subset} at about `target_ratio`, drawn from one pool (see the module docstring)."""
    if not sizes or min(sizes) < 1:
        raise ValueError(f"sizes must be positive, got {list(sizes)}")
    ratios = per_example_ratios(examples)
    pool, within = _closest(ratios, target_ratio, max(sizes), seed, tolerance)
    order = pool[np.random.default_rng([seed, 1]).permutation(len(pool))]  # a stream apart from the tie-break's
    settings = {"rule": "nested_random_from_closest_pool", "target_ratio": target_ratio, "seed": seed,
                "tolerance": tolerance, "examples": len(examples), "within_tolerance": within, "pool": len(pool)}
    out = {}
    for size in sorted(sizes):
        chosen = order[:size]
        out[size] = Subset(sorted(chosen.tolist()), {**settings, **_stats(examples, ratios, chosen, target_ratio)})
    return out


def select(examples: list[dict], cfg) -> tuple[list[dict], dict | None]:
    """The examples a `data.subset` config keeps, in file order, and the subset's stats (None: no subset)."""
    if cfg.kind is None:
        return examples, None
    if cfg.kind == "ratio":
        subset = ratio_controlled(examples, cfg.target_ratio, cfg.n, cfg.seed, cfg.tolerance)
    elif cfg.kind == "size":
        if cfg.size not in cfg.sizes:
            raise ValueError(f"data.subset.size={cfg.size} is not one of data.subset.sizes={list(cfg.sizes)}")
        subset = size_controlled(examples, tuple(cfg.sizes), cfg.target_ratio, cfg.seed, cfg.tolerance)[cfg.size]
    else:
        raise ValueError(f"data.subset.kind must be null, ratio or size, got {cfg.kind!r}")
    return [examples[i] for i in subset.indices], subset.stats
