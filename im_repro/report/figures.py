"""Figures from runs, each drawn only from data (a reason instead of an empty plot): loss curves, the loss
histograms of Figures 3, 8 and 9, and the two panels of Figure 2."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from im_repro import paper, stats
from im_repro.config import StatsConfig
from im_repro.report.collect import Run, dig, identity, number
from im_repro.report.tables import (AE1, EVAL_COLUMNS, KEYS, TABLES, Column, Items, TableSpec, build, eval_cells,
                                    eval_items, length_cells, order, paper_row, stats_cells)
from im_repro.common import read_jsonl

FIGURE_FILES = (".png", ".pdf")

# ------------------------------------------------------------------------------------------ figures -----------


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def run_label(run: Run) -> str:
    ident = identity(run)
    return f"{ident['dataset']} {ident['method']} (seed {ident['seed']})"


CURVES = ("output_loss", "instruction_loss")


def curves(runs: Sequence[Run], baseline: str):
    """Per-step output and instruction loss of every run (train/log.jsonl): IT against IM. Each point is the loss on
    one step's training batch (as logged while training), not a held-out loss: the captions say so."""
    series = {}
    for run in runs:
        records = read_jsonl(run.path / "train" / "log.jsonl", missing_ok=True)
        for key in CURVES:
            points = [(r["step"], r[key]) for r in records if "step" in r and number(r.get(key)) is not None]
            if points:
                series[run, key] = points
    if not series:
        return f"no run has per-step {' or '.join(CURVES)} in train/log.jsonl"
    plt = pyplot()
    fig, axes = plt.subplots(1, len(CURVES), figsize=(11, 4.2))
    for ax, key in zip(axes, CURVES):
        for i, run in enumerate(runs):
            if (run, key) in series:
                steps, losses = zip(*series[run, key])
                style = "-" if identity(run)["method"] == baseline else "--"
                ax.plot(steps, losses, style, color=f"C{i % 10}", label=run_label(run))
        ax.set(title=f"training {key.replace('_', ' ')}: each point one optimizer step's batch",
               xlabel="optimizer step", ylabel="mean token loss on that batch (nats)")
        ax.legend(fontsize=7)
    return fig


def split_losses(run: Run, split: str) -> list[float]:
    values = (number(r.get("loss")) for r in read_jsonl(run.path / "heldout_loss" / f"{split}.jsonl", missing_ok=True))
    return [v for v in values if v is not None]


