"""Tables from runs: each run's numbers (`measure` per table), rows keyed by identity, seeds merged to mean, std, n.

All tables come from one builder (`build`) driven by a `TableSpec`: which runs, which key columns identify a row,
which numbers a run gives (`measure`), the paper table to compare with and the row deltas are taken against.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from im_repro import paper, stats
from im_repro.evaluate import suite as evaluate_suite
from im_repro.config import StatsConfig
from im_repro.report.collect import Run, dig, identity, number, one_line, read_json

METHOD_ORDER = ("base", "chat", "it", "neftune", "kl", "im", "im_neftune", "dft", "im_dft")

# ------------------------------------------------------------------------------------------ measures ----------


@dataclass(frozen=True)
class Cell:
    value: float | None = None
    why: str = ""  # why there is no value
    std: float | None = None  # over seeds, where the row has several (sample standard deviation)
    n: int = 1  # seeds the value is the mean of


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


# Table 1's columns a benchmark fills on its own (its suite entry's `columns` names which, and with what metric).
OWN_COLUMNS = ("mt_bench", "alpaca_eval_1", "alpaca_eval_2")
EVAL_COLUMNS = (*paper.TABLE1_CATEGORIES, "mean", *OWN_COLUMNS)


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


def category_keys(suite: Mapping, category: str) -> dict[str, str]:
    """The category's benchmarks, each with the key in metrics.json its category averages."""
    return {b: entry["score"] for b, entry in suite.get("benchmarks", {}).items()
            if entry.get("category") == category and entry.get("score")}


def column_key(suite: Mapping, column: str) -> tuple[str, str] | None:
    """(benchmark, key in metrics.json) of the suite's benchmark that fills a Table 1 column of its own."""
    return next(((b, entry["columns"][column]) for b, entry in suite.get("benchmarks", {}).items()
                 if column in entry.get("columns", {})), None)


def own_cell(metrics: Mapping, suite: Mapping, column: str) -> Cell:
    found = column_key(suite, column)
    if found is None:
        return Cell(why=f"eval suite {suite.get('suite')!r} has no benchmark for {column}")
    return metric_cell(metrics, suite, *found)


def category_cell(metrics: Mapping, suite: Mapping, category: str) -> Cell:
    """The plain mean of the category's benchmarks, as the released code; TER arrives already scaled by eval."""
    names = category_keys(suite, category)
    if not names:
        return Cell(why=f"eval suite {suite.get('suite')!r} has no {category} benchmark")
    cells = {b: metric_cell(metrics, suite, b, key) for b, key in names.items()}
    absent = [f"{b}: {c.why}" for b, c in cells.items() if c.value is None]
    if absent:
        return Cell(why="; ".join(absent))
    return Cell(sum(c.value for c in cells.values()) / len(cells))


def eval_dir(run: Run):
    return run.path / "eval" / str(dig(run.config, "eval.name"))  # results are stored per suite


def eval_cells(run: Run) -> dict[str, Cell]:
    """Table 1's columns from the run's suite's metrics.json and suite.json (which benchmark is in which category)."""
    where = eval_dir(run)
    metrics = read_json(where / "metrics.json")
    suite = read_json(where / "suite.json")
    if metrics is None or suite is None:
        why = run.absent("eval", "metrics.json" if metrics is None else "suite.json")
        return {column: Cell(why=why) for column in EVAL_COLUMNS}
    cells = {category: category_cell(metrics, suite, category) for category in paper.TABLE1_CATEGORIES}
    absent = [category for category, cell in cells.items() if cell.value is None]
    cells["mean"] = (Cell(why=f"needs all six categories; no {', '.join(absent)}") if absent
                     else Cell(paper.table1_mean({k: c.value for k, c in cells.items()})))
    return cells | {column: own_cell(metrics, suite, column) for column in OWN_COLUMNS}


@dataclass(frozen=True)
class Items:
    """A column's per-item scores in one run (or averaged over a row's seeds), per metrics.json key, and its
    standard error (a category: that of the plain mean of independent benchmarks)."""

    scores: dict[str, stats.Items]
    stderr: float


