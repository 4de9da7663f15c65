"""One prepared GPU check: training throughput and MFU, packed-vs-padded numerics, DeepSpeed ZeRO-2/3 through the train
stage, and the evaluation path, on one CUDA GPU in under 8 minutes. Prints a table and writes gpu_check.json.

On a machine with a CUDA GPU and PyTorch, from the repository root, with artifacts/tokenizers/llama2 (4 MB, written by
`make setup`) beside it and the wheels of what such an image lacks (datasets, hydra-core, deepspeed, lm-eval...; `make
gpu-wheels` downloads them here into .whl/ for CPython 3.12), the one command (`make gpu-check` runs the same):

    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target .whl/site .whl/*.whl && \
        PYTHONPATH=.whl/site:. python3 scripts/gpu_check.py

At toy size on CPU, every section in 2-3 minutes of 2 cores (tests/test_gpu_check.py runs it):

    python scripts/gpu_check.py --cpu --tiny

Sections (--sections picks some); a failing one is recorded in the JSON and the others still run:
  numerics   one global batch, padded against packed: relative difference of the loss and of the whole gradient, in the
             model's dtype (bf16 on GPU; the CPU tests check the same in float32 to 1e-5)
  train      optimizer steps of a random Llama (conf/model/llama1b_random.yaml: 1.1B, bf16, gradient checkpointing) on
             LIMA-shaped global batches, laid out as scripts/bench_train.py does: mb1 (the paper's micro-batch of 1),
             padded, grouped (by length), packed (padding-free rows, position ids restarting per example) and the dense
             floor. Effective (non-padding) tokens/s, MFU, peak GPU memory, IM / IT step time.
  deepspeed  the real train stage (python -m im_repro) on model=tiny with conf/deepspeed/zero2.json and zero3.json:
             three steps with a checkpoint at 2, then the same command after a simulated kill in step 3 (it resumes)
  eval       lm-eval's HF backend through im_repro.evaluate.harness: log-likelihood requests/s on the official ARC-Easy
             task over a local file of synthetic questions; greedy generation tokens/s of the eval stage's HF engine,
             batch 1, static batches and continuous batching (prompts in the Tulu format, as token ids), and of
             its vLLM engine on the same prompts where vLLM is installed for this python (else the JSON says why
             not): the numbers launch.eval_throughput assumes
The examples are LIMA's shapes without its texts: scripts/data/lima_lengths.json holds each example's token classes
(template / instruction / output) as run lengths, from the Llama-2 tokenizer in the Tulu format at most 2048 tokens
(`--write-lengths lima_data.jsonl` rebuilds it); token ids are random, labels follow masking's class weights.
Packed rows attend within their own examples through FlashAttention-2 when flash_attn is installed, else PyTorch's
flex attention on CUDA (a block mask), else SDPA with a block-diagonal mask; the other layouts use FlashAttention-2 or
SDPA. The JSON says which ran.
MFU = model FLOPs / time / the GPU's dense bf16 peak (from the device name; --peak-tflops overrides). Model FLOPs of a
step = 6 x parameters (less the input embedding) x effective tokens + 6 x layers x hidden x the sum of squared example
lengths (causal attention, forward and backward); gradient checkpointing's recomputation is not counted.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench_eval import hf_engine, timed  # noqa: E402
from bench_train import CONFIGS, MODES, accumulate, plan, rates, synchronize, time_steps, train_step  # noqa: E402
from im_repro.common import read_jsonl, write_json  # noqa: E402
from im_repro.config import HarnessTask  # noqa: E402
from im_repro.masking import IGNORE_INDEX, class_weights, encode_batch  # noqa: E402
from im_repro.run import compose, lima_overrides, load_data  # noqa: E402
from im_repro.runs import MARKER, STARTED, read_record  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LENGTHS = ROOT / "scripts" / "data" / "lima_lengths.json"
SECTIONS = ("numerics", "train", "deepspeed", "eval")
# The real check on one GPU, and a toy size that runs every section on CPU. `steps` timed rounds visit each global
# batch equally often (a multiple of examples / batch), so every layout counts the same tokens.
SIZES = {
    "full": SimpleNamespace(model="llama1b_random", max_len=2048, examples=64, batch=16, steps=8, harness_rows=250,
                            harness_batch=32, prompts=32, gen_batch=32, batch1_prompts=8, new_tokens=64),
    "tiny": SimpleNamespace(model="tiny", max_len=96, examples=4, batch=2, steps=2, harness_rows=8,
                            harness_batch=4, prompts=4, gen_batch=4, batch1_prompts=2, new_tokens=4),
}
# Dense bf16 tensor-core peaks (NVIDIA datasheets, without sparsity), by the first substring of the device name that
# matches: the H100 PCIe and NVL before the SXM part ("NVIDIA H100 80GB HBM3"), the L40S before the L4.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("H800", 989.4),
                    ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L4", 121.0))
TARGETS = {  # the targets: anchors from torchtune, padding-free packing papers and torchtitan
    "packed / padded effective tokens/s": (">= 1.5", lambda v: v >= 1.5),
    "packed MFU": (">= 0.40", lambda v: v >= 0.40),
    "IM / IT step time (median)": ("within 2%", lambda v: abs(v - 1) <= 0.02),
    # bf16 rounding alone moves these by ~1e-3; attention across examples moves them by whole percent
    "packed vs padded loss, rel diff": ("<= 1e-2", lambda v: v <= 1e-2),
}


# ----------------------------------------------------------------------------------------------- examples -------


def write_lengths(lima: Path) -> None:
    """scripts/data/lima_lengths.json from the paper's LIMA file: token-class run lengths only, never text."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ROOT / "artifacts" / "tokenizers" / "llama2")
    conversations = [x["messages"] for x in load_data(lima_overrides(str(lima)))]
    shapes = []
    for e in encode_batch(conversations, tokenizer, "im", "tulu", 2048):
        starts = np.r_[0, np.flatnonzero(np.diff(e.token_class)) + 1]
        counts = np.diff(np.r_[starts, len(e.input_ids)])
        shapes.append([[int(e.token_class[s]), int(n)] for s, n in zip(starts, counts)])
    LENGTHS.parent.mkdir(parents=True, exist_ok=True)
    LENGTHS.write_text(json.dumps({
        "source": f"{lima.name}: {len(shapes)} LIMA training examples, Llama-2 tokenizer, Tulu format, <= 2048 tokens",
        "format": "per example, runs of [token class, count]; classes -1 special, 0 template, 1 instruction, 2 output",
        "examples": shapes,
    }, separators=(",", ":")) + "\n")
    print(f"wrote {LENGTHS}: {len(shapes)} examples, mean {np.mean([sum(n for _, n in s) for s in shapes]):.0f} tokens")


