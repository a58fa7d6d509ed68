"""The confined process of the code sandbox (run as ``python -I sandbox_child.py`` by sandbox.py; standard library
only, nothing of opd_verl is imported here).

It reads one job (JSON) from stdin, then confines itself before any untrusted code runs, in this order:

1. resource limits: address space (RLIMIT_AS; it also bounds the threads, each stack counts), CPU seconds
   (RLIMIT_CPU), the size of any file it writes (RLIMIT_FSIZE), open files (RLIMIT_NOFILE), no core dumps; where
   this machine has no seccomp table (4.), no new process or thread of its user at all (RLIMIT_NPROC = 0, which
   counts threads, and the kernel does not enforce for root);
2. as root, where the interpreter and the working directory are reachable by any user: drops to the nobody user
   (65534), so only world-writable places are writable (else it stays root: the layers below hold root too);
3. Landlock (Linux >= 5.13, where enabled): no file or directory may be created, written, truncated, renamed or
   removed outside the working directory; no TCP bind or connect (ABI >= 4); no signal to a process outside this
   one and no abstract unix socket (ABI >= 6);
4. seccomp (x86_64 and aarch64): a filter that kills the process on socket()/socketpair(), fork/vfork/clone of a
   process (threads are allowed), signals to other processes, ptrace, set*id, setting a limit, namespaces, mounts,
   io_uring, bpf and kernel keyrings; a syscall of another ABI (x32) is killed too.

Then it runs the program (``__name__`` "solution", so a ``__main__`` block does not run; or, with a ``module``
name, writes it to ``<module>.py`` for the tests to import), the setup code and each test in one namespace,
each test on its own (an exception fails that test only), and prints one line:
``<nonce> {"passed": P, "total": T, "error": "...", "layers": {...}}``. The nonce comes in the job and is never
in the namespace the program sees, so a program cannot print a forged result line by accident; one that exits,
crashes or is killed before the line prints scores 0.

A Python audit hook also ends the process (exit status ``BLOCKED_EXIT``) on an attempt to write, create or remove
a path outside the working directory, or to open a socket or start a process through Python: Landlock and
seccomp stop such an operation in the kernel (EACCES or a killed process); the hook makes the attempt itself fail
the run, even when the program would catch the error and carry on.
"""

import ctypes
import ctypes.util
import json
import os
import platform
import resource
import stat
import sys

BLOCKED_EXIT = 86

# ----------------------------------------------------------------------------------------------------------------
# resource limits and user
# ----------------------------------------------------------------------------------------------------------------


def set_limits(limits, no_processes):
    mb = 1024 * 1024
    pairs = [
        (resource.RLIMIT_AS, limits["memory_mb"] * mb),
        (resource.RLIMIT_CPU, limits["cpu_seconds"]),
        (resource.RLIMIT_FSIZE, limits["file_size_mb"] * mb),
        (resource.RLIMIT_NOFILE, limits["open_files"]),
        (resource.RLIMIT_CORE, 0),
    ] + ([(resource.RLIMIT_NPROC, 0)] if no_processes else [])
    for which, value in pairs:
        resource.setrlimit(which, (value, value))


def _world_reachable(path):
    """Whether any user may enter every directory down to ``path`` (and so import from it)."""
    path = os.path.realpath(path)
    while True:
        if not os.stat(path).st_mode & stat.S_IXOTH:
            return False
        parent = os.path.dirname(path)
        if parent == path:
            return True
        path = parent


def drop_root(workdir):
    """As root, where the interpreter's files and the working directory can be reached by any user: become nobody
    (the working directory was handed to it); returns whether it did. Otherwise root stays root, held by Landlock
    and seccomp alone."""
    needed = {os.path.dirname(workdir), os.path.dirname(os.__file__), *sys.path[1:]}
    if os.geteuid() != 0 or not all(_world_reachable(p) for p in needed if os.path.isdir(p)):
        return False
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
    return True


# ----------------------------------------------------------------------------------------------------------------
# Landlock
# ----------------------------------------------------------------------------------------------------------------

_SYS_LANDLOCK_CREATE_RULESET, _SYS_LANDLOCK_ADD_RULE, _SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
_PR_SET_NO_NEW_PRIVS = 38


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _libc():
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    libc.prctl.restype = ctypes.c_int
    return libc


