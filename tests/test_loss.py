"""The loss of every method against its definition in float64, its invariance to how a global batch is split, and the
fused cross-entropy against the plain one.

Each method is a per-token weight w(segment) x f(probability) and a reduction (train.LossSpec). The reference below is
written out per example and per token in float64 from the method's own definition (its paper's), on a float64 copy of
the model; it shares with the code under test only the token classes (masking.py, golden-tested on its own)."""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch

from im_repro import train
from im_repro.collate import Collator
from im_repro.masking import encode_batch
from im_repro.model import load_model
from im_repro.templates import Span
from tests.conftest import CONVERSATIONS, REPO, compose_with

# method -> (its config, the weight of each segment by definition, f(p), reduction) as its paper defines it
METHODS = {
    "it": ({}, {Span.OUTPUT: 1.0}, "segment", "per_example"),
    "im": ({}, {Span.INSTRUCTION: 1.0, Span.OUTPUT: 1.0}, "segment", "per_example"),
    "weighted": (("method.prompt_loss_weight=0.3",), {Span.INSTRUCTION: 0.3, Span.OUTPUT: 1.0}, "segment",
                 "per_example"),
    "wit": (("method.prompt_loss_weight=0.3", "method.response_weight=0.6"),
            {Span.INSTRUCTION: 0.3, Span.OUTPUT: 0.6}, "segment", "per_token_nonzero"),
    "dft": ({}, {Span.OUTPUT: 1.0}, "dft", "per_token"),
    "im_dft": ({}, {Span.INSTRUCTION: 1.0, Span.OUTPUT: 1.0}, "dft", "per_token"),
}


def conversations(n: int) -> list[list[dict]]:
    import json

    rows = [json.loads(line) for line in CONVERSATIONS.read_text().splitlines()]
    return [r["messages"] for r in rows[:n]]


@pytest.fixture(scope="module")
def tiny(llama2):
    torch.manual_seed(0)
    cfg = compose_with("model=tiny", "+model.arch.initializer_range=0.5")  # far from uniform: f(p) matters
    return load_model(cfg.model, len(llama2)).float(), llama2


def examples(tokenizer, cfg, n: int = 6, max_len: int = 96) -> list[dict]:
    mask = cfg.method.mask.value
    encoded = encode_batch(conversations(n), tokenizer, mask, "tulu", max_len, cfg.method.prompt_loss_weight)
    return [{**e.as_dict(), "token_class": e.token_class.tolist()} for e in encoded]


def reference(model, batch_examples: list[dict], weights: dict, weighting: str, reduction: str) -> torch.Tensor:
    """The method's loss by its definition: per example, per predicted token t, w(segment_t) f(p_t) (-log p_t) with
    p_t the model's probability of token t (f = 1, or p_t stop-gradient for DFT), summed and divided as the reduction
    says (by the weights' sum, or by the count of non-zero weights; per example then averaged, or over the batch)."""
    nums, dens = [], []
    for e in batch_examples:
        ids = torch.tensor(e["input_ids"])
        logp = torch.log_softmax(model(ids[None]).logits[0].double(), -1)
        num, den = torch.zeros((), dtype=torch.float64), 0.0
        for t in range(1, len(ids)):
            w = weights.get(e["token_class"][t], 0.0)
            if w == 0.0:
                continue
            lp = logp[t - 1, ids[t]]
            f = lp.exp().detach() if weighting == "dft" else 1.0
            num = num - w * f * lp
            den += 1.0 if reduction.endswith("_nonzero") else w
        nums.append(num)
        dens.append(den)
    if reduction.startswith("per_token"):
        return sum(nums) / sum(dens)
    kept = [n / d for n, d in zip(nums, dens) if d > 0]
    return sum(kept) / len(kept)


def grads_of(model, loss) -> torch.Tensor:
    model.zero_grad()
    loss.backward()
    return torch.cat([p.grad.flatten().double() for p in model.parameters()])


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_methods_loss_and_gradient_equal_its_definition_in_float64(tiny, method):
    model, tokenizer = tiny
    extra, weights, weighting, reduction = METHODS[method]
    cfg = compose_with("model=tiny", f"method={method}", *extra)
    spec = train.LossSpec.of(cfg)
    assert (spec.weighting, spec.reduction, spec.kernel) == (weighting, reduction, "plain")
    batch_examples = examples(tokenizer, cfg)
    batch = Collator(pad_token_id=0)(batch_examples)
    total, norm, *_ = train.forward_loss(model, batch, spec)
    ours = total / norm
    ours_grad = grads_of(model, ours)

    model64 = copy.deepcopy(model).double()
    theirs = reference(model64, batch_examples, weights, weighting, reduction)
    theirs_grad = grads_of(model64, theirs)
    assert float(ours.detach()) == pytest.approx(float(theirs.detach()), rel=1e-5)
    assert relative(ours_grad, theirs_grad) < 1e-4  # float32 against float64, large logits (initializer_range 0.5)
    # The check has power: the method under another reduction is another loss (and gradient)
    other = "per_token" if reduction.startswith("per_example") else "per_example"
    wrong = reference(model64, batch_examples, weights, weighting, other)
    assert float(wrong.detach()) != pytest.approx(float(theirs.detach()), rel=1e-3)


