"""Generation speed on the AlpacaEval path (HF backend): batch 1 against batched, as a ratio.

    python scripts/bench_eval.py [--prompts 16] [--batch 8] [--max-new-tokens 64] [--model smollm2]

Greedy answers to held-out LIMA instructions in the Tulu training format, through the same `Generator` the eval stage
uses. Tokens/s counts generated tokens up to each answer's end (EOS or the limit). Each layout runs twice, interleaved,
and keeps its best time. Prints numbers and ratios, never asserts.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from im_repro.evaluate.generate import Generator, chat_prompt  # noqa: E402
from im_repro.run import lima_overrides, load_data  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"smollm2": ROOT / "artifacts/models/smollm2-135m-instruct"}


def time_generation(model, tokenizer, prompts: list[tuple[str, bool]], batch: int,
                    max_new_tokens: int) -> tuple[float, int]:
    """(seconds, generated tokens) of greedy answers to every prompt through the eval stage's Generator."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    outputs = Generator(model, tokenizer, batch).generate(prompts, max_new_tokens=max_new_tokens, desc=f"batch {batch}")
    seconds = time.perf_counter() - start  # generate() returns text, so the GPU's work is done
    return seconds, sum(len(tokenizer(o[0], add_special_tokens=False)["input_ids"]) for o in outputs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--model", choices=MODELS, default="smollm2")
    p.add_argument("--data", help="a local copy of LIMA (default: data=lima, downloaded and cached)")
    args = p.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(MODELS[args.model])
    model = AutoModelForCausalLM.from_pretrained(MODELS[args.model], dtype=torch.float32).eval()
    held_out = load_data(lima_overrides(args.data))[-args.prompts:]  # the end of LIMA: never in a demo's training
    prompts = [chat_prompt([next(m for m in x["messages"] if m["role"] == "user")], tokenizer, "tulu")
               for x in held_out]

    best: dict[int, tuple[float, int]] = {}
    for _ in range(2):
        for batch in (1, args.batch):
            seconds, tokens = time_generation(model, tokenizer, prompts, batch, args.max_new_tokens)
            if batch not in best or seconds < best[batch][0]:
                best[batch] = (seconds, tokens)

    print(f"\n{args.model}, {args.prompts} prompts, {args.max_new_tokens} new tokens max, {torch.get_num_threads()} threads")
    for batch, (seconds, tokens) in best.items():
        print(f"  batch {batch:3}: {seconds:7.1f} s  {tokens / seconds:7.1f} generated tokens/s")
    (s1, t1), (sb, tb) = best[1], best[args.batch]
    print(f"  batched / batch 1: wall time {s1 / sb:.2f}x faster, tokens/s {tb / sb / (t1 / s1):.2f}x")
    if t1 != tb:
        print(f"  note: {t1} vs {tb} tokens generated: left padding changes some greedy answers slightly")


if __name__ == "__main__":
    main()