def landlock(workdir):
    """Writes only beneath ``workdir``, no TCP, signals and abstract unix sockets scoped; returns the ABI (0: none)."""
    libc = _libc()
    abi = libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    if abi < 1:
        return 0
    # WRITE_FILE, REMOVE_DIR, REMOVE_FILE, MAKE_CHAR .. MAKE_SYM; REFER (ABI 2); TRUNCATE (ABI 3)
    write = (1 << 1) | (1 << 4) | (1 << 5) | sum(1 << bit for bit in range(6, 13))
    write |= (1 << 13 if abi >= 2 else 0) | (1 << 14 if abi >= 3 else 0)
    attr = _RulesetAttr(handled_access_fs=write, handled_access_net=3 if abi >= 4 else 0,
                        scoped=3 if abi >= 6 else 0)
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    ruleset = libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset")
    fd = os.open(workdir, os.O_PATH | os.O_DIRECTORY)
    try:
        rule = _PathBeneathAttr(allowed_access=write, parent_fd=fd)
        if libc.syscall(_SYS_LANDLOCK_ADD_RULE, ctypes.c_int(ruleset), ctypes.c_int(1), ctypes.byref(rule),
                        ctypes.c_uint32(0)) != 0:
            raise OSError(ctypes.get_errno(), "landlock_add_rule")
    finally:
        os.close(fd)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if libc.syscall(_SYS_LANDLOCK_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0)) != 0:
        raise OSError(ctypes.get_errno(), "landlock_restrict_self")
    os.close(ruleset)
    return int(abi)


# ----------------------------------------------------------------------------------------------------------------
# seccomp
# ----------------------------------------------------------------------------------------------------------------

#: audit arch, the syscall numbers the filter looks at, and those it kills outright.
_ARCHES = {
    "x86_64": dict(
        audit=0xC000003E, socket=41, socketpair=53, fork=57, vfork=58, clone=56, clone3=435, kill=62, tgkill=234,
        prlimit64=302,
        denied=[200, 424, 101, 310, 311, 160, 272, 308, 165, 166, 169, 161, 155, 175, 313, 176, 246, 320, 321,
                425, 426, 427, 298, 250, 248, 249, 323, 105, 106, 113, 114, 117, 119, 122, 123],
    ),
    "aarch64": dict(
        audit=0xC00000B7, socket=198, socketpair=199, fork=None, vfork=None, clone=220, clone3=435, kill=129,
        tgkill=131, prlimit64=261,
        denied=[130, 424, 117, 270, 271, 164, 97, 268, 40, 39, 142, 51, 41, 105, 273, 106, 104, 294, 280, 425,
                426, 427, 241, 219, 217, 218, 282, 146, 144, 145, 143, 147, 149, 151, 152],
    ),
}
_LD_W_ABS, _JEQ_K, _JSET_K, _JGE_K, _RET_K = 0x20, 0x15, 0x45, 0x35, 0x06
_KILL_PROCESS, _ALLOW, _ERRNO = 0x80000000, 0x7FFF0000, 0x00050000
_ENOSYS, _CLONE_THREAD, _X32_BIT = 38, 0x00010000, 0x40000000


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


def seccomp_program(arch, pid):
    """The BPF program (a list of (code, jt, jf, k)) for ``arch``'s syscall numbers; ``pid``: this process."""
    a = _ARCHES[arch]
    kill, allow = (_RET_K, 0, 0, _KILL_PROCESS), (_RET_K, 0, 0, _ALLOW)
    prog = [(_LD_W_ABS, 0, 0, 4), (_JEQ_K, 1, 0, a["audit"]), kill,  # another ABI
            (_LD_W_ABS, 0, 0, 0), (_JGE_K, 0, 1, _X32_BIT), kill]  # x32 numbers
    for nr in [a["socket"], a["socketpair"], a["fork"], a["vfork"], *a["denied"]]:
        if nr is not None:
            prog += [(_JEQ_K, 0, 1, nr), kill]
    prog += [(_JEQ_K, 0, 1, a["clone3"]), (_RET_K, 0, 0, _ERRNO | _ENOSYS)]  # libc falls back to clone()
    # clone(): a thread (CLONE_THREAD in the flags, args[0]) is allowed, a process is not
    prog += [(_JEQ_K, 0, 4, a["clone"]), (_LD_W_ABS, 0, 0, 16), (_JSET_K, 0, 1, _CLONE_THREAD), allow, kill]
    # kill(pid, sig), tgkill(tgid, tid, sig): only this process
    for nr in (a["kill"], a["tgkill"]):
        prog += [(_JEQ_K, 0, 4, nr), (_LD_W_ABS, 0, 0, 16), (_JEQ_K, 0, 1, pid), allow, kill]
    # prlimit64(pid, resource, new, old): reading a limit is allowed, setting one is not (root could raise them)
    prog += [(_JEQ_K, 0, 6, a["prlimit64"]), (_LD_W_ABS, 0, 0, 32), (_JEQ_K, 0, 3, 0), (_LD_W_ABS, 0, 0, 36),
             (_JEQ_K, 0, 1, 0), allow, kill]
    return prog + [allow]


