"""LLM judges for the open-ended benchmarks: the OpenAI API, any OpenAI-compatible server, or a local HF model.

Every judge answers chat prompts (lists of {"role", "content"} messages) greedily. API judges retry transient errors
through the OpenAI client's own retries and raise `JudgeError` once they are spent (or on a malformed answer), so a
caller never stores an API failure as if it were a judgment. A judge that cannot run here (no API key, no `openai` package) raises
`JudgeUnavailable` when it is made, before anything is graded.
"""

from __future__ import annotations

import abc
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch

from im_repro.config import JudgeConfig
from im_repro.evaluate.generate import hf_generator
from im_repro.model import load_inference

log = logging.getLogger("im_repro")

Messages = list[dict]
TopLogprobs = list[tuple[str, float]]  # (token text, log-probability), most likely first

class JudgeUnavailable(RuntimeError):
    """The configured judge cannot run in this environment; nothing was graded."""


class JudgeError(RuntimeError):
    """A judge call still failed after every retry."""


def file_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:80]


def judge_label(cfg: JudgeConfig) -> str:
    """A file-name-safe name of the judge, so judgments by different judges are never mixed up."""
    model = Path(cfg.model).name if cfg.kind == "local" else cfg.model
    if cfg.gguf_file:
        model += "-" + Path(cfg.gguf_file).stem
    return file_safe(f"{cfg.kind}-{model}")


def api_key(cfg: JudgeConfig) -> str | None:
    """The API key named by the config; a clear `JudgeUnavailable` where the OpenAI API would need one."""
    key = os.environ.get(cfg.api_key_env)
    if not key and cfg.kind == "openai":
        raise JudgeUnavailable(
            f"judge.kind=openai needs an OpenAI API key in the environment variable {cfg.api_key_env}, which is not "
            f"set. Export it, or grade with a local model instead: judge.kind=local judge.model=<Hub id or folder> "
            f"(e.g. judge.model=artifacts/models/smollm2-135m-instruct), or with an OpenAI-compatible server: "
            f"judge.kind=openai_compatible judge.base_url=<url> (under eval.alpaca_eval.judge / eval.mt_bench.judge)."
        )
    return key


class Judge(abc.ABC):
    """Greedy answers to chat prompts; `top_logprobs` for annotators that read the judge's token probabilities."""

    def __init__(self, name: str):
        self.name = name

    @abc.abstractmethod
    def complete(self, prompts: list[Messages], max_new_tokens: int) -> list[str]:
        """One greedy reply per conversation, in order."""

    def top_logprobs(self, prompts: list[Messages], k: int) -> list[TopLogprobs]:
        """The k most likely first tokens of the reply to each conversation, with their log-probabilities."""
        raise NotImplementedError(f"judge {self.name} cannot report token log-probabilities")


class ApiJudge(Judge):
    """A chat-completions endpoint (`openai.OpenAI` or any client with the same `chat.completions.create`).

    Retrying is the client's: `openai.OpenAI(max_retries=, timeout=)` retries connection errors, timeouts, rate
    limits and server errors with exponential back-off. Whatever error is left, and an answer without the expected
    fields, becomes a `JudgeError` naming it.
    """

    def __init__(self, client, model: str, *, concurrency: int = 4):
        super().__init__(model)
        self.client, self.model, self.concurrency = client, model, concurrency

    def _ask(self, read: Callable[[object], object], **request):
        import openai

        try:
            response = self.client.chat.completions.create(model=self.model, temperature=0, n=1, **request)
        except openai.OpenAIError as e:
            retries = getattr(self.client, "max_retries", None)
            after = f" after {retries} retries" if retries else ""
            raise JudgeError(f"judge {self.model} failed{after}: {type(e).__name__}: {e}") from e
        try:
            return read(response)
        except (AttributeError, IndexError, KeyError, TypeError) as e:
            raise JudgeError(f"judge {self.model}: malformed answer ({type(e).__name__}: {e}): {response!r:.300}") from e

    def _map(self, fn, prompts: list[Messages]) -> list:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(fn, prompts))

    def complete(self, prompts: list[Messages], max_new_tokens: int) -> list[str]:
        def one(messages: Messages) -> str:
            return self._ask(lambda r: r.choices[0].message.content or "", messages=messages,
                             max_tokens=max_new_tokens)

        return self._map(one, prompts)

    def top_logprobs(self, prompts: list[Messages], k: int) -> list[TopLogprobs]:
        def one(messages: Messages) -> TopLogprobs:
            return self._ask(lambda r: [(t.token, t.logprob) for t in r.choices[0].logprobs.content[0].top_logprobs],
                             messages=messages, max_tokens=1, logprobs=True, top_logprobs=k)

        return self._map(one, prompts)


