"""The heldout_loss stage (PAPER.md §4.3, Figures 3, 8, 9): each example's loss on its output tokens, on the training
set and on a held-out set, for IT and IM alike.

    im-repro stages=[prepare,train,heldout_loss] data=lima method=im model=...

Writes `<run>/heldout_loss/`: each example's mean cross-entropy over its output tokens only (assistant content + the
EOS closing it), whatever mode the model was trained with, so IT and IM runs compare on the same loss, as the
released `compute_loss.py` does with its IT mask (PAPER.md §5.3). Splits: the prepared training set, and a held-out
sample of `analysis.heldout` (Tulu V2): `heldout_fraction` of it drawn with `seed` (`random`, what the paper
describes) or the released code's first examples of each `dataset` source in file order (`first_per_source`), minus
every example whose normalised first user message also opens a training example (Tulu V2 contains LIMA, and the LESS
pool's sources). Examples are truncated at `train.max_seq_length` as in training; those left without an output token
are counted, not scored.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np

from im_repro import data, keys, prepare
from im_repro.common import write_json
from im_repro.config import plain
from im_repro.runs import Job
from im_repro.templates import Span

log = logging.getLogger("im_repro")
SAMPLINGS = ("random", "first_per_source")
ENCODE_CHUNK = 1024  # held-out conversations tokenized per call, kept as arrays after each
LOSS_DEFINITION = "mean cross-entropy over each example's output tokens (assistant content + EOS), then over examples"


# ------------------------------------------------------------------------------------------ held-out set -----


def first_per_source(sources: list[str], fraction: float) -> list[int]:
    """The released `reformat_tulu_dataset.py` sample: int(fraction x total) examples, each source's share rounded
    down and taken from its first examples in file order; the rounding remainder goes to the first examples, in file
    order, of sources whose share is already full. Nothing is shuffled (its seed is set but unused)."""
    total = len(sources)
    sample_size = int(fraction * total)
    counts = Counter(sources)
    quota = {s: int((c / total) * sample_size) for s, c in counts.items()}  # the released expression, bit for bit
    remainder = sample_size - sum(quota.values())
    chosen = []
    for i, source in enumerate(sources):
        if quota[source] > 0:
            quota[source] -= 1
        elif remainder > 0:
            remainder -= 1
        else:
            continue
        chosen.append(i)
    return chosen


def sample_heldout(examples: list[dict], fraction: float, sampling: str, seed: int) -> list[int]:
    """Indices (in file order) of the held-out sample: int(fraction x n) examples, as the released code counts."""
    if not 0 < fraction <= 1:
        raise ValueError(f"analysis.heldout_fraction must be in (0, 1], got {fraction}")
    if sampling == "random":
        k = int(fraction * len(examples))
        return sorted(np.random.default_rng(seed).choice(len(examples), size=k, replace=False).tolist())
    if sampling == "first_per_source":  # examples without a `dataset` field form one source
        return first_per_source([ex.get("dataset", "") for ex in examples], fraction)
    raise ValueError(f"analysis.heldout_sampling must be one of {SAMPLINGS}, got {sampling!r}")


def first_user_message(messages: list[dict]) -> str | None:
    return next((m["content"] for m in messages if m["role"] == "user"), None)


def normalise(text: str) -> str:
    """Case and whitespace folded: the same instruction re-exported by another pipeline still matches."""
    return " ".join(text.lower().split())


def deduplicate(candidates: list[dict], training: list[dict]) -> tuple[list[int], list[int]]:
    """(kept, removed) indices of `candidates`: removed = its normalised first user message opens a training example.

    An exact match after normalisation only: a training instruction wrapped in other prompt boilerplate (AlpaGasus'
    random templates, PAPER.md §2.1) is not found.
    """
    seen = {normalise(text) for ex in training if (text := first_user_message(ex["messages"])) is not None}
    kept, removed = [], []
    for i, ex in enumerate(candidates):
        text = first_user_message(ex["messages"])
        (removed if text is not None and normalise(text) in seen else kept).append(i)
    return kept, removed


# ------------------------------------------------------------------------------------------ losses -----------


def summarise(values: list[float]) -> dict:
    """mean, median, population std and n of the per-example losses (None when there are none)."""
    if not values:
        return {"n": 0, "mean": None, "median": None, "std": None}
    x = np.asarray(values, dtype=float)
    return {"n": len(x), "mean": float(x.mean()), "median": float(np.median(x)), "std": float(x.std())}


def output_only(input_ids, token_class) -> dict:
    """An example whose labels are its output tokens, whatever its training mask was; arrays, not lists, since a
    held-out sample of Tulu V2 holds tens of millions of tokens."""
    ids, cls = np.asarray(input_ids, dtype=np.int64), np.asarray(token_class, dtype=np.int8)
    return {"input_ids": ids, "labels": np.where(cls == Span.OUTPUT, ids, -100), "token_class": cls}


def n_output_targets(example: dict) -> int:
    return int(np.count_nonzero(example["token_class"][1:] == Span.OUTPUT))  # position 0 is never predicted


def output_losses(model, examples: list[dict], batch_size: int, desc: str) -> list[float]:
    """Each example's mean cross-entropy over its labelled (output) tokens, in the order given; no gradients.

    Batches hold examples of similar length, longest first, so an out-of-memory error comes at once.
    """
    import torch
    from tqdm.auto import tqdm

    from im_repro.collate import Collator
    from im_repro.train import forward_loss

    collate = Collator(pad_token_id=0)  # padding is masked out of attention and loss, so any id will do
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    losses = [0.0] * len(examples)
    with torch.inference_mode():
        for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch"):
            ids = order[start : start + batch_size]
            batch = {k: v.to(model.device) for k, v in collate([examples[i] for i in ids]).items()}
            _, _, ce, s, _ = forward_loss(model, batch)
            weights = s["weights"]  # 1 on output targets, 0 elsewhere (padding included)
            per_example = ((ce * weights).sum(1) / weights.sum(1)).tolist()
            for i, loss in zip(ids, per_example):
                losses[i] = loss
    return losses


def heldout_split(cfg, training: list[dict]) -> tuple[list[dict], dict]:
    """The held-out examples to score (each with its `index` in the source) and how they were chosen."""
    a = cfg.analysis
    examples, report = data.load_examples(a.heldout, cfg.prepare.cache_dir)
    if not examples:
        raise ValueError(f"analysis.heldout={a.heldout.name}: no valid examples in {report.source}")
    sampled = sample_heldout(examples, a.heldout_fraction, a.heldout_sampling, cfg.seed)
    kept, removed = deduplicate([examples[i] for i in sampled], training)
    chosen = [sampled[k] for k in kept][: a.loss_limit]
    info = {
        "data": a.heldout.name,
        "source": report.source,
        "examples": len(examples),
        "fraction": a.heldout_fraction,
        "sampling": a.heldout_sampling,
        "seed": cfg.seed,
        "sampled": len(sampled),
        "duplicates_of_training_removed": len(removed),
        "duplicates_first_20": [examples[sampled[k]].get("id", sampled[k]) for k in removed[:20]],
        "after_deduplication": len(kept),
        "limit": a.loss_limit,
        "per_source": dict(Counter(examples[i].get("dataset", "") for i in chosen)),
    }
    return [{"index": i, **examples[i]} for i in chosen], info


def _scored(records: list[dict], losses: list[float], path: Path) -> list[float]:
    with path.open("w") as f:
        for record, loss in zip(records, losses):
            f.write(json.dumps({**record, "loss": loss}) + "\n")
    return losses


def settings(cfg, model) -> dict:
    """What the losses depend on (its key): the model scored, the training data as prepared, the held-out sample."""
    a = keys.without(keys.plain_dict(cfg.analysis), keys.EXCLUDED["analysis"])
    return {"format": keys.FORMAT, "model": model.identity, "prepare": prepare.settings(cfg),
            "heldout": a["heldout"], "fraction": a["heldout_fraction"], "sampling": a["heldout_sampling"],
            "limit": a["loss_limit"], "seed": cfg.seed}


def run(job: Job) -> None:
    """Writes `<run>/heldout_loss/` (one process); marks it complete with a summary."""
    import datasets

    from im_repro import masking, model as model_lib

    cfg, run_dir = job.cfg, job.run_dir
    out = run_dir / "heldout_loss"
    prepared = run_dir / "prepare" / "dataset"
    out.mkdir(parents=True, exist_ok=True)
    a = cfg.analysis

    # Training split: exactly what the model trained on (same tokens, same truncation); ids are rows of the dataset.
    train_set = datasets.load_from_disk(str(prepared))
    if a.loss_limit is not None:
        train_set = train_set.select(range(min(len(train_set), a.loss_limit)))
    has_id = "id" in train_set.column_names
    train_records, train_examples, train_skipped = [], [], 0
    for i, row in enumerate(train_set):
        example = output_only(row["input_ids"], row["token_class"])
        if not (n := n_output_targets(example)):  # an IM-trained example truncated before its output, say
            train_skipped += 1
            continue
        train_records.append({"index": i, **({"id": row["id"]} if has_id else {}), "n_output_tokens": n})
        train_examples.append(example)

    # Test split: encoded as training encoded its examples (tokenizer, template, maximum length).
    training, _ = data.load_examples(cfg.data, cfg.prepare.cache_dir)
    heldout, heldout_info = heldout_split(cfg, training)
    tokenizer = model_lib.load_tokenizer(cfg.model)
    template = plain(cfg.prepare.template)
    test_records, test_examples, test_skipped = [], [], 0
    for start in range(0, len(heldout), ENCODE_CHUNK):
        chunk = heldout[start : start + ENCODE_CHUNK]
        encoded = masking.encode_batch([ex["messages"] for ex in chunk], tokenizer, "it", template,
                                       cfg.train.max_seq_length)
        for ex, e in zip(chunk, encoded):
            example = output_only(e.input_ids, e.token_class)
            if not (n := n_output_targets(example)):
                test_skipped += 1
                continue
            ident = {key: ex[key] for key in ("id", "dataset") if key in ex}
            test_records.append({"index": ex["index"], **ident, "n_output_tokens": n})
            test_examples.append(example)

    model_path, _ = job.model.paths(cfg, run_dir)
    log.info("heldout_loss: %s on %d training and %d held-out examples", model_path, len(train_examples),
             len(test_examples))
    model, _ = job.model.load(cfg, run_dir)
    train_losses = _scored(train_records, output_losses(model, train_examples, a.batch_size, "train loss"),
                           out / "train.jsonl")
    test_losses = _scored(test_records, output_losses(model, test_examples, a.batch_size, "test loss"),
                          out / "test.jsonl")
    summary = {
        "checkpoint": model_path,
        "loss": LOSS_DEFINITION,
        "dtype": cfg.eval.dtype,
        "template": template,
        "max_seq_length": cfg.train.max_seq_length,
        "train": {**summarise(train_losses), "skipped_no_output_tokens": train_skipped, "limit": a.loss_limit},
        "test": {**summarise(test_losses), "skipped_no_output_tokens": test_skipped},
        "heldout": heldout_info,
    }
    write_json(out / "summary.json", summary)
    log.info("heldout_loss: train %s (n=%d), test %s (n=%d) -> %s", summary["train"]["mean"], len(train_losses),
             summary["test"]["mean"], len(test_losses), out / "summary.json")
    job.finish("heldout_loss", {"checkpoint": model_path, "train_mean": summary["train"]["mean"],
                                "test_mean": summary["test"]["mean"]})
