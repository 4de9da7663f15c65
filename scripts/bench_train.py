"""How fast is a training step per micro-batch layout? Ratios of effective tokens/s, IM vs IT, and peak memory.

    python scripts/bench_train.py [--examples 32] [--max-len 512] [--batch 8] [--steps 12] [--model tiny|smollm2]

About 7 minutes on 2 idle cores with the defaults (a random 19.5M-parameter Llama with the real 32k vocabulary).

A step is one optimizer step over a global batch of --batch examples (forward + backward of each micro-batch,
gradient clipping, AdamW), the same examples laid out five ways:
  mb1      the paper's micro-batch of 1: each example alone, gradients accumulated
  padded   one micro-batch of the examples, right-padded, in random order (the paper's shuffled data)
  grouped  padded, but the examples sorted by length before they are split into global batches
  packed   the same examples as `padded` concatenated into one row (block-diagonal causal mask from position_ids)
  dense    the floor: the packed row's real tokens reshaped to [k, L], all-ones mask, plain causal attention, with
           L = sum(n^2) / sum(n) so its attention FLOPs equal the per-example ones
Effective tokens are non-padding tokens. Each timed round runs every configuration and mode once, so drift on a shared
machine hits all alike; each global batch keeps its best time (--steps of twice the number of global batches gives a
best-of-2; the defaults, best-of-3). Prints ratios, never asserts.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from im_repro.collate import Collator  # noqa: E402
from im_repro.config import ModelConfig  # noqa: E402
from im_repro.masking import encode_batch  # noqa: E402
from im_repro.model import load_model, load_tokenizer  # noqa: E402
from im_repro.run import lima_overrides, load_data  # noqa: E402
from im_repro.train import LossSpec, forward_loss, normaliser  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ("mb1", "padded", "grouped", "packed", "dense")
MODES = ("it", "im")
# A CPU-sized random Llama with the real 32k vocabulary: the LM head and the loss keep their true cost.
TINY_ARCH = dict(model_type="llama", hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096, vocab_size=32000)
MODELS = {
    "tiny": ModelConfig(name="bench", path=str(ROOT / "artifacts/tokenizers/llama2"), init="random",
                        arch=TINY_ARCH, dtype="float32"),
    "smollm2": ModelConfig(name="smollm2", path=str(ROOT / "artifacts/models/smollm2-135m-instruct"),
                           dtype="float32"),
}


def load_examples(args, tokenizer) -> dict[str, list[dict]]:
    """A seeded random sample of LIMA, encoded once per loss mode (same tokens, different labels)."""
    lima = load_data(lima_overrides(args.data))
    convs = [x["messages"] for x in random.Random(0).sample(lima, args.examples)]
    return {mode: [{**e.as_dict(), "token_class": e.token_class.tolist()}
                   for e in encode_batch(convs, tokenizer, mode, "tulu", args.max_len)] for mode in MODES}


def dense_floor(packed: dict, lengths: list[int]) -> dict:
    """The packed row's tokens as a rectangular [k, L] block of real tokens: no padding, no mask to build."""
    width = max(1, round(sum(n * n for n in lengths) / sum(lengths)))
    rows = sum(lengths) // width
    block = {k: v[0, : rows * width].view(rows, width) for k, v in packed.items() if k != "position_ids"}
    block["attention_mask"] = torch.ones_like(block["input_ids"])
    block["example_index"] = torch.arange(rows).unsqueeze(1).expand(rows, width).contiguous()
    return block


def plan(examples: list[dict], batch: int, max_len: int, pad_id: int) -> dict[str, list[list[dict]]]:
    """Per configuration, its global batches of `batch` examples, each a list of micro-batches."""
    order = list(range(len(examples)))
    random.Random(1).shuffle(order)
    by_length = sorted(order, key=lambda i: len(examples[i]["input_ids"]))
    shuffled, grouped = ([[examples[i] for i in ids[s : s + batch]] for s in range(0, len(ids), batch)]
                         for ids in (order, by_length))
    random.Random(2).shuffle(grouped)  # length-grouped micro-batches, still visited in random order
    pad, pack = Collator(pad_id), Collator(pad_id, packing=True, max_row_tokens=max_len)
    one_row = Collator(pad_id, packing=True)  # the floor reshapes a single row of all the real tokens
    return {
        "mb1": [[pad([e]) for e in batch] for batch in shuffled],
        "padded": [[pad(batch)] for batch in shuffled],
        "grouped": [[pad(batch)] for batch in grouped],
        "packed": [[pack(batch)] for batch in shuffled],
        "dense": [[dense_floor(one_row(batch), [len(e["input_ids"]) for e in batch])] for batch in shuffled],
    }


