"""The report stage: an experiment's tables and figures from its run directories, beside the paper's numbers.

    python -m im_repro.report experiment=table1 'hydra.run.dir=${report.output_dir}/.hydra'

Every `{runs_dir}/{experiment}/*/manifest.json` is one run. Each table named in `report.tables` is written as
Markdown, CSV and LaTeX, each figure in `report.figures` as PNG and PDF, all under `report.output_dir`, together with
`report.json` (what was written, what was skipped and why, the runs used) and `summary.md`. A cell without a number
says why (the eval stage's `missing` reason, a failed stage, a stage never run); a figure without data is not drawn.

All tables come from one builder (`build`) driven by a `TableSpec`: which runs, which key columns identify a row,
which numbers a run gives (`measure`), the paper table to compare with and the row deltas are taken against.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from im_repro import paper
from im_repro.runs import REPO, git_state, now, read_jsonl, write_json

log = logging.getLogger("im_repro")

NONE = "—"  # a key that does not apply, or a number the paper does not give
METHOD_ORDER = ("base", "chat", "it", "neftune", "kl", "im", "im_neftune")
TABLE_FILES = (".md", ".csv", ".tex")
FIGURE_FILES = (".png", ".pdf")


# ------------------------------------------------------------------------------------------ reading runs ------


def dig(data: Any, path: str, default: Any = None) -> Any:
    """`data["a"]["b"]` for path "a.b", or `default` where a level is absent (older manifests lack newer keys)."""
    for part in path.split("."):
        if not isinstance(data, Mapping) or part not in data:
            return default
        data = data[part]
    return data


def number(value: Any) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def one_line(text: Any, limit: int = 300) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


@dataclass(frozen=True, eq=False)  # hashed by identity: figures key their series on runs
class Run:
    path: Path
    manifest: dict

    @property
    def config(self) -> dict:
        return self.manifest.get("config", {})

    def absent(self, stage: str, file: str) -> str:
        """Why `<run>/<stage>/<file>` does not exist, from the manifest's record of the stages."""
        stages = self.manifest.get("stages", {})
        own = stages.get(stage, {})
        if own.get("status") == "failed":
            return f"failed: {one_line(own.get('error'))}"
        failed = next(((name, s) for name, s in stages.items() if s.get("status") == "failed"), None)
        if failed:
            return f"not run: {failed[0]} failed: {one_line(failed[1].get('error'))}"
        if own.get("status") == "running":
            return f"{stage} did not finish"
        if own.get("status") == "done":
            return f"{stage} finished without writing {file}"
        return f"{stage} not run"


def load_runs(root: Path) -> list[Run]:
    """Every run directory under `root`: a folder with a manifest.json (others, e.g. Hydra's, are not runs)."""
    if not root.is_dir():
        return []
    return [Run(d, json.loads((d / "manifest.json").read_text()))
            for d in sorted(root.iterdir()) if (d / "manifest.json").is_file()]


def kl_mode(config: Mapping) -> str | None:
    mode = dig(config, "train.kl.mode", "none")
    return None if mode == "none" else mode


def method_name(config: Mapping) -> str:
    """The paper's method name from what a run did: it, im, neftune (IT + NEFTune), im_neftune, kl (IT + KL), ...

    Derived from the loss and the training switches rather than a free-form label, so a row cannot be misnamed.
    """
    if dig(config, "method") == "base":  # the untuned model: no loss or training switch applies
        return "base"
    extras = [name for name, on in (("neftune", bool(dig(config, "train.neftune_alpha"))),
                                    ("kl", kl_mode(config) is not None)) if on]
    loss = dig(config, "loss.name", "?")
    return "_".join(extras if loss == "it" and extras else [loss, *extras])


