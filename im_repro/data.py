"""Load, convert and validate instruction data into one messages schema; Table 5 statistics.

Every example becomes `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}` plus `id` and
`dataset` when the source has them. Rows come from a local .json/.jsonl file, a URL (downloaded once into the cache,
checked against its sha256 when the config gives one), a Hugging Face Hub dataset, or a rebuild recipe. Bad rows
raise `DataError` naming file, line and field, or with `on_invalid=skip` are counted by reason and reported, never
lost silently. Files are read as bytes: a leading BOM is accepted, and invalid UTF-8 spoils only the rows it is in.
Conversations must also have a sensible structure (`data.structure`, see `structure_problem`).
"""

from __future__ import annotations

import codecs
import itertools
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from im_repro.common import UserError, download
from im_repro.config import plain

ROLES = ("system", "user", "assistant")
# Why a row was not kept, as counted in data_stats.json (every reason listed, zeros included).
REASONS = ("invalid_utf8", "bad_json", "invalid_field",
           "no_assistant_turn", "first_turn_not_user", "roles_not_alternating")
# The structure reasons that data.structure=lenient accepts (and counts); a conversation with nothing to answer
# is never accepted: under IM it would train on its instruction alone.
LENIENT_REASONS = ("first_turn_not_user", "roles_not_alternating")


class DataError(UserError, ValueError):
    """A row that cannot become a conversation; the message names where, which field and why."""

    def __init__(self, where: str, field_name: str, problem: str, reason: str = "invalid_field"):
        self.where, self.field, self.problem, self.reason = where, field_name, problem, reason
        super().__init__(f"{where}: field {field_name!r}: {problem} [{reason}]")


class _Invalid(Exception):
    def __init__(self, field_name: str, problem: str, reason: str = "invalid_field"):
        self.field, self.problem, self.reason = field_name, problem, reason


# ------------------------------------------------------------------------------------------ converters -------
# Each takes one source row and returns messages; they raise _Invalid(field, problem) for malformed rows.


def _text(row: dict, key: str) -> str:
    if key not in row:
        raise _Invalid(key, "missing")
    value = row[key]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _Invalid(key, f"expected a string, got {type(value).__name__}")
    return value


def from_messages(row: dict) -> list[dict]:
    if "messages" not in row:
        raise _Invalid("messages", "missing; " + format_hint(row))
    messages = row["messages"]
    if not isinstance(messages, list):
        raise _Invalid("messages", f"expected a list, got {type(messages).__name__}")
    return messages


def from_alpaca(row: dict) -> list[dict]:
    """instruction / input / output (Stanford Alpaca, Code Alpaca, AlpaGasus): Alpaca's own join of the two."""
    instruction, inp = _text(row, "instruction").strip(), _text(row, "input").strip() if "input" in row else ""
    prompt = f"{instruction}\n\n{inp}" if inp else instruction
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(row, "output")}]


def from_dolly(row: dict) -> list[dict]:
    """instruction / context / response (databricks-dolly-15k)."""
    instruction, context = _text(row, "instruction").strip(), _text(row, "context").strip() if "context" in row else ""
    prompt = f"{instruction}\n\n{context}" if context else instruction
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(row, "response")}]


def from_sharegpt(row: dict) -> list[dict]:
    """`conversations: [{"from": "human"|"gpt"|"system", "value": str}]` (ShareGPT, WizardLM dumps)."""
    turns = row.get("conversations")
    if not isinstance(turns, list):
        raise _Invalid("conversations", "missing or not a list")
    roles = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "system": "system"}
    messages = []
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("from") not in roles:
            raise _Invalid(f"conversations[{k}].from", f"unknown speaker {turn.get('from') if isinstance(turn, dict) else turn!r}")
        messages.append({"role": roles[turn["from"]], "content": turn.get("value")})
    return messages


def from_lima(row: dict) -> list[dict]:
    """GAIR/lima: `conversations` is a list of strings alternating user / assistant."""
    turns = row.get("conversations")
    if not isinstance(turns, list):
        raise _Invalid("conversations", "missing or not a list")
    return [{"role": ("user", "assistant")[k % 2], "content": t} for k, t in enumerate(turns)]


