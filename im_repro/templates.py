"""Chat templates rendered as text plus character spans that say what each character is.

Masking never looks at roles: it only sees the spans produced here. A span's class is one of

* ``TEMPLATE``    role headers, separators, anything a template inserts (never supervised in `it`/`im`);
* ``INSTRUCTION`` the content of a system or user message;
* ``OUTPUT``      the content of an assistant message and the EOS text that closes it.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass, field
from enum import IntEnum


class Span(IntEnum):
    TEMPLATE = 0
    INSTRUCTION = 1
    OUTPUT = 2


@dataclass(frozen=True)
class Rendered:
    text: str
    # (start, end, Span) triples, sorted, non-overlapping, covering only non-empty ranges of `text`.
    spans: tuple[tuple[int, int, Span], ...]
    # Whether the tokenizer should add its default special tokens (BOS...) when encoding `text`.
    add_special_tokens: bool


def _content_class(role: str) -> Span:
    return Span.OUTPUT if role == "assistant" else Span.INSTRUCTION


def _clip(pieces: list[tuple[str, Span]], strip: bool) -> Rendered:
    """Join pieces; optionally strip the whole string, clipping spans to what survives."""
    text = "".join(p for p, _ in pieces)
    lo, hi = 0, len(text)
    if strip:
        stripped = text.strip()
        lo = len(text) - len(text.lstrip())
        hi = lo + len(stripped)
    spans, pos = [], 0
    for piece, cls in pieces:
        start, end = max(pos, lo), min(pos + len(piece), hi)
        if start < end:
            spans.append((start - lo, end - lo, cls))
        pos += len(piece)
    return Rendered(text[lo:hi], tuple(spans), add_special_tokens=True)


def render_tulu(messages: list[dict], eos_text: str) -> Rendered:
    """The paper's Tulu format (open-instruct `_concat_messages`), then `.strip()` of the whole string.

    system    -> "<|system|>\\n" + content.strip() + "\\n"
    user      -> "<|user|>\\n" + content.strip() + "\\n"
    assistant -> "<|assistant|>\\n" + content.strip() + EOS + "\\n"
    """
    pieces: list[tuple[str, Span]] = []
    for m in messages:
        role = m["role"]
        pieces.append((f"<|{role}|>\n", Span.TEMPLATE))
        pieces.append((m["content"].strip(), _content_class(role)))
        if role == "assistant":
            pieces.append((eos_text, Span.OUTPUT))
        pieces.append(("\n", Span.TEMPLATE))
    return _clip(pieces, strip=True)


# The same format as a Hugging Face chat template, saved with trained checkpoints (generation prompt included).
TULU_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] | trim }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% if not loop.last or add_generation_prompt %}{{ '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


class ChatTemplateError(ValueError):
    """A chat template whose rendering cannot be split exactly into message contents and template text."""


@dataclass
class ChatTemplate:
    """What masking needs of one tokenizer's chat template, found by probing it (no table keyed by model name).

    Contents are located by rendering the conversation's roles once with a unique sentinel per message (a
    "skeleton", cached per role sequence), so text a template injects (a default system prompt, a date line, an
    empty reasoning block) can never be mistaken for a message. The end-of-turn text is what the template appends
    right after the content of a final assistant turn, up to the first character that is not a special token.
    """

    source: str
    end_of_turn: str
    skeletons: dict = field(default_factory=dict)

    @classmethod
    def probe(cls, tokenizer) -> "ChatTemplate":
        source = getattr(tokenizer, "chat_template", None)
        if not source:
            raise ChatTemplateError(
                f"template=chat_template but tokenizer {tokenizer.name_or_path!r} has no chat template "
                "(set model.chat_template to borrow one)"
            )
        probe = [{"role": "user", "content": _sentinel(0)}, {"role": "assistant", "content": _sentinel(1)}]
        tail = tokenizer.apply_chat_template(probe, tokenize=False).split(_sentinel(1))[-1]
        end_of_turn = _leading_special_tokens(tail, tokenizer)
        if not end_of_turn:
            raise ChatTemplateError(
                f"the chat template of {tokenizer.name_or_path!r} closes an assistant turn with {tail!r}, which starts "
                "with no special token: there is no end-of-turn token to supervise, so a model would not learn to stop"
            )
        return cls(source, end_of_turn)

    def skeleton(self, messages: list[dict], tokenizer) -> list[str]:
        """[template, message index, template, ..., template] as the template lays out this conversation's roles."""
        key = tuple(tuple(sorted((k, repr(v)) for k, v in m.items() if k != "content")) for m in messages)
        if key not in self.skeletons:
            probe = [{**m, "content": _sentinel(i)} for i, m in enumerate(messages)]
            parts = re.split("\x00(\\d+)\x00", tokenizer.apply_chat_template(probe, tokenize=False))
            found = [int(p) for p in parts[1::2]]
            for i, m in enumerate(messages):
                if found.count(i) != 1:
                    what = "drops it" if i not in found else f"repeats its content {found.count(i)} times"
                    raise ChatTemplateError(f"message {i} ({m['role']}): the chat template {what}, so it cannot be "
                                            "masked as it is in the conversation")
            self.skeletons[key] = [p if k % 2 == 0 else int(p) for k, p in enumerate(parts)]
        return self.skeletons[key]

    def render(self, messages: list[dict], tokenizer) -> Rendered:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        parts = self.skeleton(messages, tokenizer)
        pieces: list[tuple[str, Span]] = []
        pos, after_output = 0, False
        for k in range(0, len(parts), 2):
            template = parts[k]
            if not text.startswith(template, pos):
                raise _moved_template_error(messages, parts, k, text, pos)
            if after_output:
                if not template.startswith(self.end_of_turn):
                    raise ChatTemplateError(
                        f"message {parts[k - 1]} (assistant): the chat template closes it with {template[:30]!r}, "
                        f"not with its end-of-turn token(s) {self.end_of_turn!r}"
                    )
                pieces.append((self.end_of_turn, Span.OUTPUT))
                template = template[len(self.end_of_turn) :]
                pos += len(self.end_of_turn)
            pieces.append((template, Span.TEMPLATE))
            pos += len(template)
            if k + 1 == len(parts):
                break
            i = parts[k + 1]
            role, content = messages[i]["role"], messages[i]["content"]
            end = _match_content(text, pos, content, parts[k + 2])
            if end is None and (end := _match_content(text, pos, content, "")) is not None:
                raise _moved_template_error(messages, parts, k + 2, text, end)
            if end is None:
                raise ChatTemplateError(
                    f"message {i} ({role}): the chat template rewrites its content (rendered as "
                    f"{text[pos : pos + 60]!r}...), not only trimming whitespace or cutting out a part of it"
                )
            pieces.append((text[pos:end], _content_class(role)))
            pos, after_output = end, role == "assistant"
        rendered = _clip(pieces, strip=False)
        return Rendered(rendered.text, rendered.spans, add_special_tokens=False)