def identity(run: Run) -> dict[str, Any]:
    """Everything a table may key its rows on."""
    c = run.config
    kl = kl_mode(c)
    return {
        "model": dig(c, "model.name"),
        "dataset": None if method_name(c) == "base" else dig(c, "data.name"),  # the paper's base rows have none
        "method": method_name(c),
        "kl_mode": kl,
        "kl_lambda": dig(c, "train.kl.weight") if kl else None,
        "neftune_alpha": dig(c, "train.neftune_alpha") or None,
        "limit": dig(c, "data.limit"),
        "seed": dig(c, "seed"),
    }


# ------------------------------------------------------------------------------------------ measures ----------


@dataclass(frozen=True)
class Cell:
    value: float | None = None
    why: str = ""  # why there is no value


def json_cells(run: Run, stage: str, file: str, fields: Mapping[str, str]) -> dict[str, Cell]:
    """Numbers picked from one JSON file of a stage: {column: dotted path inside the file}."""
    data = read_json(run.path / stage / file)
    if data is None:
        why = run.absent(stage, file)
        return {column: Cell(why=why) for column in fields}
    cells = {}
    for column, path in fields.items():
        value = number(dig(data, path))
        cells[column] = Cell(value) if value is not None else Cell(why=f"{stage}/{file} has no number at {path}")
    return cells


# Table 1's LLM-judged columns: (benchmark in the eval suite, key in metrics.json).
JUDGED = {
    "mt_bench": ("mt_bench", "mt_bench/score"),
    "alpaca_eval_1": ("alpaca_eval", "alpaca_eval_1.0/win_rate"),
    "alpaca_eval_2": ("alpaca_eval", "alpaca_eval_2.0/win_rate"),
}
EVAL_COLUMNS = (*paper.TABLE1_CATEGORIES, "mean", *JUDGED)


def specific(reason: Any, key: str) -> str:
    """The eval stage stores some benchmarks' reasons as JSON {metric: reason}; keep the one for this metric."""
    try:
        parsed = json.loads(reason)
    except (TypeError, ValueError):
        return one_line(reason)
    return one_line(parsed.get(key, reason) if isinstance(parsed, dict) else reason)


def metric_cell(metrics: Mapping, suite: Mapping, benchmark: str, key: str) -> Cell:
    value = number(metrics.get(key))
    if value is not None:
        return Cell(value)
    reason = metrics.get("missing", {}).get(benchmark)
    if reason is not None:
        return Cell(why=specific(reason, key))
    if benchmark not in suite.get("benchmarks", {}):
        return Cell(why=f"{benchmark} is not in eval suite {suite.get('suite')!r}")
    return Cell(why=f"no {key} in eval/metrics.json")


def category_cell(metrics: Mapping, suite: Mapping, category: str) -> Cell:
    """The plain mean of the category's benchmarks, as the released code; TER arrives already scaled by eval."""
    names = [b for b, spec in suite.get("benchmarks", {}).items() if spec.get("category") == category]
    if not names:
        return Cell(why=f"eval suite {suite.get('suite')!r} has no {category} benchmark")
    cells = {b: metric_cell(metrics, suite, b, "humaneval/pass@1" if b == "humaneval" else b) for b in names}
    absent = [f"{b}: {c.why}" for b, c in cells.items() if c.value is None]
    if absent:
        return Cell(why="; ".join(absent))
    return Cell(sum(c.value for c in cells.values()) / len(cells))


def eval_cells(run: Run) -> dict[str, Cell]:
    """Table 1's columns from eval/metrics.json and eval/suite.json (which benchmark is in which category)."""
    metrics = read_json(run.path / "eval" / "metrics.json")
    suite = read_json(run.path / "eval" / "suite.json")
    if metrics is None or suite is None:
        why = run.absent("eval", "metrics.json" if metrics is None else "suite.json")
        return {column: Cell(why=why) for column in EVAL_COLUMNS}
    cells = {category: category_cell(metrics, suite, category) for category in paper.TABLE1_CATEGORIES}
    absent = [category for category, cell in cells.items() if cell.value is None]
    cells["mean"] = (Cell(why=f"needs all six categories; no {', '.join(absent)}") if absent
                     else Cell(paper.table1_mean({k: c.value for k, c in cells.items()})))
    return cells | {column: metric_cell(metrics, suite, *where) for column, where in JUDGED.items()}


