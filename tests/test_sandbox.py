"""The sandbox's catalogue of hostile programs: each must be contained, classified, and leave the host unaffected."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from depthwave.errors import InvalidParameterError
from depthwave.eval.sandbox import SandboxLimits, SandboxResult, isolation_layers, run_program, run_tests

LAYERS = isolation_layers()
# Generous: a program here ends by passing, failing or hitting the limit under test long before this, on any
# machine; the tests that want a timeout set a short one themselves. No test depends on the machine's speed.
FAST = SandboxLimits(timeout_s=120.0, memory_mb=512)


def run(source: str, **limits: object) -> SandboxResult:
    fields = {"timeout_s": FAST.timeout_s, "memory_mb": FAST.memory_mb, **limits}
    return run_program(source, SandboxLimits(**fields))  # type: ignore[arg-type]


def assert_blocked(result: SandboxResult, event: str) -> None:
    assert result.status == "crash", result
    assert result.reason.startswith(f"blocked: {event}"), result
    assert "Error: sandbox: blocked" in result.stderr


def group_members(pgid: int) -> list[int]:
    """Live processes in a process group (field 5 of /proc/PID/stat, after the parenthesised command name)."""
    members = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                fields = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if fields[0] != "Z" and int(fields[2]) == pgid:
                members.append(int(name))
    return members


def first_line_pid(result: SandboxResult) -> int:
    return int(result.stdout.split()[0])


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory of the host, outside every sandbox."""
    path = tmp_path / "host"
    path.mkdir()
    return path


# --- ordinary programs ------------------------------------------------------------------------------------------------


def test_passing_program() -> None:
    result = run("print('hello', 6 * 7)")
    assert result.status == "pass" and result.reason == "passed"
    assert result.returncode == 0 and result.stdout == "hello 42\n" and result.stderr == ""
    assert 0 < result.duration_s < FAST.timeout_s


def test_failing_assertion() -> None:
    result = run("def check(x):\n    assert x == 1, 'wrong'\n\ncheck(2)\n")
    assert (result.status, result.reason, result.returncode) == ("fail", "AssertionError", 1)
    assert "AssertionError: wrong" in result.stderr and "program.py" in result.stderr
    assert "<sandbox>" not in result.stderr  # the sandbox's own frames are not shown


def test_syntax_error() -> None:
    result = run("def f(:\n    pass\n")
    assert (result.status, result.reason) == ("fail", "SyntaxError")
    assert "SyntaxError" in result.stderr


def test_explicit_exit_codes() -> None:
    exited = run("raise SystemExit(3)")
    assert (exited.status, exited.reason, exited.returncode) == ("fail", "exit code 3", 3)
    assert run("import sys\nsys.exit(0)").status == "pass"
    assert run("import os\nos._exit(0)").status == "pass"


def test_stdin_is_provided() -> None:
    result = run_program("print(input()[::-1])\nprint(input())", FAST, stdin="abc\nsecond line\n")
    assert result.status == "pass" and result.stdout == "cba\nsecond line\n"


def test_program_may_write_inside_its_directory() -> None:
    program = """
import os, pathlib, shutil, tempfile
pathlib.Path("out.txt").write_text("data")
os.mkdir("sub")
with open("sub/x.txt", "w") as f:
    f.write("y")
with tempfile.NamedTemporaryFile("w", delete=False) as f:
    f.write("z")
os.rename("out.txt", "moved.txt")
print(open("moved.txt").read(), open("sub/x.txt").read(), open(f.name).read(), f.name.startswith(os.getcwd()))
os.remove("moved.txt")
shutil.rmtree("sub")
"""
    result = run(program)
    assert result.status == "pass", result
    assert result.stdout == "data y z True\n"


def test_common_imports_work() -> None:
    program = (
        "import collections, dataclasses, datetime, decimal, fractions, functools, hashlib, heapq, itertools, json\n"
        "import math, random, re, statistics, string, typing\n"
        "print(math.comb(5, 2), json.dumps({'a': 1}), statistics.mean([1, 2, 3]), decimal.Decimal('1.5') * 2)\n"
    )
    result = run(program)
    assert result.status == "pass", result
    assert result.stdout == '10 {"a": 1} 2 3.0\n'