def lima_shaped(count: int, max_len: int, vocab: int) -> dict[str, list[dict]]:
    """A seeded sample of LIMA's example shapes of at most `max_len` tokens (all of them at 2048), per loss mode:
    random token ids, labels as masking sets them."""
    fitting = [s for s in json.loads(LENGTHS.read_text())["examples"] if sum(n for _, n in s) <= max_len]
    rng = np.random.default_rng(0)
    out: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for runs in random.Random(0).sample(fitting, count):
        classes = np.concatenate([np.full(n, c) for c, n in runs])
        ids = rng.integers(3, vocab, len(classes))  # above <unk>, <s>, </s>
        for mode in MODES:
            supervised = class_weights(mode)[classes + 1] > 0
            out[mode].append({"input_ids": ids.tolist(), "labels": np.where(supervised, ids, IGNORE_INDEX).tolist(),
                              "token_class": classes.tolist()})
    return out


# ----------------------------------------------------------------------------------------------- set-up ---------


def attention_kernels(device: torch.device, requested: str | None) -> dict[str, str]:
    """{"packed": ..., "padded": ...}: kernels that keep packed examples apart, and the one for padded layouts."""
    flash = importlib.util.find_spec("flash_attn") is not None and device.type == "cuda"
    padded = "flash_attention_2" if flash else "sdpa"
    packed = requested or (padded if flash else "flex_attention" if device.type == "cuda" else "sdpa")
    return {"packed": packed, "padded": padded}


def peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def device_info(device: torch.device, override: float | None) -> dict:
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"name": name, "peak_bf16_tflops": peak_tflops(name, override) if device.type == "cuda" else None,
            "torch": torch.__version__, "transformers": transformers.__version__, "cuda": torch.version.cuda}