def stats_cells(run: Run) -> dict[str, Cell]:
    return json_cells(run, "prepare", "data_stats.json", {
        "size": "length_stats.size", "total": "length_stats.total", "output": "length_stats.output",
        "output_std": "length_stats.output_std", "instruction": "length_stats.instruction",
        "instruction_std": "length_stats.instruction_std",
        "output_per_instruction": "length_stats.output_over_instruction",
        "instruction_per_output": "length_stats.instruction_over_output",
    })


def bleu_cells(run: Run) -> dict[str, Cell]:
    return json_cells(run, "memorization", "summary.json",
                      {"bleu": "mean_sentence_bleu", "corpus_bleu": "corpus_bleu"})


def loss_cells(run: Run) -> dict[str, Cell]:
    return json_cells(run, "loss", "summary.json", {"train_loss": "train.mean", "test_loss": "test.mean"})


# ------------------------------------------------------------------------------------------ tables ------------


@dataclass(frozen=True)
class Column:
    name: str  # the measure's key, and the paper's column of the same meaning
    header: str
    digits: int = 2


def every_run(ident: Mapping, baseline: str) -> bool:
    return True


@dataclass(frozen=True)
class TableSpec:
    title: str
    keys: tuple[str, ...]  # identity() fields that name a row; runs with equal keys (seeds) are averaged
    columns: tuple[Column, ...]
    measure: Callable[[Run], dict[str, Cell]]
    paper: str | None = None  # results/paper/<paper>.yaml
    paper_fixed: Mapping[str, Any] = field(default_factory=dict)  # paper key columns our runs do not vary
    # The baseline method -> the key values of the row a row's deltas are taken against (None: no deltas).
    reference: Callable[[str], dict[str, Any]] | None = None
    select: Callable[[Mapping, str], bool] = every_run  # (identity, baseline) -> does the run belong here
    selects: str = "every run"  # `select` in words, for the reason a table is skipped


@dataclass(frozen=True)
class Row:
    keys: dict[str, Any]
    runs: tuple[Run, ...]
    cells: dict[str, Cell]
    delta: dict[str, float]  # against the reference row, where both have a value
    paper: dict[str, Any] | None  # the paper's row; None where it has none


def by_baseline(baseline: str) -> dict[str, Any]:
    return {"method": baseline}


KEYS = ("model", "dataset", "method")
MEAN, AE1, AE2 = Column("mean", "Mean"), Column("alpaca_eval_1", "AE 1.0"), Column("alpaca_eval_2", "AE 2.0")
TABLES: dict[str, TableSpec] = {
    "table1": TableSpec(
        "Table 1: category means (%), their Mean, MT-Bench (1-10) and AlpacaEval win rates (%)", KEYS,
        (Column("knowledge", "Know."), Column("multilinguality", "Multiling."), Column("commonsense", "Commons."),
         Column("math_coding", "Math&Code"), Column("bbh", "BBH"), Column("safety", "Safety"), MEAN,
         Column("mt_bench", "MT-Bench"), AE1, AE2),
        eval_cells, paper="table1", reference=by_baseline),
    "table2": TableSpec(
        "Table 2: BLEU of greedy generations from the training instructions against the training outputs", KEYS,
        (Column("bleu", "BLEU (mean sentence)"), Column("corpus_bleu", "BLEU (corpus)")),
        bleu_cells, paper="table2", reference=by_baseline),
    "table3": TableSpec(
        "Table 3: KL regularisation towards the base model (Mean %, AlpacaEval %)",
        ("model", "dataset", "method", "kl_mode", "kl_lambda"), (MEAN, AE2, AE1),
        eval_cells, paper="table3", reference=lambda b: {"method": b, "kl_mode": None, "kl_lambda": None},
        select=lambda ident, b: ident["kl_mode"] is not None or ident["method"] == b,
        selects="runs with train.kl.mode set, and the baseline method's runs"),
    "table4": TableSpec(
        "Table 4: IM with and without NEFTune (AlpacaEval 1.0 %, Mean %)",
        ("model", "dataset", "method", "neftune_alpha"), (AE1, MEAN),
        eval_cells, paper="table4", reference=lambda b: {"method": "im", "neftune_alpha": None},
        select=lambda ident, b: ident["method"] in ("im", "im_neftune"), selects="im and im_neftune runs"),
    "table5": TableSpec(
        "Table 5: training-set statistics (lengths in words per example; ratios of the mean lengths)",
        ("dataset", "limit"),
        (Column("size", "Size", 0), Column("total", "Total"), Column("output", "Output"),
         Column("output_std", "Output std"), Column("instruction", "Instr."), Column("instruction_std", "Instr. std"),
         Column("output_per_instruction", "Out/Instr", 4), Column("instruction_per_output", "Instr/Out", 4)),
        stats_cells, paper="table5", paper_fixed={"fraction": 1.0}),
    "losses": TableSpec(
        "Figures 3, 8, 9: mean per-example output loss on the training set and the held-out set (nats)", KEYS,
        (Column("train_loss", "Train loss"), Column("test_loss", "Test loss")),
        loss_cells, paper="figure3_8_9", reference=by_baseline),
}


