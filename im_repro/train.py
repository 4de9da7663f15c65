"""The train stage: a prepared dataset + a base model -> an instruction-tuned checkpoint (transformers' Trainer).

    im-repro stages=[prepare,train] data=lima model=tiny method=im train=smoke
    accelerate launch --config_file conf/accelerate/deepspeed_zero3.yaml -m im_repro stages=[train] train=paper ...   (docs/multi_gpu.md)

What the Trainer does not do and this module adds, in `ITTrainer.compute_loss` (the loss is a `LossSpec`):
* the loss reduced over the *global* batch (all accumulation steps and processes), as `method.reduction` says: the
  paper's `per_example` (each example's weighted mean token loss, then the mean over examples), `per_token`, or WIT's
  count of non-zero weights (`*_nonzero`); all honour the prepared `loss_weights`;
* the loss on output tokens and on instruction tokens logged separately at every step, whatever the mode, so IT and
  IM runs compare on the same output-only loss;
* KL regularisation against the frozen base model: `kl` (Eq. 5, the real KL over the vocabulary) or `kl_released`
  (the released code's target-token log-ratio, whose gradient at lambda = 1 is zero; PAPER.md §5.2);
* NEFTune per example: each example's embeddings get uniform noise of scale alpha / sqrt(L d) with L its own length,
  in padded and packed micro-batches alike (the Trainer's hook takes L as the width of the whole micro-batch or row).
And around the Trainer's own checkpoints and resumption: a checkpoint counts only once complete (a run killed while
saving resumes from the one before), and `log.jsonl` is cut back to the resumed step, so each step is logged once.
DeepSpeed and the progress bar are the Trainer's own.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from im_repro import keys, prepare
from im_repro import model as model_lib
from im_repro.common import UserError, read_jsonl, world_size
from im_repro.config import accumulation_steps, plain
from im_repro.runs import Job
from im_repro.templates import TULU_CHAT_TEMPLATE, Span

log = logging.getLogger(__name__)
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


# ------------------------------------------------------------------------------------------ loss pieces -------


def shifted(batch: dict, response_weight: float | None = None) -> dict:
    """Per predicted position t (predicting token t+1): target, weight, class, example, and whether it is valid.

    `response_weight` (method.response_weight, mask=weighted only) scales the output tokens' prepared weight of 1 here
    rather than in prepare, so runs that differ only in it share their prepared data."""
    ex = batch["example_index"]
    weights, classes = batch["loss_weights"][:, 1:], batch["token_class"][:, 1:]
    if response_weight is not None:
        weights = torch.where(classes == Span.OUTPUT, weights * response_weight, weights)
    return {
        "targets": batch["input_ids"][:, 1:],
        "weights": weights,
        "classes": classes,
        "example": ex[:, 1:],
        # a real token predicted from a token of the same example (not padding, not across a packed boundary)
        "valid": (ex[:, 1:] >= 0) & (ex[:, 1:] == ex[:, :-1]),
    }


REDUCTIONS = ("per_example", "per_token", "per_example_nonzero", "per_token_nonzero")  # config.Reduction
WEIGHTINGS = ("segment", "dft")  # config.Weighting


@dataclass(frozen=True)
class LossSpec:
    """The loss of a batch, beyond the prepared per-token weights (method.mask and the prompt weight): each token's
    weight is w(segment) x f(its probability), summed and divided as `reduction` says, plus the KL term.

    weighting: segment (f = 1) | dft (f = the token's own probability, stop-gradient: DFT, arXiv 2508.05629). f
    scales a token's loss, never the normaliser, so a global batch's normaliser is known before its forward passes.
    """

    reduction: str = "per_example"
    response_weight: float | None = None  # mask=weighted: the output tokens' weight (None: 1)
    weighting: str = "segment"
    kl_mode: str = "none"  # none | kl (Eq. 5, over the vocabulary) | kl_released (the released code's term)
    kl_weight: float = 0.0
    kernel: str = "plain"  # plain (logits materialised) | cce | liger (fused, from the hidden states): loss_kernel()

    @classmethod
    def of(cls, cfg) -> "LossSpec":
        return cls(plain(cfg.method.reduction), cfg.method.response_weight, plain(cfg.method.weighting),
                   cfg.train.kl.mode, cfg.train.kl.weight, loss_kernel(cfg))


def loss_kernel(cfg) -> str:
    """train.loss_kernel, `auto` resolved: on a GPU Liger's fused linear cross-entropy, else cut-cross-entropy, where
    installed; on a CPU the plain loss (CCE's CPU path compiles for minutes first, and a CPU run's logits are small).
    A KL term needs the logits, and ZeRO-3 shards the output layer, so both keep the plain loss."""
    kernel = cfg.train.loss_kernel
    if kernel == "auto":
        import importlib.util

        fusable = cfg.train.kl.mode == "none" and zero_stage(cfg) < 3 and torch.cuda.is_available()
        found = [k for k, module in (("liger", "liger_kernel"), ("cce", "cut_cross_entropy"))
                 if fusable and importlib.util.find_spec(module) is not None]
        return found[0] if found else "plain"
    return kernel


def zero_stage(cfg) -> int:
    if not cfg.train.deepspeed:
        return 0
    return json.loads(Path(cfg.train.deepspeed).read_text()).get("zero_optimization", {}).get("stage", 0)


def weighted_sum(values: torch.Tensor, weights: torch.Tensor, example: torch.Tensor, reduction: str):
    """(sum of contributions, normaliser) of one micro-batch; the loss is sum / normaliser over the global batch.

    per_token:   sum_t w_t v_t            / sum_t d_t
    per_example: sum_e (sum_t w v / sum_t d over e) / number of examples with any weight
    with d_t = w_t, or [w_t > 0] for the *_nonzero reductions (WIT, arXiv 2507.07817: the count of tokens with
    non-zero weight, so a small prompt weight shrinks the prompt's share, not its mean). All agree for 0/1 weights.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"method.reduction must be one of {REDUCTIONS}, got {reduction!r}")
    counted = (weights > 0).to(weights.dtype) if reduction.endswith("_nonzero") else weights
    if reduction.startswith("per_token"):
        return (values * weights).sum(), counted.sum()
    idx = example.clamp(min=0).flatten()
    n = int(idx.max()) + 1 if idx.numel() else 0
    num = torch.zeros(n, dtype=values.dtype, device=values.device).index_add_(0, idx, (values * weights).flatten())
    den = torch.zeros(n, dtype=values.dtype, device=values.device).index_add_(0, idx, counted.flatten())
    has = den > 0
    return (num[has] / den[has]).sum(), has.sum().to(values.dtype)


def normaliser(batch: dict, spec: LossSpec) -> torch.Tensor:
    s = shifted(batch, spec.response_weight)
    return weighted_sum(torch.zeros_like(s["weights"]), s["weights"], s["example"], spec.reduction)[1]


def forward_loss(model, batch: dict, spec: LossSpec = LossSpec(), ref_model=None):
    """One micro-batch: (sum of loss contributions, local normaliser, per-position CE, shifted views, outputs).

    The CE is taken against the true next token everywhere; the weights (0 where labels are -100) decide what
    trains, so the same numbers also give the output-only and instruction-only losses.
    """
    # No KV cache: training needs none, and transformers only detects packed rows (position ids restarting) without one.
    model_inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch} | {"use_cache": False}
    s = shifted(batch, spec.response_weight)
    if spec.kernel == "plain":
        outputs = model(**model_inputs)
        logits = outputs.logits[:, :-1].float()
        ce = F.cross_entropy(logits.flatten(0, 1), s["targets"].flatten(), reduction="none").view_as(s["targets"])
    else:
        outputs, ce = fused_cross_entropy(model, model_inputs, s["targets"], spec.kernel)
    values = ce * torch.exp(-ce).detach() if spec.weighting == "dft" else ce  # DFT: p x (-log p), p stop-gradient
    total, norm = weighted_sum(values, s["weights"], s["example"], spec.reduction)
    if spec.kl_mode != "none":
        with torch.no_grad():
            ref_logits = ref_model(**model_inputs).logits[:, :-1].float()
        if spec.kl_mode == "kl":  # KL(pi_theta || pi_ref) over the vocabulary at each position (Eq. 5)
            logp, ref_logp = F.log_softmax(logits, -1), F.log_softmax(ref_logits, -1)
            per_position = (logp.exp() * (logp - ref_logp)).sum(-1)
        elif spec.kl_mode == "kl_released":  # log pi_theta(x_t) - log pi_ref(x_t) on the data token
            ref_ce = F.cross_entropy(ref_logits.flatten(0, 1), s["targets"].flatten(), reduction="none")
            per_position = ref_ce.view_as(ce) - ce
        else:
            raise ValueError(f"train.kl.mode must be none, kl or kl_released, got {spec.kl_mode!r}")
        total = total + spec.kl_weight * weighted_sum(per_position, s["weights"], s["example"], spec.reduction)[0]
    return total, norm, ce, s, outputs


def fused_cross_entropy(model, model_inputs: dict, targets: torch.Tensor, kernel: str):
    """(outputs, per-position CE) from the last hidden states and the output layer, never materialising the logits of
    the whole batch: cut-cross-entropy (its torch.compile implementation on a CPU, its kernel on a GPU) or Liger."""
    outputs = model.get_decoder()(**model_inputs)
    hidden = outputs.last_hidden_state[:, :-1]
    head = model.get_output_embeddings()
    if head.bias is not None:
        raise ValueError(f"train.loss_kernel={kernel}: the output layer has a bias, which the fused loss cannot add")
    softcap = getattr(model.config, "final_logit_softcapping", None)
    if kernel == "cce":
        from cut_cross_entropy import linear_cross_entropy

        impl = "cce" if hidden.is_cuda else "torch_compile"
        ce = linear_cross_entropy(hidden, head.weight, targets, softcap=softcap, reduction="none", impl=impl)
    elif kernel == "liger":
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

        if softcap is not None:
            raise ValueError("train.loss_kernel=liger: use cce or plain for a model with logit soft-capping")
        flat = LigerFusedLinearCrossEntropyFunction.apply(hidden.flatten(0, 1), head.weight, targets.flatten(),
                                                          None, None, -100, 0.0, 0.0, "none")
        ce = (flat[0] if isinstance(flat, tuple) else flat).view_as(targets)
    else:
        raise ValueError(f"train.loss_kernel must be auto, plain, cce or liger, got {kernel!r}")
    return outputs, ce.float()


def example_lengths_per_token(example_index: torch.Tensor) -> torch.Tensor:
    """The length of the example each token belongs to (0 on padding), padded and packed layouts alike."""
    real = example_index >= 0
    idx = example_index.clamp(min=0)
    counts = torch.bincount(idx[real], minlength=int(idx.max()) + 1 if idx.numel() else 0)
    return torch.where(real, counts[idx], 0)


def neftune_noise(embeddings: torch.Tensor, lengths: torch.Tensor, alpha: float) -> torch.Tensor:
    """NEFTune's uniform noise with the paper's scale alpha / sqrt(L d), L each token's own example's length."""
    d = embeddings.shape[-1]
    scale = torch.where(lengths > 0, alpha / (lengths.clamp(min=1) * d).double().sqrt(), 0.0)
    return torch.empty_like(embeddings).uniform_(-1, 1) * scale.unsqueeze(-1).to(embeddings.dtype)


# ------------------------------------------------------------------------------------------ the Trainer -------


class ITTrainer(Trainer):
    # compute_loss divides by the global normaliser itself: the Trainer must not divide again by the GA steps
    loss_is_scaled_for_ga = True

    def __init__(self, *args, loss: LossSpec, ref_model=None, neftune_alpha: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss, self.ref_model = loss, ref_model
        self._curves = None  # on the model's device: out ce, out n, instr ce, instr n, tokens, supervised
        self._curve_start = time.perf_counter()
        self.neftune_alpha, self._token_lengths = neftune_alpha, None
        if neftune_alpha:  # not TrainingArguments.neftune_noise_alpha: that hook cannot see where examples begin
            self.model.get_input_embeddings().register_forward_hook(self._neftune_hook)

    def _neftune_hook(self, module, inputs, output):
        if module.training and self._token_lengths is not None:
            return output + neftune_noise(output, self._token_lengths, self.neftune_alpha)
        return output

    def _prepare_inputs(self, inputs: dict) -> dict:
        # Under DeepSpeed the Trainer casts every float input to the model's dtype; the loss weights stay float32.
        weights = inputs.pop("loss_weights")
        inputs = super()._prepare_inputs(inputs)
        inputs["loss_weights"] = weights.to(inputs["input_ids"].device)
        return inputs

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor:
        total = sum(normaliser(b, self.loss) for b in batch_samples).to(device)
        if self.args.world_size > 1:
            total = self.accelerator.gather(total).sum()
        return total

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.neftune_alpha:
            self._token_lengths = example_lengths_per_token(inputs["example_index"])
        total, local_norm, ce, s, outputs = forward_loss(model, inputs, self.loss, self.ref_model)
        denominator = num_items_in_batch if num_items_in_batch is not None else local_norm
        # DDP averages gradients over processes; scaling by their number makes the result a global-batch mean.
        loss = total / denominator.clamp(min=1e-8) * self.accelerator.num_processes
        self._record_curves(ce.detach(), s)
        return (loss, outputs) if return_outputs else loss

    def _record_curves(self, ce: torch.Tensor, s: dict) -> None:
        out = (s["classes"] == Span.OUTPUT) & s["valid"]
        instr = (s["classes"] == Span.INSTRUCTION) & s["valid"]
        step = torch.stack([
            (ce * out).sum(), out.sum(), (ce * instr).sum(), instr.sum(), s["valid"].sum(), (s["weights"] > 0).sum()
        ]).double()
        self._curves = step if self._curves is None else self._curves + step  # no host sync until the next log

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if "loss" in logs and self._curves is not None:  # a training log: add the curves since the last one
            c = self._curves
            if self.args.world_size > 1:
                c = self.accelerator.reduce(c, reduction="sum")
            c = c.cpu()
            elapsed = time.perf_counter() - self._curve_start
            logs["output_loss"] = float(c[0] / c[1]) if c[1] else None
            logs["instruction_loss"] = float(c[2] / c[3]) if c[3] else None
            logs["tokens_per_second"] = float(c[4] / elapsed) if elapsed > 0 else None
            logs["tokens"], logs["supervised_tokens"] = int(c[4]), int(c[5])
            self._curves = None
            self._curve_start = time.perf_counter()
        super().log(logs, start_time)


class JsonlLog(TrainerCallback):
    """Every log record, one JSON object a line, in the run directory (whatever else `report_to` names)."""

    def __init__(self, path: Path):
        self.path = path

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:  # the steps after the resumed checkpoint are about to be logged again
            truncate_log(self.path, state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **logs}) + "\n")