class Bench:
    """The random model of the train and numerics sections, built once, on the device, with its batch plans."""

    def __init__(self, size, device: torch.device, attention: str | None):
        from im_repro.model import load_model, load_tokenizer

        dtype = "bfloat16" if device.type == "cuda" else None  # the paper trains in bf16; CPU keeps the config's
        self.cfg = compose([f"model={size.model}", *([f"model.dtype={dtype}"] if dtype else [])])
        tokenizer = load_tokenizer(self.cfg.model)
        self.kernels = attention_kernels(device, attention)
        with device:  # initialise on the GPU: a 1B model's random init on the CPU takes longer than its steps
            self.model = load_model(self.cfg.model, len(tokenizer)).train()
        self.model.gradient_checkpointing_enable()
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        examples = lima_shaped(size.examples, size.max_len, self.model.config.vocab_size)
        self.plans = {mode: to_device(plan(examples[mode], size.batch, size.max_len, pad_id), device)
                      for mode in MODES}
        self.fallback = None
        try:  # one packed step first: a kernel that fails here (flex attention's compile, say) gives way to SDPA
            self.layout("packed")
            accumulate(self.model, self.plans["im"]["packed"][0])
        except Exception as e:
            if self.kernels["packed"] == "sdpa":
                raise
            self.fallback = {"kernel": self.kernels["packed"], "error": repr(e)[-2000:]}
            print(f"packed attention {self.kernels['packed']} failed, using sdpa: {e!r}", flush=True)
            self.kernels["packed"] = "sdpa"
        self.model.zero_grad(set_to_none=True)

    def layout(self, config: str) -> None:
        kernel = self.kernels["packed" if config == "packed" else "padded"]
        if self.model.config._attn_implementation != kernel:
            self.model.set_attn_implementation(kernel)


def to_device(plans: dict, device: torch.device) -> dict:
    return {config: [[{k: v.to(device) for k, v in mb.items()} for mb in batch] for batch in batches]
            for config, batches in plans.items()}


# ----------------------------------------------------------------------------------------------- sections -------


def numerics(bench: Bench) -> dict:
    """Loss and gradient of the first global batch, padded against packed, before any update."""
    model = bench.model

    def loss_and_grad(config: str, mode: str) -> tuple[float, torch.Tensor]:
        bench.layout(config)
        model.zero_grad(set_to_none=True)
        loss = float(accumulate(model, bench.plans[mode][config][0]))
        return loss, torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])

    out = {"dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "attention": bench.kernels,
           "attention_fallback": bench.fallback}
    for mode in MODES:
        padded_loss, padded_grad = loss_and_grad("padded", mode)
        packed_loss, packed_grad = loss_and_grad("packed", mode)
        out[mode] = {"padded_loss": padded_loss, "packed_loss": packed_loss,
                     "loss_rel_diff": abs(packed_loss - padded_loss) / abs(padded_loss),
                     "grad_rel_diff": float((packed_grad - padded_grad).norm() / padded_grad.norm())}
        del padded_grad, packed_grad
    model.zero_grad(set_to_none=True)
    return out


def model_flops(micro_batches: list[dict], params: int, layers: int, hidden: int) -> float:
    """Model FLOPs of one step (see the module docstring): per example, its real tokens (example index >= 0)."""
    flops = 0.0
    for mb in micro_batches:
        index = mb["example_index"]
        for row in range(index.shape[0]):
            counts = torch.bincount(index[row][index[row] >= 0]).double()
            flops += 6 * params * float(counts.sum()) + 6 * layers * hidden * float((counts * counts).sum())
    return flops


