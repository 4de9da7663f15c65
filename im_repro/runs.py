"""Run directories: the manifest that says what made a run, and keyed stage outputs marked complete last.

A unit of work (a stage, or one benchmark of an eval suite) is done when its folder's `_COMPLETE` records the key
of this command's settings (im_repro/keys.py). `decide` says, for every unit a command would run, whether it is
reused (same key, finished), resumed (same key, started), computed (nothing there) or refused (another key:
`force=true` recomputes it from scratch). The entrypoint (im_repro/run.py) is the only caller; stages just compute.
This module knows no stage: im_repro/stages.py makes the units.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import platform
import shutil
import socket
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from im_repro import keys
from im_repro.common import UserError, is_main, read_json, write_json

PACKAGES = (
    "im-repro", "torch", "transformers", "tokenizers", "datasets", "accelerate", "deepspeed", "hydra-core",
    "lm-eval", "alpaca-eval", "wandb", "numpy",
)
REPO = Path(__file__).resolve().parents[1]


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


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
        self.writer = is_main()
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
    """{"run", "invocations": [...]}, or None where there is no manifest."""
    return read_json(path)


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


class StaleOutput(UserError, RuntimeError):
    """Outputs in a run directory were made under other settings than this command's."""


@contextmanager
def locked(run_dir: Path) -> Iterator[None]:
    """One process at a time in a run directory (the other ranks of a launch follow rank 0): an exclusive lock on a
    file beside the folder, so a refused command writes nothing in it. A second process refuses at once, naming the
    first; the kernel releases the lock of a process that dies."""
    if not is_main():
        yield
        return
    run_dir = Path(run_dir).resolve()
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    path = run_dir.parent / f".{run_dir.name}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise UserError(f"{run_dir} is in use by {holder}: two commands in one run directory would both prepare "
                        "and train it. Wait for that one to finish, or run this one elsewhere (hydra.run.dir=DIR)")
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"im-repro pid {os.getpid()} on {socket.gethostname()} since {now()}".encode(), 0)
        yield
    finally:
        os.unlink(path)  # before the lock goes, so nobody locks a file about to vanish
        os.close(fd)


@contextmanager
def log_file(path: Path) -> Iterator[None]:
    """This invocation's log lines also appended to `path` (the run's run.log), written only once its checks passed."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    logging.getLogger().addHandler(handler)
    try:
        yield
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


@dataclass
class Unit:
    """One keyed piece of work: a stage, or one benchmark of an eval suite, in its own folder. `settings` are exactly
    what can change its output (im_repro/keys.py). The folder is complete only once `_COMPLETE` exists, written last
    with their key; `_STARTED` records the key of work begun and not finished."""

    name: str
    path: Path
    settings: dict
    resuming: bool = False  # set by `begin`: work started under this key goes on from where it stopped

    @property
    def marker(self) -> Path:
        return self.path / MARKER

    @property
    def complete(self) -> bool:
        return self.marker.exists()

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
        self.resuming = not fresh
        if not is_main():
            return
        if fresh:
            shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir(parents=True, exist_ok=True)
        self.marker.unlink(missing_ok=True)
        write_json(self.path / STARTED, {"key": self.key, "settings": self.settings, "started": now()})

    def abandon(self) -> None:
        """After a failure: a unit that wrote nothing leaves no folder (a typo must not look like stale work)."""
        if is_main() and self.made_nothing():
            shutil.rmtree(self.path, ignore_errors=True)

    def finish(self, summary: dict) -> None:
        if is_main():
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


@dataclass
class Job:
    """What a stage's run function gets (im_repro/stages.py): the config, the run directory, the units it is to do
    (each begun: fresh or resuming), and the model it scores, if it scores one. The stage calls `finish` for each
    unit the moment its output is complete, so a later failure (or a kill) does not undo it."""

    cfg: Any
    run_dir: Path
    units: list[Unit]
    model: Any = None  # im_repro.model.Evaluated
    finished: dict[str, dict] = field(default_factory=dict)

    def finish(self, name: str, summary: dict) -> None:
        unit = next(u for u in self.units if u.name == name)
        unit.finish(summary)
        self.finished[name] = summary