def truncate_log(path: Path, step: int) -> None:
    """Keep the records of steps up to `step` (0: none); drop the end-of-training summary and a half-written line.

    Resuming from the checkpoint of `step` repeats every later step, and the summary is logged again at the end.
    """
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the last line of a run killed while writing it
            continue
        if record.get("step", 0) <= step and "train_runtime" not in record:
            kept.append(line + "\n")
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def complete_checkpoint(folder: Path) -> bool:
    """Whether the Trainer finished writing this checkpoint: trainer_state.json, which it writes after the weights,
    optimizer, scheduler and RNG states, is whole and at the folder's step."""
    try:
        state = json.loads((folder / "trainer_state.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return f"{PREFIX_CHECKPOINT_DIR}-{state.get('global_step')}" == folder.name


def last_complete_checkpoint(checkpoints: Path) -> tuple[Path | None, list[Path]]:
    """(the newest complete checkpoint or None, the incomplete ones newer than it, which a kill mid-save leaves)."""
    pattern = re.compile(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)")
    found = [p for p in checkpoints.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.is_dir() and pattern.fullmatch(p.name)]
    skipped = []
    for folder in sorted(found, key=lambda p: int(pattern.fullmatch(p.name).group(1)), reverse=True):
        if complete_checkpoint(folder):
            return folder, skipped
        skipped.append(folder)
    return None, skipped


# ------------------------------------------------------------------------------------------ the stage ---------


def training_arguments(cfg, out: Path, accumulation: int) -> TrainingArguments:
    t = cfg.train
    return TrainingArguments(
        output_dir=str(out / "checkpoints"),
        per_device_train_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=accumulation,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_epsilon=t.adam_epsilon,
        optim="adamw_torch",
        max_grad_norm=t.max_grad_norm,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        bf16=t.bf16,
        gradient_checkpointing=t.gradient_checkpointing,
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        length_column_name="length",
        logging_steps=t.logging_steps,
        logging_first_step=True,
        save_strategy=t.save_strategy,
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        report_to=list(t.report_to),
        seed=cfg.seed,
        data_seed=cfg.seed,
        remove_unused_columns=False,  # the collator needs labels, weights and classes
        dataloader_num_workers=t.dataloader_num_workers,
        deepspeed=t.deepspeed,
        use_cpu=not torch.cuda.is_available(),
    )


def settings(cfg, model=None, contents: bool = True) -> dict:
    """What the trained model depends on (its key): the prepared data's key, the base model, the recipe, the loss
    and the seed. `contents=False` names local tokenizer folders by path (run names are computed without reading
    them)."""
    t = keys.without(keys.plain_dict(cfg.train), keys.EXCLUDED["train"])
    if t["kl"]["mode"] == "none":
        t["kl"].pop("weight")  # no KL term: its weight multiplies nothing
    method = keys.plain_dict(cfg.method)
    loss = {k: method[k] for k in ("reduction", "response_weight", "weighting")}
    # The prepared data's settings themselves, not their hash: a refusal names the one that changed.
    return {"format": keys.FORMAT, "prepare": prepare.settings(cfg, None, contents),
            "model": keys.model_settings(cfg, contents), "train": t, "loss": loss, "seed": cfg.seed}


def trainer_for(cfg, out: Path, dataset, callbacks=()) -> "ITTrainer":
    """The Trainer of a run: its model (its KL reference and NEFTune), the collator, the loss, the logs. Checks the
    settings first, so a bad one fails before any model is loaded."""
    from im_repro.collate import Collator

    accumulation = accumulation_steps(cfg.train.global_batch_size, cfg.train.per_device_batch_size, world_size())
    if cfg.train.kl.mode != "none" and zero_stage(cfg) == 3:  # the reference is a deep copy of the model
        raise UserError("train.kl needs the full reference model, which ZeRO-3 shards: use ZeRO-2 "
                        "(train.deepspeed=conf/deepspeed/zero2.json)")
    loss = LossSpec.of(cfg)
    if loss.kernel != "plain" and zero_stage(cfg) == 3:  # the output layer is sharded outside the forward pass
        raise UserError(f"train.loss_kernel={loss.kernel} reads the output layer's weights, which ZeRO-3 shards: use "
                        "train.loss_kernel=plain (or auto) with ZeRO-3")
    args = training_arguments(cfg, out, accumulation)
    os.environ.setdefault("WANDB_MODE", "offline")  # report_to=[wandb] syncs only where the user configured it
    os.environ["WANDB_DIR"] = str(out)  # wandb's files beside this run's, not in the working directory
    out.mkdir(parents=True, exist_ok=True)
    if cfg.train.deepspeed:  # before the model is built: ZeRO-3's zero.Init reads the world size at construction
        import deepspeed

        deepspeed.init_distributed()
    set_seed(cfg.seed)
    tokenizer = model_lib.load_tokenizer(cfg.model)
    model = model_lib.load_model(cfg.model, len(tokenizer))
    ref_model = copy.deepcopy(model).eval().requires_grad_(False) if cfg.train.kl.mode != "none" else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = cfg.train.packing_row_tokens or cfg.train.max_seq_length
    return ITTrainer(model=model, args=args, train_dataset=dataset,
                     data_collator=Collator(pad_id, cfg.train.packing, rows), processing_class=tokenizer,
                     callbacks=[JsonlLog(out / "log.jsonl"), *callbacks], loss=loss, ref_model=ref_model,
                     neftune_alpha=cfg.train.neftune_alpha)


def run(job: Job) -> None:
    """Writes `<run>/train/`; marks it complete with a summary. A unit resumed (started under the
    same key) continues from its folder's last complete checkpoint."""
    cfg, run_dir, (unit,) = job.cfg, job.run_dir, job.units
    out = run_dir / "train"
    prepared = run_dir / "prepare" / "dataset"
    dataset = datasets.load_from_disk(str(prepared))
    if sum(dataset["num_supervised"]) == 0:
        raise ValueError(f"{prepared}: no example has a supervised token")
    trainer = trainer_for(cfg, out, dataset)
    args = trainer.args
    checkpoint, incomplete = last_complete_checkpoint(Path(args.output_dir)) if unit.resuming else (None, [])
    last = str(checkpoint) if checkpoint else None
    if incomplete:
        log.warning("train: skipping incomplete checkpoint(s) %s (written when the run was killed; overwritten as "
                    "training reaches them again)", ", ".join(p.name for p in incomplete))
    if last:
        log.info("train: resuming from %s", last)
    log.info("train: %d examples, global batch %d = %d x %d accumulation x %d processes, %s, %s, loss kernel %s",
             len(dataset), cfg.train.global_batch_size, cfg.train.per_device_batch_size,
             args.gradient_accumulation_steps, args.world_size, plain(cfg.method.reduction),
             "packed" if cfg.train.packing else "padded", trainer.loss.kernel)
    result = trainer.train(resume_from_checkpoint=last)

    final, tmp = out / "final", out / "final.tmp"
    if trainer.is_world_process_zero():
        shutil.rmtree(tmp, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()  # every rank takes part in saving (ZeRO-3 gathers), rank 0 writes
    trainer.save_model(str(tmp))
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        tokenizer = trainer.processing_class
        if plain(cfg.prepare.template) == "tulu":
            tokenizer.chat_template = TULU_CHAT_TEMPLATE  # so the checkpoint chats in the format it was trained on
        tokenizer.save_pretrained(str(tmp))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    steps = [r for r in read_jsonl(out / "log.jsonl", missing_ok=True) if "loss" in r]
    summary = {"global_step": result.global_step, "train_loss": result.training_loss, "resumed_from": last,
               "final_loss": steps[-1]["loss"] if steps else None, "tokens": sum(r.get("tokens", 0) for r in steps),
               "loss_kernel": trainer.loss.kernel}
    job.finish(unit.name, summary)
    log.info("train: %d optimizer steps, %s tokens; loss %.4f at the last step, %.4f over the run -> %s",
             summary["global_step"], f"{summary['tokens']:,}", summary["final_loss"] or float("nan"),
             summary["train_loss"], final)