def seccomp():
    """Installs the filter; returns the arch it was built for, or "" where this arch has no table."""
    arch = platform.machine()
    if arch not in _ARCHES:
        return ""
    prog = seccomp_program(arch, os.getpid())
    filters = (_SockFilter * len(prog))(*[_SockFilter(*ins) for ins in prog])
    fprog = _SockFprog(len(prog), filters)
    libc = _libc()
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) != 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")
    return arch


# ----------------------------------------------------------------------------------------------------------------
# audit hook: an attempt ends the run
# ----------------------------------------------------------------------------------------------------------------

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_PATH_EVENTS = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.symlink", "os.link", "os.truncate",
                "os.chmod", "os.chown", "os.utime", "shutil.rmtree", "shutil.move", "os.mkfifo", "os.mknod"}
_BLOCKED_EVENTS = {"socket.__new__", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.system",
                   "os.exec", "subprocess.Popen", "os.kill", "os.killpg", "pty.spawn"}


def _outside(path, workdir):
    if isinstance(path, int):  # an fd the process already holds
        return False
    try:
        full = os.path.realpath(os.fsdecode(path))
    except (TypeError, ValueError):
        return True
    return full != workdir and not full.startswith(workdir + os.sep)


def audit_hook(workdir):
    def hook(event, args):
        reason = None
        if event == "open":
            path, mode, flags = args
            writes = (mode is not None and any(c in str(mode) for c in "wax+")) or (
                mode is None and isinstance(flags, int) and flags & _WRITE_FLAGS)
            if writes and path is not None and _outside(path, workdir):
                reason = f"write outside the working directory: {path!r}"
        elif event in _PATH_EVENTS:
            paths = [a for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
            if any(_outside(p, workdir) for p in paths):
                reason = f"{event} outside the working directory"
        elif event in _BLOCKED_EVENTS:
            reason = event
        if reason is not None:
            try:
                os.write(2, f"sandbox: blocked {reason}\n".encode())
            finally:
                os._exit(BLOCKED_EXIT)

    sys.addaudithook(hook)


# ----------------------------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------------------------


def _run(job):
    namespace = {"__name__": "solution", "__builtins__": __builtins__}
    passed, error = 0, ""
    try:
        if job.get("module"):
            with open(job["module"] + ".py", "w") as f:
                f.write(job["program"])
        else:
            exec(compile(job["program"], "solution.py", "exec"), namespace)
        if job.get("setup"):
            exec(compile(job["setup"], "setup.py", "exec"), namespace)
    except BaseException as exc:  # noqa: BLE001 - the program's failure is the result
        return 0, f"program: {type(exc).__name__}: {exc}"[:300]
    for i, test in enumerate(job["tests"]):
        try:
            exec(compile(test, f"test_{i}.py", "exec"), namespace)
            passed += 1
        except BaseException as exc:  # noqa: BLE001
            error = error or f"test {i}: {type(exc).__name__}: {exc}"[:300]
    return passed, error


def main():
    job = json.loads(sys.stdin.read())
    sys.stdin.close()
    nonce, tests = job.pop("nonce"), job["tests"]
    workdir = os.path.realpath(job["workdir"])
    os.chdir(workdir)
    sys.path.insert(0, workdir)  # a test may import a module the program wrote there (e.g. KodCode's solution.py)
    set_limits(job["limits"], no_processes=platform.machine() not in _ARCHES)
    layers = {"nobody": drop_root(workdir), "landlock_abi": landlock(workdir), "seccomp": seccomp()}
    audit_hook(workdir)
    out = sys.stdout
    passed, error = _run(job)
    out.write("\n" + nonce + " " + json.dumps(
        {"passed": passed, "total": len(tests), "error": error, "layers": layers}) + "\n")
    out.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