def loss_histograms(runs: Sequence[Run], baseline: str):
    """Per-example output loss on the training and the held-out set (Figures 3, 8, 9): one panel per run."""
    import numpy as np

    panels = {run: (split_losses(run, "train"), split_losses(run, "test")) for run in runs}
    panels = {run: splits for run, splits in panels.items() if splits[0] or splits[1]}
    if not panels:
        return "no run has per-example losses in heldout_loss/train.jsonl or heldout_loss/test.jsonl"
    idents = {run: identity(run) for run in panels}
    lines = sorted({(i["model"], i["dataset"]) for i in idents.values()}, key=str)
    methods = sorted({i["method"] for i in idents.values()}, key=lambda m: order({"method": m}))
    plt = pyplot()
    fig, axes = plt.subplots(len(lines), len(methods), figsize=(4.5 * len(methods), 3.4 * len(lines)),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    figure_rows = paper.load("figure3_8_9")
    for run, (train, test) in panels.items():
        i = idents[run]
        ax = axes[lines.index((i["model"], i["dataset"])), methods.index(i["method"])]
        ax.axis("on")
        low, high = min(train + test), max(train + test)
        bins = np.linspace(low, high, 40) if high > low else 10
        for split, values in (("train", train), ("test", test)):
            if values:
                ax.hist(values, bins=bins, alpha=0.5, label=f"{split}: mean {sum(values) / len(values):.2f}")
        theirs = paper_row(TABLES["losses"], figure_rows, i)
        title = f"{i['dataset']} {i['method']} ({i['model']}, seed {i['seed']})"
        if theirs:
            title += f"\npaper: train {theirs['train_loss']:.2f}, test {theirs['test_loss']:.2f}"
        ax.set(title=title, xlabel="per-example mean token loss (nats)", ylabel="examples")
        ax.title.set_fontsize(9)
        ax.legend(fontsize=8)
    return fig


@dataclass(frozen=True)
class Point:
    label: str
    x: float
    gain: float  # relative AlpacaEval 1.0 improvement of IM over the baseline, in percent


def figure2_points(runs: Sequence[Run], baseline: str, x: str) -> list[Point] | str:
    """IM's relative AlpacaEval 1.0 gain over the baseline per model and dataset, against a training-set statistic."""
    spec = TableSpec("", KEYS, (AE1, Column(x, x)), lambda run: eval_cells(run) | stats_cells(run))
    rows = {tuple(r.keys.values()): r for r in build(spec, runs, baseline)}
    points, whys = [], []
    for (model, dataset, method), row in rows.items():
        ref = rows.get((model, dataset, baseline))
        if method != "im" or ref is None:
            continue
        cells = {f"{dataset}/{baseline} AlpacaEval 1.0": ref.cells[AE1.name],
                 f"{dataset}/im AlpacaEval 1.0": row.cells[AE1.name], f"{dataset} {x}": row.cells[x]}
        absent = [f"{name}: {cell.why}" for name, cell in cells.items() if cell.value is None]
        if absent:
            whys += absent
            continue
        theirs, ours, at = (cell.value for cell in cells.values())
        if theirs == 0:
            whys.append(f"{dataset}/{baseline} AlpacaEval 1.0 is 0, so a relative gain is undefined")
            continue
        points.append(Point(f"{dataset} ({model})", at, 100 * (ours - theirs) / theirs))
    if points:
        return points
    reason = f"no model and dataset has AlpacaEval 1.0 win rates for both {baseline} and im, and its {x}"
    return reason + (": " + "; ".join(whys[:3]) if whys else "")


LOGS = {"ln": math.log, "log10": math.log10}


def figure2(runs: Sequence[Run], baseline: str, panel: str, x: str, xlabel: str):
    """One panel of Figure 2: our points and the paper's fitted line (y = slope * log(x) + intercept)."""
    import numpy as np

    points = figure2_points(runs, baseline, x)
    if isinstance(points, str):
        return points
    fit = paper.lookup("figure2", panel=panel)
    xs = [p.x for p in points] + list(fit.get("x_range") or [])
    line_x = np.geomspace(min(xs) / 1.5, max(xs) * 1.5, 100)
    line_y = [fit["slope"] * LOGS[fit["x_transform"]](v) + fit["intercept"] for v in line_x]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    ax.plot(line_x, line_y, "--", color="gray",
            label=f"paper's fit: y = {fit['slope']} {fit['x_transform']}(x) + {fit['intercept']}")
    ax.scatter([p.x for p in points], [p.gain for p in points], color="C0", zorder=3, label="ours")
    for p in points:
        ax.annotate(p.label, (p.x, p.gain), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_xscale("log")
    ax.set(xlabel=xlabel, ylabel=f"AlpacaEval 1.0: (IM - {baseline}) / {baseline} (%)")
    ax.legend(fontsize=8)
    return fig


def plw_categories(runs: Sequence[Run], baseline: str, settings: StatsConfig = StatsConfig()):
    """Score vs prompt-loss weight (method=weighted runs), one panel per Table 1 column and one series per dataset:
    each run a point with its 95% interval (1.96 standard errors), and the quadratic fit of Huerta-Enochian & Ko with
    its coefficients' intervals in the legend (or why it could not be fitted)."""
    import numpy as np

    weighted = [r for r in runs if dig(r.config, "method.mask") == "weighted"]
    points: dict[tuple[str, str], list[tuple[float, float, float | None]]] = {}
    for run in weighted:
        cells, found = eval_cells(run), eval_items(run, settings)
        for column in EVAL_COLUMNS:
            if cells[column].value is not None:
                se = found.get(column)
                points.setdefault((column, identity(run)["dataset"]), []).append(
                    (float(dig(run.config, "method.prompt_loss_weight")), cells[column].value,
                     se.stderr if isinstance(se, Items) else None))
    if not points:
        return f"no method=weighted run has an evaluated score (of {len(weighted)} weighted runs)"
    columns = [c for c in EVAL_COLUMNS if any(k[0] == c for k in points)]
    plt = pyplot()
    fig, axes = plt.subplots(1, len(columns), figsize=(4.2 * len(columns), 4), squeeze=False)
    for ax, column in zip(axes[0], columns):
        for i, ((col, dataset), pts) in enumerate(sorted((k, v) for k, v in points.items() if k[0] == column)):
            w, y, se = (np.array([p[j] for p in pts], dtype=float) for j in range(3))
            ax.errorbar(w, y, yerr=np.where(np.isnan(se), 0, 1.96 * se), fmt="o", color=f"C{i}", capsize=3)
            try:
                fit = stats.quadratic_fit(w, y)
            except ValueError as e:
                ax.plot([], [], "o", color=f"C{i}", label=f"{dataset}: no fit ({e})")
                continue
            (a, b, c), ((al, ah), (bl, bh), _) = fit.coefficients, fit.intervals
            grid = np.linspace(w.min(), w.max(), 100)
            ax.plot(grid, fit(grid), "-", color=f"C{i}",
                    label=f"{dataset}: a={a:.3g} [{al:.3g}, {ah:.3g}], b={b:.3g} [{bl:.3g}, {bh:.3g}], c={c:.3g}")
        ax.set(title=column, xlabel="prompt-loss weight", ylabel="score")
        ax.legend(fontsize=6)
    return fig


def length_winrate(runs: Sequence[Run], baseline: str):
    """Win rate against mean output length (tokens), one point per run, a colour per method: AlpacaEval 2.0 raw
    (filled) and length-controlled (hollow), and MT-Bench."""
    points = [(identity(run)["method"], length_cells(run)) for run in runs]
    panels = (("ae_tokens_mean", ("ae_win_rate", "ae_lc_win_rate"), "AlpacaEval 2.0 win rate (%)"),
              ("mt_tokens_mean", ("mt_bench",), "MT-Bench score (1-10)"))
    if not any(c[x].value is not None and c[y].value is not None for _, c in points for x, ys, _ in panels for y in ys):
        return "no run has an output length beside an AlpacaEval 2.0 win rate or an MT-Bench score"
    methods = sorted({m for m, _ in points}, key=lambda m: order({"method": m}))
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, (x, ys, label) in zip(axes, panels):
        for y in ys:
            for i, method in enumerate(methods):
                xy = [(c[x].value, c[y].value) for m, c in points
                      if m == method and c[x].value is not None and c[y].value is not None]
                if xy:
                    lc = y.endswith("lc_win_rate")
                    ax.scatter(*zip(*xy), s=40, color=f"C{i}", facecolors="none" if lc else f"C{i}",
                               label=f"{method}{' (length-controlled)' if lc else ''}")
        ax.set(xlabel="mean output length (tokens)", ylabel=label)
        ax.legend(fontsize=7)
    return fig


FIGURES: dict[str, Callable[[Sequence[Run], str], Any]] = {
    "length_winrate": length_winrate,
    "plw_categories": plw_categories,
    "curves": curves,
    "loss_histograms": loss_histograms,
    "figure2_ratio": partial(figure2, panel="left", x="instruction_per_output",
                             xlabel="instruction length / output length (ratio of the means)"),
    "figure2_size": partial(figure2, panel="right", x="size", xlabel="training examples"),
}


def write_figure(name: str, runs: Sequence[Run], label: str, baseline: str, out: Path) -> list[str] | str:
    """The figure's files, or why it was not drawn."""
    fig = FIGURES[name](runs, baseline)
    if isinstance(fig, str):
        return fig
    plt = pyplot()
    if label:
        fig.suptitle(label, fontsize=9)
    fig.tight_layout()
    paths = [out / f"{name}{suffix}" for suffix in FIGURE_FILES]
    for path in paths:
        fig.savefig(path, dpi=150, metadata={"Title": f"{name}: {label}" if label else name})
    plt.close(fig)
    return [str(p) for p in paths]


