"""What made each output: the pieces every stage's key is built from.

A unit's key (a stage, or one benchmark of a suite) is the sha256 of exactly the resolved settings that can change
what it writes, plus `FORMAT`; each stage declares its own settings (im_repro/stages.py), each benchmark its own
(im_repro/evaluate/benchmark.py), from the pieces here. The settings in `EXCLUDED` cannot change an output (labels,
logging, worker counts) and are left out, so changing them reuses a finished unit; tests/test_keys.py lists them.
Where a setting names a local file (the training data, a tokenizer folder), its content's sha256 stands in for the
path, so the same data read from another place is the same run.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from im_repro.common import file_sha256
from im_repro.config import plain

# Bump when a stage's outputs change meaning: every older key then differs and is refused. 2: the evaluated model's
# eval.dtype in every score's key, stage `loss` renamed heldout_loss, method.mask / method.reduction (README).
FORMAT = 2

# Settings that cannot change a stage's output, per config group (dotted paths inside the group).
EXCLUDED: dict[str, tuple[str, ...]] = {
    "data": ("name", "paper_name", "paper_size", "licence"),  # labels: the source and its contents decide
    "model": ("name", "params_b"),
    "method": ("name",),  # the label; the loss mode and the train settings it sets decide
    "train": ("name", "logging_steps", "report_to", "save_strategy", "save_steps", "save_total_limit",
              "dataloader_num_workers", "gradient_checkpointing", "loss_kernel"),
    "prepare": ("num_proc", "batch_size", "cache_dir"),
    "analysis": ("batch_size",),
}  # each benchmark lists its own (Benchmark.excluded); eval.only and eval.generation are in no key, but the engine it
# chooses is in every generating unit's (evaluate.generate.engine: backend, version, vLLM's own arguments)


def digest(settings: Any) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def plain_dict(node) -> Any:
    """A config node as plain data (resolved, enums as strings)."""
    if OmegaConf.is_config(node):
        node = OmegaConf.to_container(node, resolve=True, enum_to_str=True)
    return node


def without(settings: dict, excluded: tuple[str, ...]) -> dict:
    """A deep copy of `settings` (enums as strings) less the dotted paths in `excluded`."""
    settings = json.loads(json.dumps(settings, default=plain))
    for path in excluded:
        *parents, leaf = path.split(".")
        node = settings
        for part in parents:
            node = node.get(part, {})
        node.pop(leaf, None)
    return settings


@lru_cache(maxsize=64)
def _sha256(path: str, mtime_ns: int) -> str:  # mtime in the cache key: an edited file is hashed again
    return file_sha256(path)


def content(path: str | None) -> str | None:
    """The sha256 of a local file, or of a folder's files (name and bytes); None for anything else (a Hub id)."""
    if not path:
        return None
    p = Path(path)
    if p.is_file():
        return _sha256(str(p.resolve()), p.stat().st_mtime_ns)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        return digest([[str(f.relative_to(p)), content(str(f))] for f in files])
    return None


def data_settings(cfg) -> dict:
    """The data config less its labels, with the rows identified by their sha256 where known: a local `data.path`
    and a URL source with a checksum name the same rows when the bytes are the same."""
    d = without(plain_dict(cfg.data), EXCLUDED["data"])
    source, path = d.pop("source"), d.pop("path")
    if path:  # a local file replaces the source entirely, its dataset filter included (data.rows_for)
        d["rows"] = {"sha256": content(path) or path, "dataset_regex": None}
    elif source["kind"] == "url" and source["args"].get("sha256"):
        d["rows"] = {"sha256": source["args"]["sha256"], "dataset_regex": source["dataset_regex"]}
    else:
        d["rows"] = source
    if not d["subset"]["kind"]:
        d.pop("subset")
    return d


def tokenizer_settings(model, contents: bool = True) -> dict:
    m = plain_dict(model)
    path, gguf = (m["tokenizer"], m["tokenizer_gguf_file"]) if m["tokenizer"] else (m["path"], m["gguf_file"])
    found = content(path) if contents else None
    return {"tokenizer": {"sha256": found} if found else path, "gguf_file": gguf, "fast": m["use_fast_tokenizer"]}


def model_settings(cfg, contents: bool = True) -> dict:
    m = without(plain_dict(cfg.model), EXCLUDED["model"])
    if m["init"] == "random":  # the weights come from the seed
        m["seed"] = cfg.seed
    m["chat_template"] = chat_template(cfg, contents)
    return m


def chat_template(cfg, contents: bool = True) -> str | dict | None:
    """A borrowed chat template (model.chat_template) by its content where it is local: two templates that differ
    only in a header must not share a key, wherever they were read from."""
    source = cfg.model.chat_template
    found = content(source) if contents else None
    return {"sha256": found} if found else source


def template_settings(cfg, contents: bool = True) -> dict:
    """How conversations are rendered: the format and, for the tokenizer's own template, the template borrowed."""
    return {"template": plain(cfg.prepare.template), "chat_template": chat_template(cfg, contents)}


def flat(settings: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(settings, dict):
        return {k: v for key, value in settings.items() for k, v in flat(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): settings}


def differences(old: dict, new: dict) -> list[str]:
    """`setting: old -> new` for every setting that differs (absent on one side: `(none)`)."""
    a, b = flat(old), flat(new)
    return [f"{k}: {a.get(k, '(none)')} -> {b.get(k, '(none)')}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
