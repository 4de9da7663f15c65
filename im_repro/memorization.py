"""The memorization stage (PAPER.md §4.3, Table 2): BLEU of greedy answers to the training instructions against the
training outputs.

    im-repro stages=[prepare,train,memorization] data=lima method=im model=...

Writes `<run>/memorization/`: greedy answers to each training example's first user message, in the training chat
format, scored against its first assistant reply with sacrebleu: sentence-level BLEU-4 averaged over examples (the
paper's "Average BLEU"; the library and settings are not in the paper, PAPER.md §5.4) and corpus BLEU. Generations
are resumable: a restarted job generates only what is missing.
"""

from __future__ import annotations

import json
import logging

import numpy as np

from im_repro import data, keys
from im_repro.common import write_json
from im_repro.config import plain
from im_repro.runs import Job

log = logging.getLogger("im_repro")


def memorization_items(examples: list[dict], limit: int | None) -> tuple[list[dict], int]:
    """(items, skipped): each example's first user message and the first assistant reply after it, as the released
    `generate.py` asks only the first user message; examples with no such pair are skipped and counted."""
    items, skipped = [], 0
    for index, ex in enumerate(examples[:limit]):
        messages = ex["messages"]
        user = next((k for k, m in enumerate(messages) if m["role"] == "user"), None)
        reply = next((m["content"] for m in messages[user + 1 :] if m["role"] == "assistant"), None) \
            if user is not None else None
        if reply is None:
            skipped += 1
            continue
        ident = {"id": ex["id"]} if "id" in ex else {}
        items.append({"index": index, **ident, "instruction": messages[user]["content"], "reference": reply})
    return items, skipped


def bleu_scores(hypotheses: list[str], references: list[str]) -> dict:
    """Sentence BLEU-4 of each hypothesis against its one reference (`sacrebleu.sentence_bleu`'s defaults: 13a
    tokenisation, mixed case, exponential smoothing, effective order) and corpus BLEU (`corpus_bleu`'s defaults)."""
    from sacrebleu.metrics import BLEU

    sentence, corpus = BLEU(effective_order=True), BLEU()
    scores = [sentence.sentence_score(h, [r]).score for h, r in zip(hypotheses, references)]
    return {
        "sentence": scores,
        "mean_sentence_bleu": float(np.mean(scores)) if scores else None,
        "corpus_bleu": corpus.corpus_score(hypotheses, [references]).score if scores else None,
        "sentence_signature": str(sentence.get_signature()),
        "corpus_signature": str(corpus.get_signature()),
    }


def settings(cfg, model) -> dict:
    """What the scores depend on (its key): the model answering, the training examples, how they are asked, and the
    engine that answers (eval.generation)."""
    from im_repro.evaluate.generate import engine

    a = cfg.analysis
    return {"format": keys.FORMAT, "model": model.identity, "data": keys.data_settings(cfg),
            **keys.template_settings(cfg), "limit": a.memorization_limit, "max_new_tokens": a.max_new_tokens,
            "generation": engine(cfg.eval.generation)}


def run(job: Job, generator=None) -> None:
    """Writes `<run>/memorization/` (one process), resuming its generations; returns the summary its completion
    marker records. `generator`: anything with `generate(prompts, **kwargs)` and `tokenizer` (tests); default: the
    model the run scores."""
    from im_repro.evaluate.generate import LazyGenerator, chat_prompt, engine, generate_resumable, make_generator

    cfg, run_dir = job.cfg, job.run_dir
    out = run_dir / "memorization"
    out.mkdir(parents=True, exist_ok=True)
    a, template = cfg.analysis, plain(cfg.prepare.template)
    generations = out / "generations.jsonl"
    examples, _ = data.load_examples(cfg.data, cfg.prepare.cache_dir)
    items, skipped = memorization_items(examples, a.memorization_limit)
    model_path, tokenizer_path = job.model.paths(cfg, run_dir)
    if generator is None:
        generator = LazyGenerator(lambda: make_generator(cfg.eval.generation, model_path, tokenizer_path,
                                                         dtype=cfg.eval.dtype, seed=cfg.seed,
                                                         load_hf=lambda: job.model.load(cfg, run_dir)))
    records = generate_resumable(
        generator, items, generations, key="index",
        prompt=lambda item: chat_prompt([{"role": "user", "content": item["instruction"]}], generator.tokenizer,
                                        template),
        max_new_tokens=a.max_new_tokens, desc="memorization",
    )
    # Both sides stripped: training rendered every content stripped, and decoding may leave a leading space.
    scores = bleu_scores([r["outputs"][0].strip() for r in records], [r["reference"].strip() for r in records])
    with (out / "scores.jsonl").open("w") as f:
        for record, bleu in zip(records, scores["sentence"]):
            f.write(json.dumps({key: record[key] for key in ("index", "id") if key in record} | {"bleu": bleu}) + "\n")
    summary = {
        "checkpoint": model_path,
        "template": template,
        "max_new_tokens": a.max_new_tokens,
        "decoding": "greedy",
        "generation": engine(cfg.eval.generation),
        "n": len(records),
        "skipped_no_user_assistant_pair": skipped,
        "limit": a.memorization_limit,
        "mean_sentence_bleu": scores["mean_sentence_bleu"],
        "median_sentence_bleu": float(np.median(scores["sentence"])) if records else None,
        "corpus_bleu": scores["corpus_bleu"],
        "sentence_signature": scores["sentence_signature"],
        "corpus_signature": scores["corpus_signature"],
    }
    write_json(out / "summary.json", summary)
    log.info("memorization: mean sentence BLEU %s over %d examples -> %s", summary["mean_sentence_bleu"],
             len(records), out / "summary.json")
    job.finish("memorization", {"checkpoint": model_path, "n": len(records),
                                "mean_sentence_bleu": summary["mean_sentence_bleu"]})
