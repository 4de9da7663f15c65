"""Run directories: the manifest that says what made a run, and stage outputs marked complete last."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

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
    """`<run>/manifest.json`: resolved config, overrides, git commit, versions, times, status of each stage."""

    def __init__(self, run_dir: Path, config: dict, overrides: list[str]):
        self.path = run_dir / "manifest.json"
        # Under a multi-process launcher only rank 0 writes; the others would race on the same file.
        self.writer = int(os.environ.get("RANK", 0)) == 0
        previous = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.data = {
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
            "stages": previous.get("stages", {}),
            "history": previous.get("history", []) + ([{k: previous.get(k) for k in ("started", "ended", "status")}] if previous else []),
        }
        run_dir.mkdir(parents=True, exist_ok=True)
        self.save()

    def save(self) -> None:
        if self.writer:
            write_json(self.path, self.data)

    def stage(self, name: str, **fields) -> None:
        self.data["stages"].setdefault(name, {}).update(fields)
        self.save()

    def finish(self, status: str, error: str | None = None) -> None:
        self.data.update(status=status, ended=now(), error=error)
        self.save()


class StageOutput:
    """A stage's folder; it is complete only once `_COMPLETE` exists, and that file is written last."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.marker = self.path / "_COMPLETE"

    @property
    def complete(self) -> bool:
        return self.marker.exists()

    def start(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self.marker.unlink(missing_ok=True)

    def finish(self, summary: dict) -> None:
        write_json(self.marker, {"finished": now(), **summary})