def accumulate(model, micro_batches: list[dict], reduction: str = "per_example") -> torch.Tensor:
    """Forward and backward of a global batch, its loss normalised over the whole batch as the train stage does."""
    spec = LossSpec(reduction)
    total_norm = sum(normaliser(mb, spec) for mb in micro_batches).clamp(min=1e-8)
    parts = []
    for mb in micro_batches:
        part = forward_loss(model, mb, spec)[0] / total_norm
        part.backward()
        parts.append(part.detach())
    return torch.stack(parts).sum()


def train_step(model, optimizer, micro_batches: list[dict], reduction: str = "per_example") -> None:
    """One optimizer step over a global batch."""
    accumulate(model, micro_batches, reduction)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def check_losses(model, plans: dict) -> float:
    """Packed and micro-batch-1 losses against padded ones on the same examples; the worst relative difference."""
    def loss(micro_batches: list[dict], norm: str) -> float:
        sums = [forward_loss(model, mb, LossSpec(norm))[:2] for mb in micro_batches]
        return float(sum(t for t, _ in sums) / sum(n for _, n in sums))

    worst = 0.0
    for mode in MODES:
        for norm in ("per_token", "per_example"):
            ref = loss(plans[mode]["padded"][0], norm)
            for config in ("packed", "mb1"):
                got = loss(plans[mode][config][0], norm)
                rel = abs(got - ref) / abs(ref)
                worst = max(worst, rel)
                print(f"  loss {mode:2} {norm:11} padded {ref:.7f}  {config:6} {got:.7f}  rel diff {rel:.1e}")
    return worst


def tokens(micro_batches: list[dict]) -> int:
    """Effective tokens: real ones, whatever the layout (padding and packed rows' filler have example index -1)."""
    return sum(int((mb["example_index"] >= 0).sum()) for mb in micro_batches)


def synchronize() -> None:
    """Wait for queued GPU work: a CUDA step returns before its kernels have run."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_steps(model, optimizer, plans: dict, steps: int, configs: tuple[str, ...] = CONFIGS,
               layout: Callable[[str], None] = lambda config: None) -> dict:
    """Best time of each global batch per (mode, config), rounds interleaved: {(mode, config): {batch: seconds}}.

    `layout(config)` runs before each configuration's steps (gpu_check.py switches the attention kernel there).
    """
    best: dict = {(mode, config): {} for mode in MODES for config in configs}
    for mode, config in best:  # warm-up: first calls pay for lazy initialisation and the optimizer state
        layout(config)
        train_step(model, optimizer, plans[mode][config][0])
    for step in range(steps):
        for config in configs:  # IT and IM back to back, in alternating order: their ratio sees the least drift
            layout(config)
            for mode in MODES[:: 1 if step % 2 else -1]:
                i = step % len(plans[mode][config])
                synchronize()
                start = time.perf_counter()
                train_step(model, optimizer, plans[mode][config][i])
                synchronize()
                best[(mode, config)][i] = min(time.perf_counter() - start, best[(mode, config)].get(i, float("inf")))
    return best


def peak_memory(config: str, argv: list[str]) -> float:
    """Peak RSS growth (MiB) of a fresh process over one step of this configuration's largest global batch."""
    out = subprocess.run([sys.executable, __file__, *argv, "--memory-of", config],
                         capture_output=True, text=True, check=True).stdout
    return float(out.split()[-1])


def proc_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) from /proc: ru_maxrss survives exec, so a child would report its parent's peak."""
    return next(int(x.split()[1]) for x in Path("/proc/self/status").read_text().splitlines()
                if x.startswith(field + ":")) / 1024


def memory_child(model, optimizer, batches: list[list[dict]]) -> None:
    largest = max(batches, key=lambda b: max(mb["input_ids"].numel() for mb in b))
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to now: the step's, not the set-up's
    before = proc_mib("VmRSS")
    train_step(model, optimizer, largest)
    print(proc_mib("VmHWM") - before)