def _moved_template_error(messages, parts, k: int, text: str, pos: int) -> ChatTemplateError:
    """The template text parts[k] is not where the probe put it: it depends on the content around it."""
    around = " and ".join(f"message {i} ({messages[i]['role']})" for i in parts[max(k - 1, 1) : k + 2 : 2])
    return ChatTemplateError(
        f"{around}: the chat template renders {text[pos : pos + len(parts[k]) + 20]!r} at character {pos} where a "
        f"probe with the same roles renders {parts[k]!r}: the text it puts around a content depends on the content "
        "(e.g. reasoning moved into a <think> block), so the contents cannot be located"
    )


def _sentinel(i: int) -> str:
    return f"\x00{i}\x00"


def _leading_special_tokens(text: str, tokenizer) -> str:
    specials = sorted((t.content for t in tokenizer.added_tokens_decoder.values() if t.special), key=len, reverse=True)
    pos = 0
    while (match := next((s for s in specials if s and text.startswith(s, pos)), None)) is not None:
        pos += len(match)
    return text[:pos]


def _match_content(text: str, pos: int, content: str, following: str) -> int | None:
    """Where the rendering of `content` starting at `pos` ends: the content with some surrounding whitespace
    trimmed (longest first), or else the longest part of it (a template cutting out reasoning) that is followed by
    the template text `following`. None when the rendering is not the message's own characters."""
    lo, hi = len(content) - len(content.lstrip()), len(content.rstrip())
    for a in range(lo + 1):
        for b in range(len(content), max(a, hi) - 1, -1):
            if text.startswith(content[a:b], pos) and text.startswith(following, pos + b - a):
                return pos + b - a
    best, end = None, text.find(following, pos) if following else -1
    while 0 <= end <= pos + len(content):
        if text[pos:end] and text[pos:end] in content:
            best = end
        end = text.find(following, end + 1)
    return best


_CHAT_TEMPLATES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def chat_template(tokenizer) -> ChatTemplate:
    """The probed template of this tokenizer, cached until its `chat_template` changes."""
    cached = _CHAT_TEMPLATES.get(tokenizer)
    if cached is None or cached.source != getattr(tokenizer, "chat_template", None):
        cached = _CHAT_TEMPLATES[tokenizer] = ChatTemplate.probe(tokenizer)
    return cached


def render_chat_template(messages: list[dict], tokenizer) -> Rendered:
    """The tokenizer's own Hugging Face chat template, with the same span semantics as `render_tulu`: message
    contents are instruction/output, the end-of-turn token(s) closing an assistant turn are output, everything the
    template inserts is template text. Encoded without extra special tokens, as `apply_chat_template` does."""
    return chat_template(tokenizer).render(messages, tokenizer)


def render(messages: list[dict], tokenizer, template: str = "tulu") -> Rendered:
    if template == "tulu":
        return render_tulu(messages, eos_text=tokenizer.eos_token or "")
    if template == "chat_template":
        return render_chat_template(messages, tokenizer)
    raise ValueError(f"unknown template {template!r}; expected 'tulu' or 'chat_template'")