def test_numpy_works() -> None:
    # The sandbox's interpreter sees what this interpreter sees without our environment (PYTHONPATH is dropped).
    probe = subprocess.run([sys.executable, "-s", "-c", "import numpy"], env={}, capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip("numpy is not installed for this interpreter")
    result = run("import numpy as np\nprint(int(np.arange(10).sum()), np.linalg.det(np.eye(3)))")
    assert result.status == "pass", result
    assert result.stdout == "45 1.0\n"


def test_working_directory_is_removed() -> None:
    result = run("import os\nopen('left.txt', 'w').write('x')\nprint(os.getcwd())")
    assert result.status == "pass", result
    cwd = Path(result.stdout.strip())
    assert cwd.name == "work"
    assert not cwd.exists() and not cwd.parent.exists()


def test_working_directory_is_removed_after_a_timeout() -> None:
    result = run("import os\nprint(os.getcwd(), flush=True)\nwhile True:\n    pass", timeout_s=1.0)
    assert result.status == "timeout"
    assert not Path(result.stdout.strip()).parent.exists()


# --- run_tests --------------------------------------------------------------------------------------------------------

PROMPT = 'def add(a: int, b: int) -> int:\n    """Add two numbers."""\n'
CHECK = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n\n\ncheck(add)\n"


def test_run_tests_passes_a_correct_completion() -> None:
    result = run_tests(PROMPT + "    return a + b\n", CHECK, FAST)
    assert (result.status, result.reason) == ("pass", "passed")


def test_run_tests_fails_a_wrong_completion() -> None:
    result = run_tests(PROMPT + "    return a - b\n", CHECK, FAST)
    assert (result.status, result.reason) == ("fail", "AssertionError")


@pytest.mark.parametrize("escape", ["import sys\nsys.exit(0)", "exit()", "import os\nos._exit(0)"])
def test_run_tests_fails_a_completion_that_exits_before_the_checks(escape: str) -> None:
    result = run_tests(PROMPT + "    return a - b\n\n" + escape + "\n", CHECK, FAST)
    assert (result.status, result.reason) == ("fail", "exited before the tests completed")


# --- time -------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("program", ["while True:\n    pass", "import time\ntime.sleep(60)"])
def test_infinite_program_times_out(program: str) -> None:
    started = time.monotonic()
    result = run("import os\nprint(os.getpid(), flush=True)\n" + program, timeout_s=1.0)
    elapsed = time.monotonic() - started
    assert (result.status, result.reason) == ("timeout", "timed out after 1 s")
    assert result.returncode == -signal.SIGKILL
    # Killed at its timeout: left alone it would run 60 s or forever (a wide margin, for a busy machine).
    assert elapsed < 30.0
    assert group_members(first_line_pid(result)) == []


def test_cpu_time_limit_is_a_timeout() -> None:
    # The harness's wall clock normally fires first; the kernel's CPU limit (here lowered by the program itself)
    # is the backstop that holds even if the harness were stuck.
    program = "import resource\nresource.setrlimit(resource.RLIMIT_CPU, (1, 2))\nwhile True:\n    pass"
    result = run(program)
    assert (result.status, result.reason) == ("timeout", "CPU time limit exceeded")
    assert result.returncode == -signal.SIGXCPU


# --- processes --------------------------------------------------------------------------------------------------------


def test_fork_bomb_is_blocked() -> None:
    result = run("import os\nprint(os.getpid(), flush=True)\nwhile True:\n    os.fork()")
    assert_blocked(result, "os.fork")
    assert group_members(first_line_pid(result)) == []


def test_fork_bomb_is_capped_by_the_process_limit_when_forks_are_allowed() -> None:
    # With forks allowed, the guard lets them through: the kernel's process limit is what holds.
    program = """
import os
print(os.getpid(), flush=True)
forks = 0
try:
    while True:
        if os.fork() == 0:
            while True:
                pass
        forks += 1
except OSError as exc:
    print("refused after", forks, flush=True)
    raise
"""
    result = run(program, max_processes=3)
    assert (result.status, result.reason) == ("fail", "BlockingIOError"), result
    if "uid" in LAYERS:
        assert "refused after 3" in result.stdout
    assert group_members(first_line_pid(result)) == []


def test_threads_are_refused_without_a_process_allowance() -> None:
    program = "import threading\nt = threading.Thread(target=print, args=('thread ran',))\nt.start()\nt.join()"
    result = run(program)
    assert result.status in ("fail", "crash"), result
    assert "thread ran" not in result.stdout
    allowed = run(program, max_processes=2)
    assert allowed.status == "pass" and allowed.stdout == "thread ran\n"


@pytest.mark.parametrize(
    ("program", "event"),
    [
        ("import os\nos.system('touch {marker}')", "os.system"),
        ("import subprocess\nsubprocess.run(['touch', '{marker}'])", "subprocess.Popen"),
        ("import os\nos.popen('touch {marker}').read()", "subprocess.Popen"),
        ("import os\nos.execv('/usr/bin/touch', ['touch', '{marker}'])", "os.exec"),
        ("import os\nos.posix_spawn('/usr/bin/touch', ['touch', '{marker}'], {{}})", "os.posix_spawn"),
        ("import ctypes\nctypes.CDLL(None).system(b'touch {marker}')", "import ctypes"),
        ("import pty\npty.spawn(['touch', '{marker}'])", "pty.spawn"),
    ],
)
def test_running_other_programs_is_blocked(program: str, event: str, outside: Path) -> None:
    marker = outside / "ran"
    result = run(program.format(marker=marker))
    assert_blocked(result, event)
    assert not marker.exists()


def test_spawning_and_signalling_without_audit_events_are_disarmed() -> None:
    program = (
        "import _posixsubprocess, signal, subprocess\n"
        "print(hasattr(_posixsubprocess, 'fork_exec'), getattr(subprocess, '_fork_exec', None),"
        " hasattr(signal, 'pidfd_send_signal'))"
    )
    result = run(program)
    assert result.status == "pass" and result.stdout == "False None False\n", result


def test_signalling_other_processes_is_blocked() -> None:
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        for program in [
            f"import os, signal\nos.kill({sleeper.pid}, signal.SIGKILL)",
            f"import os, signal\nos.killpg({sleeper.pid}, signal.SIGKILL)",
            "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)",
            "import os, signal\nos.kill(-1, signal.SIGKILL)",
        ]:
            result = run(program)
            assert result.status == "crash" and result.reason.startswith("blocked: os.kill"), (program, result)
        time.sleep(0.1)
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_program_may_signal_itself() -> None:
    result = run(
        "import os, signal\nsignal.signal(signal.SIGUSR1, lambda *a: print('got it'))\n"
        "os.kill(os.getpid(), signal.SIGUSR1)"
    )
    assert result.status == "pass" and result.stdout == "got it\n"


# --- memory, stack, crashes -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "program",
    ["x = bytearray(10**10)", "chunks = []\nwhile True:\n    chunks.append(bytearray(10**7))"],
)
def test_memory_bomb_runs_out_of_memory(program: str) -> None:
    result = run(program, memory_mb=256)
    assert (result.status, result.reason) == ("crash", "out of memory (MemoryError)"), result
    assert run("print('alive')").stdout == "alive\n"