def format_hint(row: dict) -> str:
    """Which converter a row that is not in the messages format seems to need, for the error message."""
    turns = row.get("conversations")
    guess = ("alpaca" if {"instruction", "output"} <= set(row) else "dolly" if {"instruction", "response"} <= set(row)
             else "lima" if isinstance(turns, list) and turns and isinstance(turns[0], str)
             else "sharegpt" if isinstance(turns, list) else None)
    if guess:
        return f"the row looks like the {guess} format: pass data.converter={guess}"
    return f"the row has the fields {sorted(row)[:8]}: choose data.converter from {sorted(CONVERTERS)}"


CONVERTERS: dict[str, Callable[[dict], list[dict]]] = {
    "messages": from_messages,
    "alpaca": from_alpaca,
    "dolly": from_dolly,
    "sharegpt": from_sharegpt,
    "lima": from_lima,
}


def validate_messages(messages: list[dict]) -> None:
    if not messages:
        raise _Invalid("messages", "empty conversation")
    for k, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _Invalid(f"messages[{k}]", f"expected an object, got {type(m).__name__}")
        if "role" not in m:
            raise _Invalid(f"messages[{k}].role", "missing")
        if m["role"] not in ROLES:
            raise _Invalid(f"messages[{k}].role", f"unknown role {m['role']!r}; expected one of {ROLES}")
        if "content" not in m:
            raise _Invalid(f"messages[{k}].content", "missing")
        if not isinstance(m["content"], str):
            raise _Invalid(f"messages[{k}].content", f"expected a string, got {type(m['content']).__name__}")
        extra = set(m) - {"role", "content"}
        if extra:
            raise _Invalid(f"messages[{k}]", f"unknown keys {sorted(extra)}")


def structure_problem(messages: list[dict]) -> _Invalid | None:
    """The first structure rule a (field-valid) conversation breaks, or None.

    After any leading system messages the turns must go user, assistant, user, ... and at least one must be the
    assistant's: an assistant-first conversation or two user turns in a row is not what the templates expect.
    """
    if not any(m["role"] == "assistant" for m in messages):
        return _Invalid("messages", "no assistant turn: nothing to answer", "no_assistant_turn")
    start = next(k for k, m in enumerate(messages) if m["role"] != "system")
    if messages[start]["role"] != "user":
        return _Invalid(f"messages[{start}].role", f"the first non-system message is from {messages[start]['role']!r}, "
                        "not the user", "first_turn_not_user")
    for k in range(start, len(messages)):
        expected = ("user", "assistant")[(k - start) % 2]
        if messages[k]["role"] != expected:
            return _Invalid(f"messages[{k}].role", f"expected {expected!r} (turns alternate user / assistant), got "
                            f"{messages[k]['role']!r}", "roles_not_alternating")
    return None


# ------------------------------------------------------------------------------------------ row sources ------


def _invalid_bytes(raw: bytes) -> list[int]:
    """Offsets of the bytes of `raw` that are not valid UTF-8 (each becomes one surrogate under surrogateescape)."""
    bad, start = [], 0
    while True:
        try:
            raw[start:].decode("utf-8")
            return bad
        except UnicodeDecodeError as e:
            bad.extend(range(start + e.start, start + e.end))
            start += e.end


def _escaped_bytes(value) -> int:
    """How many undecodable bytes (surrogateescape's U+DC80..U+DCFF) a parsed JSON value holds."""
    if isinstance(value, str):
        return sum(1 for c in value if "\udc80" <= c <= "\udcff")
    if isinstance(value, dict):
        return sum(_escaped_bytes(k) + _escaped_bytes(v) for k, v in value.items())
    if isinstance(value, list):
        return sum(_escaped_bytes(v) for v in value)
    return 0


