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


def _environment(work: Path, tmp: Path) -> dict[str, str]:
    """The program's whole environment, built from scratch."""
    return {
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
    env = _environment(work, tmp)
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
            [*iso.namespaces, sys.executable, *flags, "-c", _LOADER, _bootstrap(), json.dumps(config)],
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


# The child runs `python -c _LOADER <child.py's text> <JSON configuration>` (see child.py): read here as text, not
# imported, so that nothing of depthwave is loaded in the sandboxed interpreter.
_LOADER = "import sys; exec(compile(sys.argv[1], '<sandbox>', 'exec'))"
_CHILD = Path(__file__).with_name("child.py")


def _bootstrap() -> str:
    return _CHILD.read_text(encoding="utf-8")