def eval_items(run: Run, settings: StatsConfig) -> dict[str, Items | str]:
    """Per eval column, the per-item scores and standard error behind it, or why there are none. The Mean column has
    none: it is a mean of category means, which no per-item resampling here reproduces."""
    where = eval_dir(run)
    suite = read_json(where / "suite.json")
    if suite is None:
        return {}
    columns = {c: category_keys(suite, c) for c in paper.TABLE1_CATEGORIES}
    columns |= {column: dict([found]) for column in OWN_COLUMNS if (found := column_key(suite, column))}
    found: dict[str, Items | str] = {}
    for column, keys in columns.items():
        try:
            scores = {key: evaluate_suite.items(where, key) for key in keys.values()}
            errors = [evaluate_suite.stderr(where, key, settings) for key in keys.values()]
        except (OSError, KeyError, ValueError) as e:
            found[column] = f"no per-item scores: {one_line(e, 200)}"
            continue
        if scores:
            found[column] = Items(scores, sum(e * e for e in errors) ** 0.5 / len(errors))
    return found


def merge_items(found: Sequence[Items | str]) -> Items | str:
    """A row's items over its seeds: each item's mean over the runs that all scored it; the runs' mean stderr."""
    whys = [f for f in found if isinstance(f, str)]
    if whys:
        return whys[0]
    scores = {}
    for key in found[0].scores:
        common = set.intersection(*(set(f.scores.get(key, {})) for f in found))
        scores[key] = {i: sum(f.scores[key][i] for f in found) / len(found) for i in common}
    return Items(scores, sum(f.stderr for f in found) / len(found))


def paired(row: Items, ref: Items, settings: StatsConfig) -> stats.Difference:
    return stats.mean_paired_difference([(row.scores[k], ref.scores[k]) for k in row.scores if k in ref.scores],
                                        settings)


class Cells(dict):
    """A run's cells of a table whose columns come from the suites' own records: a column this run's suite lacks
    says so."""

    def __init__(self, cells: dict[str, Cell], why: str):
        super().__init__(cells)
        self.why = why

    def __missing__(self, column: str) -> Cell:
        return Cell(why=self.why.format(column=column))


def suite_columns(runs: Sequence[Run], suite_name: str) -> tuple[Column, ...]:
    """Every number the suite's benchmarks report in these runs (their headlines, then the rest), in suite order."""
    keys: dict[str, None] = {}
    for run in runs:
        for entry in (read_json(run.path / "eval" / suite_name / "suite.json") or {}).get("benchmarks", {}).values():
            keys |= dict.fromkeys([*entry["headlines"], *entry.get("more", [])])
    return tuple(Column(key, key) for key in keys)


def suite_cells(suite_name: str) -> Callable[[Run], dict[str, Cell]]:
    """A run's numbers of suite `suite_name` (eval/<suite>/metrics.json), each under its metrics.json key."""

    def measure(run: Run) -> dict[str, Cell]:
        where = run.path / "eval" / suite_name
        metrics, suite = read_json(where / "metrics.json"), read_json(where / "suite.json")
        if metrics is None or suite is None:
            return Cells({}, run.absent("eval", f"{suite_name}/metrics.json"))
        cells = {key: metric_cell(metrics, suite, benchmark, key)
                 for benchmark, entry in suite["benchmarks"].items()
                 for key in [*entry["headlines"], *entry.get("more", [])]}
        return Cells(cells, f"{{column}} is not in eval suite {suite_name!r} of this run")

    return measure


def suite_items(suite_name: str) -> Callable[[Run, StatsConfig], dict[str, Items | str]]:
    """Per key of the suite: its per-item scores and standard error (or why there are none)."""

    def found(run: Run, settings: StatsConfig) -> dict[str, Items | str]:
        where = run.path / "eval" / suite_name
        suite = read_json(where / "suite.json")
        if suite is None:
            return {}
        out: dict[str, Items | str] = {}
        for entry in suite["benchmarks"].values():
            for key in [*entry["headlines"], *entry.get("more", [])]:
                try:
                    out[key] = Items({key: evaluate_suite.items(where, key)},
                                     evaluate_suite.stderr(where, key, settings))
                except (OSError, KeyError, ValueError) as e:
                    out[key] = f"no per-item scores: {one_line(e, 200)}"
        return out

    return found