def train(bench: Bench, size, peak: float | None) -> dict:
    model = bench.model
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5, fused=next(model.parameters()).is_cuda)
    best = time_steps(model, optimizer, bench.plans, size.steps, CONFIGS, bench.layout)
    tok, rate, ratios, computed = rates(bench.plans, best)

    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    params = sum(p.numel() for p in model.parameters()) - (0 if tied else model.get_input_embeddings().weight.numel())
    arch = model.config
    out: dict = {"model": bench.cfg.model.name, "parameters": sum(p.numel() for p in model.parameters()),
                 "attention": bench.kernels, "attention_fallback": bench.fallback,
                 "gradient_checkpointing": model.is_gradient_checkpointing,
                 "global_batch": size.batch, "max_len": size.max_len, "timed_rounds": size.steps, "configs": {}}
    for config in CONFIGS:
        flops = {m: sum(model_flops(bench.plans[m][config][i], params, arch.num_hidden_layers, arch.hidden_size)
                        for i in best[(m, config)]) / sum(best[(m, config)].values()) for m in MODES}
        out["configs"][config] = {
            "effective_tokens": tok[("it", config)], "computed_positions": computed[config],
            "it_tokens_per_s": rate[("it", config)], "im_tokens_per_s": rate[("im", config)],
            "im_it_step_time": statistics.median(ratios[config]),
            "mfu": (flops["it"] + flops["im"]) / 2 / (peak * 1e12) if peak else None,
            "peak_memory_gib": peak_memory(model, optimizer, bench, config),
        }
    c = out["configs"]
    both = {k: (v["it_tokens_per_s"] + v["im_tokens_per_s"]) / 2 for k, v in c.items()}
    out["packed_over_padded"] = both["packed"] / both["padded"]
    out["im_it_step_time"] = statistics.median(r for rs in ratios.values() for r in rs)
    return out