def iter_json_rows(path: str | Path) -> Iterator[tuple[str, dict | _Invalid]]:
    """(where, row) for a .jsonl (one object per line) or .json (a list of objects) file.

    Read as bytes, so that a row holding invalid UTF-8 becomes an invalid row (file, line and byte offset) and the
    rows around it are kept; a leading BOM, which Windows tools write, is skipped.
    """
    path = Path(path)
    if path.suffix == ".jsonl":
        with path.open("rb") as f:
            offset = 0
            for lineno, line in enumerate(f, 1):
                start, offset = offset, offset + len(line)
                if lineno == 1 and line.startswith(codecs.BOM_UTF8):
                    line, start = line[len(codecs.BOM_UTF8):], start + len(codecs.BOM_UTF8)
                where = f"{path}:{lineno}"
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield where, _Invalid("<utf-8>", f"invalid UTF-8 at byte offset {start + e.start}", "invalid_utf8")
                    continue
                if not text.strip():
                    continue
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as e:
                    yield where, _Invalid("<json>", f"bad JSON: {e.msg} at column {e.colno}", "bad_json")
                    continue
                yield where, row if isinstance(row, dict) else _Invalid("<row>", "expected a JSON object")
    elif path.suffix == ".json":
        raw = path.read_bytes()
        try:  # undecodable bytes become lone surrogates, so one bad record does not lose the file
            rows = json.loads(raw.decode("utf-8-sig", "surrogateescape"))
        except json.JSONDecodeError as e:
            where = f"{path}:{e.lineno}"
            raise DataError(where, "<json>", f"bad JSON: {e.msg} at column {e.colno}", "bad_json") from None
        if not isinstance(rows, list):
            raise DataError(str(path), "<file>", "a .json data file must hold a list of objects")
        bad = iter(_invalid_bytes(raw))  # in file order, as the records hold them
        for k, row in enumerate(rows):
            offsets = list(itertools.islice(bad, _escaped_bytes(row)))
            if offsets:
                line = raw.count(b"\n", 0, offsets[0]) + 1
                row = _Invalid("<utf-8>", f"invalid UTF-8 at byte offset {offsets[0]} (line {line})", "invalid_utf8")
            elif not isinstance(row, dict):
                row = _Invalid("<row>", "expected an object")
            yield f"{path}: record {k}", row
    else:
        raise DataError(str(path), "<file>", "expected a .json or .jsonl file")


def iter_hub_rows(uri: str, split: str, subset: str | None) -> Iterator[tuple[str, dict]]:
    import datasets

    is_file = subset is not None and subset.endswith((".json", ".jsonl", ".parquet"))
    ds = (
        datasets.load_dataset(uri, data_files=subset, split=split)
        if is_file
        else datasets.load_dataset(uri, subset, split=split)
    )
    for k, row in enumerate(ds):
        yield f"hf://{uri}[{split}] row {k}", row


# ------------------------------------------------------------------------------------------ loading ----------


@dataclass
class LoadReport:
    """What happened to every row read: kept, or skipped with a reason (`on_invalid=skip`)."""

    source: str
    rows_read: int = 0
    kept: int = 0
    skipped: int = 0
    filtered_out: int = 0  # rows of other subsets (dataset_regex), not errors
    skipped_by_reason: Counter = field(default_factory=Counter)  # every skipped row, by one of REASONS
    skipped_by_field: Counter = field(default_factory=Counter)
    skipped_examples: list[str] = field(default_factory=list)  # the first few, with where and why
    accepted_by_reason: Counter = field(default_factory=Counter)  # kept despite a rule (data.structure=lenient)

    def as_dict(self) -> dict:
        return {
            "source": self.source,
            "rows_read": self.rows_read,
            "kept": self.kept,
            "skipped_invalid": self.skipped,
            "filtered_out_by_dataset_regex": self.filtered_out,
            "skipped_by_reason": {r: self.skipped_by_reason[r] for r in REASONS},
            "skipped_by_field": dict(self.skipped_by_field),
            "skipped_examples": self.skipped_examples,
            "accepted_by_reason": {r: self.accepted_by_reason[r] for r in LENIENT_REASONS},
        }


def label(cfg) -> str:
    """The name runs and tables give a data config: its own, unless `data.path` names a file other than the one its
    source pins (by sha256); then the file's stem, so a user's own file is never reported under the paper's name."""
    from im_repro.keys import content

    path, pinned = cfg.get("path"), ((cfg.get("source") or {}).get("args") or {}).get("sha256")
    if not path or (pinned and content(path) == pinned):
        return cfg.get("name")
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(path).stem)