def test_dft_scales_each_tokens_loss_by_its_probability_not_the_normaliser(tiny):
    model, tokenizer = tiny
    cfg = compose_with("model=tiny", "method=dft")
    batch = Collator(pad_token_id=0)(examples(tokenizer, cfg))
    spec = train.LossSpec.of(cfg)
    dft_total, dft_norm, ce, s, _ = train.forward_loss(model, batch, spec)
    plain_total, plain_norm, *_ = train.forward_loss(model, batch, train.LossSpec("per_token"))
    assert float(dft_norm) == float(plain_norm) == float(s["weights"].sum())  # known before the forward pass
    assert float(dft_norm) == float(train.normaliser(batch, spec))
    assert float(dft_total.detach()) < float(plain_total.detach())  # every probability is below 1


# ------------------------------------------------------------------------------------------ invariance ---------

LAYOUTS = {  # (micro-batch, accumulation, packed): one global batch of 16 examples
    "16x1": (16, 1, False), "4x4": (4, 4, False), "1x16": (1, 16, False), "4x4 packed": (4, 4, True),
    "16x1 packed": (16, 1, True),
}
REDUCTIONS = ("per_example", "per_token", "per_example_nonzero", "per_token_nonzero")


class FirstStep(train.TrainerCallback):
    """The gradient of the first optimizer step (before the optimizer moves anything) and the step's logged loss."""

    def __init__(self):
        self.grad, self.loss = None, None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grad = torch.cat([p.grad.flatten().double().clone() for p in model.parameters() if p.grad is not None])

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.loss is None and logs and "loss" in logs:
            self.loss = float(logs["loss"])


def one_step(tmp: Path, reduction: str, micro: int, accumulation: int, packed: bool, processes: int = 1):
    """The train stage's Trainer (train.trainer_for) for one optimizer step of a global batch of 16 examples."""
    cfg = compose_with("data=lima", f"data.path={CONVERSATIONS}", "data.limit=16", "model=tiny", "train=smoke",
                       "method=weighted", "method.prompt_loss_weight=0.3", "method.response_weight=0.6",
                       f"method.reduction={reduction}", "train.max_seq_length=128", "train.global_batch_size=16",
                       f"train.per_device_batch_size={micro}", f"train.packing={packed}", "train.max_steps=1",
                       "train.max_grad_norm=0", "train.save_strategy=no", "train.learning_rate=1e-9")
    assert accumulation * micro * processes == 16
    from im_repro.run import execute

    if not (tmp / "prepare" / "_COMPLETE").exists():
        execute(cfg, tmp, ["prepare"])
    step = FirstStep()
    trainer = train.trainer_for(cfg, tmp / f"train-{reduction}-{micro}-{packed}",
                                datasets.load_from_disk(str(tmp / "prepare" / "dataset")), callbacks=[step])
    trainer.train()
    return step


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("invariance")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IM_REPRO_CACHE", str(tmp / "cache"))
        yield tmp


