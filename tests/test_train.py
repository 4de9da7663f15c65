"""The train stage on CPU with a tiny random Llama (real Llama-2 tokenizer): modes, over-fitting, resumption,
determinism, packing, KL and the errors that must come before any compute."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.integrations.neftune import activate_neftune

from im_repro import config, train
from im_repro.common import UserError
from im_repro.run import execute
from im_repro.collate import Collator
from im_repro.masking import encode_full
from im_repro.model import load_model
from im_repro.templates import Span
from tests.conftest import CONVERSATIONS, compose_with

SMALL = ("model=tiny", "train=smoke", "train.max_seq_length=128", "train.global_batch_size=4",
         "train.per_device_batch_size=2", "train.max_steps=2", "train.save_strategy=no")


def pipeline(run_dir, *overrides, limit=16, stages=("prepare", "train")):
    cfg = compose_with("data=lima", f"data.path={CONVERSATIONS}", f"data.limit={limit}",
                       *SMALL, *overrides)
    execute(cfg, run_dir, list(stages))
    return cfg


def logs(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train" / "log.jsonl").read_text().splitlines()]


def final_state(run_dir) -> dict:
    return AutoModelForCausalLM.from_pretrained(run_dir / "train" / "final").state_dict()


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("IM_REPRO_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("mask", ["it", "im", "im_released", "weighted"])
def test_each_mode_trains_and_leaves_a_loadable_checkpoint(tmp_path, mask):
    pipeline(tmp_path, f"method={mask}")
    steps = [r for r in logs(tmp_path) if "loss" in r]
    assert len(steps) == 2 and all(r["loss"] > 0 and r["output_loss"] > 0 for r in steps)
    assert all(r["instruction_loss"] > 0 for r in steps)  # logged whatever the mode
    final = tmp_path / "train" / "final"
    assert (tmp_path / "train" / "_COMPLETE").exists()
    tok = AutoTokenizer.from_pretrained(final)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|user|>\nHi\n<|assistant|>\n"  # the paper's inference prompt
    AutoModelForCausalLM.from_pretrained(final)


def test_loss_falls_when_overfitting_eight_examples(tmp_path):
    pipeline(tmp_path, "method=im", "train.max_steps=25", "train.learning_rate=1e-2", "train.lr_scheduler=constant",
             "train.global_batch_size=8",
             "train.per_device_batch_size=8", limit=8)
    losses = [r["loss"] for r in logs(tmp_path) if "loss" in r]
    assert losses[-1] < 0.6 * losses[0], losses


def test_same_seed_same_losses(tmp_path):
    pipeline(tmp_path / "a", "method=it")
    pipeline(tmp_path / "b", "method=it")
    key = lambda r: (r["loss"], r["grad_norm"], r["output_loss"])  # noqa: E731
    assert [key(r) for r in logs(tmp_path / "a") if "loss" in r] == [key(r) for r in logs(tmp_path / "b") if "loss" in r]


# The tiny model's first logged step on the fixture (seed 42, CPU float32, SMALL above), per loss mode: its loss and
# gradient norm (rtol 1e-4) and its supervised tokens (exact). A random model is near uniform, so its loss barely
# moves with the mask or the weights (output tokens at weight 0.9 under `weighted` stays within 1e-4); the gradient
# norm and the token count are what catch such a change. Obtained once by running this pipeline with
# train.max_steps=1 and reading train/log.jsonl (the same to 1e-6 under 1 and 2 torch threads). A change here is a
# change of the numbers every run reports: re-pin only when that is intended, and say so in the commit.
FIRST_STEP = {  # method: (loss, grad_norm, supervised_tokens)
    "it": (10.39494514465332, 1.790690541267395, 112),
    "im": (10.381864547729492, 1.6928625106811523, 155),
    "weighted": (10.387391090393066, 1.699923038482666, 155),  # prompt_loss_weight=0.5: IM's tokens, weighted
}


@pytest.mark.parametrize("method", sorted(FIRST_STEP))
def test_first_step_of_the_tiny_model_is_pinned(tmp_path, method):
    pipeline(tmp_path, f"method={method}", "train.max_steps=1")
    first = next(r for r in logs(tmp_path) if "loss" in r)
    loss, grad_norm, supervised = FIRST_STEP[method]
    assert (first["step"], first["supervised_tokens"]) == (1, supervised)
    assert (first["loss"], first["grad_norm"]) == pytest.approx((loss, grad_norm), rel=1e-4, abs=0)


RESUMABLE = ("method=im", "train.max_steps=4", "train.save_strategy=steps", "train.save_steps=2")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The run the interrupted ones must end up equal to."""
    run_dir = tmp_path_factory.mktemp("whole")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IM_REPRO_CACHE", str(run_dir / "cache"))
        pipeline(run_dir, *RESUMABLE)
    return run_dir


