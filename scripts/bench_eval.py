"""Generation speed on the AlpacaEval path: the HF engine's static batches, transformers' continuous batching and
vLLM, on the same prompts and model, as generated tokens/s and ratios.

    python scripts/bench_eval.py [--prompts 16] [--batch 8] [--max-new-tokens 64] [--vllm-python .venv-vllm/bin/python]

Greedy answers to held-out LIMA instructions in the Tulu training format, as token ids made once (the eval stage's
`encode_prompt`). Rows:
  hf batch 1      the HF engine one prompt at a time (no padding)
  hf static       the HF engine's static batches: length-sorted, --batch prompts each, left-padded
  hf continuous   the HF engine with transformers' continuous batching (`generate_batch`, paged attention), --batch
                  requests at most in flight (eval.generation.hf_batching=continuous)
  vllm            vLLM through the eval stage's engine (a worker process of --vllm-python; skipped without one)
Tokens/s counts each answer's tokens up to its end (EOS or the limit). The HF rows run twice, interleaved, and keep
their best time; vLLM's worker starts (and compiles, unless --vllm-eager) before its timed call. Each row also says
how many answers equal the batch-1 ones token for token. Prints numbers and ratios, never asserts.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from im_repro.evaluate.generate import HFEngine, Sampling, VLLMEngine, chat_prompt, encode_prompt, eos_ids  # noqa: E402
from im_repro.run import lima_overrides, load_data  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"smollm2": ROOT / "artifacts/models/smollm2-135m-instruct"}


def timed(run) -> tuple[float, list[list[int]]]:
    """(seconds, one completion's token ids per prompt) of `run()`; the tokens are back on the host, so it is done."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    tokens = run()
    return time.perf_counter() - start, tokens


def hf_engine(model, tokenizer, prompts: list[list[int]], s: Sampling, batch: int,
              continuous: bool = False) -> list[list[int]]:
    """One completion per prompt from the eval stage's HF engine, static or continuously batched."""
    engine = HFEngine(model, tokenizer, batch, continuous)
    return [row[0] for row in engine.complete(prompts, s, desc=f"hf batch {batch}")]


def report(best: dict[str, tuple[float, list[list[int]]]], reference: list[list[int]]) -> None:
    base = sum(map(len, best["hf static"][1])) / best["hf static"][0]
    for name, (seconds, tokens) in best.items():
        rate = sum(map(len, tokens)) / seconds
        same = sum(a == b for a, b in zip(tokens, reference))
        print(f"  {name:14} {seconds:7.1f} s  {rate:7.1f} generated tokens/s  {rate / base:5.2f}x hf static  "
              f"{same}/{len(reference)} answers equal batch 1's")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--model", choices=MODELS, default="smollm2")
    p.add_argument("--data", help="a local copy of LIMA (default: data=lima, downloaded and cached)")
    p.add_argument("--vllm-python", help="the python of an environment with vLLM (e.g. .venv-vllm/bin/python)")
    p.add_argument("--vllm-eager", action="store_true", help="vLLM without torch.compile (CPU: minutes saved)")
    p.add_argument("--vllm-memory", type=float, default=0.15,
                   help="vLLM's gpu_memory_utilization (on its CPU backend: the share of host memory)")
    args = p.parse_args()

    path = MODELS[args.model]
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    held_out = load_data(lima_overrides(args.data))[-args.prompts:]  # the end of LIMA: never in a demo's training
    prompts = [encode_prompt(tokenizer, chat_prompt([next(m for m in x["messages"] if m["role"] == "user")],
                                                    tokenizer, "tulu")) for x in held_out]
    s = Sampling(max_new_tokens=args.max_new_tokens, eos=eos_ids(model.generation_config, tokenizer))

    runs = {"hf batch 1": lambda: hf_engine(model, tokenizer, prompts, s, 1),
            "hf static": lambda: hf_engine(model, tokenizer, prompts, s, args.batch),
            "hf continuous": lambda: hf_engine(model, tokenizer, prompts, s, args.batch, continuous=True)}
    best: dict[str, tuple[float, list[list[int]]]] = {}
    for _ in range(2):
        for name, run in runs.items():
            seconds, tokens = timed(run)
            if name not in best or seconds < best[name][0]:
                best[name] = (seconds, tokens)
    if args.vllm_python:
        engine = VLLMEngine(str(path), str(path), dtype="float32", python=args.vllm_python,
                            gpu_memory_utilization=args.vllm_memory, args={"enforce_eager": args.vllm_eager})
        engine.complete(prompts[:1], Sampling(max_new_tokens=2, eos=s.eos))  # start-up and warm-up, untimed
        best["vllm"] = timed(lambda: [row[0] for row in engine.complete(prompts, s)])
        engine.close()

    print(f"\n{args.model}, {args.prompts} prompts, {args.max_new_tokens} new tokens max, batch {args.batch}, "
          f"{torch.get_num_threads()} threads, {'cuda' if torch.cuda.is_available() else 'cpu'}")
    report(best, best["hf batch 1"][1])
    if "vllm" not in best:
        print("  vllm: not run (--vllm-python names the python of an environment with vLLM)")


if __name__ == "__main__":
    main()