class LocalJudge(Judge):
    """A local causal LM prompted with its own chat template; batched, greedy."""

    def __init__(self, model, tokenizer, *, name: str, batch_size: int = 8):
        super().__init__(name)
        if tokenizer.chat_template is None:
            raise ValueError(f"local judge {name} has no chat template: use an instruction-tuned (chat) model")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.generator = hf_generator(model, tokenizer, batch_size)

    def _text(self, messages: Messages) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def complete(self, prompts: list[Messages], max_new_tokens: int) -> list[str]:
        # The chat template writes its own special tokens, so the tokenizer must not add a BOS of its own.
        outputs = self.generator.generate([(self._text(m), False) for m in prompts], max_new_tokens=max_new_tokens,
                                          desc=f"judge {self.name}")
        return [o[0] for o in outputs]

    @torch.no_grad()
    def top_logprobs(self, prompts: list[Messages], k: int) -> list[TopLogprobs]:
        tok = self.tokenizer
        tok.padding_side = "left"  # the next-token distribution is then at the last position of every row
        out: list[TopLogprobs] = []
        for start in range(0, len(prompts), self.batch_size):
            texts = [self._text(m) for m in prompts[start : start + self.batch_size]]
            enc = tok(texts, add_special_tokens=False, padding=True, return_tensors="pt").to(self.model.device)
            position_ids = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
            logits = self.model(**enc, position_ids=position_ids).logits[:, -1].float()
            values, ids = torch.log_softmax(logits, dim=-1).topk(k, dim=-1)
            for row_ids, row_values in zip(ids.tolist(), values.tolist()):
                out.append([(tok.decode([i]), v) for i, v in zip(row_ids, row_values)])
        return out


def make_judge(cfg: JudgeConfig, *, batch_size: int = 8) -> Judge:
    """The judge `cfg` describes. `batch_size`: prompts per forward pass (local) or concurrent requests (API)."""
    if cfg.kind in ("openai", "openai_compatible"):
        key = api_key(cfg)
        if cfg.kind == "openai_compatible" and not cfg.base_url:
            raise ValueError("judge.kind=openai_compatible needs judge.base_url (e.g. http://localhost:8000/v1)")
        try:
            import openai
        except ImportError as e:
            raise JudgeUnavailable(f"judge.kind={cfg.kind} needs the openai package: pip install 'openai>=1'") from e
        # Self-hosted servers (vLLM, TGI) usually accept any key, but the client refuses to start without one.
        client = openai.OpenAI(api_key=key or "EMPTY", base_url=cfg.base_url, max_retries=cfg.max_retries,
                               timeout=cfg.timeout_s)
        return ApiJudge(client, cfg.model, concurrency=batch_size)
    if cfg.kind == "local":
        try:
            model, tokenizer = load_inference(cfg.model, cfg.model, "auto", cfg.gguf_file)
        except OSError as e:  # not on disk, and the Hub unreachable or offline
            raise JudgeUnavailable(f"judge.kind=local could not load {cfg.model}: {e}") from e
        log.info("judge: local model %s (%.0fM parameters)", cfg.model, model.num_parameters() / 1e6)
        return LocalJudge(model, tokenizer, name=judge_label(cfg), batch_size=batch_size)
    raise ValueError(f"judge.kind must be openai, openai_compatible or local, got {cfg.kind!r}")
