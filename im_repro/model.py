"""Load tokenizers and models from the Hub, a local folder or a GGUF file; which model a run scores (`evaluated`)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from im_repro import keys
from im_repro.common import UserError, read_json

log = logging.getLogger("im_repro")


class CannotLoad(UserError, FileNotFoundError):
    """A model or tokenizer a config names is not there: the message says why and what to pass instead."""


def cannot_load(cfg, what: str, source: str, error: Exception) -> CannotLoad:
    text = str(error)
    if any(word in text for word in ("gated", "401", "403", "restricted")):
        fix = (f"the Hub keeps {source} gated: request access at https://huggingface.co/{source} and log in "
               "(`hf auth login`), or pass model.path=<a local copy>")
    elif os.environ.get("HF_HUB_OFFLINE") == "1" or "offline" in text.lower() or "connect" in text.lower():
        fix = (f"{source} is not in the local Hugging Face cache and the Hub is not reached (HF_HUB_OFFLINE=1, which "
               "the Makefile sets): download it once with HF_HUB_OFFLINE=0, or pass model.path=<a local copy>")
    else:
        fix = "pass model.path=<a local folder or a Hub id> (for the offline CPU models, run `make setup`)"
    return CannotLoad(f"model={cfg.name}: cannot load the {what} from {source!r}: {fix}. ({type(error).__name__}: "
                      f"{text.splitlines()[0] if text else ''})")


def load_tokenizer(cfg):
    """The tokenizer a model config names: `tokenizer` (+ `tokenizer_gguf_file`) or else `path` (+ `gguf_file`)."""
    path, gguf = (cfg.tokenizer, cfg.tokenizer_gguf_file) if cfg.tokenizer else (cfg.path, cfg.gguf_file)
    try:
        tokenizer = load_slow_sentencepiece(path) if not cfg.use_fast_tokenizer else tokenizer_from_pretrained(path, gguf)
    except OSError as e:
        raise cannot_load(cfg, "tokenizer" + (f" (gguf_file={gguf})" if gguf else ""), path, e) from e
    if cfg.chat_template:
        tokenizer.chat_template = borrowed_chat_template(cfg.chat_template, cfg.name)
    return tokenizer


def borrowed_chat_template(source: str, model_name: str = "?") -> str:
    """The chat template a base model borrows (`model.chat_template`): a .jinja file, or the template of a
    tokenizer folder or Hub id."""
    try:
        if source.endswith(".jinja"):
            return Path(source).read_text(encoding="utf-8")
        template = AutoTokenizer.from_pretrained(source).chat_template
    except OSError as e:
        raise FileNotFoundError(f"model={model_name}: model.chat_template={source!r} cannot be read: {e}") from e
    if not template:
        raise ValueError(f"model={model_name}: model.chat_template={source!r} has no chat template to borrow")
    return template


def tokenizer_from_pretrained(path: str, gguf_file: str | None = None):
    """AutoTokenizer, or for a GGUF whose architecture transformers cannot map to a tokenizer class (Gemma-4's
    config fails validation, Command-R is unsupported) the plain fast tokenizer the GGUF vocabulary converts to."""
    if not gguf_file:
        return AutoTokenizer.from_pretrained(path)
    try:
        return AutoTokenizer.from_pretrained(path, gguf_file=gguf_file)
    except (ValueError, StrictDataclassError) as e:
        log.info("AutoTokenizer cannot load %s/%s (%s); loading it as PreTrainedTokenizerFast", path, gguf_file, e)
        return PreTrainedTokenizerFast.from_pretrained(path, gguf_file=gguf_file)


def load_slow_sentencepiece(path: str):
    """The paper's slow, legacy SentencePiece tokenizer (BOS prepended) from the model's `tokenizer.model`.

    transformers 5 converts every Llama tokenizer to a fast one; this keeps the legacy behaviour the paper's runs
    had, e.g. a "▁" token after "</s>" (PAPER.md §5.6). It reports no offsets: masking aligns them itself.
    """
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    return SentencePieceBackend.from_pretrained(
        path, special_tokens_pattern="bos", legacy=True, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that decides token ids: vocabulary, merges, normalisation, special tokens."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    h.update(json.dumps({k: str(v) for k, v in tokenizer.special_tokens_map.items()}, sort_keys=True).encode())
    h.update(json.dumps(tokenizer("a b\n</s>")["input_ids"]).encode())  # catches add_bos / legacy-space settings
    return h.hexdigest()[:16]


def load_model(cfg, vocab_size: int):
    """The base model: pretrained weights, or (init=random) a fresh model built from `arch`, in `dtype`."""
    dtype = getattr(torch, cfg.dtype)
    if cfg.init == "random":
        config = AutoConfig.for_model(**dict(cfg.arch))
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=cfg.attn_implementation)
    elif cfg.init == "pretrained":
        kwargs = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
        try:
            model = AutoModelForCausalLM.from_pretrained(
                cfg.path, dtype=dtype, attn_implementation=cfg.attn_implementation, **kwargs
            )
        except OSError as e:
            raise cannot_load(cfg, "weights", cfg.path, e) from e
    else:
        raise ValueError(f"model.init must be pretrained or random, got {cfg.init!r}")
    if model.get_input_embeddings().num_embeddings < vocab_size:
        raise ValueError(
            f"model={cfg.name}: the tokenizer has {vocab_size} tokens but the model only "
            f"{model.get_input_embeddings().num_embeddings} embeddings"
        )
    return model


# ------------------------------------------------------------------------------------------ scoring -----------


def load_inference(model_path: str, tokenizer_path: str, dtype="auto", gguf_file: str | None = None):
    """(model, tokenizer) for scoring and generation: eval mode, on the GPU when there is one. `dtype`: a torch
    dtype or its name, or auto (the checkpoint's own)."""
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = tokenizer_from_pretrained(tokenizer_path, gguf_file)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, **kwargs)
    return model.to("cuda" if torch.cuda.is_available() else "cpu").eval(), tokenizer