def peak_memory(model, optimizer, bench: Bench, config: str) -> float | None:
    """Peak GPU memory (GiB) over one step of this layout's largest global batch; CUDA only."""
    if not torch.cuda.is_available():
        return None
    largest = max(bench.plans["im"][config], key=lambda b: sum(mb["input_ids"].numel() for mb in b))
    bench.layout(config)
    synchronize()
    torch.cuda.reset_peak_memory_stats()
    train_step(model, optimizer, largest)
    synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def synthetic_conversations(count: int, rng: random.Random) -> list[dict]:
    words = "the model reads an instruction and writes a careful answer about data loss tokens".split()
    return [{"messages": [{"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(10, 60)))},
                          {"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(20, 120)))}]}
            for _ in range(count)]


def kill_after_checkpoint_2(train_dir: Path) -> None:
    """Leave a finished train folder as a job killed during step 3 leaves it: checkpoint-2 and no later one, no final
    weights, the work recorded as started, not finished (runs.Unit then calls it partial: the same command resumes)."""
    record = read_record(train_dir / MARKER)
    write_json(train_dir / STARTED, {k: record[k] for k in ("key", "settings")} | {"started": record["finished"]})
    (train_dir / MARKER).unlink()
    shutil.rmtree(train_dir / "final")
    shutil.rmtree(train_dir / "checkpoints" / "checkpoint-3", ignore_errors=True)


def deepspeed(work: Path, cuda: bool) -> dict:
    """ZeRO-2 and ZeRO-3 through `python -m im_repro` on one process: 3 steps with a checkpoint at 2, then the same
    command after a simulated kill in step 3, which must resume from checkpoint-2 and reach step 3's loss again."""
    data = work / "ds_data.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in synthetic_conversations(16, random.Random(0))))
    env = {**os.environ, "IM_REPRO_CACHE": str(work / "cache"), "WANDB_MODE": "offline", "MASTER_ADDR": "127.0.0.1",
           "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "PYTHONPATH": os.pathsep.join(
               [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    if not cuda:
        env["DS_ACCELERATOR"] = "cpu"
    out = {}
    for stage in ("zero2", "zero3"):
        run_dir = work / f"ds_{stage}"
        common = ["stages=[prepare,train]", "data=lima", f"data.path={data}", "model=tiny", "method=im", "train=smoke",
                  "train.max_steps=3", "train.save_steps=2",
                  f"train.deepspeed={ROOT / 'conf' / 'deepspeed' / f'{stage}.json'}", f"train.bf16={str(cuda).lower()}",
                  f"train.gradient_checkpointing={str(cuda).lower()}", f"hydra.run.dir={run_dir}"]
        runs = {}
        for name in ("first", "resume"):
            if name == "resume":
                kill_after_checkpoint_2(run_dir / "train")
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                env["MASTER_PORT"] = str(s.getsockname()[1])
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "im_repro", *common], cwd=ROOT, env=env,
                                  capture_output=True, text=True, timeout=600)
            if proc.returncode:
                raise RuntimeError(f"{stage} {name}: exit {proc.returncode}\n{(proc.stdout + proc.stderr)[-3000:]}")
            summary = json.loads((run_dir / "train" / "_COMPLETE").read_text())
            logs = [r for r in read_jsonl(run_dir / "train" / "log.jsonl") if "loss" in r]
            runs[name] = {"seconds": time.perf_counter() - start, "global_step": summary["global_step"],
                          "resumed_from": summary["resumed_from"], "last_loss": logs[-1]["loss"]}
        checkpoint = run_dir / "train" / "checkpoints" / "checkpoint-2" / "global_step2"
        out[stage] = {**runs, "deepspeed_checkpoint": checkpoint.is_dir() and any(checkpoint.iterdir()),
                      "resumed": runs["resume"]["resumed_from"] is not None and runs["resume"]["global_step"] == 3,
                      "step_3_loss_rel_diff": abs(runs["resume"]["last_loss"] - runs["first"]["last_loss"])
                      / abs(runs["first"]["last_loss"])}
    return out


def evaluation(bench: Bench | None, size, work: Path, device: torch.device) -> dict:
    """lm-eval log-likelihood and batched generation with the (random) model, saved as a checkpoint first."""
    from im_repro.evaluate import harness
    from im_repro.evaluate.generate import Sampling, chat_prompt, encode_prompt, eos_ids
    from im_repro.model import load_inference, load_model, load_tokenizer

    cfg = bench.cfg if bench else compose([f"model={size.model}"])
    tokenizer = load_tokenizer(cfg.model)
    model = bench.model if bench else load_model(cfg.model, len(tokenizer))
    checkpoint = work / "checkpoint"
    model.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    if bench:
        del bench.model, bench.plans  # the eval loads its own copies
        if device.type == "cuda":
            torch.cuda.empty_cache()

    rng = random.Random(1)
    words = "which of these is a mammal bird fish plant rock cloud river mountain".split()
    rows = [{"id": f"q{i}", "question": " ".join(rng.choices(words, k=rng.randint(8, 40))),
             "choices": {"text": [" ".join(rng.choices(words, k=rng.randint(1, 8))) for _ in "ABCD"],
                         "label": list("ABCD")}, "answerKey": rng.choice("ABCD")} for i in range(size.harness_rows)]
    arc = work / "arc_easy.jsonl"
    arc.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg.eval.harness.batch_size = str(size.harness_batch)
    cfg.eval.harness.tasks = {"arc_easy": HarnessTask(task="arc_easy", metric="acc_norm,none", category="commonsense",
                                                      num_fewshot=0, data_files={"validation": str(arc)},
                                                      dataset_path="json")}
    cfg.eval.harness.limit = None
    lm = harness.load_lm(cfg, str(checkpoint), str(checkpoint))
    synchronize()
    start = time.perf_counter()
    accuracy = harness.run(cfg, lm, ["arc_easy"], work / "lm_eval")["arc_easy"]["arc_easy"]
    seconds = time.perf_counter() - start
    requests = sum(len(r["choices"]["text"]) for r in rows)
    out = {"lm_eval": {"task": "arc_easy (synthetic local rows)", "batch_size": size.harness_batch, "rows": len(rows),
                       "loglikelihood_requests": requests, "seconds": seconds, "requests_per_s": requests / seconds,
                       "acc_norm": accuracy}}
    del lm

    model, tokenizer = load_inference(str(checkpoint), str(checkpoint), getattr(torch, cfg.model.dtype))
    instructions = [{"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(10, 80)))}
                    for _ in range(size.prompts)]
    prompts = [encode_prompt(tokenizer, chat_prompt([m], tokenizer, "tulu")) for m in instructions]
    s = Sampling(max_new_tokens=size.new_tokens, eos=eos_ids(model.generation_config, tokenizer))
    hf_engine(model, tokenizer, prompts[:1], Sampling(max_new_tokens=2, eos=s.eos), 1)  # warm-up: kernels, allocator
    generation = {}
    for batch, subset in ((1, prompts[: size.batch1_prompts]), (size.gen_batch, prompts)):
        seconds, tokens = timed(lambda: hf_engine(model, tokenizer, subset, s, batch))
        generation[f"batch_{batch}"] = {"prompts": len(subset), "seconds": seconds, "tokens": sum(map(len, tokens)),
                                        "tokens_per_s": sum(map(len, tokens)) / seconds}
    generation["batched_over_batch_1"] = (generation[f"batch_{size.gen_batch}"]["tokens_per_s"]
                                          / generation["batch_1"]["tokens_per_s"])
    seconds, tokens = timed(lambda: hf_engine(model, tokenizer, prompts, s, size.gen_batch, continuous=True))
    generation["continuous"] = {"prompts": len(prompts), "seconds": seconds, "tokens": sum(map(len, tokens)),
                                "tokens_per_s": sum(map(len, tokens)) / seconds}
    generation["continuous_over_batched"] = (generation["continuous"]["tokens_per_s"]
                                             / generation[f"batch_{size.gen_batch}"]["tokens_per_s"])
    del model
    generation["vllm"] = vllm_generation(checkpoint, cfg.model.dtype, prompts, s, device)
    if "tokens_per_s" in generation["vllm"]:
        generation["vllm_over_batched"] = (generation["vllm"]["tokens_per_s"]
                                           / generation[f"batch_{size.gen_batch}"]["tokens_per_s"])
    out["generation"] = {"max_new_tokens": size.new_tokens, **generation}
    return out


def vllm_generation(checkpoint: Path, dtype: str, prompts: list[list[int]], s, device: torch.device) -> dict:
    """The same prompts through the eval stage's vLLM engine (a worker process of this python), where vLLM is
    installed; else why not. Its start-up (and compilation) is untimed."""
    from im_repro.evaluate.generate import VLLMEngine, vllm_version

    version = vllm_version(sys.executable)
    if version is None:
        return {"skipped": f"vLLM is not installed for {sys.executable}: pip install vllm there (its CUDA wheels, "
                           "hundreds of MB, do not travel with the repository as .whl/ does)"}
    memory = 0.5 if device.type == "cuda" else 0.15  # on vLLM's CPU backend: the share of host memory
    engine = VLLMEngine(str(checkpoint), str(checkpoint), dtype=dtype, python=sys.executable,
                        gpu_memory_utilization=memory, args={"enforce_eager": device.type != "cuda"})
    try:
        engine.complete(prompts[:1], type(s)(max_new_tokens=2, eos=s.eos))
        seconds, tokens = timed(lambda: [row[0] for row in engine.complete(prompts, s)])
    finally:
        engine.close()
    return {"version": version, "prompts": len(prompts), "seconds": seconds, "tokens": sum(map(len, tokens)),
            "tokens_per_s": sum(map(len, tokens)) / seconds}


# ----------------------------------------------------------------------------------------------- report ---------


def summary_rows(result: dict) -> list[tuple[str, float | None]]:
    s = result["sections"]
    rows: list[tuple[str, float | None]] = []
    if "configs" in s.get("train", {}):
        t = s["train"]
        rows += [("packed / padded effective tokens/s", t["packed_over_padded"]),
                 ("packed MFU", t["configs"]["packed"]["mfu"]), ("IM / IT step time (median)", t["im_it_step_time"])]
    if "it" in s.get("numerics", {}):
        rows += [("packed vs padded loss, rel diff", max(s["numerics"][m]["loss_rel_diff"] for m in MODES)),
                 ("packed vs padded gradient, rel diff", max(s["numerics"][m]["grad_rel_diff"] for m in MODES))]
    if "zero2" in s.get("deepspeed", {}):
        ds = s["deepspeed"]
        rows += [(f"DeepSpeed {z} saved and resumed", float(ds[z]["deepspeed_checkpoint"] and ds[z]["resumed"]))
                 for z in ("zero2", "zero3")]
    if "lm_eval" in s.get("eval", {}):
        e = s["eval"]
        rows += [("lm-eval log-likelihood requests/s", e["lm_eval"]["requests_per_s"]),
                 ("generation tokens/s, batch 1", e["generation"]["batch_1"]["tokens_per_s"]),
                 ("generation batched / batch 1", e["generation"]["batched_over_batch_1"]),
                 ("generation HF continuous / batched", e["generation"]["continuous_over_batched"]),
                 ("generation vLLM / HF batched", e["generation"].get("vllm_over_batched"))]
    return rows


def print_report(result: dict) -> None:
    d = result["device"]
    print(f"\ndevice: {d['name']}  bf16 peak: {d['peak_bf16_tflops'] or 'unknown'} TFLOP/s  torch {d['torch']}  "
          f"transformers {d['transformers']}  total {result['seconds']:.0f} s")
    train_result = result["sections"].get("train", {})
    if "configs" in train_result:
        print(f"\ntrain: {train_result['model']} ({train_result['parameters'] / 1e6:.0f}M), attention "
              f"{train_result['attention']}, global batch {train_result['global_batch']}")
        print(f"  {'layout':8} {'tokens':>7} {'computed':>9} {'IT tok/s':>10} {'IM tok/s':>10} {'IM/IT':>6} {'MFU':>6} "
              f"{'peak GiB':>8}")
        for config, c in train_result["configs"].items():
            mfu = f"{c['mfu']:6.1%}" if c["mfu"] is not None else f"{'-':>6}"
            mem = f"{c['peak_memory_gib']:8.1f}" if c["peak_memory_gib"] is not None else f"{'-':>8}"
            print(f"  {config:8} {c['effective_tokens']:7d} {c['computed_positions']:9d} {c['it_tokens_per_s']:10.0f} "
                  f"{c['im_tokens_per_s']:10.0f} {c['im_it_step_time']:6.3f} {mfu} {mem}")
    print(f"\n  {'measurement':38} {'value':>10}   {'target':10} met")
    for name, value in summary_rows(result):
        target, test = TARGETS.get(name, ("", None))
        met = "-" if test is None or value is None else "yes" if test(value) else "NO"
        print(f"  {name:38} {'-' if value is None else f'{value:10.4g}':>10}   {target:10} {met}")
    for name, section in result["sections"].items():
        if "error" in section:
            print(f"\n{name}: FAILED\n{section['error']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="run on the CPU even where a GPU is present")
    p.add_argument("--tiny", action="store_true", help="toy sizes (model=tiny, few examples and steps)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {','.join(SECTIONS)}")
    p.add_argument("--attention", help="the packed layout's kernel (default: flash_attention_2, flex_attention, sdpa)")
    p.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, where the name is not in the table")
    p.add_argument("--out", default="gpu_check.json")
    p.add_argument("--write-lengths", type=Path, metavar="LIMA_JSONL", help="rebuild scripts/data/lima_lengths.json")
    args = p.parse_args()
    if args.write_lengths:
        return write_lengths(args.write_lengths)

    sections = args.sections.split(",")
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        p.error(f"--sections: unknown {sorted(unknown)}; have {','.join(SECTIONS)}")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    size = SIZES["tiny" if args.tiny else "full"]
    torch.manual_seed(0)
    result = {"device": device_info(device, args.peak_tflops), "size": "tiny" if args.tiny else "full",
              "sections": {}}
    start = time.perf_counter()
    bench = None
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        for name in sections:
            print(f"== {name}", flush=True)
            section_start = time.perf_counter()
            try:
                if name in ("numerics", "train") and bench is None:
                    bench = Bench(size, device, args.attention)
                if name == "numerics":
                    out = numerics(bench)
                elif name == "train":
                    out = train(bench, size, result["device"]["peak_bf16_tflops"])
                elif name == "deepspeed":
                    out = deepspeed(Path(tmp), device.type == "cuda")
                else:
                    out = evaluation(bench, size, Path(tmp), device)
                    bench = None
            except Exception:  # recorded and shown: one broken section must not hide the others' numbers
                out = {"error": traceback.format_exc()[-4000:]}
            result["sections"][name] = {**out, "seconds": time.perf_counter() - section_start}
    result["seconds"] = time.perf_counter() - start
    result["summary"] = {name: value for name, value in summary_rows(result)}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print_report(result)
    print(f"\nwrote {args.out}")
    sys.exit(1 if any("error" in s for s in result["sections"].values()) else 0)


if __name__ == "__main__":
    main()