def order(keys: Mapping[str, Any]) -> tuple:
    """Rows sorted by their keys, methods in the paper's order (IT first, as the row deltas refer to it)."""
    return tuple((METHOD_ORDER.index(v) if k == "method" and v in METHOD_ORDER else len(METHOD_ORDER), str(v))
                 for k, v in keys.items())


def merge(cells: Sequence[Cell], runs: Sequence[Run]) -> Cell:
    """One cell from the runs of a row (seeds): their mean when every run has a value, else every run's reason."""
    if all(c.value is not None for c in cells):
        return Cell(sum(c.value for c in cells) / len(cells))
    if len(cells) == 1:
        return cells[0]
    whys = dict.fromkeys(f"{r.path.name}: {c.why}" for r, c in zip(runs, cells) if c.value is None)
    return Cell(why="; ".join(whys))


def paper_row(spec: TableSpec, table: paper.PaperTable | None, keys: Mapping[str, Any]) -> dict[str, Any] | None:
    if table is None:
        return None
    query = {k: keys[k] for k in table.keys if k in keys} | dict(spec.paper_fixed)
    try:
        return paper.lookup(table, **query)
    except KeyError:
        return None


def build(spec: TableSpec, runs: Sequence[Run], baseline: str) -> list[Row]:
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        ident = identity(run)
        if spec.select(ident, baseline):
            groups.setdefault(tuple(ident[k] for k in spec.keys), []).append(run)
    cells = {}
    for key, members in groups.items():
        measured = [spec.measure(run) for run in members]
        cells[key] = {c.name: merge([m[c.name] for m in measured], members) for c in spec.columns}
    table = paper.load(spec.paper) if spec.paper else None
    rows = []
    for key in sorted(groups, key=lambda k: order(dict(zip(spec.keys, k)))):
        keys = dict(zip(spec.keys, key))
        ref = tuple((keys | spec.reference(baseline))[k] for k in spec.keys) if spec.reference else key
        delta = {}
        if ref != key and ref in cells:
            delta = {c: cell.value - cells[ref][c].value for c, cell in cells[key].items()
                     if cell.value is not None and cells[ref][c].value is not None}
        rows.append(Row(keys, tuple(groups[key]), cells[key], delta, paper_row(spec, table, keys)))
    return rows


def why_empty(spec: TableSpec, rows: Sequence[Row]) -> str | None:
    """Why a table has nothing to show, or None when some cell has a value."""
    if not rows:
        return f"no run belongs in it (it takes {spec.selects})"
    if any(c.value is not None for row in rows for c in row.cells.values()):
        return None
    whys = list(dict.fromkeys(c.why for row in rows for c in row.cells.values()))
    return "no run has a value: " + "; ".join(whys[:3]) + (f" (and {len(whys) - 3} more)" if len(whys) > 3 else "")


