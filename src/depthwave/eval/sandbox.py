"""Run untrusted Python (model-written HumanEval / MBPP completions) in a sandbox.

`run_program(source)` executes one program in a fresh interpreter and reports how it ended; `run_tests(program,
tests)` runs a completion followed by its tests. Neither raises for a misbehaving program: everything the program
does wrong, including breaking out of a limit, comes back as a `SandboxResult`.

Layers, outermost first (`isolation_layers()` names the ones active on this machine):

- process: a fresh interpreter per program, in its own session and process group, with a scrubbed environment
  (no variable of the caller's survives), started in a throwaway directory that also holds HOME and TMPDIR.
  The harness waits on a wall clock, then SIGKILLs the whole group; the directory is deleted afterwards.
- rlimits: address space (memory), CPU seconds (timeout + 1), file size, open files, no core dumps, processes.
- uid (when the harness runs as root): the program runs under a fresh unprivileged uid/gid of its own, with no
  supplementary groups and no_new_privs. File permissions then protect everything it does not own, the process
  limit is enforced (the kernel ignores RLIMIT_NPROC for root), it cannot signal or trace other processes, and
  every process left with that uid is killed afterwards. The interpreter starts as root and drops privileges
  before the program is compiled, so the interpreter may live where the sandbox uid cannot reach (e.g. under a
  0700 /root): import directories it cannot enter, or that the private /tmp below would hide (a checkout under
  /tmp), are reopened through descriptors taken before the drop and the mounts.
- namespaces (`unshare` from util-linux, when it works here): a fresh network namespace (no network, not even
  loopback of the host) and IPC namespace; as root also a mount namespace in which the working directory is a
  size-limited, noexec tmpfs and the world-writable /tmp, /var/tmp and /dev/shm are replaced by empty tmpfs that
  only root can write. The program can then write nowhere on the host, and nothing it writes outlives it.
- guard: an audit hook (PEP 578), installed before the program runs and impossible to remove, refuses sockets,
  running other programs (os.system, exec*, spawn*, subprocess), fork and threads unless `max_processes` allows
  them, ctypes (dropped before the program starts; importing it raises ImportError, so numpy & co. carry on
  without it), signals to other process groups, the garbage collector's object walks (which would reach the
  hook), loading native extensions from outside the Python installation, symlinks, writing, deleting, renaming,
  chmod-ing or entering anything outside the working directory (/dev/null excepted), opening directories outside
  it, and reading obvious secrets: the caller's HOME, /root, /home, /etc/shadow and friends, other processes' /proc
  entries (the Python installation and the import path stay readable wherever they live). A refusal raises
  PermissionError (ImportError for imports) "sandbox: blocked <event> <detail>" in the program.
  Audit hooks are not a security boundary against a determined attacker (PEP 578 says so; numpy's
  `__array_interface__` alone reads and writes raw memory): the guard stops accidents and naive escapes and names
  what was refused. Run the harness as root, in a throwaway VM or container, when the code may be adversarial:
  the kernel layers above then hold whatever happens inside the interpreter.

Status rules, applied in this order:

- "timeout": the wall clock ran out (the group was killed) or the CPU limit was hit (SIGXCPU).
- "crash": setup of the sandbox failed; the program was killed by a signal (reason "killed by SIGSEGV", ...).
- "pass": exit code 0 (for `run_tests`, only if the tests also ran to the end: a completion that calls exit()
  first fails with "exited before the tests completed"). Refusals the program caught and survived do not matter.
- "crash": nonzero exit when the uncaught exception is a refusal of the guard, or was raised while handling one
  (reason "blocked: <event> <detail>"), after a MemoryError ("out of memory (MemoryError)"), or after stdout or
  stderr reached the file size limit ("output limit exceeded (N MB)").
- "fail": any other nonzero exit: an uncaught exception (reason: its type, e.g. "AssertionError",
  "RecursionError", "SyntaxError") or an explicit exit code ("exit code 3").

stdout and stderr go to files (bounded by the file size limit), of which at most `output_limit_bytes` are kept:
the beginning and, so that a final traceback survives, the end, joined by a "[... N bytes truncated ...]" line.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import secrets
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from depthwave.errors import is_int, require

Status = Literal["pass", "fail", "timeout", "crash"]

# Fresh uids come from a range no distribution allocates; each run takes one that no process is using.
_UID_RANGE = (1_900_000_000, 2_000_000_000)
_MIB = 1024 * 1024
# The working directory tmpfs (mount namespace) holds this many files of the maximum size.
_WORK_FILES = 4
_MAX_STACK = 64 * _MIB
_SECRETS = ("/root", "/home", "/etc/shadow", "/etc/gshadow", "/etc/sudoers", "/etc/sudoers.d", "/etc/ssh")
_SHARED_TMP = ("/tmp", "/var/tmp", "/dev/shm")
_STATUS_LIMIT = 64_000
_UIDS_LOCK = threading.Lock()
_UIDS_TAKEN: set[int] = set()


@dataclass(frozen=True)
class SandboxLimits:
    """What one program may use. `max_processes` counts processes and threads beyond the program itself."""

    timeout_s: float = 10.0
    memory_mb: int = 1024
    max_processes: int = 0
    max_file_mb: int = 16
    max_open_files: int = 64
    output_limit_bytes: int = 64_000

    def __post_init__(self) -> None:
        timeout = self.timeout_s
        require(
            isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and 0 < timeout < math.inf,
            "timeout_s",
            timeout,
            "a finite number of seconds > 0",
        )
        # The interpreter itself needs some address space and a few descriptors before the program runs.
        require(is_int(self.memory_mb) and self.memory_mb >= 64, "memory_mb", self.memory_mb, "an integer >= 64")
        require(
            is_int(self.max_processes) and self.max_processes >= 0,
            "max_processes",
            self.max_processes,
            "an integer >= 0",
        )
        require(is_int(self.max_file_mb) and self.max_file_mb >= 1, "max_file_mb", self.max_file_mb, "an integer >= 1")
        require(
            is_int(self.max_open_files) and self.max_open_files >= 16,
            "max_open_files",
            self.max_open_files,
            "an integer >= 16",
        )
        require(
            is_int(self.output_limit_bytes) and self.output_limit_bytes >= 1,
            "output_limit_bytes",
            self.output_limit_bytes,
            "an integer >= 1",
        )


@dataclass(frozen=True)
class SandboxResult:
    """How a program ended. `returncode` is negative when a signal killed it, None when it never started."""

    status: Status
    returncode: int | None
    stdout: str
    stderr: str
    duration_s: float
    reason: str


DEFAULT_LIMITS = SandboxLimits()


def run_program(source: str, limits: SandboxLimits = DEFAULT_LIMITS, stdin: str = "") -> SandboxResult:
    """Run `source` as `__main__` in the sandbox and classify how it ended (see the module docstring)."""
    return _run_checked(source, limits, stdin, require_completion=False)


def run_tests(program: str, tests: str, limits: SandboxLimits = DEFAULT_LIMITS) -> SandboxResult:
    """Run a completion followed by its tests, e.g. HumanEval's prompt + completion and `check(entry_point)`.

    Passes only if the tests run to their end: a program that exits early (exit(0) before the checks) fails."""
    require(isinstance(tests, str), "tests", type(tests).__name__, "a str")
    return _run_checked(program + "\n\n" + tests, limits, "", require_completion=True)


def isolation_layers() -> tuple[str, ...]:
    """The layers active on this machine: process, rlimits, guard, and where available uid, netns, ipcns, mountns."""
    iso = _isolation()
    layers = ["process", "rlimits", "guard"]
    if iso.drop_privileges:
        layers.append("uid")
    if iso.namespaces:
        layers += ["netns", "ipcns"]
    if iso.private_mounts:
        layers.append("mountns")
    return tuple(layers)


@dataclass(frozen=True)
class _Isolation:
    namespaces: tuple[str, ...]  # the `unshare ...` command prefix; empty without namespaces
    private_mounts: bool
    drop_privileges: bool
    user_namespace: bool = False


_PROBE_LIMITS = SandboxLimits(timeout_s=30.0)


@lru_cache(maxsize=1)
def _isolation() -> _Isolation:
    """The strongest isolation that actually works here, found once by running an empty program under each."""
    root = os.geteuid() == 0
    unshare = shutil.which("unshare") or shutil.which("unshare", path="/usr/bin:/bin")
    candidates = []
    if unshare is not None:
        if root:
            candidates.append(_Isolation((unshare, "--mount", "--net", "--ipc"), True, True))
            candidates.append(_Isolation((unshare, "--net", "--ipc"), False, True))
        else:
            # Without root, a user namespace is what lets an unprivileged process create the network namespace.
            candidates.append(_Isolation((unshare, "--map-current-user", "--net", "--ipc"), False, False, True))
            candidates.append(_Isolation((unshare, "--map-root-user", "--net", "--ipc"), False, False, True))
    for iso in candidates:
        if _execute("pass\n", _PROBE_LIMITS, "", iso, require_completion=True).status == "pass":
            return iso
    return _Isolation((), False, root)


def _run_checked(source: str, limits: SandboxLimits, stdin: str, require_completion: bool) -> SandboxResult:
    require(isinstance(source, str), "source", type(source).__name__, "a str")
    require(isinstance(limits, SandboxLimits), "limits", type(limits).__name__, "a SandboxLimits")
    require(isinstance(stdin, str), "stdin", type(stdin).__name__, "a str")
    return _execute(source, limits, stdin, _isolation(), require_completion)


def _execute(
    source: str, limits: SandboxLimits, stdin: str, iso: _Isolation, require_completion: bool
) -> SandboxResult:
    started = time.monotonic()
    root: Path | None = None
    uid: int | None = None
    try:
        root = Path(tempfile.mkdtemp(prefix="depthwave-sandbox-"))
        uid = _take_uid() if iso.drop_privileges else None
        return _execute_in(root, uid, source, limits, stdin, iso, require_completion, started)
    except (OSError, subprocess.SubprocessError) as exc:
        return SandboxResult("crash", None, "", "", time.monotonic() - started, f"sandbox error: {exc}")
    finally:
        if root is not None:
            _remove_tree(root)
        if uid is not None:
            _give_back_uid(uid)


def _execute_in(
    root: Path,
    uid: int | None,
    source: str,
    limits: SandboxLimits,
    stdin: str,
    iso: _Isolation,
    require_completion: bool,
    started: float,
) -> SandboxResult:
    work = root / "work"
    tmp = work / "tmp"
    program = work / "program.py"
    work.mkdir(mode=0o700)
    tmp.mkdir(mode=0o700)
    program.write_text(source, encoding="utf-8", errors="surrogatepass")
    program.chmod(0o644)
    (root / "stdin").write_text(stdin, encoding="utf-8", errors="surrogatepass")
    if uid is not None:
        # The sandbox uid must reach its directory but nothing else of ours.
        root.chmod(0o711)
        os.chown(work, uid, uid)
        os.chown(tmp, uid, uid)

    config: dict[str, Any] = {
        "work": str(work),
        "tmp": str(tmp),
        "program": str(program),
        "uid": uid,
        "gid": uid,
        "parent_pid": os.getpid(),
        "private_mounts": iso.private_mounts,
        "shared_tmp": _shared_tmp_dirs() if iso.private_mounts else [],
        "work_mb": _WORK_FILES * limits.max_file_mb,
        "rlimits": _rlimits(limits, uid, iso),
        "max_processes": limits.max_processes,
        "deny_read": _secret_paths(),
    }
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(work),
        "TMPDIR": str(tmp),
        "LANG": "C.UTF-8",
        "USER": "sandbox",
        "LOGNAME": "sandbox",
        "PYTHONHASHSEED": "0",
        "PYTHONDONTWRITEBYTECODE": "1",
        # BLAS libraries start a thread per core on import, which the process limit refuses.
        "OPENBLAS_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    # -s: no user site; -B: no bytecode files; -P: the working directory is not on sys.path. -E/-I are not used
    # because the environment is already built from scratch and PYTHONHASHSEED=0 must reach the interpreter.
    flags = ["-s", "-B"] + (["-P"] if sys.version_info >= (3, 11) else [])
    out_path, err_path, status_path = root / "stdout", root / "stderr", root / "status"
    with (
        open(root / "stdin", "rb") as stdin_file,
        open(out_path, "wb") as out_file,
        open(err_path, "wb") as err_file,
        open(status_path, "ab") as status_file,
    ):
        config["status_fd"] = status_file.fileno()
        proc = subprocess.Popen(
            [*iso.namespaces, sys.executable, *flags, "-c", _LOADER, _BOOTSTRAP, json.dumps(config)],
            stdin=stdin_file,
            stdout=out_file,
            stderr=err_file,
            pass_fds=(status_file.fileno(),),
            cwd=work,
            env=env,
            start_new_session=True,
        )
    try:
        timed_out = not _wait_for_exit(proc.pid, limits.timeout_s)
    finally:
        # The leader is not reaped yet, so its pid cannot have been reused as someone else's process group id.
        _kill_leftovers(proc.pid, uid)
        _, wait_status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(wait_status)
    duration = time.monotonic() - started

    stdout, out_size = _read_bounded(out_path, limits.output_limit_bytes)
    stderr, err_size = _read_bounded(err_path, limits.output_limit_bytes)
    with open(status_path, "rb") as f:
        status_lines = f.read(_STATUS_LIMIT).decode("utf-8", "replace").splitlines()
    outcome = _Outcome(
        returncode=proc.returncode,
        timed_out=timed_out,
        cpu_s=usage.ru_utime + usage.ru_stime,
        output_overflow=max(out_size, err_size) >= limits.max_file_mb * _MIB,
        status_lines=status_lines,
    )
    status, reason = _classify(outcome, limits, require_completion)
    return SandboxResult(status, proc.returncode, stdout, stderr, duration, reason)


@dataclass(frozen=True)
class _Outcome:
    returncode: int
    timed_out: bool
    cpu_s: float
    output_overflow: bool
    status_lines: list[str]


def _classify(outcome: _Outcome, limits: SandboxLimits, require_completion: bool) -> tuple[Status, str]:
    lines = outcome.status_lines
    blocked = next((line.removeprefix("blocked ").strip() for line in lines if line.startswith("blocked ")), None)
    setup = next((line.removeprefix("setup-error ") for line in lines if line.startswith("setup-error ")), None)
    exception = next((line.removeprefix("exception ") for line in lines if line.startswith("exception ")), None)
    rc = outcome.returncode
    if outcome.timed_out:
        return "timeout", f"timed out after {limits.timeout_s:g} s"
    if setup is not None:
        return "crash", f"sandbox setup failed: {setup}"
    if rc < 0:
        sig = -rc
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and outcome.cpu_s >= _cpu_limit_s(limits)):
            return "timeout", "CPU time limit exceeded"
        return "crash", f"killed by {_signal_name(sig)}"
    if rc == 0:
        if require_completion and "done" not in lines:
            return "fail", "exited before the tests completed"
        return "pass", "passed"
    if blocked is not None:
        return "crash", f"blocked: {blocked}"
    if exception == "MemoryError":
        return "crash", "out of memory (MemoryError)"
    if outcome.output_overflow:
        return "crash", f"output limit exceeded ({limits.max_file_mb} MB)"
    if exception is not None:
        return "fail", exception
    return "fail", f"exit code {rc}"


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def _cpu_limit_s(limits: SandboxLimits) -> int:
    return math.ceil(limits.timeout_s) + 1


def _rlimits(limits: SandboxLimits, uid: int | None, iso: _Isolation) -> list[tuple[str, int, int]]:
    """(name, soft, hard), address space last so that setting the others cannot fail for lack of memory."""
    cpu = _cpu_limit_s(limits)
    if uid is not None or iso.user_namespace:
        nproc = 1 + limits.max_processes  # the program's uid (or user namespace) counts only its own tasks
    else:
        # The same uid as ours: the limit counts every task we already run, so it is relative to that count.
        nproc = _task_count(os.getuid()) + 1 + limits.max_processes
    stack_soft, _ = resource.getrlimit(resource.RLIMIT_STACK)
    stack = _MAX_STACK if stack_soft == resource.RLIM_INFINITY else min(stack_soft, _MAX_STACK)
    file_size = limits.max_file_mb * _MIB
    return [
        ("RLIMIT_CORE", 0, 0),
        ("RLIMIT_CPU", cpu, cpu + 1),
        ("RLIMIT_FSIZE", file_size, file_size),
        ("RLIMIT_NOFILE", limits.max_open_files, limits.max_open_files),
        ("RLIMIT_NPROC", nproc, nproc),
        ("RLIMIT_STACK", stack, stack),
        ("RLIMIT_AS", limits.memory_mb * _MIB, limits.memory_mb * _MIB),
    ]


def _secret_paths() -> list[str]:
    home = os.path.realpath(os.path.expanduser("~"))
    paths = list(_SECRETS)
    if home != "/":
        paths.append(home)
    return paths


def _shared_tmp_dirs() -> list[str]:
    """World-writable scratch directories the sandbox uid could otherwise fill, including our own temp root."""
    found: list[str] = []
    for path in (*_SHARED_TMP, tempfile.gettempdir()):
        real = os.path.realpath(path)
        try:
            mode = os.stat(real).st_mode
        except OSError:
            continue
        if stat.S_ISDIR(mode) and mode & stat.S_IWOTH and real not in found:
            found.append(real)
    return found


@dataclass(frozen=True)
class _Process:
    pid: int
    uid: int  # real uid
    pgid: int
    threads: int


def _processes() -> list[_Process]:
    """Every live (not zombie) process we can see."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status", encoding="utf-8") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            if fields["State"].split()[0] != "Z":
                uid, pgid = int(fields["Uid"].split()[0]), int(fields["NSpgid"].split()[0])
                found.append(_Process(int(name), uid, pgid, int(fields["Threads"])))
        except (OSError, KeyError, ValueError, IndexError):
            continue
    return found