LC, AE_WIN = "alpaca_eval_2.0/lc_win_rate", "alpaca_eval_2.0/win_rate"


def run_tokenizer(run: Run):
    """The tokenizer the run's outputs were generated with (its trained model's, else the one its eval used)."""
    from transformers import AutoTokenizer

    for folder in (run.path / "train" / "final", run.path / "eval" / "base_tokenizer"):
        if (folder / "tokenizer_config.json").exists():
            return AutoTokenizer.from_pretrained(folder)
    path = dig(run.config, "eval.checkpoint") or dig(run.config, "model.tokenizer") or dig(run.config, "model.path")
    gguf = dig(run.config, "model.tokenizer_gguf_file") or dig(run.config, "model.gguf_file")
    return AutoTokenizer.from_pretrained(path, **({"gguf_file": gguf} if gguf else {}))


def output_tokens(run: Run) -> dict[str, dict[str, list[int]]]:
    """{"alpaca_eval": {instruction: [tokens]}, "mt_bench": {question: [tokens of each turn]}} from the generations
    the run's eval suite kept (no new generation), counted by the run's own tokenizer."""
    from im_repro.common import read_jsonl

    where, found = eval_dir(run), {}
    tokenizer = run_tokenizer(run)
    count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    outputs = read_json(where / "alpaca_eval" / "model_outputs.json")
    if outputs:
        found["alpaca_eval"] = {o["instruction"]: [count(o["output"])] for o in outputs}
    answers = sorted((where / "mt_bench" / "model_answer").glob("*.jsonl"))
    if answers:
        found["mt_bench"] = {str(a["question_id"]): [count(t) for t in a["choices"][0]["turns"]]
                             for a in read_jsonl(answers[0])}
    return found


def length_cells(run: Run) -> dict[str, Cell]:
    """The length question: output length in tokens on AlpacaEval and MT-Bench, and the win rates beside it."""
    import numpy as np

    cells = eval_cells(run)
    where = eval_dir(run)
    metrics = read_json(where / "metrics.json") or {}
    suite = read_json(where / "suite.json") or {}
    out = {"ae_win_rate": metric_cell(metrics, suite, "alpaca_eval", AE_WIN),
           "ae_lc_win_rate": metric_cell(metrics, suite, "alpaca_eval", LC), "mt_bench": cells["mt_bench"]}
    try:
        tokens = output_tokens(run)
    except (OSError, ValueError) as e:
        tokens, why = {}, f"no tokenizer for the run's outputs: {one_line(e, 200)}"
    else:
        why = run.absent("eval", "alpaca_eval/model_outputs.json or mt_bench/model_answer/")
    for prefix, name in (("ae", "alpaca_eval"), ("mt", "mt_bench")):
        lengths = [n for per_item in tokens.get(name, {}).values() for n in per_item]
        out[f"{prefix}_tokens_mean"] = Cell(float(np.mean(lengths))) if lengths else Cell(why=why)
        out[f"{prefix}_tokens_median"] = Cell(float(np.median(lengths))) if lengths else Cell(why=why)
    return out