def test_recursion_overflow_is_a_recursion_error() -> None:
    result = run("def f():\n    return f()\n\nf()")
    assert (result.status, result.reason) == ("fail", "RecursionError")


def test_unbounded_recursion_limit_is_contained() -> None:
    program = "import sys\nsys.setrecursionlimit(10**6)\n\ndef f(n):\n    return f(n + 1) + 1\n\nf(0)"
    result = run(program, memory_mb=128)
    assert result.status in ("crash", "fail"), result
    assert run("print('alive')").stdout == "alive\n"


def test_c_stack_overflow_is_contained() -> None:
    # repr of a deeply nested list recurses in C: a segfault on Python 3.11, a RecursionError from 3.12 on.
    program = "import sys\nsys.setrecursionlimit(10**6)\nx = []\nfor _ in range(10**6):\n    x = [x]\nprint(repr(x))"
    result = run(program)
    assert (result.status, result.reason) in [("crash", "killed by SIGSEGV"), ("fail", "RecursionError")], result
    assert run("print('alive')").stdout == "alive\n"


def test_segfault_is_a_crash() -> None:
    result = run("import faulthandler\nfaulthandler._sigsegv()")
    assert (result.status, result.reason) == ("crash", "killed by SIGSEGV")
    assert result.returncode == -signal.SIGSEGV
    assert "Fatal Python error" in result.stderr


# --- output -----------------------------------------------------------------------------------------------------------


def test_huge_output_is_truncated() -> None:
    program = "import sys\nline = 'x' * 999 + '\\n'\nfor _ in range(10_000):\n    sys.stdout.write(line)\nprint('end')"
    result = run(program, output_limit_bytes=10_000)
    assert result.status == "pass", result.reason
    assert len(result.stdout) < 10_100
    assert result.stdout.startswith("x" * 999 + "\n")
    assert "bytes truncated ...]" in result.stdout and result.stdout.endswith("end\n")


