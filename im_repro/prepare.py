"""The prepare stage: load -> validate -> render -> tokenize + mask -> save, with statistics.

Writes `<run>/prepare/dataset/` (a `datasets` folder: input_ids, labels[, loss_weights], id, dataset and per-example
token counts) and `<run>/prepare/data_stats.json`. Every example that is not kept is counted there, by reason:
invalid rows (data.on_invalid=skip), examples whose truncation left no output token (in every mode, unless
data.keep_output_less=true), and examples left with no supervised token, the latter also for every other loss mode,
since IT and IM can drop different examples; truncated examples are counted too. data_stats.json is written even when
nothing is left to keep, so the reasons survive the failure. Tokenization is cached under `prepare.cache_dir`, keyed
on the examples, the tokenizer, the template, the loss mode and the maximum length.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import datasets
import numpy as np

from im_repro import data, keys, masking, model, subsets
from im_repro.config import plain
from im_repro.masking import CLASS_NAMES
from im_repro.runs import Job
from im_repro.common import write_json
from im_repro.templates import chat_template

log = logging.getLogger(__name__)


def encode_columns(batch: dict, tokenizer, mask: str, template: str, max_seq_length: int, weight) -> dict:
    """`datasets.map` function: messages -> ids, labels and per-example token counts by class."""
    encoded = masking.encode_batch(batch["messages"], tokenizer, mask, template, max_seq_length, weight)
    out: dict[str, list] = {
        "input_ids": [], "labels": [], "token_class": [], "length": [], "num_tokens_untruncated": [], "num_supervised": []
    }
    if mask == "weighted":
        out["loss_weights"] = []
    for cls in CLASS_NAMES.values():
        out[f"num_{cls}"] = []
    for e in encoded:
        for key, value in e.as_dict().items():
            out[key].append(value)
        out["token_class"].append(e.token_class.tolist())  # for the separate instruction / output loss curves
        out["length"].append(len(e.input_ids))
        out["num_tokens_untruncated"].append(e.num_tokens_untruncated)
        out["num_supervised"].append(e.num_supervised)
        predicted = e.token_class[1:]  # position 0 is never a target
        for cls, name in CLASS_NAMES.items():
            out[f"num_{name}"].append(int(np.count_nonzero(predicted == cls)))
    return out


# Bump whenever what `encode_columns` writes changes (a column added, a count redefined): older cache entries
# then miss instead of being served to code that expects the new layout.
CACHE_FORMAT = 2


def cache_key(examples: list[dict], tokenizer, cfg) -> str:
    h = hashlib.sha256(f"format {CACHE_FORMAT}".encode())
    for ex in examples:
        h.update(json.dumps(ex, sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\n")
    settings = [
        model.tokenizer_fingerprint(tokenizer),
        plain(cfg.prepare.template),
        tokenizer.chat_template if plain(cfg.prepare.template) == "chat_template" else None,
        plain(cfg.method.mask),
        cfg.method.prompt_loss_weight,
        cfg.train.max_seq_length,
        datasets.__version__,
    ]
    h.update(json.dumps(settings).encode())
    return h.hexdigest()[:20]


def output_less(ds: datasets.Dataset) -> np.ndarray:
    """Examples whose truncation left no output token: under IM they would train on their instruction alone."""
    truncated = np.asarray(ds["num_tokens_untruncated"]) > np.asarray(ds["length"])
    return truncated & (np.asarray(ds["num_output"]) == 0)


def token_statistics(ds: datasets.Dataset, mask: str, weight, dropped_first: np.ndarray) -> dict:
    """Token totals and, per loss mode, how many examples that mode would drop for lack of supervised tokens
    (beyond `dropped_first`, the examples dropped whatever the mode)."""
    cols = {name: np.asarray(ds[f"num_{name}"], dtype=np.int64) for name in CLASS_NAMES.values()}
    n_tokens = np.asarray(ds["num_tokens_untruncated"], dtype=np.int64)
    lengths = sum(cols.values()) + 1  # + position 0
    per_mode = {
        "it": cols["output"],
        "im": cols["output"] + cols["instruction"],
        "full": lengths - 1,
    }
    if mask == "weighted":
        per_mode["weighted"] = per_mode["im"] if weight else per_mode["it"]
    return {
        "examples": len(ds),
        "truncated": int(np.count_nonzero(n_tokens > lengths)),
        "truncated_no_output": int(np.count_nonzero(output_less(ds))),
        "tokens": {
            "total": int(lengths.sum()),
            "total_before_truncation": int(n_tokens.sum()),
            "max_example": int(lengths.max()) if len(ds) else 0,
            **{name: int(v.sum()) for name, v in cols.items()},
            "supervised": int(np.asarray(ds["num_supervised"]).sum()),
        },
        "dropped_no_supervision_per_mode": {
            m: int(np.count_nonzero((v == 0) & ~dropped_first)) for m, v in per_mode.items()
        },
    }


def settings(cfg, model=None, contents: bool = True) -> dict:
    """What the prepared dataset depends on (its key): the rows, the tokenizer, how conversations are rendered, which
    tokens carry which weight, and the maximum length."""
    method = keys.plain_dict(cfg.method)
    mask = {"mode": method["mask"],
            **({"prompt_loss_weight": method["prompt_loss_weight"]} if method["mask"] == "weighted" else {})}
    return {"format": keys.FORMAT, "data": keys.data_settings(cfg), **keys.tokenizer_settings(cfg.model, contents),
            **keys.template_settings(cfg, contents), "mask": mask, "max_seq_length": cfg.train.max_seq_length}


def run(job: Job) -> None:
    """Writes `<run>/prepare/`; marks it complete with a summary."""
    cfg, out = job.cfg, job.run_dir / "prepare"
    out.mkdir(parents=True, exist_ok=True)
    examples, report = data.load_examples(cfg.data, cfg.prepare.cache_dir)
    if not examples:
        write_json(out / "data_stats.json", {"data": report.as_dict()})
        raise ValueError(f"data={cfg.data.name}: no valid examples in {report.source} "
                         f"(reasons in {out / 'data_stats.json'})")
    log.info("prepare: %d examples from %s (%d invalid rows skipped)", len(examples), report.source, report.skipped)
    examples, subset = subsets.select(examples, cfg.data.subset)
    if subset:
        log.info("prepare: subset %s keeps %d of %d examples", cfg.data.subset.kind, len(examples), subset["examples"])

    tokenizer = model.load_tokenizer(cfg.model)
    mask, template, weight = plain(cfg.method.mask), plain(cfg.prepare.template), cfg.method.prompt_loss_weight
    max_len = cfg.train.max_seq_length
    key = cache_key(examples, tokenizer, cfg)
    cache_file = Path(cfg.prepare.cache_dir) / "prepare" / key / "encoded.arrow"
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    raw = datasets.Dataset.from_list(examples)
    encoded = raw.map(
        encode_columns,
        fn_kwargs=dict(tokenizer=tokenizer, mask=mask, template=template, max_seq_length=max_len, weight=weight),
        batched=True,
        batch_size=cfg.prepare.batch_size,
        num_proc=cfg.prepare.num_proc if cfg.prepare.num_proc > 1 else None,
        remove_columns=["messages"],
        cache_file_name=str(cache_file),
        new_fingerprint=key,
        desc=f"tokenize + mask ({mask})",
    )
    no_output = output_less(encoded) if not cfg.data.keep_output_less else np.zeros(len(encoded), dtype=bool)
    no_supervision = (np.asarray(encoded["num_supervised"]) == 0) & ~no_output
    stats = token_statistics(encoded, mask, weight, no_output)
    kept = encoded.select(np.flatnonzero(~no_output & ~no_supervision))
    dropped = {"dropped_truncated_no_output": int(no_output.sum()), "dropped_no_supervision": int(no_supervision.sum())}
    summary = {
        "data": report.as_dict(),
        "subset": subset,
        "length_stats": data.length_stats(examples),
        "tokenization": {
            "tokenizer": tokenizer.name_or_path,
            "template": template,
            **({"end_of_turn": chat_template(tokenizer).end_of_turn} if template == "chat_template" else {}),
            "mask": mask,
            "prompt_loss_weight": weight,
            "max_seq_length": max_len,
            "keep_output_less": cfg.data.keep_output_less,
            "cache_key": key,
            **stats,
            **dropped,
            "kept": len(kept),
        },
    }
    write_json(out / "data_stats.json", summary)
    if not len(kept):
        raise ValueError(f"method.mask={mask}: no example has a supervised token and an output token (max_seq_length="
                         f"{max_len}; reasons in {out / 'data_stats.json'})")

    tmp = out / "dataset.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    kept.save_to_disk(str(tmp))
    shutil.rmtree(out / "dataset", ignore_errors=True)
    tmp.rename(out / "dataset")
    log.info(
        "prepare: kept %d of %d (%d truncated at %d tokens; dropped: %d left with no output token, %d with no "
        "supervised token) -> %s", len(kept), len(encoded), stats["truncated"], max_len,
        *dropped.values(), out,
    )
    job.finish("prepare", {"kept": len(kept), **dropped, "truncated": stats["truncated"]})
