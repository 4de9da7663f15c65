"""Load tokenizers (and, for the train stage, models) from the Hub, a local folder or a GGUF file."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

log = logging.getLogger("im_repro")


def load_tokenizer(cfg):
    """The tokenizer a model config names: `tokenizer` (+ `tokenizer_gguf_file`) or else `path` (+ `gguf_file`)."""
    path, gguf = (cfg.tokenizer, cfg.tokenizer_gguf_file) if cfg.tokenizer else (cfg.path, cfg.gguf_file)
    kwargs = {"gguf_file": gguf} if gguf else {}
    try:
        tokenizer = load_slow_sentencepiece(path) if not cfg.use_fast_tokenizer else tokenizer_from_pretrained(path, gguf)
    except OSError as e:
        raise FileNotFoundError(
            f"model={cfg.name}: cannot load the tokenizer from {path!r}"
            + (f" (gguf_file={gguf!r})" if gguf else "")
            + f": {e}. For the offline CPU models run `make setup` (it writes artifacts/)."
        ) from e
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
            raise FileNotFoundError(f"model={cfg.name}: cannot load {cfg.path!r}: {e}") from e
    else:
        raise ValueError(f"model.init must be pretrained or random, got {cfg.init!r}")
    if model.get_input_embeddings().num_embeddings < vocab_size:
        raise ValueError(
            f"model={cfg.name}: the tokenizer has {vocab_size} tokens but the model only "
            f"{model.get_input_embeddings().num_embeddings} embeddings"
        )
    return model