def checkpoint_identity(source: str) -> dict:
    """What a checkpoint is, whatever path names it: a run's trained model by its training's key, another local folder
    by its files' sha256, a Hub id by its revision (the commit the local cache or the Hub resolves `main` to)."""
    folder = Path(source)
    if folder.is_dir():
        marker = read_json(folder.parent / "_COMPLETE") if folder.name == "final" else None
        return {"train": marker["key"]} if marker and "key" in marker else {"checkpoint": keys.content(source)}
    return {"hub": source, "revision": hub_revision(source)}


def hub_revision(repo_id: str) -> str | None:
    """The commit `main` of a Hub model resolves to: from the local cache, else the Hub; None where neither says."""
    from huggingface_hub import HfApi, constants

    ref = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "refs" / "main"
    if ref.is_file():
        return ref.read_text().strip()
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return None
    try:
        return HfApi().model_info(repo_id).sha
    except Exception:  # noqa: BLE001  (gated, unknown or unreachable: loading it says which, with the fix)
        return None


@dataclass(frozen=True)
class Evaluated:
    """The model an eval or analysis stage scores, and what identifies it in their keys: a checkpoint named by
    `eval.checkpoint`, the model this run trains, or the base model as it is (method=base), each in `eval.dtype`."""

    kind: str  # checkpoint | trained | base
    identity: dict

    def paths(self, cfg, run_dir: Path) -> tuple[str, str]:
        """(model, tokenizer) folders or Hub ids to load it from; a random initialisation or a borrowed chat
        template is saved into the run directory first, so every backend loads the same thing."""
        if self.kind == "checkpoint":
            return cfg.eval.checkpoint, cfg.eval.checkpoint
        if self.kind == "trained":
            final = str(run_dir / "train" / "final")
            return final, final
        tokenizer = cfg.model.tokenizer or cfg.model.path
        if cfg.model.chat_template and cfg.model.init == "pretrained":
            tokenizer = str(run_dir / "eval" / "base_tokenizer")  # the untuned model prompted through the template
            if not (Path(tokenizer) / "tokenizer_config.json").exists():
                load_tokenizer(cfg.model).save_pretrained(tokenizer)
        if cfg.model.init == "pretrained":
            return cfg.model.path, tokenizer
        path = run_dir / "eval" / "random_init"
        if not (path / "config.json").exists():
            from transformers import set_seed

            log.warning("model.init=random and nothing trained: evaluating the random initialisation")
            set_seed(cfg.seed)
            tok = load_tokenizer(cfg.model)
            load_model(cfg.model, len(tok)).save_pretrained(str(path))
            tok.save_pretrained(str(path))
        return str(path), str(path)

    def load(self, cfg, run_dir: Path):
        """(model, tokenizer) in `eval.dtype`, ready to score."""
        return load_inference(*self.paths(cfg, run_dir), cfg.eval.dtype)


def evaluated(cfg, run_dir: Path, train_key: str | None) -> Evaluated:
    """What the run's eval and analysis stages score: eval.checkpoint, else the model it trains (`train_key`, None
    when it trains nothing), else the base model."""
    dtype = {"dtype": cfg.eval.dtype}  # float32 and bfloat16 log-likelihoods differ: part of every score's key
    if cfg.eval.checkpoint:
        return Evaluated("checkpoint", {**checkpoint_identity(cfg.eval.checkpoint), **dtype})
    if train_key is not None:
        return Evaluated("trained", {"train": train_key, **dtype})
    return Evaluated("base", {"base": keys.model_settings(cfg), **dtype})