def rates(plans: dict, best: dict) -> tuple[dict, dict, dict, dict]:
    """Per (mode, config): effective tokens, effective tokens/s; per config: IM / IT step time ratios, positions."""
    configs = sorted({c for _, c in best}, key=CONFIGS.index)
    tok = {(m, c): sum(tokens(plans[m][c][i]) for i in b) for (m, c), b in best.items()}
    rate = {key: tok[key] / sum(b.values()) for key, b in best.items()}
    # IM / IT time per step as a median over global batches: one step slowed by a neighbour cannot swing it
    ratios = {c: [best[("im", c)][i] / best[("it", c)][i] for i in best[("it", c)]] for c in configs}
    computed = {c: sum(mb["input_ids"].numel() for i in best[("im", c)] for mb in plans["im"][c][i]) for c in configs}
    return tok, rate, ratios, computed


def report(plans: dict, best: dict, memory: dict, worst: float) -> None:
    tok, rate, ratios, computed = rates(plans, best)
    print(f"\n{'config':8} {'tokens':>7} {'computed':>9} {'IT tok/s':>9} {'IM tok/s':>9} {'IM/IT':>6} {'peak MiB':>9}")
    for c in CONFIGS:
        print(f"{c:8} {tok[('it', c)]:7d} {computed[c]:9d} {rate[('it', c)]:9.0f} {rate[('im', c)]:9.0f} "
              f"{statistics.median(ratios[c]):6.3f} {memory[c]:9.0f}")
    print("  computed: positions incl. padding; peak MiB: peak RSS growth over one step of the largest global batch in"
          "\n  a fresh process (activations, gradients, AdamW state, allocator slack: torch has no CPU allocator stats)")

    both = {c: (rate[("it", c)] + rate[("im", c)]) / 2 for c in CONFIGS}
    packed_padded, packed_dense = both["packed"] / both["padded"], both["packed"] / both["dense"]
    im_it = statistics.median(r for c in CONFIGS for r in ratios[c])
    rows = [  # measurement, value, target, met (None: no target)
        ("max rel loss diff vs padded", worst, "<= 1e-5", worst <= 1e-5),
        ("tokens/s packed / padded", packed_padded, ">= 1.5", packed_padded >= 1.5),
        ("tokens/s packed / dense floor", packed_dense, ">= 0.9", packed_dense >= 0.9),
        # identical computation, only the weights differ: 5% is timing noise on a shared machine
        ("time per step IM / IT (median)", im_it, "<= 1.05", im_it <= 1.05),
        ("tokens/s grouped / padded", both["grouped"] / both["padded"], "", None),
        ("tokens/s mb1 / padded", both["mb1"] / both["padded"], "", None),
        # what packing could gain over padding if attention cost nothing
        ("padded / real positions", computed["padded"] / computed["mb1"], "", None),
        ("peak MiB packed / padded", memory["packed"] / memory["padded"], "", None),
    ]
    print(f"\n  {'measurement':32} {'value':>10}   {'target':8} met")
    for name, value, target, met in rows:
        print(f"  {name:32} {value:10.4g}   {target:8} {'-' if met is None else 'yes' if met else 'NO'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=32)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=12, help="timed rounds; past one epoch they repeat global batches")
    p.add_argument("--model", choices=sorted(MODELS), default="tiny")
    p.add_argument("--data", help="a local copy of LIMA (default: data=lima, downloaded and cached)")
    p.add_argument("--memory-of", choices=CONFIGS, help=argparse.SUPPRESS)
    args = p.parse_args()

    torch.manual_seed(0)
    cfg = MODELS[args.model]
    tokenizer = load_tokenizer(cfg)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    plans = {mode: plan(examples, args.batch, args.max_len, pad_id)
             for mode, examples in load_examples(args, tokenizer).items()}
    model = load_model(cfg, len(tokenizer)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5)
    if args.memory_of:
        return memory_child(model, optimizer, plans["im"][args.memory_of])

    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"model={args.model} ({params:.1f}M params, {torch.get_num_threads()} threads)  examples={args.examples} "
          f"max_len={args.max_len} batch={args.batch} steps={args.steps}")
    print("correctness (first global batch, before any update):")
    worst = check_losses(model, plans)
    best = time_steps(model, optimizer, plans, args.steps)
    report(plans, best, {config: peak_memory(config, sys.argv[1:]) for config in CONFIGS}, worst)


if __name__ == "__main__":
    main()
