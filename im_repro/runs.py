"""Run directories: the manifest that says what made a run, and keyed stage outputs marked complete last.

A unit of work (a stage, or one benchmark of an eval suite) is done when its folder's `_COMPLETE` records the key
of this command's settings (im_repro/keys.py). `decide` says, for every unit a command would run, whether it is
reused (same key, finished), resumed (same key, started), computed (nothing there) or refused (another key:
`force=true` recomputes it from scratch). The entrypoint (im_repro/run.py) is the only caller; stages just compute.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from dataclasses import dataclass
from pathlib import Path

from im_repro import keys

PACKAGES = (
    "im-repro", "torch", "transformers", "tokenizers", "datasets", "accelerate", "deepspeed", "hydra-core",
    "lm-eval", "alpaca-eval", "wandb", "numpy",
)
REPO = Path(__file__).resolve().parents[1]


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_json(path: Path, obj) -> None:
    """Atomic: a reader never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def read_jsonl(path: Path, missing_ok: bool = False) -> list[dict]:
    """One record per non-empty line; no records from an absent file when `missing_ok`."""
    path = Path(path)
    if missing_ok and not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def git_state(repo: Path = REPO) -> dict:
    def git(*args):
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}


def package_versions() -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


class Manifest:
    """`<run>/manifest.json`: what made the run, kept for every invocation (nothing is overwritten).

    {"run": name, "invocations": [{command, overrides, config, git, packages, host, times, status, stages}, ...]};
    `latest(manifest)` is the last invocation, whose stage statuses the report reads.
    """

    def __init__(self, run_dir: Path, config: dict, overrides: list[str]):
        self.path = run_dir / "manifest.json"
        # Under a multi-process launcher only rank 0 writes; the others would race on the same file.
        self.writer = int(os.environ.get("RANK", 0)) == 0
        self.data = read_manifest(self.path) or {"run": run_dir.name, "invocations": []}
        self.current = {
            "status": "running",
            "started": now(),
            "ended": None,
            "command": sys.argv,
            "overrides": overrides,
            "config": config,
            "git": git_state(),
            "packages": package_versions(),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "host": socket.gethostname(),
            "stages": {},
        }
        self.data["invocations"].append(self.current)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.save()

    def save(self) -> None:
        if self.writer:
            write_json(self.path, self.data)

    def stage(self, name: str, **fields) -> None:
        self.current["stages"].setdefault(name, {}).update(fields)
        self.save()

    def finish(self, status: str, error: str | None = None) -> None:
        self.current.update(status=status, ended=now(), error=error)
        self.save()


def read_manifest(path: Path) -> dict | None:
    """A manifest with its invocations; one written before they were kept becomes a single invocation."""
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    if "invocations" not in data:
        data = {"run": path.parent.name, "invocations": [{k: v for k, v in data.items() if k != "history"}]}
    return data


def latest(manifest: dict) -> dict:
    """The last invocation, with the status of every stage any invocation ran (the latest record of each)."""
    invocations = manifest.get("invocations") or [{}]
    stages: dict[str, dict] = {}
    for inv in invocations:
        stages.update(inv.get("stages", {}))
    return {**invocations[-1], "stages": stages}


MARKER, STARTED = "_COMPLETE", "_STARTED"