# ------------------------------------------------------------------------------------------ rendering ---------


def show(value: Any) -> str:
    return NONE if value is None else str(value)


def row_label(keys: Mapping[str, Any]) -> str:
    return "/".join(str(v) for v in keys.values() if v is not None)


def provenance(runs: Sequence[Run], label: str, paper_name: str | None) -> list[str]:
    """Where a table's numbers come from: each run's overrides, commit and status, the package versions."""
    report_git = git_state()
    lines = [f"label: {label or '(none)'}",
             f"generated: {now()} by im_repro.report at git {report_git['commit']}"
             + (" (dirty)" if report_git["dirty"] else "")]
    if paper_name:
        lines.append(f"paper numbers: results/paper/{paper_name}.yaml ({one_line(paper.load(paper_name).source)})")
    versions: dict[str, dict[str, None]] = {}
    for run in runs:
        git = run.manifest.get("git", {})
        overrides = " ".join(run.manifest.get("overrides", [])) or "(none)"
        lines.append(f"run {run.path}: status {run.manifest.get('status')}; git {git.get('commit')}"
                     + (" (dirty)" if git.get("dirty") else "") + f"; overrides: {overrides}")
        for name, version in run.manifest.get("packages", {}).items():
            if version is not None:
                versions.setdefault(name, {})[version] = None
    lines.append("packages: " + (", ".join(f"{n} {' / '.join(v)}" for n, v in versions.items()) or "(not recorded)"))
    return lines


@dataclass(frozen=True)
class Document:
    """A table as display strings, printed by `markdown` and `latex` alike."""

    title: str
    label: str
    legend: str
    header: list[str]
    body: list[list[str]]
    notes: list[str]
    provenance: list[str]


def document(spec: TableSpec, rows: Sequence[Row], label: str, baseline: str, prov: list[str]) -> Document:
    notes: list[str] = []

    def note(text: str) -> str:
        notes.append(text)
        return f"[{len(notes)}]"

    body = []
    for row in rows:
        name = row_label(row.keys)
        marks = {}
        for why in dict.fromkeys(c.why for c in row.cells.values() if c.value is None):
            columns = [c.name for c in spec.columns if row.cells[c.name].value is None and row.cells[c.name].why == why]
            marks[why] = note(f"{name} ({', '.join(columns)}): {why}")
        source = "ours"
        if len(row.runs) > 1:
            runs = ", ".join(r.path.name for r in row.runs)
            source += " " + note(f"{name}: every number is the mean of {len(row.runs)} runs ({runs})")
        cells = []
        for c in spec.columns:
            cell = row.cells[c.name]
            if cell.value is None:
                cells.append(f"n/a {marks[cell.why]}")
            else:
                delta = row.delta.get(c.name)
                cells.append(f"{cell.value:.{c.digits}f}" + (f" ({delta:+.{c.digits}f})" if delta is not None else ""))
        body.append([*(show(row.keys[k]) for k in spec.keys), source, *cells])
        if spec.paper:
            body.append(["" for _ in spec.keys] + paper_line(spec, row, note))
    return Document(spec.title, label, legend(spec, baseline), [*spec.keys, "", *(c.header for c in spec.columns)],
                    body, notes, prov)


def paper_line(spec: TableSpec, row: Row, note: Callable[[str], str]) -> list[str]:
    source = "paper"
    if row.paper and row.paper.get("notes"):
        source += " " + note(f"{row_label(row.keys)}: the paper's row: {one_line(row.paper['notes'])}")
    cells = []
    for c in spec.columns:
        theirs = number(row.paper.get(c.name)) if row.paper else None
        ours = row.cells[c.name].value
        if theirs is None:
            cells.append(NONE)
        else:
            cells.append(f"{theirs:.{c.digits}f}" + (f" [{ours - theirs:+.{c.digits}f}]" if ours is not None else ""))
    return [source, *cells]