@pytest.fixture(scope="module")
def reference_steps(prepared):
    """One step at 16 x 1 for every reduction: the reference both Trainer tests compare against (run once)."""
    return {reduction: one_step(prepared, reduction, *LAYOUTS["16x1"]) for reduction in REDUCTIONS}


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_the_global_batch_loss_does_not_depend_on_its_micro_batches(llama2, reduction):
    """What ITTrainer does per optimizer step, without the Trainer: the global batch's normaliser (the sum of every
    micro-batch's, known before any forward pass), each micro-batch's sum divided by it, the gradients accumulated."""
    torch.manual_seed(0)
    model, tokenizer = load_model(compose_with("model=tiny").model, len(llama2)), llama2  # the train stage's model
    cfg = compose_with("model=tiny", "method=weighted", "method.prompt_loss_weight=0.3", "method.response_weight=0.6",
                       f"method.reduction={reduction}")
    spec, batch_examples = train.LossSpec.of(cfg), examples(tokenizer, cfg, n=16)
    results = {}
    for name in ("16x1", "1x16", "4x4 packed"):  # the Trainer's test below (slow) takes every layout
        micro, _, packed = LAYOUTS[name]
        collate = Collator(pad_token_id=0, packing=packed)
        batches = [collate(batch_examples[i:i + micro]) for i in range(0, 16, micro)]
        norm = sum(train.normaliser(b, spec) for b in batches)
        model.zero_grad()
        loss = 0.0
        for b in batches:
            part = train.forward_loss(model, b, spec)[0] / norm
            part.backward()
            loss += float(part.detach())
        results[name] = (loss, torch.cat([q.grad.flatten().double() for q in model.parameters()]))
    ref_loss, ref_grad = results["16x1"]
    for name, (loss, grad) in results.items():
        assert loss == pytest.approx(ref_loss, rel=1e-6) and relative(grad, ref_grad) < 1e-6, name


# Each reduction against one other layout, so that every layout and every reduction is stepped: 8 Trainer runs
# instead of 20 (the fast test above crosses them all without the Trainer).
SPLITS = dict(zip(REDUCTIONS, ("1x16", "4x4 packed", "16x1 packed", "4x4")))


@pytest.mark.slow  # 8 one-step runs of the Trainer (about a minute on 2 cores)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_one_steps_loss_and_gradient_do_not_depend_on_how_the_batch_is_split(prepared, reference_steps, reduction):
    """axolotl #3196 saw a first-step loss of 2.4 at micro-batch 16 x accumulation 1 and 4.75 at 1 x 16: here a
    split layout, padded or packed, gives the 16 x 1 loss and gradient (float32, 1e-6 relative)."""
    ref, step = reference_steps[reduction], one_step(prepared, reduction, *LAYOUTS[SPLITS[reduction]])
    assert step.loss == pytest.approx(ref.loss, rel=1e-6), (SPLITS[reduction], step.loss, ref.loss)
    assert relative(step.grad, ref.grad) < 1e-6, SPLITS[reduction]


# Run by the test below under `accelerate launch --num_processes 2`: one step at 4 x 2 on each process, on the data
# the test prepared (prepare runs in one process).
if __name__ == "__main__" and os.environ.get("IM_REPRO_INVARIANCE_OUT"):
    out, data = Path(os.environ["IM_REPRO_INVARIANCE_OUT"]), Path(os.environ["IM_REPRO_INVARIANCE_DATA"])
    for red in REDUCTIONS:
        result = one_step(data, red, 4, 2, False, processes=2)
        if int(os.environ.get("RANK", 0)) == 0:
            torch.save({"grad": result.grad, "loss": result.loss}, out / f"{red}.pt")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_give_one_process_loss_and_gradient(prepared, reference_steps, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "IM_REPRO_CACHE": str(prepared / "cache"),
           "IM_REPRO_INVARIANCE_OUT": str(tmp_path), "IM_REPRO_INVARIANCE_DATA": str(prepared),
           "PYTHONPATH": str(REPO)}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        env.pop(name, None)
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu",
                           "--main_process_port", str(free_port()), str(Path(__file__))], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    for reduction, ref in reference_steps.items():
        two = torch.load(tmp_path / f"{reduction}.pt")
        assert two["loss"] == pytest.approx(ref.loss, rel=1e-6), reduction
        assert relative(two["grad"], ref.grad) < 1e-6, reduction


# ------------------------------------------------------------------------------------------ fused kernel -------


@pytest.mark.slow  # cut-cross-entropy's CPU path compiles with torch.compile first (a minute or two)
@pytest.mark.parametrize("method", ["weighted", "dft"])
def test_the_fused_cross_entropy_equals_the_plain_one(tiny, method):
    pytest.importorskip("cut_cross_entropy", reason="pip install '.[cce]'")
    model, tokenizer = tiny
    cfg = compose_with("model=tiny", f"method={method}")
    batch = Collator(pad_token_id=0)(examples(tokenizer, cfg))
    spec = train.LossSpec.of(cfg)
    losses, grads = {}, {}
    for kernel in ("plain", "cce"):
        total, norm, *_ = train.forward_loss(model, batch, train.LossSpec(**{**spec.__dict__, "kernel": kernel}))
        losses[kernel] = total / norm
        grads[kernel] = grads_of(model, losses[kernel])
    assert float(losses["cce"]) == pytest.approx(float(losses["plain"]), rel=1e-5)
    assert relative(grads["cce"], grads["plain"]) < 1e-5