def rows_for(cfg, cache_dir: str | Path) -> tuple[str, Iterable[tuple[str, dict | _Invalid]]]:
    """The row stream a data config names: `path` if set, else its source."""
    if cfg.path:
        return str(cfg.path), iter_json_rows(cfg.path)
    src = cfg.source
    if src.kind == "url":
        hint = f"Pass a local copy of it: data.path=FILE (data={cfg.name}; for the demo: make demo DATA=FILE)"
        return src.uri, iter_json_rows(download(src.uri, cache_dir, src.args.get("sha256"), offline_hint=hint))
    if src.kind == "hf":
        return f"hf://{src.uri}", iter_hub_rows(src.uri, src.split, src.subset)
    if src.kind == "rebuild":
        from im_repro import rebuild

        return f"rebuild:{src.uri}", iter_json_rows(rebuild.build(src.uri, cache_dir, **src.args))
    raise ValueError(f"data.source.kind must be hf, url or rebuild, got {src.kind!r}")


def load_examples(cfg, cache_dir: str | Path) -> tuple[list[dict], LoadReport]:
    """Examples in the messages schema plus a report of every row that was not kept."""
    source, rows = rows_for(cfg, cache_dir)
    convert = CONVERTERS.get(cfg.converter)
    if convert is None:
        raise ValueError(f"data.converter={cfg.converter!r} is not one of {sorted(CONVERTERS)}")
    keep_dataset = re.compile(cfg.source.dataset_regex) if (cfg.source.dataset_regex and not cfg.path) else None
    skip = plain(cfg.on_invalid) == "skip"
    lenient = plain(cfg.structure) == "lenient"
    report, examples = LoadReport(source), []
    for where, row in rows:
        if cfg.limit is not None and len(examples) >= cfg.limit:
            break
        report.rows_read += 1
        try:
            if isinstance(row, _Invalid):
                raise row
            if keep_dataset and not keep_dataset.fullmatch(str(row.get("dataset", ""))):
                report.filtered_out += 1
                continue
            messages = convert(row)
            validate_messages(messages)
            problem = structure_problem(messages)
            if problem and lenient and problem.reason in LENIENT_REASONS:
                report.accepted_by_reason[problem.reason] += 1
            elif problem:
                raise problem
        except _Invalid as bad:
            if not skip:
                hint = " (data.structure=lenient accepts it)" if bad.reason in LENIENT_REASONS else ""
                raise DataError(where, bad.field, bad.problem + hint, bad.reason) from None
            report.skipped += 1
            report.skipped_by_reason[bad.reason] += 1
            report.skipped_by_field[bad.field] += 1
            if len(report.skipped_examples) < 20:
                report.skipped_examples.append(f"{where}: field {bad.field!r}: {bad.problem} [{bad.reason}]")
            continue
        example = {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
        for key in ("id", "dataset"):
            if key in row:
                example[key] = str(row[key])
        examples.append(example)
    report.kept = len(examples)
    return examples, report


# ------------------------------------------------------------------------------------------ statistics -------


def message_length(content: str) -> int:
    """The paper's Table 5 unit (PAPER.md §2.3): whitespace words plus one per message (the role tag)."""
    return len(content.split()) + 1


def example_lengths(examples: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(instruction, output) length of each example: user (and system) messages, assistant messages."""
    instruction = np.array(
        [sum(message_length(m["content"]) for m in ex["messages"] if m["role"] != "assistant") for ex in examples],
        dtype=float,
    )
    output = np.array(
        [sum(message_length(m["content"]) for m in ex["messages"] if m["role"] == "assistant") for ex in examples],
        dtype=float,
    )
    return instruction, output


def length_stats(examples: list[dict]) -> dict:
    """Table 5 columns: instruction = user (and system) messages, output = assistant messages.

    Means and population standard deviations over examples; the two ratios are ratios of the means.
    """
    instruction, output = example_lengths(examples)
    if len(examples) == 0:
        raise ValueError("length_stats needs at least one example")
    i_mean, o_mean = float(instruction.mean()), float(output.mean())
    return {
        "size": len(examples),
        "total": i_mean + o_mean,
        "output": o_mean,
        "output_std": float(output.std()),
        "instruction": i_mean,
        "instruction_std": float(instruction.std()),
        "output_over_instruction": o_mean / i_mean if i_mean else float("inf"),
        "instruction_over_output": i_mean / o_mean if o_mean else float("inf"),
        "output_median": float(np.median(output)),
    }