def test_killed_run_resumes_to_the_same_weights(tmp_path, monkeypatch, uninterrupted):

    calls = {"n": 0}
    step = train.ITTrainer.training_step

    def dies_in_step_3(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3 * 2:  # 2 accumulation micro-steps per optimiser step
            raise KeyboardInterrupt("killed")
        return step(self, *args, **kwargs)

    monkeypatch.setattr(train.ITTrainer, "training_step", dies_in_step_3)
    with pytest.raises(KeyboardInterrupt):
        pipeline(tmp_path / "killed", *RESUMABLE)
    assert not (tmp_path / "killed" / "train" / "_COMPLETE").exists()
    assert (tmp_path / "killed" / "train" / "checkpoints" / "checkpoint-2").exists()
    monkeypatch.setattr(train.ITTrainer, "training_step", step)
    pipeline(tmp_path / "killed", *RESUMABLE, stages=("train",))  # the same command again

    whole, resumed = final_state(uninterrupted), final_state(tmp_path / "killed")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert [r["step"] for r in logs(tmp_path / "killed") if "loss" in r] == [1, 2, 3, 4]


def test_kill_mid_save_resumes_from_the_last_complete_checkpoint(tmp_path, monkeypatch, uninterrupted):

    save = train.ITTrainer._save_optimizer_and_scheduler

    def killed_saving_step_4(self, output_dir):
        if output_dir.endswith("checkpoint-4"):  # the weights are written, nothing after them
            raise KeyboardInterrupt("killed mid-save")
        return save(self, output_dir)

    monkeypatch.setattr(train.ITTrainer, "_save_optimizer_and_scheduler", killed_saving_step_4)
    with pytest.raises(KeyboardInterrupt):
        pipeline(tmp_path / "killed", *RESUMABLE)
    checkpoints = tmp_path / "killed" / "train" / "checkpoints"
    half = checkpoints / "checkpoint-4"
    assert {"config.json", "model.safetensors"} <= {p.name for p in half.iterdir()}
    assert not (half / "trainer_state.json").exists()
    assert train.last_complete_checkpoint(checkpoints) == (checkpoints / "checkpoint-2", [half])

    monkeypatch.setattr(train.ITTrainer, "_save_optimizer_and_scheduler", save)
    pipeline(tmp_path / "killed", *RESUMABLE, stages=("train",))  # the same command again

    whole, resumed = final_state(uninterrupted), final_state(tmp_path / "killed")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    key = lambda r: (r["step"], r.get("loss"), r.get("grad_norm"), "train_runtime" in r)  # noqa: E731
    assert [key(r) for r in logs(tmp_path / "killed")] == [key(r) for r in logs(uninterrupted)]
    assert [r["step"] for r in logs(tmp_path / "killed") if "loss" in r] == [1, 2, 3, 4]
    assert train.complete_checkpoint(half)


def test_log_is_cut_back_to_the_resumed_step(tmp_path):
    path = tmp_path / "log.jsonl"
    records = [{"step": k, "loss": 1.0 / k} for k in range(1, 6)] + [{"step": 5, "train_runtime": 1.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 6, "lo')
    train.truncate_log(path, 3)
    assert [json.loads(line) for line in path.read_text().splitlines()] == records[:3]
    train.truncate_log(path, 0)  # killed before the first checkpoint: training starts again from step 0
    assert path.read_text() == ""


# ------------------------------------------------------------------------------ losses without a Trainer -----


@pytest.fixture(scope="module")
def tiny_and_batch(llama2):
    torch.manual_seed(0)
    model = load_model(compose_with("model=tiny").model, len(llama2))
    convs = [
        [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue, like the sky."}],
        [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "4"}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help you today?"},
         {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Ciao"}],
    ]
    examples = []
    for messages in convs:
        e = encode_full(messages, llama2, mask="weighted", prompt_loss_weight=0.5)
        examples.append({**e.as_dict(), "token_class": e.token_class.tolist()})
    return model, examples


def loss_and_grads(model, batch, reduction, ref_model=None, **kw):
    model.zero_grad()
    total, norm, *_ = train.forward_loss(model, batch, train.LossSpec(reduction, **kw), ref_model)
    loss = total / norm
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_packing_fills_gaps_first_fit_decreasing():
    # In arrival order, 5 | 5+3 | 3 needs three rows of 8; filling gaps first needs two, with no filler at all.
    rows, used = Collator(pad_token_id=0, packing=True, max_row_tokens=8).bins([5, 5, 3, 3])
    assert rows == [[0, 2], [1, 3]] and used == [8, 8]
    assert Collator(pad_token_id=0, packing=True).bins([2, 7, 4]) == ([[1, 2, 0]], [13])


@pytest.mark.parametrize("reduction", ["per_token", "per_example"])
@pytest.mark.parametrize("row_cap", [None, 60])  # one row, or two rows of which one ends in a padding segment
def test_packed_loss_and_gradients_equal_padded(tiny_and_batch, reduction, row_cap):
    model, examples = tiny_and_batch
    padded = Collator(pad_token_id=0, packing=False)(examples)
    packed = Collator(pad_token_id=0, packing=True, max_row_tokens=row_cap)(examples)
    real = int((packed["example_index"] >= 0).sum())
    assert packed["input_ids"].shape[0] == (1 if row_cap is None else 2) and real == padded["attention_mask"].sum()
    loss_a, grads_a = loss_and_grads(model, padded, reduction)
    loss_b, grads_b = loss_and_grads(model, packed, reduction)
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_per_example_normalisation_weighs_examples_equally(tiny_and_batch):
    model, examples = tiny_and_batch
    batch = Collator(pad_token_id=0)(examples)
    with torch.no_grad():
        _, _, ce, s, _ = train.forward_loss(model, batch, train.LossSpec("per_token"))
        total, norm = train.weighted_sum(ce, s["weights"], s["example"], "per_example")
    means = [float((ce[r] * s["weights"][r]).sum() / s["weights"][r].sum()) for r in range(len(examples))]
    assert norm == len(examples) and float(total / norm) == pytest.approx(sum(means) / len(means), rel=1e-6)


@pytest.mark.parametrize("per", ["per_token", "per_example"])
@pytest.mark.parametrize("divisor", ["weight_sum", "nonzero_tokens"])  # the reduction's "_nonzero" suffix or not
@pytest.mark.parametrize("response_weight", [None, 0.5])
def test_weighted_loss_equals_a_float64_loop(per, divisor, response_weight):
    """method=weighted's loss against the definitions written out per token in float64: a packed row of two examples
    and a padded row, template 0, instruction 0.1, output 1 (times the response weight)."""
    gen = torch.Generator().manual_seed(0)
    example = torch.tensor([[0] * 5 + [1] * 7, [2] * 8 + [-1] * 4])
    classes = torch.randint(0, 3, example.shape, generator=gen)
    classes[:, 0] = classes[0, 5] = classes[1, 8:] = -1  # each example's BOS, and padding: weight 0 (SPECIAL)
    prepared = torch.tensor([0.0, 0.0, 0.1, 1.0])[classes + 1]
    batch = {"input_ids": torch.zeros_like(example), "loss_weights": prepared, "token_class": classes,
             "example_index": example}
    values = torch.rand(2, 11, generator=gen)  # a per-position loss
    reduction = per + ("_nonzero" if divisor == "nonzero_tokens" else "")
    s = train.shifted(batch, response_weight)
    total, norm = train.weighted_sum(values, s["weights"], s["example"], reduction)

    num, den = {}, {}  # per example: sum of w v, and of what the mean divides by
    for r in range(2):
        for t in range(1, 12):
            w = float(prepared[r, t]) * (response_weight or 1.0 if int(classes[r, t]) == Span.OUTPUT else 1.0)
            e = int(example[r, t])
            num[e] = num.get(e, 0.0) + w * float(values[r, t - 1])
            den[e] = den.get(e, 0.0) + (w if divisor == "weight_sum" else float(w > 0))
    if per == "per_token":
        expected = sum(num.values()) / sum(den.values())
    else:
        means = [num[e] / den[e] for e in num if e >= 0 and den[e] > 0]
        expected = sum(means) / len(means)
    assert float(total / norm) == pytest.approx(expected, rel=1e-6)
    assert float(train.normaliser(batch, train.LossSpec(reduction, response_weight))) == pytest.approx(float(norm))


def test_weighting_knobs_are_refused_outside_mask_weighted():
    with pytest.raises(UserError, match="act on mask=weighted's weights only .* not mask=im"):
        config.validate(compose_with("method=im", "method.reduction=per_example_nonzero"))
    with pytest.raises(UserError, match=r"method.response_weight=0.0 \(must be > 0"):
        config.validate(compose_with("method=weighted", "method.response_weight=0"))


def test_kl_released_at_lambda_one_has_zero_gradient(tiny_and_batch):
    """PAPER.md §5.2: CE + (log p - log p_ref) cancels the CE's gradient exactly."""
    model, examples = tiny_and_batch
    batch = Collator(pad_token_id=0)(examples)
    ref = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():  # move away from the reference, so the cancellation is not the trivial theta == ref
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    _, ce_grads = loss_and_grads(model, batch, "per_token")
    _, grads = loss_and_grads(model, batch, "per_token", ref, kl_mode="kl_released", kl_weight=1.0)
    assert max(g.abs().max() for g in ce_grads) > 1e-3
    assert max(g.abs().max() for g in grads) < 1e-6


def test_real_kl_is_zero_at_the_reference_and_positive_away_from_it(tiny_and_batch):
    model, examples = tiny_and_batch
    batch = Collator(pad_token_id=0)(examples)
    ref = copy.deepcopy(model).requires_grad_(False)
    plain, _ = loss_and_grads(model, batch, "per_token")
    at_ref, _ = loss_and_grads(model, batch, "per_token", ref, kl_mode="kl", kl_weight=1.0)
    torch.testing.assert_close(plain, at_ref)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    away, _ = loss_and_grads(model, batch, "per_token", ref, kl_mode="kl", kl_weight=1.0)
    assert away > plain


ALPHA, VOCAB = 5.0, 512


def neftune_examples(n=16):
    g = torch.Generator().manual_seed(0)
    # at least 64 tokens of width 64: the largest of >= 4096 uniform draws is within 0.3% of the bound (p > 1 - 1e-5)
    lengths = torch.randint(64, 320, (n,), generator=g).tolist()
    return [{"input_ids": ids, "labels": ids, "token_class": [Span.OUTPUT] * len(ids)}
            for ids in (torch.randint(3, VOCAB, (k,), generator=g).tolist() for k in lengths)]


def neftune_ratios(model, examples, micro_batch, packed, forward) -> list[tuple[float, int, int]]:
    """Per example: (the largest noise added to its embeddings over the paper's alpha / sqrt(L d), L its own length,
    the micro-batch's width W). Transformers' hook would give sqrt(L / W)."""
    emb = model.get_input_embeddings()
    seen = {}
    handle = emb.register_forward_hook(lambda m, i, out: seen.update(out=out.detach()))  # after the NEFTune hook
    ratios = []
    try:
        for start in range(0, len(examples), micro_batch):
            batch = Collator(pad_token_id=0, packing=packed)(examples[start:start + micro_batch])
            forward(batch)
            noise = (seen["out"] - emb.weight[batch["input_ids"]]).detach()
            idx = batch["example_index"]
            for e in idx[idx >= 0].unique():
                mine = idx == e
                length = int(mine.sum())
                paper = ALPHA / math.sqrt(length * noise.shape[-1])
                ratios.append((float(noise[mine].abs().max()) / paper, length, idx.shape[1]))
    finally:
        handle.remove()
    return ratios


@pytest.fixture(scope="module")
def neftune_models(tmp_path_factory):
    """A tiny model under ITTrainer's NEFTune, and one under transformers' hook."""
    cfg = compose_with("model=tiny", f"model.arch.vocab_size={VOCAB}", "train=smoke", "train.neftune_alpha=5")
    torch.manual_seed(0)
    model = load_model(cfg.model, VOCAB).train()
    args = train.training_arguments(cfg, tmp_path_factory.mktemp("neftune"), 1)
    trainer = train.ITTrainer(model=model, args=args, loss=train.LossSpec("per_token"),
                              neftune_alpha=cfg.train.neftune_alpha)
    reference = load_model(cfg.model, VOCAB).train()
    activate_neftune(reference, ALPHA)
    return ((model, lambda b: trainer.compute_loss(model, b)),
            (reference, lambda b: train.forward_loss(reference, b, train.LossSpec("per_token"))))


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("micro_batch", [1, 4, 16])
def test_neftune_scales_each_example_by_its_own_length(neftune_models, micro_batch, packed):
    examples = neftune_examples()
    (model, step), (reference, reference_step) = neftune_models
    ours = neftune_ratios(model, examples, micro_batch, packed, step)
    assert len(ours) == len(examples) and all(0.99 <= r <= 1.0 + 1e-5 for r, _, _ in ours), ours

    # The same measurement of transformers' hook finds its known drift, sqrt(L / W), so it would catch one.
    theirs = neftune_ratios(reference, examples, micro_batch, packed, reference_step)
    assert all(r == pytest.approx(math.sqrt(length / width), rel=0.01) for r, length, width in theirs), theirs
    assert (min(r for r, _, _ in theirs) < 0.9) == (micro_batch > 1)


def test_kl_and_neftune_train_end_to_end(tmp_path):
    pipeline(tmp_path / "kl", "method=it", "train.kl.mode=kl", "train.kl.weight=0.1")
    pipeline(tmp_path / "neft", "method=im", "train.neftune_alpha=5")
    for run in ("kl", "neft"):
        assert all(r["loss"] > 0 for r in logs(tmp_path / run) if "loss" in r)


def test_wandb_writes_under_the_run_directory(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)  # restored after the test, whatever train sets
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    pipeline(tmp_path / "run", "method=it", "train.max_steps=1", "train.report_to=[wandb]", limit=4)
    assert list((tmp_path / "run" / "train" / "wandb").glob("offline-run-*"))
    assert not list((tmp_path / "cwd").iterdir())


# ------------------------------------------------------------------------------ errors before compute --------


def test_bad_settings_fail_before_any_compute(tmp_path):
    pipeline(tmp_path, "method=it", stages=("prepare",))
    with pytest.raises(UserError, match="not a multiple of"):
        pipeline(tmp_path, "method=it", "train.global_batch_size=5", stages=("train",))
    assert not (tmp_path / "train").exists()
    with pytest.raises(UserError, match="train needs the prepare stage's output"):
        pipeline(tmp_path / "fresh", "method=it", stages=("train",))
    with pytest.raises(FileNotFoundError, match="cannot load"):
        pipeline(tmp_path, "method=it", "model.init=pretrained", f"model.path={tmp_path / 'nowhere'}",
                 stages=("train",))


def test_max_length_below_the_template_drops_everything_with_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no example has a supervised token"):
        pipeline(tmp_path, "method=it", "train.max_seq_length=8", stages=("prepare",))


@pytest.mark.slow
def test_smollm2_fine_tunes_a_few_steps(tmp_path):
    pipeline(tmp_path, "model=smollm2", "method=im", "train.max_steps=3", "train.learning_rate=1e-5", limit=12)
    losses = [r["output_loss"] for r in logs(tmp_path) if "loss" in r]
    assert all(0 < x < 6 for x in losses), losses  # a pretrained instruct model, not a random one (~10.4)
