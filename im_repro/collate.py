"""Micro-batches from prepared examples: padded rows, or padding-free packed rows.

Both layouts carry, per token, the loss weight (0 = no loss), the class (template / instruction / output, for the
separate loss curves) and the index of the example it belongs to (for per-example loss normalisation; -1 = padding).

Packing concatenates a micro-batch's examples into rows of at most `max_row_tokens` tokens, with position ids
restarting at 0 for each example and no attention mask: transformers then builds a block-diagonal causal mask (SDPA /
eager on CPU) or uses varlen kernels (flash attention), so no example attends to another. Rows are capped because
SDPA computes a row's whole score matrix: one long row costs attention quadratic in the micro-batch's tokens. Shorter
rows are filled with a padding segment whose positions also restart at 0, so it forms a block of its own. Each
example's first token gets no loss, since in a packed row it would be predicted from the previous example.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from im_repro.masking import IGNORE_INDEX, SPECIAL


def _weights(example: dict) -> list[float]:
    if "loss_weights" in example:
        return example["loss_weights"]
    return [0.0 if label == IGNORE_INDEX else 1.0 for label in example["labels"]]


@dataclass
class Collator:
    pad_token_id: int
    packing: bool = False
    max_row_tokens: int | None = None  # packing: start a new row rather than exceed this (None: one row)

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        return self.pack(examples) if self.packing else self.pad(examples)

    def pad(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(e["input_ids"]) for e in examples)
        rows = len(examples)
        batch = {
            "input_ids": torch.full((rows, width), self.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros((rows, width), dtype=torch.long),
            "loss_weights": torch.zeros((rows, width), dtype=torch.float32),
            "token_class": torch.full((rows, width), SPECIAL, dtype=torch.long),
            "example_index": torch.full((rows, width), -1, dtype=torch.long),
        }
        for r, e in enumerate(examples):
            n = len(e["input_ids"])
            batch["input_ids"][r, :n] = torch.tensor(e["input_ids"])
            batch["attention_mask"][r, :n] = 1
            batch["loss_weights"][r, :n] = torch.tensor(_weights(e))
            batch["token_class"][r, :n] = torch.tensor(e["token_class"])
            batch["example_index"][r, :n] = r
        return batch

    def bins(self, lengths: list[int]) -> tuple[list[list[int]], list[int]]:
        """First-fit decreasing: the longest example opens a row, shorter ones fill the gaps of earlier rows.

        Filling in arrival order leaves each row's tail empty whenever the next example does not fit; every filler
        token still costs a full forward and backward, so the tighter bins are what make packing pay on CPU.
        """
        rows: list[list[int]] = []
        used: list[int] = []
        for k in sorted(range(len(lengths)), key=lambda k: -lengths[k]):
            r = next((r for r, u in enumerate(used) if not self.max_row_tokens or u + lengths[k] <= self.max_row_tokens),
                     len(rows))
            if r == len(rows):
                rows.append([])
                used.append(0)
            rows[r].append(k)
            used[r] += lengths[k]
        return rows, used

    def pack(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        rows, used = self.bins([len(e["input_ids"]) for e in examples])
        width = max(used)
        keys = ("input_ids", "position_ids", "loss_weights", "token_class", "example_index")
        out: dict[str, list[list]] = {key: [] for key in keys}
        for row in rows:
            cols: dict[str, list] = {key: [] for key in keys}
            for k in row:
                e, n = examples[k], len(examples[k]["input_ids"])
                cols["input_ids"] += e["input_ids"]
                cols["position_ids"] += range(n)
                cols["loss_weights"] += [0.0] + list(_weights(e)[1:])
                cols["token_class"] += e["token_class"]
                cols["example_index"] += [k] * n
            pad = width - len(cols["input_ids"])
            for key, value in zip(keys, (self.pad_token_id, None, 0.0, SPECIAL, -1)):
                cols[key] += range(pad) if key == "position_ids" else [value] * pad
            for key in keys:
                out[key].append(cols[key])
        return {
            key: torch.tensor(value, dtype=torch.float32 if key == "loss_weights" else torch.long)
            for key, value in out.items()
        }