def test_endless_output_hits_the_file_size_limit() -> None:
    result = run("while True:\n    print('y' * 1000)", max_file_mb=1)
    # The size limit ends it: only a broken limit would let it run into the (generous) timeout.
    assert (result.status, result.reason) == ("crash", "output limit exceeded (1 MB)"), result
    assert len(result.stdout) < 70_000


def test_a_traceback_survives_truncation() -> None:
    result = run("print('z' * 200_000)\nraise ValueError('at the end')", output_limit_bytes=5_000)
    assert (result.status, result.reason) == ("fail", "ValueError")
    assert "ValueError: at the end" in result.stderr and len(result.stdout) < 5_100


# --- the file system --------------------------------------------------------------------------------------------------

WRITE_ESCAPES = [
    ("open({target!r}, 'w').write('pwned')", "open"),
    ("import pathlib\npathlib.Path({target!r}).write_text('pwned')", "open"),
    ("import os\nos.open({target!r}, os.O_WRONLY | os.O_CREAT)", "open"),
    ("import os\nos.symlink({target!r}, 'link')\nopen('link', 'w').write('pwned')", "os.symlink"),
    ("open('../' * 30 + {target!r}.lstrip('/'), 'w').write('pwned')", "open"),
    ("import shutil\nshutil.copy('program.py', {target!r})", "open"),
    ("open('mine.txt', 'w').write('pwned')\nimport os\nos.rename('mine.txt', {target!r})", "os.rename"),
    ("import os\nos.mkdir({target!r})", "os.mkdir"),
    ("import os\nos.chdir({parent!r})\nopen({name!r}, 'w').write('pwned')", "os.chdir"),
]


@pytest.mark.parametrize(("program", "event"), WRITE_ESCAPES)
def test_writing_outside_the_working_directory_is_blocked(program: str, event: str, outside: Path) -> None:
    target = outside / "victim.txt"
    result = run(program.format(target=str(target), parent=str(outside), name=target.name))
    assert_blocked(result, event)
    assert not target.exists()


@pytest.mark.parametrize(
    "program",
    [
        "open({target!r}, 'w').write('pwned')",
        # os.open's audit event does not carry dir_fd, so directories outside cannot be opened at all.
        "import os\nfd = os.open({parent!r}, os.O_RDONLY)\nos.open({name!r}, os.O_WRONLY | os.O_CREAT, dir_fd=fd)",
    ],
)
def test_writing_to_shared_tmp_is_blocked(program: str) -> None:
    # The shared temporary directory exists inside the sandbox too (private or not), unlike pytest's tmp_path.
    target = Path(tempfile.gettempdir()) / f"depthwave-sandbox-test-{uuid.uuid4().hex}"
    result = run(program.format(target=str(target), parent=str(target.parent), name=target.name))
    assert_blocked(result, "open")
    assert not target.exists()


@pytest.mark.parametrize(
    ("program", "event"),
    [
        ("import os\nos.remove({victim!r})", "os.remove"),
        ("import os\nos.unlink({victim!r})", "os.remove"),
        ("import shutil\nshutil.rmtree({folder!r})", "shutil.rmtree"),
        ("import os\nos.rmdir({folder!r})", "os.rmdir"),
        ("import os\nos.rename({victim!r}, 'stolen.txt')", "os.rename"),
        ("import os\nos.chmod({victim!r}, 0)", "os.chmod"),
        ("import os\nos.truncate({victim!r}, 0)", "os.truncate"),
        ("open({victim!r}, 'w')", "open"),
        ("open({victim!r}, 'a').write('more')", "open"),
        ("import os\nos.utime({victim!r}, (0, 0))", "os.utime"),
    ],
)
def test_changing_host_files_is_blocked(program: str, event: str, outside: Path) -> None:
    folder = outside / "folder"
    folder.mkdir()
    victim = folder / "victim.txt"
    victim.write_text("precious")
    before = victim.stat()
    result = run(program.format(victim=str(victim), folder=str(folder)))
    assert_blocked(result, event)
    after = victim.stat()
    assert victim.read_text() == "precious"
    assert (after.st_mode, after.st_mtime_ns) == (before.st_mode, before.st_mtime_ns)


