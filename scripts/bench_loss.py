"""Peak memory of one training step's loss, plain cross-entropy against the fused one (train.loss_kernel), at a large
vocabulary: the tiny Llama with Llama-3's 128,256 tokens, where the logits are most of a step's memory.

    python scripts/bench_loss.py [--vocab 128256] [--tokens 1024] [--kernels plain,cce]      (make bench-loss)

Each kernel runs in a fresh process (peak RSS cannot be reset in one): it builds the model, runs one forward and
backward of a weighted IM-style loss on random tokens, and reports how far its peak resident memory rose during that
step (ru_maxrss after the step minus before it) and the step's seconds (the fused kernel compiles once first: that
warm-up is excluded). Printed: each kernel's peak and its ratio to plain's. On a GPU, scripts/gpu_check.py measures
the same at 1B.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from im_repro.train import LossSpec, forward_loss  # noqa: E402


def step(kernel: str, vocab: int, tokens: int, rows: int = 4) -> dict:
    """One forward and backward in this process; the rise of its peak RSS over the step, in MiB."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    width = tokens // rows
    ids = torch.randint(3, vocab, (rows, width))
    classes = torch.full((rows, width), 1)
    classes[:, width // 2:] = 2  # instruction, then output
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_class": classes,
             "loss_weights": torch.where(classes == 2, 1.0, 0.5), "example_index": torch.arange(rows)[:, None]
             .expand(rows, width).contiguous()}
    spec = LossSpec("per_example", kernel=kernel)
    if kernel != "plain":  # compile once on a small batch: the step below is what a run repeats
        small = {k: v[:1, :8] for k, v in batch.items()}
        forward_loss(model, small, spec)[0].backward()
        model.zero_grad()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    total, norm, *_ = forward_loss(model, batch, spec)
    (total / norm).backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"kernel": kernel, "step_peak_mib": (peak - before) / 1024, "seconds": seconds,
            "loss": float((total / norm).detach())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--kernels", default="plain,cce")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # run one kernel in this process (the child)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(step(args.one, args.vocab, args.tokens)))
        return
    results = []
    for kernel in args.kernels.split(","):
        proc = subprocess.run([sys.executable, __file__, "--one", kernel, "--vocab", str(args.vocab), "--tokens",
                               str(args.tokens)], capture_output=True, text=True, env={**os.environ})
        if proc.returncode:
            print(f"{kernel}: failed: {proc.stderr.strip().splitlines()[-1]}")
            continue
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    plain = next((r for r in results if r["kernel"] == "plain"), None)
    print(f"one step of the tiny Llama at vocabulary {args.vocab:,}, {args.tokens} tokens (CPU, float32):")
    for r in results:
        ratio = f"  {r['step_peak_mib'] / plain['step_peak_mib']:.2f}x plain" if plain else ""
        print(f"  {r['kernel']:6} peak +{r['step_peak_mib']:8.1f} MiB  {r['seconds']:6.2f} s  loss {r['loss']:.5f}{ratio}")


if __name__ == "__main__":
    main()
