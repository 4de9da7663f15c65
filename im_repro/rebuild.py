"""Rebuild the paper's training files that are missing from its repository (PAPER.md §2.1, §2.4, §2.5).

`alpagasus`: the paper's `src/reformat_alpagasus_data.py` seeds Python's RNG once (42) and passes claude_t45,
chatgpt_9k and dolly_3k, in that order, through open-instruct's `encode_instruction_example(random_template=True)`,
which draws one weighted prompt template per record. Any one file is therefore reproducible only by replaying the
draws of every file before it. `less`: the LESS top-5% subsets, taken from LESS's released less-data.zip.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import zipfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

from im_repro.common import download, file_sha256

log = logging.getLogger(__name__)

# open-instruct's templates (prompt, completion, weight), verbatim and in order: the order fixes which template
# each RNG draw selects. Both lists carry the same weights, so a draw's template index does not depend on the input.
WITH_INPUT = [
    ("{instruction}\n\n{input}\n\n", "{output}", 0.2),
    ("{instruction}\n{input}\n\n", "{output}", 0.1),
    ("{instruction}\n{input}\n", "{output}", 0.1),
    ("{instruction}\n\nInput: {input}\n\nOutput:", "{output}", 0.05),
    ("{instruction}\nInput: {input}\nOutput:", "{output}", 0.05),
    ("{instruction}\n{input}\n\nResponse:", "{output}", 0.05),
    ("{instruction}\n\nAdditional Context:\n{input}\n\nAnswer:", "{output}", 0.05),
    ("Task: {instruction}\nInput: {input}\nOutput:", "{output}", 0.05),
    ("Task: {instruction}\n\n{input}\n\n", "{output}", 0.05),
    ("Task: {instruction}\n\n{input}\n\nAnswer:", "{output}", 0.05),
    ("You need to complete the following task:\n\n{instruction}\n\n{input}\n\nAnswer:", "{output}", 0.05),
    ("{instruction}\n\nNow complete the following instance -\nInput: {input}\nOutput:", "{output}", 0.05),
    ("Instruction:{instruction}\n\nInput: {input}\n\n", "{output}", 0.05),
    ("Below is an instruction that describes a task, paired with an input that provides further context. Write a "
     "response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}"
     "\n\n### Response:", "{output}", 0.1),
]
WITHOUT_INPUT = [
    ("{instruction}\n\n", "{output}", 0.2),
    ("{instruction}\n", "{output}", 0.1),
    ("{instruction}", "\n{output}", 0.1),
    ("{instruction} Output:", "{output}", 0.05),
    ("{instruction}\nResponse:", "{output}", 0.05),
    ("{instruction}\n\nAnswer:", "{output}", 0.05),
    ("Task: {instruction}\n\n", "{output}", 0.05),
    ("Instruction: {instruction}\n", "{output}", 0.05),
    ("Instruction: {instruction}\nOutput:", "{output}", 0.05),
    ("You need to complete the following task:\n\n{instruction}\n\n", "{output}", 0.05),
    ("Can you help with this?\n\n{instruction}\n", "{output}", 0.05),
    ("Plase answer the following request: {instruction}\nAnswer:", "{output}", 0.05),  # upstream's typo
    ("Tell me how would you respond to the following request.\n{instruction}\n", "{output}", 0.05),
    ("Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
     "### Response:", "{output}", 0.1),
]
WEIGHTS = [w for _, _, w in WITH_INPUT]

ALPAGASUS_URL = "https://raw.githubusercontent.com/gpt4life/alpagasus/main/data/filtered/"
# (which, upstream-file argument, id prefix) in the order the paper's script consumed the RNG stream.
ALPAGASUS_FILES = (
    ("claude_t45_alpaca", "claude_t45_url", "alpagasus_"),
    ("9k_dolly", "chatgpt_9k_url", "alpagasus_9k_"),
    ("3k_dolly", "dolly_3k_url", "alpagasus_3k_"),
)
ALPAGASUS_SIZES = {"claude_t45_alpaca": 5305, "9k_dolly": 9229, "3k_dolly": 2996}
PAPER_SHA256 = {
    "claude_t45_alpaca": "7faffd3ac3a580402ddca3dd824616d5d5c81cdc782de330c6b0a3e6d95936fe",
    "3k_dolly": "28b89ba107e6776179515990d12a231b1a209ee360e21f365341033d8fad9f23",
}

LESS_URL = "https://huggingface.co/datasets/princeton-nlp/less_data/resolve/main/less-data.zip"
LESS_TASKS = {"tydiqa": "tydiqa", "mmlu-chat": "mmlu", "bbh-icl": "bbh"}  # paper's task name -> LESS's short name


def template_stream(seed: int = 42) -> Iterator[int]:
    """The template index of each successive `encode_instruction_example` call after `random.seed(seed)`.

    `random.choices` spends exactly one `random()` per call and picks by index, so choosing from `range(14)` on a
    private `Random(seed)` gives the same indices as the paper's global-RNG calls on its template lists.
    """
    rng = random.Random(seed)
    while True:
        yield rng.choices(range(len(WEIGHTS)), weights=WEIGHTS)[0]


def encode(instruction: str, input: str | None, output: str, index: int) -> tuple[str, str]:
    """(prompt, completion) as open-instruct builds them with template `index`."""
    if input is not None and input.strip() != "":
        prompt, completion, _ = WITH_INPUT[index]
        prompt = prompt.format(instruction=instruction.strip(), input=input.strip())
    else:
        prompt, completion, _ = WITHOUT_INPUT[index]
        prompt = prompt.format(instruction=instruction.strip())
    return prompt, completion.format(output=output.strip())


def _fetch(url: str, cache_dir: str | Path) -> Path:
    # A bare local path becomes a file:// URL so tests and offline mirrors go through the same cached download.
    return download(url if "://" in url else Path(url).resolve().as_uri(), cache_dir)


def _write_jsonl(path: Path, records: Iterable[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")  # default separators and ASCII escapes, as the paper's script wrote
    os.replace(tmp, path)


def _out_dir(cache_dir: str | Path, recipe: str, sources: dict) -> Path:
    # Different upstream files must not share a cached result.
    key = hashlib.sha256(json.dumps(sources, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cache_dir) / "rebuild" / recipe / key


def _alpagasus_rows(name: str, url: str, cache_dir: str | Path, hub_id: str | None) -> list[dict]:
    try:
        return json.loads(_fetch(url, cache_dir).read_text(encoding="utf-8"))
    except OSError as e:  # URLError and HTTPError are OSErrors
        if name != "9k_dolly" or not hub_id:
            raise
        log.warning("%s could not be downloaded (%s); using HF %s instead, an UNVERIFIED mirror of it", url, e, hub_id)
        import datasets

        return [dict(row) for row in datasets.load_dataset(hub_id, split="train")]


def build_alpagasus(
    cache_dir: str | Path,
    which: str,
    seed: int = 42,
    claude_t45_url: str = ALPAGASUS_URL + "claude_t45.json",
    chatgpt_9k_url: str = ALPAGASUS_URL + "chatgpt_9k.json",
    dolly_3k_url: str = ALPAGASUS_URL + "dolly_3k.json",
    chatgpt_9k_hub_id: str | None = "mlabonne/alpagasus",
    expected_sizes: dict[str, int] | None = None,
) -> Path:
    """`alpagasus_{which}.jsonl`, replaying the seed's template stream through every file before it."""
    names = [name for name, _, _ in ALPAGASUS_FILES]
    if which not in names:
        raise ValueError(f"alpagasus: which={which!r} is not one of {names}")
    urls = {"claude_t45_url": claude_t45_url, "chatgpt_9k_url": chatgpt_9k_url, "dolly_3k_url": dolly_3k_url}
    out_dir = _out_dir(cache_dir, "alpagasus", {**urls, "seed": seed, "hub": chatgpt_9k_hub_id})
    target = out_dir / f"alpagasus_{which}.jsonl"
    if target.exists():
        return target
    sizes = {**ALPAGASUS_SIZES, **(expected_sizes or {})}
    stream = template_stream(seed)
    for name, url_arg, id_prefix in ALPAGASUS_FILES[: names.index(which) + 1]:
        rows = _alpagasus_rows(name, urls[url_arg], cache_dir, chatgpt_9k_hub_id)
        if len(rows) != sizes[name]:
            # A wrong count in an earlier file would also shift every later file's templates.
            raise ValueError(f"alpagasus {name}: {urls[url_arg]} has {len(rows)} records, expected {sizes[name]}")
        records = []
        # `rows` comes first in zip so that it never takes a draw past the file's last record.
        for idx, (row, index) in enumerate(zip(rows, stream)):
            prompt, completion = encode(row["instruction"], row.get("input"), row["output"], index)
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
            records.append({"dataset": f"alpagasus_{name}", "id": f"{id_prefix}{idx}", "messages": messages})
        path = out_dir / f"alpagasus_{name}.jsonl"
        if not path.exists():
            _write_jsonl(path, records)
            if name in PAPER_SHA256:
                if file_sha256(path) == PAPER_SHA256[name]:
                    log.info("%s is byte-identical to the paper's file", path)
                else:
                    log.warning("%s differs from the paper's file (sha256); upstream may have changed", path)
    return target