def test_reading_the_callers_home_is_blocked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "token").write_text("hf_secret_value")
    monkeypatch.setenv("HOME", str(home))
    for program, event in [
        (f"print(open({str(home / 'token')!r}).read())", "open"),
        (f"import os\nprint(os.listdir({str(home)!r}))", "os.listdir"),
    ]:
        result = run(program)
        assert_blocked(result, event)
        assert "hf_secret_value" not in result.stdout and "token" not in result.stdout


def test_reading_system_secrets_is_blocked() -> None:
    result = run("print(open('/etc/shadow').read())")
    assert_blocked(result, "open")


def test_reading_public_files_is_allowed() -> None:
    result = run("print(open('/etc/passwd').read().count(':') > 0)")
    assert result.status == "pass" and result.stdout == "True\n"


def test_environment_secrets_do_not_leak(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = f"s3cr3t-{uuid.uuid4().hex}"
    monkeypatch.setenv("DEPTHWAVE_TEST_SECRET", secret)
    result = run("import os\nprint(dict(os.environ))")
    assert result.status == "pass"
    assert secret not in result.stdout and "DEPTHWAVE_TEST_SECRET" not in result.stdout
    parent = run("import os\nprint(open(f'/proc/{os.getppid()}/environ', 'rb').read())")
    assert_blocked(parent, "open")
    assert secret not in parent.stdout + parent.stderr


# --- the network ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("program", "event"),
    [
        ("import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'hi')", "socket."),
        ("import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))", "socket.__new__"),
        ("import _socket\n_socket.socket()", "socket.__new__"),
        ("import socket\nsocket.getaddrinfo('localhost', {port})", "socket.getaddrinfo"),
        ("import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/', timeout=2)", "socket."),
    ],
)
def test_network_is_blocked(program: str, event: str) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.setblocking(False)
        result = run(program.format(port=server.getsockname()[1]))
        assert_blocked(result, event)
        with pytest.raises(BlockingIOError):
            server.accept()


@pytest.mark.skipif("netns" not in LAYERS, reason="no network namespace on this machine")
def test_network_namespace_has_only_loopback() -> None:
    result = run("print(open('/proc/self/net/dev').read())")
    assert result.status == "pass", result
    interfaces = {line.split(":")[0].strip() for line in result.stdout.splitlines() if ":" in line}
    assert interfaces == {"lo"}


# --- the kernel layers ------------------------------------------------------------------------------------------------


@pytest.mark.skipif("uid" not in LAYERS, reason="privileges are only dropped when the harness runs as root")
def test_program_runs_unprivileged() -> None:
    program = (
        "import os\nprint(os.getuid(), os.geteuid(), os.getgid(), os.getgroups())\n"
        "try:\n    os.setuid(0)\nexcept PermissionError:\n    print('setuid refused')\n"
    )
    result = run(program)
    assert result.status == "pass", result
    uid, euid, gid, groups, *rest = result.stdout.split(maxsplit=4)
    assert int(uid) == int(euid) != 0 and int(gid) != 0 and groups == "[]"
    assert rest == ["setuid refused\n"]


@pytest.mark.skipif("mountns" not in LAYERS, reason="no private mount namespace on this machine")
def test_shared_tmp_is_private() -> None:
    result = run(f"import os\nprint(os.listdir({tempfile.gettempdir()!r}), os.listdir('/dev/shm'))")
    assert result.status == "pass", result
    assert result.stdout.startswith("['depthwave-sandbox-") and result.stdout.endswith(" []\n")


@pytest.mark.skipif("mountns" not in LAYERS, reason="no private mount namespace on this machine")
def test_writes_the_guard_cannot_see_stay_inside() -> None:
    # os.mkfifo raises no audit event: only the private, root-owned /tmp stops it.
    target = Path(tempfile.gettempdir()) / f"depthwave-sandbox-test-{uuid.uuid4().hex}"
    result = run(f"import os\nos.mkfifo({str(target)!r})")
    assert (result.status, result.reason) == ("fail", "PermissionError"), result
    assert not target.exists()


@pytest.mark.skipif("mountns" not in LAYERS, reason="no private mount namespace on this machine")
def test_filling_the_disk_is_bounded() -> None:
    program = "i = 0\nwhile True:\n    open(f'f{i}', 'wb').write(b'x' * 1_000_000)\n    i += 1"
    result = run(program, max_file_mb=1)
    assert (result.status, result.reason) == ("fail", "OSError"), result
    assert "No space left on device" in result.stderr


# --- the guard --------------------------------------------------------------------------------------------------------


