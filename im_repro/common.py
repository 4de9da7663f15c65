"""Helpers every other module may use, and which use no other module of the package: atomic JSON files, JSONL
records, downloads checked against their sha256, and which process of a launch this is."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import urllib.request
from pathlib import Path
from typing import Any, Iterable


# --- files ----------------------------------------------------------------------------------------------------------

def artifacts() -> Path:
    """The offline artifacts folder (scripts/fetch_artifacts.py): IM_REPRO_ARTIFACTS, else artifacts/ beside the
    package."""
    return Path(os.environ.get("IM_REPRO_ARTIFACTS", Path(__file__).resolve().parents[1] / "artifacts"))


def write_json(path: str | Path, obj: Any) -> None:
    """Atomic: a reader never sees half a file, and two writers never share a temporary file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, default=str)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: str | Path, default: Any = None) -> Any:
    """The file's JSON, or `default` when there is no file."""
    path = Path(path)
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else default


def read_jsonl(path: str | Path, missing_ok: bool = False) -> list[dict]:
    """One record per non-empty line; none from an absent file when `missing_ok`."""
    path = Path(path)
    if missing_ok and not path.exists():
        return []
    return [json.loads(line) for line in jsonl_lines(path.read_text(encoding="utf-8"))]


def jsonl_lines(text: str) -> list[str]:
    """The non-empty lines of JSONL text: split at "\n" alone (str.splitlines also splits at U+2028 and other
    separators that JSON strings may hold raw, as Arena-Hard's questions do)."""
    return [line for line in text.split("\n") if line.strip()]


def read_records(path: str | Path) -> list[dict]:
    """The records of a JSON list or of a JSONL file."""
    text = Path(path).read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in jsonl_lines(text)]


def append_jsonl(path: str | Path, records: Iterable[dict]) -> None:
    """Each record as one line at the end of `path` (created with its folder), flushed before returning."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
        f.flush()


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --- errors a user can fix ------------------------------------------------------------------------------------------

class UserError(Exception):
    """A mistake a user can fix (a setting, a file, a missing download): the entrypoint prints its message, which
    names the fix, instead of a traceback (HYDRA_FULL_ERROR=1 shows it)."""


class DownloadError(UserError, ConnectionError):
    """A file could not be fetched (offline, a URL that moved)."""


class ChecksumError(UserError, ValueError):
    """A file's bytes are not the ones the config pins."""


# --- downloads ------------------------------------------------------------------------------------------------------

def download(url: str, cache_dir: str | Path, sha256: str | None = None, *, offline_hint: str = "") -> Path:
    """Fetch `url` once into `<cache_dir>/downloads/` (atomically); a file whose sha256 is not the expected one
    never enters the cache. `offline_hint`: what to do instead, for the error message (e.g. the setting to point at a
    local copy)."""
    target = Path(cache_dir) / "downloads" / hashlib.sha256(url.encode()).hexdigest()[:16] / url.rsplit("/", 1)[-1]
    if target.exists():
        _verify(target, sha256, f"the cached copy of {url} (delete it to download again)")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(target.suffix + ".part")
    try:
        urllib.request.urlretrieve(url, tmp)
        _verify(tmp, sha256, f"{url} as downloaded (corrupt, or changed upstream; not cached)")
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise DownloadError(f"cannot download {url} ({e}). {offline_hint or 'Point the config at a local copy.'} "
                                f"A copy placed at {target} is used as the download.") from e
        raise
    os.replace(tmp, target)
    return target


def _verify(path: Path, sha256: str | None, what: str) -> None:
    if sha256 and (actual := file_sha256(path)) != sha256:
        raise ChecksumError(f"{path}: sha256 mismatch: {what} has {actual}, the config expects {sha256}")


# --- processes of a launch ------------------------------------------------------------------------------------------

def rank() -> int:
    """This process's rank under a multi-process launcher (accelerate, torchrun, DeepSpeed); 0 alone."""
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    """How many processes the launcher started; 1 alone."""
    return int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    """Whether this process writes the run's shared files (rank 0)."""
    return rank() == 0