def length_items(run: Run, settings: StatsConfig) -> dict[str, Items | str]:
    """Per item: its output tokens (an MT-Bench question's share of the mean over answers), its win and its
    length-controlled win, for the paired intervals of IM minus IT."""
    where = eval_dir(run)
    found: dict[str, Items | str] = {}
    for column, key in (("ae_win_rate", AE_WIN), ("ae_lc_win_rate", LC), ("mt_bench", "mt_bench/score")):
        try:
            found[column] = Items({key: evaluate_suite.items(where, key)}, evaluate_suite.stderr(where, key, settings))
        except (OSError, KeyError, ValueError) as e:
            found[column] = f"no per-item scores: {one_line(e, 200)}"
    try:
        tokens = output_tokens(run)
    except (OSError, ValueError) as e:
        return found | {c: f"no tokenizer: {one_line(e, 200)}" for c in ("ae_tokens_mean", "mt_tokens_mean")}
    for prefix, name in (("ae", "alpaca_eval"), ("mt", "mt_bench")):
        per_item = tokens.get(name, {})
        total = sum(len(v) for v in per_item.values())
        scores = {i: sum(v) * len(per_item) / total for i, v in per_item.items()} if total else {}
        found[f"{prefix}_tokens_mean"] = (Items({name: scores}, stats.bootstrap_stderr(list(scores.values()), settings))
                                          if len(scores) > 1 else f"{len(scores)} {name} outputs")
    return found


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
    return json_cells(run, "heldout_loss", "summary.json", {"train_loss": "train.mean", "test_loss": "test.mean"})


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
    items: Callable[[Run, StatsConfig], dict[str, Items | str]] | None = None  # per-item scores behind the columns
    suite: str | None = None  # columns: every number eval suite <suite> reports in the runs (suite_columns)


@dataclass(frozen=True)
class Row:
    keys: dict[str, Any]
    runs: tuple[Run, ...]
    cells: dict[str, Cell]
    delta: dict[str, float]  # against the reference row, where both have a value
    paper: dict[str, Any] | None  # the paper's row; None where it has none
    stderr: dict[str, float] = field(default_factory=dict)  # per column, where per-item scores were found
    interval: dict[str, stats.Difference] = field(default_factory=dict)  # of the delta, paired over the same items
    no_stats: dict[str, str] = field(default_factory=dict)  # per column, why it has no stderr or interval


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
        eval_cells, paper="table1", reference=by_baseline, items=eval_items),
    "table2": TableSpec(
        "Table 2: BLEU of greedy generations from the training instructions against the training outputs", KEYS,
        (Column("bleu", "BLEU (mean sentence)"), Column("corpus_bleu", "BLEU (corpus)")),
        bleu_cells, paper="table2", reference=by_baseline),
    "table3": TableSpec(
        "Table 3: KL regularisation towards the base model (Mean %, AlpacaEval %)",
        ("model", "dataset", "method", "kl_mode", "kl_lambda"), (MEAN, AE2, AE1),
        eval_cells, paper="table3", reference=lambda b: {"method": b, "kl_mode": None, "kl_lambda": None},
        items=eval_items,
        select=lambda ident, b: ident["kl_mode"] is not None or ident["method"] in (b, "im"),
        selects="runs with train.kl.mode set, and the baseline method's and IM's runs"),
    "table4": TableSpec(
        "Table 4: IM with and without NEFTune (AlpacaEval 1.0 %, Mean %)",
        ("model", "dataset", "method", "neftune_alpha"), (AE1, MEAN),
        eval_cells, paper="table4", reference=lambda b: {"method": "im", "neftune_alpha": None}, items=eval_items,
        select=lambda ident, b: ident["method"] in ("im", "im_neftune"), selects="im and im_neftune runs"),
    "table5": TableSpec(
        "Table 5: training-set statistics (lengths in words per example; ratios of the mean lengths)",
        ("dataset", "limit"),
        (Column("size", "Size", 0), Column("total", "Total"), Column("output", "Output"),
         Column("output_std", "Output std"), Column("instruction", "Instr."), Column("instruction_std", "Instr. std"),
         Column("output_per_instruction", "Out/Instr", 4), Column("instruction_per_output", "Instr/Out", 4)),
        stats_cells, paper="table5", paper_fixed={"fraction": 1.0}),
    "modern": TableSpec(
        "The modern suite (eval=modern): each benchmark's numbers as metrics.json keys them (README, The modern "
        "suite: units, judges)", KEYS, (), suite_cells("modern"), reference=by_baseline, items=suite_items("modern"),
        suite="modern"),
    "length": TableSpec(
        "The length question: output length (tokens of the run's own tokenizer) and win rates, AlpacaEval 2.0 raw and "
        "length-controlled (%), MT-Bench (1-10)", KEYS,
        (Column("ae_tokens_mean", "AE tokens (mean)", 1), Column("ae_tokens_median", "AE tokens (median)", 1),
         Column("ae_win_rate", "AE 2.0 win"), Column("ae_lc_win_rate", "AE 2.0 LC win"),
         Column("mt_tokens_mean", "MT tokens (mean)", 1), Column("mt_tokens_median", "MT tokens (median)", 1),
         Column("mt_bench", "MT-Bench")),
        length_cells, reference=by_baseline, items=length_items),
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
    """One cell from the runs of a row: the mean over seeds (runs of one seed, e.g. IT and IM for a data statistic,
    averaged first) with the seeds' standard deviation and count, when every run has a value; else their reasons."""
    if all(c.value is not None for c in cells):
        by_seed: dict[Any, list[float]] = {}
        for run, cell in zip(runs, cells):
            by_seed.setdefault(identity(run)["seed"], []).append(cell.value)
        means = [sum(v) / len(v) for v in by_seed.values()]
        mean = sum(means) / len(means)
        std = (sum((m - mean) ** 2 for m in means) / (len(means) - 1)) ** 0.5 if len(means) > 1 else None
        return Cell(mean, std=std, n=len(means))
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


