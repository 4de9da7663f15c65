"""What made each output: the settings every stage's key is computed from.

A stage's key is the sha256 of exactly the resolved settings that can change what it writes, plus `FORMAT`. The
settings in `EXCLUDED` cannot change an output (labels, logging, batch sizes of evaluation, worker counts) and are
left out, so changing them reuses a finished stage; tests/test_keys.py lists them. Where a setting names a local
file (the training data, a tokenizer folder), its content's sha256 stands in for the path, so the same data read from
another place is the same run.

Units: `prepare`, `train`, `loss`, `memorization`, and one per benchmark of the eval suite (`eval/<suite>/<name>`).
The run directory's name carries `run_id`: the short hash of the run's training settings, the tokenizer named by its
path rather than its files (a config names its directory without reading a model folder).
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from im_repro import data
from im_repro.config import plain

FORMAT = 1  # bump when a stage's outputs change meaning: every older key then differs and is refused

# Settings that cannot change a stage's output, per config group (dotted paths inside the group).
EXCLUDED: dict[str, tuple[str, ...]] = {
    "data": ("name", "paper_name", "paper_size", "licence"),  # labels: the source and its contents decide
    "model": ("name", "params_b"),
    "method": ("name",),  # the label; the loss mode and the train settings it sets decide
    "train": ("name", "logging_steps", "report_to", "save_strategy", "save_steps", "save_total_limit",
              "dataloader_num_workers", "gradient_checkpointing"),
    "prepare": ("num_proc", "batch_size", "cache_dir"),
    "harness": ("batch_size", "max_batch_size", "log_samples"),
    "humaneval": ("enabled", "workers", "category"),
    "alpaca_eval": ("enabled", "judge.api_key_env", "judge.max_retries"),
    "mt_bench": ("enabled", "judge.api_key_env", "judge.max_retries"),
    "eval": ("generation_batch_size", "only", "checkpoint"),
    "analysis": ("batch_size",),
}


def digest(settings: Any) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def plain_dict(node) -> Any:
    """A config node as plain data (resolved, enums as strings)."""
    if OmegaConf.is_config(node):
        node = OmegaConf.to_container(node, resolve=True, enum_to_str=True)
    return node


def without(settings: dict, group: str) -> dict:
    settings = json.loads(json.dumps(settings, default=plain))  # a deep copy with enums as strings
    for path in EXCLUDED[group]:
        *parents, leaf = path.split(".")
        node = settings
        for part in parents:
            node = node.get(part, {})
        node.pop(leaf, None)
    return settings


@lru_cache(maxsize=64)
def file_sha256(path: str, mtime_ns: int) -> str:  # mtime in the cache key: an edited file is hashed again
    return data.file_sha256(path)


def content(path: str | None) -> str | None:
    """The sha256 of a local file, or of a folder's files (name and bytes); None for anything else (a Hub id)."""
    if not path:
        return None
    p = Path(path)
    if p.is_file():
        return file_sha256(str(p.resolve()), p.stat().st_mtime_ns)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        return digest([[str(f.relative_to(p)), content(str(f))] for f in files])
    return None


def data_settings(cfg) -> dict:
    """The data config less its labels, with the rows identified by their sha256 where known: a local `data.path`
    and a URL source with a checksum name the same rows when the bytes are the same."""
    d = without(plain_dict(cfg.data), "data")
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


def loss_settings(cfg) -> dict:
    m = plain_dict(cfg.method)
    return {"mode": m["loss"], **({"prompt_loss_weight": m["prompt_loss_weight"]} if m["loss"] == "weighted" else {})}


def prepare_settings(cfg, contents: bool = True) -> dict:
    return {"format": FORMAT, "data": data_settings(cfg), **tokenizer_settings(cfg.model, contents),
            "template": plain(cfg.prepare.template), "loss": loss_settings(cfg),
            "max_seq_length": cfg.train.max_seq_length}


def model_settings(cfg) -> dict:
    m = without(plain_dict(cfg.model), "model")
    if m["init"] == "random":  # the weights come from the seed
        m["seed"] = cfg.seed
    return m


