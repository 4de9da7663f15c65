"""The paper's reported numbers, kept as data in results/paper/*.yaml (schema: results/paper/README.md).

Reports compare reproduced results against these files rather than against numbers typed into code, so a number
is transcribed once, next to its source and caveats, and checked by tests/test_paper_numbers.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PAPER_DIR = Path(__file__).resolve().parents[1] / "results" / "paper"
TABLE1_CATEGORIES = ("knowledge", "multilinguality", "commonsense", "math_coding", "bbh", "safety")
_HEADER = ("source", "units", "keys", "values", "columns", "rows")
# Row fields every table may carry without declaring them in `columns`.
_ROW_EXTRAS = ("notes", "delta")


@dataclass(frozen=True)
class PaperTable:
    name: str
    source: str
    units: str
    keys: list[str]  # the columns that identify a row
    values: list[str]  # the reported numbers
    columns: dict[str, str]
    rows: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)
    # A row's `delta` is the paper's printed arrow: the row minus the row found by overriding its keys with these.
    delta_reference: dict[str, Any] | None = None


def tables(root: Path = PAPER_DIR) -> list[str]:
    return sorted(path.stem for path in root.glob("*.yaml"))


def load(table: str, root: Path = PAPER_DIR) -> PaperTable:
    path = root / f"{table}.yaml"
    with path.open(encoding="utf-8") as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping with {list(_HEADER)}")
    missing = [name for name in _HEADER if name not in data]
    if missing:
        raise ValueError(f"{path}: header lacks {missing}")
    keys, values, columns = data["keys"], data["values"], data["columns"]
    if not isinstance(data["rows"], list) or not data["rows"]:
        raise ValueError(f"{path}: `rows` must be a non-empty list")
    undescribed = [name for name in (*keys, *values) if name not in columns]
    if undescribed:
        raise ValueError(f"{path}: {undescribed} are not described in `columns`")
    reference = data.get("delta_reference")
    if reference is not None and not set(reference) <= set(keys):
        raise ValueError(f"{path}: delta_reference may only name key columns {keys}")
    seen: dict[tuple[Any, ...], int] = {}
    for i, row in enumerate(data["rows"]):
        _check_row(path, i, row, keys, values, columns)
        ident = tuple(row[k] for k in keys)
        if ident in seen:
            raise ValueError(f"{path}: row {i}: field {keys!r}: same keys as row {seen[ident]}")
        seen[ident] = i
    return PaperTable(
        name=table,
        source=data["source"],
        units=data["units"],
        keys=keys,
        values=values,
        columns=columns,
        rows=data["rows"],
        notes=data.get("notes", []),
        delta_reference=reference,
    )


def _is_number(value: Any) -> bool:
    # YAML reads 1e-6 (no dot) as a string and yes/no as booleans; both must fail here.
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_row(path: Path, i: int, row: Any, keys: list[str], values: list[str], columns: dict[str, str]) -> None:
    def bad(name: str, problem: str) -> ValueError:
        return ValueError(f"{path}: row {i}: field {name!r}: {problem}")

    if not isinstance(row, dict):
        raise ValueError(f"{path}: row {i}: expected a mapping, got {row!r}")
    for name in row:
        if name not in columns and name not in _ROW_EXTRAS:
            raise bad(name, "not described in `columns` (a typo?)")
    for name in keys:
        if name not in row:
            raise bad(name, "missing key")
        if isinstance(row[name], (list, dict)):
            raise bad(name, "a key must be a scalar or null")
    for name in values:
        if name not in row:
            raise bad(name, "missing value (write null and say why in the row's notes)")
        if row[name] is None and not row.get("notes"):
            raise bad(name, "null without the row's `notes` saying why")
        if row[name] is not None and not _is_number(row[name]):
            raise bad(name, f"{row[name]!r} is not a number")
    delta = row.get("delta", {})
    if not isinstance(delta, dict):
        raise bad("delta", "expected a mapping from value columns to numbers")
    for name, value in delta.items():
        if name not in values:
            raise bad(f"delta.{name}", "not a value column")
        if not _is_number(value):
            raise bad(f"delta.{name}", f"{value!r} is not a number")


def lookup(table: str | PaperTable, **keys: Any) -> dict[str, Any]:
    """The one row whose key columns equal `keys`; key columns left out match anything."""
    paper = table if isinstance(table, PaperTable) else load(table)
    unknown = [name for name in keys if name not in paper.keys]
    if unknown:
        raise KeyError(f"{paper.name}: {unknown} are not key columns; its keys are {paper.keys}")
    matches = [row for row in paper.rows if all(row[k] == v for k, v in keys.items())]
    query = ", ".join(f"{k}={v!r}" for k, v in keys.items()) or "no keys"
    if not matches:
        hints = [
            f"{k} is one of {list(dict.fromkeys(row[k] for row in paper.rows))}"
            for k, v in keys.items()
            if all(row[k] != v for row in paper.rows)
        ]
        raise KeyError(f"{paper.name}: no row with {query}" + (f" ({'; '.join(hints)})" if hints else ""))
    if len(matches) > 1:
        free = [k for k in paper.keys if k not in keys]
        raise KeyError(f"{paper.name}: {len(matches)} rows match {query}; narrow it with {free}")
    return dict(matches[0])


def table1_mean(categories: Mapping[str, Any]) -> float:
    """Table 1's Mean: the mean of the six category means, not of the 18 tasks (PAPER.md §1.1).

    Other entries are ignored, so a whole Table 1 row can be passed.
    """
    missing = [name for name in TABLE1_CATEGORIES if categories.get(name) is None]
    if missing:
        raise ValueError(f"table1_mean needs all six categories; missing {missing}")
    return sum(categories[name] for name in TABLE1_CATEGORIES) / len(TABLE1_CATEGORIES)