def _task_count(uid: int) -> int:
    return sum(process.threads for process in _processes() if process.uid == uid)


def _take_uid() -> int:
    """A uid no process runs as and no concurrent run of ours has taken; give it back with `_give_back_uid`."""
    busy = {process.uid for process in _processes()}
    with _UIDS_LOCK:
        while True:
            uid = _UID_RANGE[0] + secrets.randbelow(_UID_RANGE[1] - _UID_RANGE[0])
            if uid not in busy and uid not in _UIDS_TAKEN:
                _UIDS_TAKEN.add(uid)
                return uid


def _give_back_uid(uid: int) -> None:
    with _UIDS_LOCK:
        _UIDS_TAKEN.discard(uid)


def _kill_leftovers(pgid: int, uid: int | None) -> None:
    """SIGKILL the program's process group and every process of its sandbox uid (also those that left the group,
    e.g. by setsid), and wait until none of them is alive: a SIGKILLed process takes a moment to die."""
    deadline = time.monotonic() + 5.0
    while True:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        alive = [process for process in _processes() if process.pgid == pgid or process.uid == uid]
        if not alive or time.monotonic() > deadline:
            return
        for process in alive:
            if process.uid == uid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGKILL)
        time.sleep(0.001)


def _wait_for_exit(pid: int, timeout: float) -> bool:
    """Wait until the child exits, without reaping it; False on timeout."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    if pidfd is not None:
        try:
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            return bool(poller.poll(timeout * 1000))
        finally:
            os.close(pidfd)
    # No pidfds (Linux < 5.3): poll the child's state instead.
    deadline = time.monotonic() + timeout
    delay = 0.001
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(delay, left))
        delay = min(2 * delay, 0.05)
    return True


def _read_bounded(path: Path, limit: int) -> tuple[str, int]:
    """The text of a captured stream cut to `limit` bytes (head and tail), and the stream's full size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size <= limit:
            return f.read().decode("utf-8", "replace"), size
        tail = min(limit // 4, 16_000)
        head = f.read(limit - tail)
        f.seek(size - tail)
        end = f.read(tail) if tail else b""
    marker = f"\n[... {size - len(head) - len(end)} bytes truncated ...]\n"
    return head.decode("utf-8", "replace") + marker + end.decode("utf-8", "replace"), size


def _remove_tree(root: Path) -> None:
    # A program may have taken permissions off its own directories; without root we need them back to delete.
    for dirpath, dirnames, _ in os.walk(root):
        for name in dirnames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                with contextlib.suppress(OSError):
                    os.chmod(path, 0o700)
    shutil.rmtree(root, ignore_errors=True)


# The child runs `python -c _LOADER _BOOTSTRAP <JSON configuration>`. The bootstrap sets up the sandbox (mounts,
# limits, privileges, guard) and then runs the program file as __main__, reporting on the status descriptor
# "exception <type>", "blocked <event> <detail>", "exit", "done" or "setup-error <message>". Nothing of the program
# runs before the guard is installed, and nothing that the guard relies on is reachable from the program. The
# bootstrap's frames are named <sandbox>, and left out of the tracebacks shown to the program's reader.
_LOADER = "import sys; exec(compile(sys.argv[1], '<sandbox>', 'exec'))"

_BOOTSTRAP = r"""
import json
import os
import sys


def main():
    cfg = json.loads(sys.argv[2])
    status_fd = cfg["status_fd"]

    def report(line):
        try:
            os.write(status_fd, (line.replace("\n", " ") + "\n").encode("utf-8", "replace"))
        except OSError:
            pass

    try:
        source = prepare(cfg)
    except BaseException as exc:
        report("setup-error %s: %s" % (type(exc).__name__, exc))
        os._exit(70)
    run(source, cfg["program"], report)


def prepare(cfg):
    import ctypes
    import faulthandler
    import resource
    import signal
    import subprocess

    import _posixsubprocess
    import _signal

    work, tmp, program, uid, gid = cfg["work"], cfg["tmp"], cfg["program"], cfg["uid"], cfg["gid"]
    with open(program, "rb") as f:
        source = f.read().decode("utf-8", "surrogatepass")
    if sys.path and sys.path[0] in ("", os.getcwd()):  # Python 3.10 has no -P
        del sys.path[0]
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
    libc.prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)

    def check(result, what):
        if result != 0:
            err = ctypes.get_errno()
            raise OSError(err, "%s: %s" % (what, os.strerror(err)))

    import_roots = sorted(
        {
            os.path.realpath(path)
            for path in (*sys.path, sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)
            if isinstance(path, str) and path.startswith("/")
        }
    )
    # Before the mounts: an interpreter or virtual environment under /tmp (a checkout there) would vanish under
    # the private /tmp, and one under a 0700 directory is out of the sandbox uid's reach.
    hidden = tuple(cfg["shared_tmp"]) if cfg["private_mounts"] else ()
    if uid is not None or hidden:
        keep_imports_reachable(hidden)
    if cfg["private_mounts"]:
        ms_nosuid, ms_nodev, ms_noexec, ms_rec, ms_private = 2, 4, 8, 16384, 1 << 18
        sealed = ms_nosuid | ms_nodev | ms_noexec
        check(libc.mount(None, b"/", None, ms_rec | ms_private, None), "make mounts private")
        for shared in cfg["shared_tmp"]:
            check(libc.mount(b"tmpfs", shared.encode(), b"tmpfs", sealed, b"size=1m,mode=0755"), "mount " + shared)
        os.makedirs(work, exist_ok=True)
        options = "size=%dm,mode=0700,uid=%d,gid=%d" % (cfg["work_mb"], uid, gid)
        check(libc.mount(b"tmpfs", work.encode(), b"tmpfs", sealed, options.encode()), "mount " + work)
        os.chdir(work)
        with open(program, "w", encoding="utf-8", errors="surrogatepass") as f:
            f.write(source)
        os.chmod(program, 0o644)
        os.mkdir(tmp, 0o700)
        os.chown(tmp, uid, gid)

    for name, soft, hard in cfg["rlimits"]:
        resource.setrlimit(getattr(resource, name), (soft, hard))
    check(libc.prctl(38, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    if uid is not None:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
        try:
            os.setuid(0)
        except PermissionError:
            pass
        else:
            raise RuntimeError("privileges could not be dropped")
    # Credentials changes clear the parent-death signal, so it is armed after the drop.
    check(libc.prctl(1, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != cfg["parent_pid"]:
        os._exit(71)
    os.chdir(work)
    faulthandler.enable()

    # ctypes calls C without audit events (ctypes.memmove writes anywhere): the program gets no ctypes at all, and
    # importing it again is refused. Libraries that treat ctypes as optional (numpy) carry on without it.
    del libc, check
    for name in [name for name in sys.modules if name in ("ctypes", "_ctypes") or name.startswith("ctypes.")]:
        del sys.modules[name]
    # Speed bumps, not walls: these spawn or signal without an audit event. subprocess.Popen and os.kill are
    # audited, so nothing legitimate needs them.
    del _posixsubprocess.fork_exec
    if getattr(subprocess, "_fork_exec", None) is not None:
        subprocess._fork_exec = None
    for module in (signal, _signal):
        if hasattr(module, "pidfd_send_signal"):
            delattr(module, "pidfd_send_signal")

    sys.addaudithook(make_guard(work, import_roots, cfg["deny_read"], cfg["max_processes"]))
    return source


def reachable_by_others(path):
    import stat

    parts = [part for part in os.path.realpath(path).split("/") if part]
    try:
        for depth in range(len(parts)):
            if not os.stat("/" + "/".join(parts[:depth])).st_mode & stat.S_IXOTH:
                return False
        mode = os.stat("/" + "/".join(parts)).st_mode
    except OSError:
        return False
    return bool(mode & stat.S_IXOTH and mode & stat.S_IROTH)


def keep_imports_reachable(hidden=()):
    # Import directories the sandbox uid cannot enter (an interpreter under a 0700 /root) or that the private
    # mounts will cover (`hidden`) stay usable through descriptors opened now, as /proc/self/fd/N: the kernel lets a
    # process follow its own descriptors, and they keep pointing at the original directories.
    moved = {}
    entries = []
    for entry in sys.path:
        if not (isinstance(entry, str) and os.path.isdir(entry)):
            entries.append(entry)
            continue
        real = os.path.realpath(entry)
        covered = any(real == top or real.startswith(top + "/") for top in hidden)
        if covered or not reachable_by_others(entry):
            fd = os.open(entry, os.O_RDONLY | os.O_DIRECTORY)
            moved[entry] = "/proc/self/fd/%d" % fd
            entry = moved[entry]
        entries.append(entry)
    if not moved:
        return
    sys.path[:] = entries
    olds = sorted(moved, key=len, reverse=True)

    def relocate(path):
        for old in olds:
            if isinstance(path, str) and (path == old or path.startswith(old + "/")):
                return moved[old] + path[len(old):]
        return path

    for module in list(sys.modules.values()):
        paths = getattr(module, "__path__", None)
        if isinstance(paths, list):
            paths[:] = [relocate(path) for path in paths]
    sys.path_importer_cache.clear()


def make_guard(work, import_roots, deny_read, max_processes):
    # Everything the hook uses is bound here, in its closure: the program can rebind builtins and module
    # attributes, but cannot reach these cells (the garbage collector's object walks are refused). The hook only
    # looks at exact str/bytes/int arguments, so it never calls code of the program. The interpreter never traces
    # or profiles an audit hook.
    import posix

    type_, str_, bytes_, int_, len_, reversed_ = type, str, bytes, int, len, reversed
    permission_error, import_error, os_error = PermissionError, ImportError, OSError
    lstat, readlink, getcwd, getpid, getpgid = posix.lstat, posix.readlink, posix.getcwd, posix.getpid, posix.getpgid
    encoding = sys.getfilesystemencoding()
    work = os.path.realpath(work)
    import_roots = tuple(import_roots)
    deny_read = tuple(deny_read)
    own_pgid = getpgid(0)
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    o_directory = os.O_DIRECTORY
    s_ifmt, s_iflnk, s_ifdir = 0o170000, 0o120000, 0o040000
    refused = {
        "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.startfile", "subprocess.Popen", "pty.spawn",
        "os.symlink", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
    }
    if max_processes == 0:
        refused |= {"os.fork", "os.forkpty", "_thread.start_new_thread", "_thread.start_joinable_thread"}
    refused = frozenset(refused)
    refused_prefixes = ("socket.", "ctypes.")
    # Loaded (or dropped) by the bootstrap already: importing them again would only serve to undo that.
    # cffi calls C freely.
    refused_imports = frozenset({"ctypes", "_ctypes", "_posixsubprocess", "_signal", "_cffi_backend"})

    def deny(event, detail):
        raise permission_error("sandbox: blocked " + event + (" " + detail if detail else ""))

    def shown(value):
        kind = type_(value)
        if kind is str_:
            return value
        if kind is bytes_:
            return value.decode(encoding, "replace")
        if kind is int_:
            return "fd %d" % value
        return "<object>"

    def within(path, root):
        return root == "/" or path == root or path.startswith(root + "/")

    def may_write(path):
        return path is not None and (within(path, work) or path == "/dev/null")

    def resolve(path):
        # realpath without posixpath, whose module globals the program could replace
        resolved = ""
        pending = path.split("/")
        pending.reverse()
        hops = 0
        while pending:
            part = pending.pop()
            if part == "" or part == ".":
                continue
            if part == "..":
                resolved = resolved[: resolved.rfind("/")]
                continue
            candidate = resolved + "/" + part
            try:
                mode = lstat(candidate).st_mode
            except os_error:
                resolved = candidate
                continue
            if mode & s_ifmt == s_iflnk:
                hops += 1
                if hops > 40:
                    return None
                target = readlink(candidate)
                if target.startswith("/"):
                    resolved = ""
                pending.extend(reversed_(target.split("/")))
            else:
                resolved = candidate
        return resolved or "/"

    def fd_path(fd):
        try:
            return readlink("/proc/self/fd/%d" % fd)
        except os_error:
            return ""

    def absolute(value, dir_fd):
        kind = type_(value)
        if kind is int_:
            path = fd_path(value)
        else:
            if kind is bytes_:
                value = value.decode(encoding, "surrogateescape")
            elif kind is not str_:
                return None
            path = value
            if not path.startswith("/"):
                if dir_fd is None or (type_(dir_fd) is int_ and dir_fd == -1):
                    base = getcwd()
                elif type_(dir_fd) is int_:
                    base = fd_path(dir_fd)
                else:
                    return None
                path = base + "/" + path
        if not path.startswith("/"):
            return None  # a pipe, socket or other descriptor without a path
        return resolve(path)

    def secret(path):
        if within(path, work):
            return False
        for root in import_roots:
            if within(path, root):
                return False
        for root in deny_read:
            if within(path, root):
                return True
        if path.startswith("/proc/"):
            head = path[6:].split("/", 1)[0]
            return head.isdigit() and head != "%d" % getpid()
        return False

    def writable(event, value, dir_fd=None):
        if not may_write(absolute(value, dir_fd)):
            deny(event, shown(value))

    def readable(event, value, dir_fd=None):
        path = absolute("." if value is None else value, dir_fd)
        if path is None or secret(path):
            deny(event, shown(value))

    def is_dir(path):
        try:
            return lstat(path).st_mode & s_ifmt == s_ifdir
        except os_error:
            return False

    def on_open(event, args):
        path, flags = args[0], args[2]
        if type_(path) is int_:
            return  # wrapping a descriptor that is open already
        if type_(path) is bytes_:
            path = path.decode(encoding, "surrogateescape")
        if type_(path) is not str_ or type_(flags) is not int_:
            deny(event, shown(path))
        # os.open(dir_fd=...) does not pass dir_fd to the event: a relative path is only judged safely when it
        # cannot climb out of whatever directory it is relative to, and directories outside cannot be opened.
        if not path.startswith("/") and ".." in path.split("/"):
            deny(event, path)
        real = absolute(path, None)
        if real is None:
            deny(event, path)
        if flags & write_flags or flags & o_directory or is_dir(real):
            if not may_write(real):
                deny(event, path)
        elif secret(real):
            deny(event, path)

    def write_check(index, dir_index):
        def check(event, args):
            dir_fd = args[dir_index] if dir_index is not None and dir_index < len_(args) else None
            writable(event, args[index], dir_fd)

        return check

    def two_paths_check(event, args):
        writable(event, args[0], args[2] if len_(args) > 2 else None)
        writable(event, args[1], args[3] if len_(args) > 3 else None)

    def read_check(event, args):
        readable(event, args[0] if len_(args) > 0 else None)

    def on_kill(event, args):
        pid = args[0]
        if type_(pid) is int_:
            if pid == 0 or pid == getpid() or pid == -own_pgid:
                return
            if pid > 0:
                try:
                    if getpgid(pid) == own_pgid:
                        return
                except os_error:
                    return  # no such process: the call fails by itself
        deny(event, "pid %s" % shown(pid))

    def on_killpg(event, args):
        pgid = args[0]
        if not (type_(pgid) is int_ and (pgid == 0 or pgid == own_pgid)):
            deny(event, "process group %s" % shown(pgid))

    def on_prlimit(event, args):
        pid = args[0]
        if not (type_(pid) is int_ and (pid == 0 or pid == getpid())):
            deny(event, "pid %s" % shown(pid))

    def on_import(event, args):
        name = args[0]
        # ImportError, so that code treating a module as optional carries on without it.
        if type_(name) is not str_ or name in refused_imports:
            raise import_error("sandbox: blocked import " + shown(name))
        if len_(args) > 1 and args[1] is not None:  # a native extension module, loaded from this file
            path = absolute(args[1], None)
            if path is None or not any_root(path):
                raise import_error("sandbox: blocked import " + name + " from " + shown(args[1]))

    def any_root(path):
        for root in import_roots:
            if within(path, root):
                return True
        return False

    checks = {
        "open": on_open,
        "os.chdir": write_check(0, None),
        "os.chmod": write_check(0, 2),
        "os.chown": write_check(0, 3),
        "os.chflags": write_check(0, None),
        "os.lchflags": write_check(0, None),
        "os.mkdir": write_check(0, 2),
        "os.remove": write_check(0, 1),
        "os.rmdir": write_check(0, 1),
        "os.truncate": write_check(0, None),
        "os.utime": write_check(0, 3),
        "os.setxattr": write_check(0, None),
        "os.removexattr": write_check(0, None),
        "shutil.rmtree": write_check(0, 1),
        "shutil.chown": write_check(0, None),
        "os.rename": two_paths_check,
        "os.link": two_paths_check,
        "os.listdir": read_check,
        "os.scandir": read_check,
        "os.getxattr": read_check,
        "os.listxattr": read_check,
        "os.kill": on_kill,
        "os.killpg": on_killpg,
        "resource.prlimit": on_prlimit,
        "import": on_import,
    }

    def hook(event, args):
        if type_(event) is not str_:
            deny("<event>", "")
        if event in refused or event.startswith(refused_prefixes):
            deny(event, "")
        check = checks.get(event)
        if check is not None:
            check(event, args)

    return hook


def refusal(exc):
    # The sandbox's refusal that led to this exception, if any: the exception itself or one it was raised from.
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        message = exc.args[0] if isinstance(exc, (PermissionError, ImportError)) and exc.args else None
        if isinstance(message, str) and message.startswith("sandbox: blocked "):
            return message[len("sandbox: blocked "):]
        exc = exc.__cause__ or exc.__context__
    return None


def without_sandbox(summary):
    import traceback

    seen = set()
    pending = [summary]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        frames = [frame for frame in current.stack if frame.filename != "<sandbox>"]
        current.stack = traceback.StackSummary.from_list(frames)
        pending += [current.__cause__, current.__context__]
    return summary.format()


def run(source, program, report):
    import traceback
    import types

    main = types.ModuleType("__main__")
    main.__file__ = program
    sys.modules["__main__"] = main
    sys.argv[:] = [program]
    try:
        exec(compile(source, program, "exec", dont_inherit=True), main.__dict__)
    except SystemExit as exc:
        blocked = refusal(exc.__context__)
        if blocked is not None:
            report("blocked " + blocked)
        report("exit")
        raise
    except BaseException as exc:
        report("exception " + type(exc).__name__)
        blocked = refusal(exc)
        if blocked is not None:
            report("blocked " + blocked)
        if isinstance(exc, MemoryError):
            main.__dict__.clear()  # room to format the traceback
        try:
            # Like the interpreter's own report: the innermost 1000 frames (a deep recursion has far more).
            summary = traceback.TracebackException(type(exc), exc, exc.__traceback__, limit=-1000)
            sys.stderr.write("".join(without_sandbox(summary)))
        except BaseException:
            pass
        sys.exit(1)
    report("done")


main()
"""
