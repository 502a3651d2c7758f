"""The sandbox's child program: set up the sandbox (mounts, limits, privileges, guard), then run the untrusted
program file as __main__.

The parent (`depthwave.eval.sandbox`) reads this file as text and runs it with `python -c <loader> <this text>
<JSON configuration>`, compiled under the name <sandbox>. It reports on the status descriptor "exception <type>",
"blocked <event> <detail>", "exit", "done" or "setup-error <message>". Nothing of the program runs before the
guard is installed, and nothing that the guard relies on is reachable from the program: so this module imports
nothing of depthwave, and is never imported, only run. Its frames, named <sandbox>, are left out of the
tracebacks shown to the program's reader.
"""

import json
import os
import sys


def main():
    cfg = json.loads(sys.argv[2])
    status_fd = cfg["status_fd"]

    def report(line):
        # Also called after the program ran, which may have patched contextlib: plain try/except cannot be.
        try:  # noqa: SIM105
            os.write(status_fd, (line.replace("\n", " ") + "\n").encode("utf-8", "replace"))
        except OSError:
            pass

    try:
        source = prepare(cfg)
    except BaseException as exc:
        report(f"setup-error {type(exc).__name__}: {exc}")
        os._exit(70)
    run(source, cfg["program"], report)


def prepare(cfg):
    import _posixsubprocess
    import _signal
    import ctypes
    import faulthandler
    import resource
    import signal
    import subprocess

    work, program, uid, gid = cfg["work"], cfg["program"], cfg["uid"], cfg["gid"]
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
            raise OSError(err, f"{what}: {os.strerror(err)}")

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
        mount_private(libc, check, cfg, source)

    for name, soft, hard in cfg["rlimits"]:
        resource.setrlimit(getattr(resource, name), (soft, hard))
    check(libc.prctl(38, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    if uid is not None:
        drop_privileges(uid, gid)
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
        subprocess._fork_exec = None  # type: ignore[attr-defined]
    for module in (signal, _signal):
        if hasattr(module, "pidfd_send_signal"):
            delattr(module, "pidfd_send_signal")

    sys.addaudithook(make_guard(work, import_roots, cfg["deny_read"], cfg["max_processes"]))
    return source


def mount_private(libc, check, cfg, source):
    """Private mounts: the shared temporary folders empty, the working folder a size-limited tmpfs of the sandbox
    uid's, holding the program again."""
    work, tmp, program, uid, gid = cfg["work"], cfg["tmp"], cfg["program"], cfg["uid"], cfg["gid"]
    ms_nosuid, ms_nodev, ms_noexec, ms_rec, ms_private = 2, 4, 8, 16384, 1 << 18
    sealed = ms_nosuid | ms_nodev | ms_noexec
    check(libc.mount(None, b"/", None, ms_rec | ms_private, None), "make mounts private")
    for shared in cfg["shared_tmp"]:
        check(libc.mount(b"tmpfs", shared.encode(), b"tmpfs", sealed, b"size=1m,mode=0755"), "mount " + shared)
    os.makedirs(work, exist_ok=True)
    options = f"size={cfg['work_mb']:d}m,mode=0700,uid={uid:d},gid={gid:d}"
    check(libc.mount(b"tmpfs", work.encode(), b"tmpfs", sealed, options.encode()), "mount " + work)
    os.chdir(work)
    with open(program, "w", encoding="utf-8", errors="surrogatepass") as f:
        f.write(source)
    os.chmod(program, 0o644)
    os.mkdir(tmp, 0o700)
    os.chown(tmp, uid, gid)


def drop_privileges(uid, gid):
    """Become the sandbox uid for good: no groups, and no way back to root."""
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:
        raise RuntimeError("privileges could not be dropped")


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
            moved[entry] = f"/proc/self/fd/{fd:d}"
            entry = moved[entry]
        entries.append(entry)
    if not moved:
        return
    sys.path[:] = entries
    olds = sorted(moved, key=len, reverse=True)

    def relocate(path):
        for old in olds:
            if isinstance(path, str) and (path == old or path.startswith(old + "/")):
                return moved[old] + path[len(old) :]
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
        "os.system",
        "os.exec",
        "os.posix_spawn",
        "os.spawn",
        "os.startfile",
        "subprocess.Popen",
        "pty.spawn",
        "os.symlink",
        "gc.get_objects",
        "gc.get_referrers",
        "gc.get_referents",
    }
    if max_processes == 0:
        refused |= {"os.fork", "os.forkpty", "_thread.start_new_thread", "_thread.start_joinable_thread"}
    refused = frozenset(refused)  # type: ignore[assignment]
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
            return f"fd {value:d}"
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
            return readlink(f"/proc/self/fd/{fd:d}")
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
            return head.isdigit() and head != f"{getpid():d}"
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
        deny(event, f"pid {shown(pid)}")

    def on_killpg(event, args):
        pgid = args[0]
        if not (type_(pgid) is int_ and (pgid == 0 or pgid == own_pgid)):
            deny(event, f"process group {shown(pgid)}")

    def on_prlimit(event, args):
        pid = args[0]
        if not (type_(pid) is int_ and (pid == 0 or pid == getpid())):
            deny(event, f"pid {shown(pid)}")

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
        # A loop, not the builtin any(), which the program can replace before it imports anything.
        for root in import_roots:  # noqa: SIM110
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
            return message[len("sandbox: blocked ") :]
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


if __name__ == "__main__":
    main()
