"""Tables as Markdown, CSV and LaTeX, each with its notes (why a cell is empty) and provenance (which run made it)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from im_repro import paper, stats
from im_repro.config import StatsConfig
from im_repro.report.collect import Run, identity, number, one_line
from im_repro.report.tables import Row, TableSpec, build, why_empty
from im_repro.runs import git_state, now

TABLE_FILES = (".md", ".csv", ".tex", ".meta.json")
NONE = "—"  # a key that does not apply, or a number the paper does not give

# ------------------------------------------------------------------------------------------ rendering ---------


def show(value: Any) -> str:
    return NONE if value is None else str(value)


def row_label(keys: Mapping[str, Any]) -> str:
    return "/".join(str(v) for v in keys.values() if v is not None)


def provenance(rows: Sequence[Row], label: str, paper_name: str | None) -> list[str]:
    """Where a table's numbers come from: each row's runs with their overrides, commit and status, the packages."""
    report_git = git_state()
    lines = [f"label: {label or '(none)'}",
             f"generated: {now()} by im_repro.report at git {report_git['commit']}"
             + (" (dirty)" if report_git["dirty"] else "")]
    if paper_name:
        lines.append(f"paper numbers: results/paper/{paper_name}.yaml ({one_line(paper.load(paper_name).source)})")
    versions: dict[str, dict[str, None]] = {}
    for run in (run for row in rows for run in row.runs):
        if run.manifest is None:
            lines.append(f"{row_label(identity(run))}: run {run.path}: missing: not found in the run store")
            continue
        inv = run.invocation
        git = inv.get("git", {})
        overrides = " ".join(inv.get("overrides", [])) or "(none)"
        lines.append(f"{row_label(identity(run))}: run {run.path}: status {inv.get('status')}; git {git.get('commit')}"
                     + (" (dirty)" if git.get("dirty") else "") + f"; overrides: {overrides}")
        for name, version in inv.get("packages", {}).items():
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
    method: str = ""  # how the uncertainty was computed (stats.method_note), printed under the table


def document(spec: TableSpec, rows: Sequence[Row], label: str, baseline: str, prov: list[str],
             settings: StatsConfig = StatsConfig()) -> Document:
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
            seeds = max(cell.n for cell in row.cells.values())
            over = f", over {seeds} seeds: mean ± standard deviation" if seeds > 1 else ""
            source += " " + note(f"{name}: every number is the mean of {len(row.runs)} runs ({runs}){over}")
        cells = []
        for c in spec.columns:
            cell = row.cells[c.name]
            if cell.value is None:
                cells.append(f"n/a {marks[cell.why]}")
            else:
                spread = f" ± {cell.std:.{c.digits}f} (n={cell.n})" if cell.n > 1 else ""
                se = f" [SE {row.stderr[c.name]:.{c.digits}f}]" if c.name in row.stderr else ""
                cells.append(f"{cell.value:.{c.digits}f}{spread}{se}" + difference(row, c.name, c.digits))
        body.append([*(show(row.keys[k]) for k in spec.keys), source, *cells])
        if spec.paper:
            body.append(["" for _ in spec.keys] + paper_line(spec, row, note))
    no_stats: dict[str, list[str]] = {}  # one note per reason, after the cells' own
    for row in rows:
        for why in dict.fromkeys(row.no_stats.values()):
            columns = [c for c, w in row.no_stats.items() if w == why]
            no_stats.setdefault(why, []).append(f"{row_label(row.keys)} ({', '.join(columns)})")
    for why, where in no_stats.items():
        note(f"no standard error or paired interval for {'; '.join(where)}: {why}")
    return Document(spec.title, label, legend(spec, baseline), [*spec.keys, "", *(c.header for c in spec.columns)],
                    body, notes, prov, stats.method_note(settings) if spec.items else "")


def difference(row: Row, column: str, digits: int) -> str:
    """ (delta), or (delta [low, high]) with * when the paired interval excludes zero."""
    delta = row.delta.get(column)
    if delta is None:
        return ""
    d = row.interval.get(column)
    if d is None:
        return f" ({delta:+.{digits}f})"
    interval = f"[{d.low:+.{digits}f}, {d.high:+.{digits}f}]{'*' if d.excludes_zero else ''}"
    if d.unmatched:  # the rows scored different items: the interval belongs to the matched items' own difference
        matched = f"over {d.n} matched items {d.difference:+.{digits}f} {interval}, {d.unmatched} unmatched"
        return f" ({delta:+.{digits}f}; {matched})"
    return f" ({delta:+.{digits}f} {interval})"


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
             *(["", doc.method] if doc.method else []),
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
             *([tex(doc.method) + r"\\"] if doc.method else []),
             *(rf"[{i}] {tex(text)}\\" for i, text in enumerate(doc.notes, 1)),
             r"\end{table}"]
    return "\n".join(lines) + "\n"


CSV_COLUMNS = {  # per table column: the CSV's column suffix and what it holds (the sidecar <table>.meta.json says so)
    "": "our value (the mean over seeds where the row has several)",
    "_std": "sample standard deviation over seeds", "_n": "seeds the value is the mean of",
    "_se": "the cell's standard error", "_delta": "our value minus the baseline row's",
    "_delta_matched": "the same difference over the items both rows scored, which the interval is about",
    "_delta_low": "low end of the paired interval of _delta_matched", "_delta_high": "its high end",
    "_delta_significant": "1 when that interval excludes zero", "_delta_items": "items both rows scored",
    "_delta_unmatched": "items only one row scored, left out of the interval",
}
PAPER_COLUMNS = {"_paper": "the paper's value", "_vs_paper": "our value minus the paper's"}


def csv_text(spec: TableSpec, rows: Sequence[Row]) -> str:
    """One line per row, no comment lines (pandas.read_csv reads it as is): each column's value, spread, standard
    error, difference from the baseline row with its paired interval, paper value; `runs`, and reasons in `missing`."""
    def fmt(value: float | None) -> str:
        return "" if value is None else repr(round(value, 6))

    suffixes = [*CSV_COLUMNS, *(PAPER_COLUMNS if spec.paper else ())]
    header = [*spec.keys, *(c.name + s for c in spec.columns for s in suffixes), "runs", "missing"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        values = []
        for c in spec.columns:
            ours = row.cells[c.name].value
            theirs = number(row.paper.get(c.name)) if row.paper else None
            cell = row.cells[c.name]
            d = row.interval.get(c.name)
            paired = (d.difference, d.low, d.high, int(d.excludes_zero), d.n, d.unmatched) if d else (None,) * 6
            mine = [ours, cell.std, cell.n if ours is not None else None, row.stderr.get(c.name),
                    row.delta.get(c.name), *paired]
            if spec.paper:
                mine += [theirs, ours - theirs if None not in (ours, theirs) else None]
            values += [fmt(v) for v in mine]
        missing = "; ".join(f"{name}: {cell.why}" for name, cell in row.cells.items() if cell.value is None)
        writer.writerow([*("" if row.keys[k] is None else row.keys[k] for k in spec.keys), *values,
                         " ".join(str(r.path) for r in row.runs), missing])
    return buffer.getvalue()


def metadata(spec: TableSpec, prov: list[str], settings: StatsConfig) -> dict:
    """The CSV's sidecar: what made it and what each column holds."""
    return {"title": spec.title, "provenance": prov, "keys": list(spec.keys),
            "columns": {c.name: c.header for c in spec.columns},
            "suffixes": {**CSV_COLUMNS, **(PAPER_COLUMNS if spec.paper else {})},
            "uncertainty": stats.method_note(settings) if spec.items else None}


def write_table(name: str, spec: TableSpec, settings: StatsConfig, runs: Sequence[Run], label: str, baseline: str,
                out: Path) -> list[str] | str:
    """The table's files, or why it was not written."""
    rows = build(spec, runs, baseline, settings)
    why = why_empty(spec, rows)
    if why:
        return why
    prov = provenance(rows, label, spec.paper)
    doc = document(spec, rows, label, baseline, prov, settings)
    texts = {".md": markdown(doc), ".csv": csv_text(spec, rows), ".tex": latex(doc),
             ".meta.json": json.dumps(metadata(spec, prov, settings), indent=2)}
    for suffix, text in texts.items():
        (out / f"{name}{suffix}").write_text(text, encoding="utf-8")
    return [str(out / f"{name}{suffix}") for suffix in texts]


