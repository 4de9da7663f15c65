"""Which runs a report reads: the runs an experiment's sweep names, found in the run store by their keys.

A table needs runs (data x method x model x recipe x seed): `wanted` composes each job of the experiment's sweep
(its `hydra.sweeper.params` and the report command's own overrides, as Hydra's multirun would) and looks for the
run directory its settings name (stages.run_name). A run not in the store is still listed, so every cell it would
fill says "missing: run X not found". Runs that differ only in seed share `identity(run)` but their seed.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from im_repro.data import label as data_label
from im_repro.runs import latest, read_manifest

def dig(data: Any, path: str, default: Any = None) -> Any:
    """`data["a"]["b"]` for path "a.b", or `default` where a level is absent (older manifests lack newer keys)."""
    for part in path.split("."):
        if not isinstance(data, Mapping) or part not in data:
            return default
        data = data[part]
    return data


def number(value: Any) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def one_line(text: Any, limit: int = 300) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


@dataclass(frozen=True, eq=False)  # hashed by identity: figures key their series on runs
class Run:
    """A run the report wants: its directory in the store, and the config that names it (the manifest's latest
    invocation when the run was found by folder). `manifest` is None when the store has no such run."""

    path: Path
    manifest: dict | None
    config: dict

    @property
    def invocation(self) -> dict:
        return latest(self.manifest) if self.manifest else {}

    def absent(self, stage: str, file: str) -> str:
        """Why `<run>/<stage>/<file>` does not exist, from the manifest's record of the stages."""
        if self.manifest is None:
            return f"missing: run {self.path.name} not found in {self.path.parent}"
        stages = self.invocation.get("stages", {})
        own = stages.get(stage, {})
        if own.get("status") == "failed":
            return f"failed: {one_line(own.get('error'))}"
        failed = next(((name, s) for name, s in stages.items() if s.get("status") == "failed"), None)
        if failed:
            return f"not run: {failed[0]} failed: {one_line(failed[1].get('error'))}"
        if own.get("status") == "running":
            return f"{stage} did not finish"
        if own.get("status") in ("done", "reused"):
            return f"{stage} finished without writing {file}"
        return f"{stage} not run"


def found(path: Path, config: dict | None = None) -> Run:
    manifest = read_manifest(path / "manifest.json")
    if config is None:
        config = latest(manifest).get("config", {}) if manifest else {}
    return Run(path, manifest, config)


def load_runs(root: Path) -> list[Run]:
    """Every run directory under `root`: a folder with a manifest.json (others, e.g. Hydra's, are not runs)."""
    if not root.is_dir():
        return []
    return [found(d) for d in sorted(root.iterdir()) if (d / "manifest.json").is_file()]


def sweep(params: Mapping[str, str], overrides: list[str]) -> list[list[str]]:
    """Every job's overrides, as Hydra's basic sweeper expands them: the command line's overrides take the place of
    the sweep's for the same key, and every comma list is swept."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    given = parser.parse_overrides(list(overrides))
    keys = {o.get_key_element() for o in given}
    swept = parser.parse_overrides([f"{k}={v}" for k, v in params.items() if k not in keys]) + given
    choices = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override()
               else [f"{o.get_key_element()}={o.get_value_element_as_str()}"] for o in swept]
    return [list(job) for job in itertools.product(*choices)]


def wanted(runs_dir: Path, params: Mapping[str, str], overrides: list[str]) -> list[Run]:
    """The runs an experiment's sweep names, each found in `runs_dir` by its name and key, or listed as missing.
    Call inside a Hydra app (the report's entry point): each job's config is composed as the sweep would."""
    from hydra import compose
    from omegaconf import OmegaConf

    from im_repro.stages import run_name

    runs: dict[Path, Run] = {}
    for job in sweep(params, overrides):
        cfg = compose(config_name="config", overrides=job)
        path = Path(runs_dir) / run_name(cfg)
        if path not in runs:  # a sweep may name one run several times (Table 3's baselines)
            runs[path] = found(path, OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    return list(runs.values())


def kl_mode(config: Mapping) -> str | None:
    mode = dig(config, "train.kl.mode", "none")
    return None if mode == "none" else mode


def identity(run: Run) -> dict[str, Any]:
    """Everything a table may key its rows on, from the run's config (conf/method/ names the method)."""
    c = run.config
    kl = kl_mode(c)
    method = dig(c, "method.name")
    return {
        "model": dig(c, "model.name"),
        "dataset": None if method == "base" else data_label(dig(c, "data", {})),  # the paper's base rows have none
        "method": method,
        "kl_mode": kl,
        "kl_lambda": dig(c, "train.kl.weight") if kl else None,
        "neftune_alpha": dig(c, "train.neftune_alpha") or None,
        "limit": dig(c, "data.limit"),
        "seed": dig(c, "seed"),
    }