def legend(spec: TableSpec, baseline: str) -> str:
    parts = ["ours: our value"]
    if spec.reference:
        against = ", ".join(f"{k}={show(v)}" for k, v in spec.reference(baseline).items())
        parts[0] += f" (its difference from the row with {against} and the same other keys)"
    if spec.paper:
        parts.append(f"paper: the paper's value [ours - paper]; {NONE} where the paper gives none")
    parts.append("n/a [k]: no value, see note k")
    return "; ".join(parts) + "."


def markdown(doc: Document) -> str:
    lines = [f"# {doc.title}", "", *([f"**{doc.label}**", ""] if doc.label else []), doc.legend, "",
             "| " + " | ".join(doc.header) + " |", "|" + "---|" * len(doc.header),
             *("| " + " | ".join(cells) + " |" for cells in doc.body),
             "", "## Notes", "", *([f"{i}. {text}" for i, text in enumerate(doc.notes, 1)] or ["None."]),
             "", "## Provenance", "", *(f"- {line}" for line in doc.provenance)]
    return "\n".join(lines) + "\n"


TEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
               "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", NONE: "--"}


def tex(text: str) -> str:
    return "".join(TEX_ESCAPES.get(ch, ch) for ch in text)


def latex(doc: Document) -> str:
    lines = [*(f"% {line}" for line in doc.provenance),
             r"\begin{table}[ht]", r"\centering", r"\footnotesize",
             rf"\caption{{{tex(doc.title)}" + (f" ({tex(doc.label)})" if doc.label else "") + "}",
             rf"\begin{{tabular}}{{{'l' * len(doc.header)}}}", r"\hline",
             " & ".join(map(tex, doc.header)) + r" \\", r"\hline",
             *(" & ".join(map(tex, cells)) + r" \\" for cells in doc.body),
             r"\hline", r"\end{tabular}", "",
             r"\smallskip", tex(doc.legend) + r"\\",
             *(rf"[{i}] {tex(text)}\\" for i, text in enumerate(doc.notes, 1)),
             r"\end{table}"]
    return "\n".join(lines) + "\n"


def csv_text(spec: TableSpec, rows: Sequence[Row], prov: list[str]) -> str:
    """One line per row: each column's value, delta, paper value and ours - paper; reasons in `missing`."""
    def fmt(value: float | None) -> str:
        return "" if value is None else repr(round(value, 6))

    suffixes = ("", "_delta", "_paper", "_vs_paper") if spec.paper else ("", "_delta")
    header = [*spec.keys, *(c.name + s for c in spec.columns for s in suffixes), "runs", "missing"]
    buffer = io.StringIO()
    buffer.write("".join(f"# {line}\n" for line in prov))
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        values = []
        for c in spec.columns:
            ours = row.cells[c.name].value
            theirs = number(row.paper.get(c.name)) if row.paper else None
            mine = [ours, row.delta.get(c.name)]
            if spec.paper:
                mine += [theirs, ours - theirs if None not in (ours, theirs) else None]
            values += [fmt(v) for v in mine]
        missing = "; ".join(f"{name}: {cell.why}" for name, cell in row.cells.items() if cell.value is None)
        writer.writerow([*("" if row.keys[k] is None else row.keys[k] for k in spec.keys), *values,
                         " ".join(str(r.path) for r in row.runs), missing])
    return buffer.getvalue()


def write_table(name: str, spec: TableSpec, runs: Sequence[Run], label: str, baseline: str,
                out: Path) -> list[str] | str:
    """The table's files, or why it was not written."""
    rows = build(spec, runs, baseline)
    why = why_empty(spec, rows)
    if why:
        return why
    prov = provenance([run for row in rows for run in row.runs], label, spec.paper)
    doc = document(spec, rows, label, baseline, prov)
    texts = {".md": markdown(doc), ".csv": csv_text(spec, rows, prov), ".tex": latex(doc)}
    for suffix, text in texts.items():
        (out / f"{name}{suffix}").write_text(text, encoding="utf-8")
    return [str(out / f"{name}{suffix}") for suffix in texts]


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
    """Per-step output and instruction loss of every run (train/log.jsonl): IT against IM."""
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
        ax.set(title=key.replace("_", " "), xlabel="optimizer step", ylabel="mean token loss (nats)")
        ax.legend(fontsize=7)
    return fig


