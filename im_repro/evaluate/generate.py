"""Text generation for the open-ended benchmarks: the training chat format, batched, resumable.

Prompts are rendered exactly as training rendered conversations (`templates.render`), followed by the assistant
header, so a model is asked in the format it was tuned on. Results go to a JSONL file one record per prompt as each
batch finishes; a restarted job reads the file and generates only the prompts that are missing.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import set_seed

from im_repro.common import append_jsonl
from im_repro.templates import render

log = logging.getLogger("im_repro")


def chat_prompt(messages: list[dict], tokenizer, template: str) -> tuple[str, bool]:
    """(text, add_special_tokens) asking for the next assistant turn after `messages`."""
    if template == "tulu":  # the released code's create_prompt_with_tulu_chat_format, our BOS as in training
        return render(messages, tokenizer, "tulu").text + "\n<|assistant|>\n", True
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), False


def cut_at_stop(text: str, stop: list[str]) -> str:
    """Text up to the first stop sequence: generation halts after one appears, but it is part of the output."""
    ends = [i for i in (text.find(s) for s in stop) if i >= 0]
    return text[: min(ends)] if ends else text


@dataclass
class Generator:
    model: object
    tokenizer: object
    batch_size: int = 8

    @torch.no_grad()
    def generate(self, prompts: list[tuple[str, bool]], *, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, n: int = 1, stop: list[str] = (), seed: int = 0,
                 desc: str = "generate") -> list[list[str]]:
        """n completions per (text, add_special_tokens) prompt; greedy when temperature is 0.

        Prompts are batched in order of length (less padding, left-padded for decoder-only models); each batch
        reseeds from `seed` and its offset, so the same call samples the same outputs.
        """
        tok = self.tokenizer
        tok.padding_side = "left"
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i][0]))
        out: list[list[str]] = [[] for _ in prompts]
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else \
            {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        for start in tqdm(range(0, len(order), self.batch_size), desc=desc, unit="batch"):
            ids = order[start : start + self.batch_size]
            set_seed(seed + start)
            encoded = [tok(prompts[i][0], add_special_tokens=prompts[i][1])["input_ids"] for i in ids]
            width = max(map(len, encoded))
            input_ids = torch.tensor([[pad_id] * (width - len(e)) + e for e in encoded])
            attention_mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
            generated = self.model.generate(
                input_ids=input_ids.to(self.model.device), attention_mask=attention_mask.to(self.model.device),
                max_new_tokens=max_new_tokens, num_return_sequences=n, pad_token_id=pad_id,
                stop_strings=list(stop) or None, tokenizer=tok if stop else None, **sampling,
            )
            texts = tok.batch_decode(generated[:, width:], skip_special_tokens=True)
            for k, i in enumerate(ids):
                out[i] = [cut_at_stop(t, list(stop)) for t in texts[k * n : (k + 1) * n]]
        return out


class LazyGenerator:
    """A `Generator` made on first use, so a re-run with every generation cached loads no model."""

    def __init__(self, load):
        self._load, self._generator = load, None

    def __getattr__(self, name):
        if self._generator is None:
            self._generator = self._load()
        return getattr(self._generator, name)


class ResumableOutputs:
    """`path`: one JSON record per finished prompt, keyed by `key`; what is there is never generated again."""

    def __init__(self, path: Path, key: str):
        self.path, self.key = Path(path), key
        self.records: dict[str, dict] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a job killed mid-write leaves at most one torn last line
                    continue
                self.records[str(record[key])] = record

    def missing(self, items: list[dict]) -> list[dict]:
        return [item for item in items if str(item[self.key]) not in self.records]

    def add(self, records: list[dict]) -> None:
        append_jsonl(self.path, records)
        self.records.update((str(record[self.key]), record) for record in records)

    def ordered(self, items: list[dict]) -> list[dict]:
        return [self.records[str(item[self.key])] for item in items]


def generate_resumable(generator: Generator, items: list[dict], path: Path, *, key: str,
                       prompt, chunk: int = 64, **kwargs) -> list[dict]:
    """Complete every item (a dict with `key`) whose record is not yet in `path`; returns all records in order.

    `prompt(item) -> (text, add_special_tokens)`; each record is the item plus `outputs` (n strings). Work is saved
    every `chunk` prompts, so a killed job loses at most one chunk.
    """
    store = ResumableOutputs(path, key)
    todo = sorted(store.missing(items), key=lambda item: len(prompt(item)[0]))  # similar lengths share a batch
    if len(todo) < len(items):
        log.info("%s: %d of %d outputs already generated, resuming", path.name, len(items) - len(todo), len(items))
    for start in range(0, len(todo), chunk):
        part = todo[start : start + chunk]
        outputs = generator.generate([prompt(item) for item in part], **kwargs)
        store.add([{**item, "outputs": o} for item, o in zip(part, outputs)])
    return store.ordered(items)