def weighting_settings(cfg) -> dict:
    """The loss=weighted settings the train stage applies on top of prepare's weights (none for other modes, where
    every weight is 0 or 1 and both normalisations agree)."""
    m = plain_dict(cfg.method)
    return {"weighting": {k: m[k] for k in ("normalize", "response_weight")}} if m["loss"] == "weighted" else {}


def train_settings(cfg, contents: bool = True) -> dict:
    t = without(plain_dict(cfg.train), "train")
    if t["kl"]["mode"] == "none":
        t["kl"].pop("weight")  # no KL term: its weight multiplies nothing
    return {"format": FORMAT, "prepare": digest(prepare_settings(cfg, contents)), "model": model_settings(cfg),
            "train": t, "seed": cfg.seed, **weighting_settings(cfg)}


def untrained(cfg) -> bool:
    """A run of the base model as it is (method=base): no data, no recipe."""
    return "train" in cfg.skip_stages


def evaluated_model(cfg, train_key: str | None) -> dict:
    """What an eval or analysis stage scores: a given checkpoint, the run's trained model (its train key), or the
    base model (evaluate.checkpoint chooses the same way)."""
    if cfg.eval.checkpoint:
        return {"checkpoint": content(cfg.eval.checkpoint) or cfg.eval.checkpoint}
    if train_key:
        return {"train": train_key, "dtype": cfg.model.dtype}
    return {"base": model_settings(cfg)}


def benchmark_settings(cfg, name: str, train_key: str | None) -> dict:
    """One benchmark of the suite: the model evaluated + the benchmark's own resolved settings."""
    e = cfg.eval
    common = {"format": FORMAT, "model": evaluated_model(cfg, train_key), "seed": cfg.seed}
    if name in e.harness.tasks:
        harness = without(plain_dict(e.harness), "harness")
        task = harness.pop("tasks")[name]
        task["limit"] = task["limit"] if task["limit"] is not None else harness.pop("limit")
        harness.pop("limit", None)
        task.pop("category"), task.pop("higher_is_better")  # how the report groups it, not what it measures
        return {**common, "harness": harness, "task": task}
    own = without(plain_dict(e[name]), name)
    return {**common, name: own, "template": plain(cfg.prepare.template)}


def loss_analysis_settings(cfg, train_key: str | None) -> dict:
    a = without(plain_dict(cfg.analysis), "analysis")
    return {"format": FORMAT, "model": evaluated_model(cfg, train_key), "prepare": digest(prepare_settings(cfg)),
            "heldout": a["heldout"], "fraction": a["heldout_fraction"], "sampling": a["heldout_sampling"],
            "limit": a["loss_limit"], "seed": cfg.seed}


def memorization_settings(cfg, train_key: str | None) -> dict:
    a = cfg.analysis
    return {"format": FORMAT, "model": evaluated_model(cfg, train_key), "data": data_settings(cfg),
            "template": plain(cfg.prepare.template), "limit": a.memorization_limit,
            "max_new_tokens": a.max_new_tokens}


def run_id(cfg) -> str:
    """The short hash in a run directory's name: what the run trains (or, for the base model, evaluates)."""
    if untrained(cfg):
        return digest({"base": model_settings(cfg)})[:6]
    return digest(train_settings(cfg, contents=False))[:6]


def run_name(cfg) -> str:
    """`<data>__<model>__<method>__<train>__seed<k>__<run_id>`; the base model's runs have no data or recipe."""
    if untrained(cfg):
        return f"{cfg.method.name}__{cfg.model.name}__seed{cfg.seed}__{run_id(cfg)}"
    return f"{cfg.data.name}__{cfg.model.name}__{cfg.method.name}__{cfg.train.name}__seed{cfg.seed}__{run_id(cfg)}"


def flat(settings: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(settings, dict):
        return {k: v for key, value in settings.items() for k, v in flat(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): settings}


def differences(old: dict, new: dict) -> list[str]:
    """`setting: old -> new` for every setting that differs (absent on one side: `(none)`)."""
    a, b = flat(old), flat(new)
    return [f"{k}: {a.get(k, '(none)')} -> {b.get(k, '(none)')}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