def split_losses(run: Run, split: str) -> list[float]:
    values = (number(r.get("loss")) for r in read_jsonl(run.path / "loss" / f"{split}.jsonl", missing_ok=True))
    return [v for v in values if v is not None]


def loss_histograms(runs: Sequence[Run], baseline: str):
    """Per-example output loss on the training and the held-out set (Figures 3, 8, 9): one panel per run."""
    import numpy as np

    panels = {run: (split_losses(run, "train"), split_losses(run, "test")) for run in runs}
    panels = {run: splits for run, splits in panels.items() if splits[0] or splits[1]}
    if not panels:
        return "no run has per-example losses in loss/train.jsonl or loss/test.jsonl"
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


FIGURES: dict[str, Callable[[Sequence[Run], str], Any]] = {
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


# ------------------------------------------------------------------------------------------ the stage ---------


def summary_markdown(report: dict) -> str:
    runs = f"the {len(report['runs'])} run directories under {report['runs_dir']}"
    lines = [f"# Report: {report['experiment']}", "", *([f"**{report['label']}**", ""] if report["label"] else []),
             f"Generated {report['generated']} from {runs}.",
             "", "## Written", "", *([f"- {name}: {', '.join(Path(f).name for f in files)}"
                                      for name, files in report["written"].items()] or ["None."]),
             "", "## Skipped", "", *([f"- {name}: {why}" for name, why in report["skipped"].items()] or ["None."])]
    return "\n".join(lines) + "\n"


def run(cfg) -> dict:
    """Every table and figure the report config names, from the runs of `cfg.experiment`; returns report.json."""
    rc = cfg.report
    for kind, names, known in (("tables", rc.tables, TABLES), ("figures", rc.figures, FIGURES)):
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"report.{kind}={list(names)}: unknown {unknown}; choose from {sorted(known)}")
    root = Path(cfg.runs_dir) / cfg.experiment
    runs = load_runs(root)
    if not runs:
        raise FileNotFoundError(f"report: no run directory (a folder with manifest.json) under {root}")
    out = Path(rc.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {"experiment": cfg.experiment, "label": rc.label, "generated": now(), "runs_dir": str(root),
              "output_dir": str(out),
              "runs": [{"path": str(r.path), "status": r.manifest.get("status"), **identity(r)} for r in runs],
              "written": {}, "skipped": {}}
    jobs = [(name, TABLE_FILES, partial(write_table, name, TABLES[name])) for name in rc.tables]
    jobs += [(name, FIGURE_FILES, partial(write_figure, name)) for name in rc.figures]
    for name, suffixes, write in jobs:
        result = write(runs, rc.label, rc.baseline, out)
        if isinstance(result, str):
            for suffix in suffixes:  # an old file would pass for this run's result
                (out / f"{name}{suffix}").unlink(missing_ok=True)
            report["skipped"][name] = result
            log.warning("report: %s not written: %s", name, result)
        else:
            report["written"][name] = result
            log.info("report: wrote %s", ", ".join(result))
    write_json(out / "report.json", report)
    (out / "summary.md").write_text(summary_markdown(report), encoding="utf-8")
    return report


@hydra.main(version_base="1.3", config_path=str(REPO / "conf"), config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    run(cfg)


def main() -> None:
    import im_repro.run  # noqa: F401  (the schema and resolvers; imported here so importing this module stays light)

    # Hydra's default run directory is a run's own folder, whose .hydra/ would be overwritten: keep the report's
    # Hydra files beside its output unless the command line says otherwise.
    if not any(arg.startswith("hydra.run.dir=") for arg in sys.argv[1:]):
        sys.argv.append("hydra.run.dir=${report.output_dir}/.hydra_report")
    _hydra_main()


if __name__ == "__main__":
    main()