def test_a_caught_refusal_does_not_fail_a_passing_program() -> None:
    result = run("try:\n    open('/etc/hostname-copy', 'w')\nexcept PermissionError as e:\n    print(e)\n")
    assert (result.status, result.reason) == ("pass", "passed")
    assert result.stdout == "sandbox: blocked open /etc/hostname-copy\n"


def test_an_error_raised_while_handling_a_refusal_is_the_refusal() -> None:
    result = run("import os\ntry:\n    os.remove('/etc/hostname')\nexcept PermissionError:\n    raise ValueError('no')")
    assert (result.status, result.reason) == ("crash", "blocked: os.remove /etc/hostname")
    exited = run("import os, sys\ntry:\n    os.remove('/etc/hostname')\nexcept PermissionError:\n    sys.exit(2)")
    assert (exited.status, exited.reason) == ("crash", "blocked: os.remove /etc/hostname")


def test_a_caught_refusal_does_not_taint_a_later_failure() -> None:
    result = run("try:\n    import ctypes\nexcept ImportError:\n    pass\nassert False")
    assert (result.status, result.reason) == ("fail", "AssertionError")


def test_debugging_hooks_work() -> None:
    program = """
def double(x):
    '''
    >>> double(2)
    4
    '''
    return 2 * x

import doctest, sys
print(doctest.testmod())
sys.settrace(None)
sys.setprofile(None)
"""
    result = run(program)
    assert result.status == "pass", result
    assert result.stdout == "TestResults(failed=0, attempted=1)\n"


def test_writing_to_dev_null_is_allowed() -> None:
    result = run("import os, sys\nsys.stdout = open(os.devnull, 'w')\nprint('hidden')")
    assert result.status == "pass" and result.stdout == ""


@pytest.mark.parametrize(
    ("program", "event"),
    [
        ("import gc\ngc.get_objects()", "gc.get_objects"),
        ("import gc\ngc.get_referrers(print)", "gc.get_referrers"),
        ("import ctypes", "import ctypes"),
        ("import _ctypes", "import _ctypes"),
        ("import sys\nsys.modules.pop('_posixsubprocess')\nimport _posixsubprocess", "import _posixsubprocess"),
        # cffi 2 loads its C backend on first use, not on import.
        ("import cffi\ncffi.FFI().dlopen(None)", "import _cffi_backend"),
        ("import _cffi_backend", "import _cffi_backend"),
    ],
)
def test_reaching_into_the_interpreter_is_blocked(program: str, event: str) -> None:
    if "cffi" in program:
        pytest.importorskip("_cffi_backend")
    assert_blocked(run(program), event)


def test_loading_a_native_extension_from_the_working_directory_is_blocked() -> None:
    # A copy of a genuine extension module stands in for one the program would carry in its source.
    candidates = [importlib.util.find_spec(name) for name in ("_csv", "_bisect", "_heapq", "_statistics", "_json")]
    extension = next((spec.name for spec in candidates if spec and (spec.origin or "").endswith(".so")), None)
    if extension is None:
        pytest.skip("no extension module outside the interpreter binary")
    program = f"""
import {extension}, importlib.util, shutil
shutil.copy({extension}.__file__, "copy.so")
spec = importlib.util.spec_from_file_location({extension!r}, "copy.so")
importlib.util.module_from_spec(spec)
"""
    assert_blocked(run(program), f"import {extension} from")


# --- limits -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("timeout_s", 0),
        ("timeout_s", float("inf")),
        ("timeout_s", True),
        ("memory_mb", 10),
        ("memory_mb", 512.0),
        ("max_processes", -1),
        ("max_file_mb", 0),
        ("max_open_files", 4),
        ("output_limit_bytes", 0),
    ],
)
def test_limits_are_validated(field: str, value: object) -> None:
    with pytest.raises(InvalidParameterError, match=field):
        SandboxLimits(**{field: value})  # type: ignore[arg-type]


def test_arguments_are_validated() -> None:
    with pytest.raises(InvalidParameterError, match="source"):
        run_program(b"print(1)")  # type: ignore[arg-type]
    with pytest.raises(InvalidParameterError, match="tests"):
        run_tests("x = 1", None)  # type: ignore[arg-type]


def test_isolation_layers_always_include_the_portable_ones() -> None:
    assert {"process", "rlimits", "guard"} <= set(LAYERS)
    if os.geteuid() == 0:
        assert "uid" in LAYERS
