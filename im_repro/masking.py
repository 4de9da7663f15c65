"""Which tokens carry the loss: the one place where IT vs IM is decided.

`encode(messages, tokenizer, mask=..., template=..., max_seq_length=...)` renders a conversation (templates.py),
tokenizes it exactly once as the paper's code does, and maps the rendered text's character spans onto tokens through
the tokenizer's offsets. A token is supervised if any of its characters is. Labels follow the Hugging Face
convention: aligned with `input_ids` (the model shifts), -100 = no loss.

Mask modes (method.mask; PAPER.md §3, §5.1):
  it           assistant content + the EOS closing each assistant turn
  im           the content of every message + the assistant EOS; never a template token (the paper's Eq. 4)
  im_released  the paper's released code: everything except exact token matches of tokenizer("<|system|>\\n"),
               tokenizer("<|user|>\\n") and tokenizer("wa\\n") (with BOS, so in practice only the first header)
  full         plain language modelling over the whole sequence, template included
  weighted     output tokens weight 1, instruction tokens `prompt_loss_weight` (0 = it, 1 = im), template 0
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from im_repro.templates import Rendered, Span, render

IGNORE_INDEX = -100
MASK_MODES = ("it", "im", "im_released", "full", "weighted")  # config.MaskMode
# Token classes as stored per token: a Span value, or SPECIAL for zero-width tokens the tokenizer adds (BOS).
SPECIAL = -1
CLASS_NAMES = {SPECIAL: "special", Span.TEMPLATE: "template", Span.INSTRUCTION: "instruction", Span.OUTPUT: "output"}
RELEASED_IM_PATTERNS = ("<|system|>\n", "<|user|>\n", "wa\n")


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]
    loss_weights: list[float] | None
    token_class: np.ndarray  # int8 per token: SPECIAL or a Span value
    num_tokens_untruncated: int

    @property
    def truncated(self) -> bool:
        return self.num_tokens_untruncated > len(self.input_ids)

    @property
    def num_supervised(self) -> int:
        """Tokens that contribute to the loss: the label at position 0 is never predicted (causal shift)."""
        return sum(1 for x in self.labels[1:] if x != IGNORE_INDEX)

    def as_dict(self) -> dict:
        out = {"input_ids": self.input_ids, "labels": self.labels}
        if self.loss_weights is not None:
            out["loss_weights"] = self.loss_weights
        return out


def class_weights(mask: str, prompt_loss_weight: float | None = None) -> np.ndarray:
    """Loss weight per token class, indexed [SPECIAL, TEMPLATE, INSTRUCTION, OUTPUT]."""
    if mask == "weighted":
        if prompt_loss_weight is None or not 0.0 <= prompt_loss_weight <= 1.0:
            raise ValueError(f"mask=weighted needs prompt_loss_weight in [0, 1], got {prompt_loss_weight!r}")
        return np.array([0.0, 0.0, prompt_loss_weight, 1.0])
    if prompt_loss_weight is not None:
        raise ValueError(f"prompt_loss_weight is only used with mask=weighted, not mask={mask!r}")
    table = {"it": [0, 0, 0, 1], "im": [0, 0, 1, 1], "full": [1, 1, 1, 1]}
    if mask not in table:
        raise ValueError(f"unknown mask mode {mask!r}; expected one of {MASK_MODES}")
    return np.array(table[mask], dtype=float)


# --------------------------------------------------------------------------------------------- offsets ------


def _backend(tokenizer):
    """The Rust tokenizer, called directly (the Python wrapper's per-call conversions cost as much as masking).

    Only when no truncation or padding is left configured on it, so its output is exactly `tokenizer(text)`'s.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is not None and backend.truncation is None and backend.padding is None:
        return backend
    return None


@dataclass(frozen=True)
class Tokenized:
    """Token ids plus what masking needs of the tokenizer's offsets: which token holds a given character."""

    ids: list[int]
    char_to_token: Callable[[int], int | None]
    added: Callable[[int], np.ndarray]  # (n) -> bool mask of the first n tokens the tokenizer added (BOS...)


def _from_encoding(enc) -> Tokenized:
    return Tokenized(enc.ids, enc.char_to_token, lambda n: np.asarray(enc.special_tokens_mask[:n], dtype=bool))


def _from_offsets(ids: list[int], offsets: list[tuple[int, int]]) -> Tokenized:
    owner: dict[int, int] = {}
    for k, (start, end) in enumerate(offsets):
        for c in range(start, end):
            owner.setdefault(c, k)
    zero_width = np.array([e <= s for s, e in offsets], dtype=bool)
    return Tokenized(list(ids), owner.get, lambda n: zero_width[:n])


def tokenize(tokenizer, rendered: Rendered) -> Tokenized:
    """One tokenization of the rendered text, exactly `tokenizer(text)`'s ids, with a character -> token map."""
    backend = _backend(tokenizer)
    if backend is not None:
        return _from_encoding(backend.encode(rendered.text, add_special_tokens=rendered.add_special_tokens))
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(rendered.text, add_special_tokens=rendered.add_special_tokens, return_offsets_mapping=True)
        return _from_offsets(enc["input_ids"], enc["offset_mapping"])
    ids = tokenizer(rendered.text, add_special_tokens=rendered.add_special_tokens)["input_ids"]
    return _from_offsets(ids, align_offsets(tokenizer, rendered.text, ids))


def align_offsets(tokenizer, text: str, ids: list[int]) -> list[tuple[int, int]]:
    """Character offsets for tokenizers that cannot report them (slow, Python-backend tokenizers).

    Decodes incrementally with a little left context (so SentencePiece's word-initial spaces and multi-byte
    characters split over byte tokens come out right), then walks the text. Tokens the tokenizer added (BOS) get a
    zero-width range. Raises if any visible character of `text` is left without a token.
    """
    tokens = tokenizer.convert_ids_to_tokens(ids)
    special = set(tokenizer.all_special_ids)
    # transformers' Python-side decode leaves SentencePiece byte pieces ("<0x0A>") undecoded; the processor does not.
    sp = getattr(tokenizer, "sp_model", None)
    decode = sp.decode if sp is not None else lambda x: tokenizer.decode(x, clean_up_tokenization_spaces=False)
    offsets: list[tuple[int, int]] = [(0, 0)] * len(ids)
    cursor = 0
    prefix, read = 0, 0  # decode window: tokens[prefix:read] already emitted, kept as left context
    for i, tid in enumerate(ids):
        if tid in special:
            piece = tokens[i]
            at = text.find(piece, cursor)
            if at >= 0 and not text[cursor:at].strip():
                offsets[i] = (at, at + len(piece))
                cursor = at + len(piece)
            else:
                offsets[i] = (cursor, cursor)
            prefix, read = i + 1, i + 1
            continue
        before, after = decode(ids[prefix:read]), decode(ids[prefix : i + 1])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            continue  # an incomplete multi-byte character: wait for the next token
        piece = after[len(before) :]
        start = _locate(text, piece, cursor)
        if start is None:
            raise ValueError(f"cannot align token {i} ({tokens[i]!r}, decoded {piece!r}) at character {cursor}")
        end = start + len(piece.strip()) if not text.startswith(piece, start) else start + len(piece)
        for j in range(read, i + 1):
            offsets[j] = (start, end)
        cursor = max(cursor, end)
        prefix, read = read, i + 1
    covered = np.zeros(len(text) + 1, dtype=np.int32)
    for s, e in offsets:
        covered[s] += 1
        covered[e] -= 1
    uncovered = [k for k, c in enumerate(np.cumsum(covered)[: len(text)]) if c == 0 and not text[k].isspace()]
    if uncovered:
        k = uncovered[0]
        raise ValueError(f"offset alignment left character {k} ({text[k]!r}) without a token")
    return offsets


def _locate(text: str, piece: str, cursor: int) -> int | None:
    if text.startswith(piece, cursor):
        return cursor
    core = piece.strip()
    if not core:  # whitespace the tokenizer normalised (e.g. a SentencePiece space before a newline)
        return cursor
    at = text.find(core, cursor)
    return at if at >= 0 and not text[cursor:at].strip() else None


# --------------------------------------------------------------------------------------------- encode -------


def _first_token(tok: Tokenized, chars: range) -> int | None:
    for c in chars:  # almost always the first character: only normalised-away characters have no token
        k = tok.char_to_token(c)
        if k is not None:
            return k
    return None


def token_classes(rendered: Rendered, tok: Tokenized, n: int) -> np.ndarray:
    """Class of each of the first n tokens: the highest among its characters (OUTPUT > INSTRUCTION > TEMPLATE),
    SPECIAL for tokens the tokenizer added. A span's tokens run from the one holding its first character to the
    last one holding its last character, so a token straddling a boundary belongs to the span."""
    out = np.full(n, Span.TEMPLATE, dtype=np.int8)
    for start, end, cls in rendered.spans:
        if not cls:
            continue
        first = _first_token(tok, range(start, end))
        if first is None or first >= n:
            continue
        # char_to_token names the first of the byte tokens that spell a character, so the span ends just before
        # the token of the next character, unless the token of its own last character straddles the boundary.
        after = _first_token(tok, range(end, len(rendered.text)))
        last = max(_first_token(tok, range(end - 1, start - 1, -1)), (len(tok.ids) if after is None else after) - 1)
        window = out[first : min(last, n - 1) + 1]
        np.maximum(window, cls, out=window)
    out[tok.added(n)] = SPECIAL
    return out


def _released_im_labels(input_ids: list[int], tokenizer) -> list[int]:
    labels = list(input_ids)
    for pattern_text in RELEASED_IM_PATTERNS:
        pattern = tokenizer(pattern_text)["input_ids"]
        n = len(pattern)
        for i in range(len(input_ids) - n + 1):
            if input_ids[i : i + n] == pattern:
                labels[i : i + n] = [IGNORE_INDEX] * n
    return labels


def encode_rendered(
    rendered: Rendered,
    tok: Tokenized,
    tokenizer,
    mask: str = "im",
    max_seq_length: int = 2048,
    prompt_loss_weight: float | None = None,
) -> Encoded:
    """Labels for an already tokenized rendering (the batched path tokenizes many texts in one call)."""
    ids = tok.ids[:max_seq_length]
    cls = token_classes(rendered, tok, len(ids))
    if mask == "im_released":
        return Encoded(ids, _released_im_labels(ids, tokenizer), None, cls, len(tok.ids))
    weights = class_weights(mask, prompt_loss_weight)[cls + 1]
    labels = np.where(weights > 0, np.asarray(ids, dtype=np.int64), IGNORE_INDEX).tolist()
    loss_weights = weights.tolist() if mask == "weighted" else None
    return Encoded(ids, labels, loss_weights, cls, len(tok.ids))


def _check_settings(mask: str, template: str, max_seq_length: int) -> None:
    if mask == "im_released" and template != "tulu":
        raise ValueError("mask=im_released reproduces the released code's Tulu header search; use template=tulu")
    if max_seq_length < 1:
        raise ValueError(f"max_seq_length must be positive, got {max_seq_length}")


def encode_full(
    messages: list[dict],
    tokenizer,
    mask: str = "im",
    template: str = "tulu",
    max_seq_length: int = 2048,
    prompt_loss_weight: float | None = None,
) -> Encoded:
    _check_settings(mask, template, max_seq_length)
    rendered = render(messages, tokenizer, template)
    return encode_rendered(rendered, tokenize(tokenizer, rendered), tokenizer, mask, max_seq_length, prompt_loss_weight)


def encode(
    messages: list[dict],
    tokenizer,
    mask: str = "im",
    template: str = "tulu",
    max_seq_length: int = 2048,
    prompt_loss_weight: float | None = None,
) -> dict:
    """`{"input_ids", "labels"[, "loss_weights"]}` for one conversation; see the module docstring for the modes."""
    return encode_full(messages, tokenizer, mask, template, max_seq_length, prompt_loss_weight).as_dict()


def encode_batch(
    conversations: list[list[dict]],
    tokenizer,
    mask: str = "im",
    template: str = "tulu",
    max_seq_length: int = 2048,
    prompt_loss_weight: float | None = None,
) -> list[Encoded]:
    """`encode_full` for many conversations with one tokenizer call (fast tokenizers batch in Rust)."""
    _check_settings(mask, template, max_seq_length)
    rendered = [render(messages, tokenizer, template) for messages in conversations]
    backend = _backend(tokenizer)
    if backend is None or not rendered:
        tokenized = [tokenize(tokenizer, r) for r in rendered]
    else:  # one call: the Rust side spreads the batch over threads
        texts, (specials,) = [r.text for r in rendered], {r.add_special_tokens for r in rendered}
        tokenized = [_from_encoding(e) for e in backend.encode_batch(texts, add_special_tokens=specials)]
    return [
        encode_rendered(r, tok, tokenizer, mask, max_seq_length, prompt_loss_weight)
        for r, tok in zip(rendered, tokenized)
    ]