def read_record(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


class StageOutput:
    """A stage's folder; it is complete only once `_COMPLETE` exists, and that file is written last. The key its
    work was started under (`_STARTED`, written by `Unit.begin`) is recorded in the marker."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.marker = self.path / MARKER

    @property
    def complete(self) -> bool:
        return self.marker.exists()

    def start(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self.marker.unlink(missing_ok=True)

    def finish(self, summary: dict) -> None:
        started = read_record(self.path / STARTED) or {}
        write_json(self.marker, {"finished": now(), **{k: started[k] for k in ("key", "settings") if k in started},
                                 **summary})


class StaleOutput(RuntimeError):
    """Outputs in a run directory were made under other settings than this command's."""


@dataclass
class Unit(StageOutput):
    """One keyed piece of work: a stage, or one benchmark of an eval suite. `settings` are exactly what can change
    its output (im_repro/keys.py); the marker records their key."""

    name: str
    path: Path
    settings: dict

    def __post_init__(self):
        super().__init__(self.path)

    @property
    def key(self) -> str:
        return keys.digest(self.settings)

    def record(self) -> dict | None:
        """What the folder says made it: the finished marker, else the record of work started; None if empty."""
        return read_record(self.marker) or read_record(self.path / STARTED)

    def made_nothing(self) -> bool:
        """No output here: no folder, or only the record of work that stopped before writing anything."""
        return not self.path.exists() or all(p.name == STARTED for p in self.path.iterdir())

    def state(self) -> str:
        """done (finished under this key) | partial (started under it) | new (nothing there) | stale (other key)."""
        if self.made_nothing():
            return "new"
        record = self.record()
        if record is None or record.get("key") != self.key:
            return "stale"
        return "done" if self.complete else "partial"

    def why_stale(self) -> str:
        record = self.record()
        if record is None or "settings" not in record:
            return f"{self.path} holds outputs with no recorded key (written by an older version or by hand)"
        diffs = keys.differences(record["settings"], self.settings)
        return f"{self.path} was made with other settings: " + "; ".join(diffs)

    def begin(self, fresh: bool) -> None:
        """Rank 0 clears the folder when starting from scratch and records the key the work is done under."""
        if int(os.environ.get("RANK", 0)) != 0:
            return
        if fresh:
            shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir(parents=True, exist_ok=True)
        self.marker.unlink(missing_ok=True)
        write_json(self.path / STARTED, {"key": self.key, "settings": self.settings, "started": now()})

    def abandon(self) -> None:
        """After a failure: a unit that wrote nothing leaves no folder (a typo must not look like stale work)."""
        if int(os.environ.get("RANK", 0)) == 0 and self.made_nothing():
            shutil.rmtree(self.path, ignore_errors=True)

    def finish(self, summary: dict) -> None:
        if int(os.environ.get("RANK", 0)) == 0:
            write_json(self.marker, {"finished": now(), "key": self.key, "settings": self.settings, **summary})
            (self.path / STARTED).unlink(missing_ok=True)


def decide(units: list[Unit], force: bool) -> dict[str, str]:
    """{unit name: skip | resume | fresh}. Without `force`, a unit made under other settings is refused before any
    work starts (StaleOutput names each differing setting, old -> new); `force` recomputes every unit from scratch."""
    if force:
        return {u.name: "fresh" for u in units}
    states = {u.name: u.state() for u in units}
    stale = [u for u in units if states[u.name] == "stale"]
    if stale:
        raise StaleOutput("\n".join(
            ["this run directory holds outputs made under other settings; not reusing them:",
             *(f"  {u.name}: {u.why_stale()}" for u in stale),
             "Use another run directory (the default name changes with the settings), or force=true to recompute "
             "these stages from scratch."]))
    return {name: {"done": "skip", "partial": "resume", "new": "fresh"}[state] for name, state in states.items()}


def pipeline(cfg) -> list[str]:
    """The stages of the run, whatever phase this job runs: `stages` less `skip_stages`."""
    return [s for s in cfg.stages if s not in cfg.skip_stages]


def units(cfg, run_dir: Path, stages: list[str]) -> dict[str, list[Unit]]:
    """The keyed units of each of `stages` in this run directory."""
    from im_repro.evaluate import select, suite, suite_dir

    train = Unit("train", run_dir / "train", keys.train_settings(cfg))
    # What eval and the analyses score: this run's training when it trains, else a model trained here before.
    train_key = train.key if "train" in pipeline(cfg) else (read_record(train.marker) or {}).get("key")
    found: dict[str, list[Unit]] = {}
    for stage in stages:
        if stage == "prepare":
            found[stage] = [Unit("prepare", run_dir / "prepare", keys.prepare_settings(cfg))]
        elif stage == "train":
            found[stage] = [train]
        elif stage == "eval":
            found[stage] = [Unit(f"eval/{cfg.eval.name}/{name}", suite_dir(cfg, run_dir) / name,
                                 keys.benchmark_settings(cfg, name, train_key))
                            for name in select(suite(cfg), cfg.eval.only)]
        elif stage == "loss":
            found[stage] = [Unit("loss", run_dir / "loss", keys.loss_analysis_settings(cfg, train_key))]
        elif stage == "memorization":
            found[stage] = [Unit("memorization", run_dir / "memorization", keys.memorization_settings(cfg, train_key))]
        else:
            raise ValueError(f"no units known for stage {stage!r}")
    return found