def build(spec: TableSpec, runs: Sequence[Run], baseline: str, settings: StatsConfig = StatsConfig()) -> list[Row]:
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        ident = identity(run)
        if spec.select(ident, baseline):
            groups.setdefault(tuple(ident[k] for k in spec.keys), []).append(run)
    cells, items = {}, {}
    for key, members in groups.items():
        measured = [spec.measure(run) for run in members]
        cells[key] = {c.name: merge([m[c.name] for m in measured], members) for c in spec.columns}
        if spec.items:
            found = [spec.items(run, settings) for run in members]
            items[key] = {c.name: merge_items([f.get(c.name, "no per-item scores") for f in found])
                          for c in spec.columns if all(c.name in f for f in found)}
    table = paper.load(spec.paper) if spec.paper else None
    rows = []
    for key in sorted(groups, key=lambda k: order(dict(zip(spec.keys, k)))):
        keys = dict(zip(spec.keys, key))
        ref = tuple((keys | spec.reference(baseline))[k] for k in spec.keys) if spec.reference else key
        delta = {}
        if ref != key and ref in cells:
            delta = {c: cell.value - cells[ref][c].value for c, cell in cells[key].items()
                     if cell.value is not None and cells[ref][c].value is not None}
        mine = items.get(key, {})
        stderr = {c: i.stderr for c, i in mine.items() if not isinstance(i, str) and cells[key][c].value is not None}
        no_stats = {c: i for c, i in mine.items() if isinstance(i, str) and cells[key][c].value is not None}
        interval = {}
        for c in delta:
            theirs = items.get(ref, {}).get(c)
            if isinstance(mine.get(c), Items) and isinstance(theirs, Items):
                try:
                    interval[c] = paired(mine[c], theirs, settings)
                except ValueError as e:  # fewer than 2 items both rows scored
                    no_stats[c] = one_line(e)
        rows.append(Row(keys, tuple(groups[key]), cells[key], delta, paper_row(spec, table, keys), stderr, interval,
                        no_stats))
    return rows


def why_empty(spec: TableSpec, rows: Sequence[Row]) -> str | None:
    """Why a table has nothing to show, or None when some cell has a value."""
    if not rows:
        return f"no run belongs in it (it takes {spec.selects})"
    if any(c.value is not None for row in rows for c in row.cells.values()):
        return None
    whys = list(dict.fromkeys(c.why for row in rows for c in row.cells.values()))
    return "no run has a value: " + "; ".join(whys[:3]) + (f" (and {len(whys) - 3} more)" if len(whys) > 3 else "")