def _less_member(names: list[str], task: str) -> str:
    wanted = f"{task}_adam_sim_trainp0.05_seed3_p0.05.jsonl"
    for name in names:
        if name.rsplit("/", 1)[-1] == wanted:
            return name
    for alias in (task, LESS_TASKS[task]):
        suffix = f"selected_data/{alias}/top_p0.05.jsonl"
        for name in names:
            if name == suffix or name.endswith("/" + suffix):
                return name
    selected = [name for name in names if "selected_data" in name]
    raise FileNotFoundError(f"less: no selected file for {task!r} in the zip; its selected_data members: {selected}")


def _less_record(row: dict, task: str, k: int) -> dict:
    if "messages" in row:
        messages = row["messages"]
    else:
        messages = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
    dataset, id_ = row.get("dataset", f"less_{task}"), row.get("id", f"less_{task}_{k}")
    return {"dataset": str(dataset), "id": str(id_), "messages": messages}


def build_less(cache_dir: str | Path, task: str, url: str = LESS_URL, expected_rows: int = 13533) -> Path:
    """The paper's `{task}_adam_sim_trainp0.05_seed3_p0.05.jsonl`, extracted from LESS's released selections.

    Re-running LESS's selection itself (a warm-up LoRA on a 5% random slice, seed 3, of the Flan v2 + CoT + Dolly +
    OASST1 pool; Adam gradient features; 8192-dim random projections; matching against the target task's gradients;
    top 5%) is LESS's pipeline (github.com/princeton-nlp/LESS) and is not re-implemented here.
    """
    if task not in LESS_TASKS:
        raise ValueError(f"less: task={task!r} is not one of {sorted(LESS_TASKS)}")
    target = _out_dir(cache_dir, "less", {"url": url}) / f"{task}_adam_sim_trainp0.05_seed3_p0.05.jsonl"
    if target.exists():
        return target
    with zipfile.ZipFile(_fetch(url, cache_dir)) as zf:
        member = _less_member(zf.namelist(), task)
        lines = [line for line in zf.read(member).decode("utf-8").splitlines() if line.strip()]
    if len(lines) != expected_rows:
        raise ValueError(f"less {task}: {member} has {len(lines)} rows, expected {expected_rows}")
    _write_jsonl(target, (_less_record(json.loads(line), task, k) for k, line in enumerate(lines)))
    return target


REBUILDERS: dict[str, Callable[..., Path]] = {"alpagasus": build_alpagasus, "less": build_less}


def build(recipe: str, cache_dir: str | Path, **args) -> Path:
    """The .jsonl file (messages schema) that rebuild recipe `recipe` makes from `args`, cached under cache_dir."""
    if recipe not in REBUILDERS:
        raise ValueError(f"unknown rebuild recipe {recipe!r}; known: {sorted(REBUILDERS)}")
    return REBUILDERS[recipe](cache_dir, **args)
