"""Run untrusted Python (a model's completion and a problem's tests) in a confined, throw-away process.

``run_python(program, tests, setup, limits)`` starts ``python -I sandbox_child.py`` (isolated mode: no user
site, no PYTHON* variables, the script's directory not on sys.path) in a new session (its own process group),
in a fresh temporary directory, with a minimal environment, stdout and stderr going to files in a directory the
child cannot write (RLIMIT_FSIZE bounds them). The child confines itself before the program runs (see
sandbox_child.py: resource limits, Landlock, seccomp, an audit hook). The parent waits at most
``limits.wall_seconds``; on return, timeout or any error it kills the whole process group and removes the
directory, so a completion that hangs, crashes, forks, floods its output or writes files leaves nothing behind.

Why not one of verl's executors: verl 0.9.1's ``prime_code`` runs APPS stdin/stdout cases in a forked copy of the
reward worker itself (``multiprocessing``) after OpenAI's ``reliability_guard`` (which sets None into
``os.fork``, ``os.kill``, ``shutil.rmtree``... of that copy: a Python-level guard that ``import posix`` or ctypes
walks around, with no network block and no throw-away directory), and ``sandbox_fusion`` needs a SandboxFusion
HTTP service. HumanEval/MBPP/KodCode tests are asserts and test functions, not stdin/stdout cases. This
executor instead relies on the kernel (seccomp, Landlock, rlimits) and a fresh interpreter per run.

What it does not do: it confines writes, processes, signals and the network, not reads (the program may read any
file its user may: without root there is no mount namespace to hide them; with no network and no socket nothing
read can leave). It protects the machine and the trainer, not the score from a program written to game it: an
object whose ``__eq__`` always returns True passes an ``assert f(x) == y``, and code in the same interpreter can
reach the harness (e.g. through frame introspection) — as with every assert-based executor.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

CHILD = Path(__file__).with_name("sandbox_child.py")
#: The child's exit status when its audit hook stopped a forbidden operation (sandbox_child.BLOCKED_EXIT).
BLOCKED_EXIT = 86
#: Bytes of the child's stdout read back (the result line is the last one).
OUTPUT_TAIL = 65536
#: The environment of the child: nothing of the trainer's (tokens, paths, CUDA settings) is passed on.
CHILD_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
             "MKL_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}


@dataclass(frozen=True)
class Limits:
    """Limits of one run (``code_*`` reward kwargs set them, see code.LIMIT_KWARGS)."""

    wall_seconds: float = 10.0  # the parent kills the process group after this
    cpu_seconds: int = 10  # RLIMIT_CPU: SIGKILL past it
    memory_mb: int = 1024  # RLIMIT_AS: allocations fail past it (MemoryError)
    file_size_mb: int = 16  # RLIMIT_FSIZE: the largest file it may write, output included
    open_files: int = 64  # RLIMIT_NOFILE


@dataclass(frozen=True)
class RunResult:
    passed: int  # tests that passed
    total: int  # tests run
    timed_out: bool  # the wall or CPU limit ended the run
    blocked: bool  # the sandbox stopped a forbidden operation (audit hook, or seccomp killed the process)
    status: str  # "ok", "failed", "timeout", "blocked", "crashed" or "error"
    detail: str = ""  # the first error, or how the process ended
    layers: dict | None = None  # the confinement the child applied (nobody, landlock_abi, seccomp)

    @property
    def all_passed(self) -> bool:
        return self.total > 0 and self.passed == self.total


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the child is its session's (and group's) leader
    except (ProcessLookupError, PermissionError):
        pass


def _result(returncode: int, stdout: bytes, stderr: bytes, nonce: str, total: int, timed_out: bool) -> RunResult:
    line = next((ln for ln in reversed(stdout.splitlines()) if ln.startswith(nonce.encode())), None)
    if timed_out or returncode in (-signal.SIGKILL, -signal.SIGXCPU):
        why = "wall time" if timed_out else "CPU time"
        return RunResult(0, total, True, False, "timeout", f"{why} limit")
    if returncode == BLOCKED_EXIT or returncode == -signal.SIGSYS:
        text = stderr.decode(errors="replace").strip().splitlines()
        detail = text[-1] if text and returncode == BLOCKED_EXIT else "seccomp killed a forbidden syscall"
        return RunResult(0, total, False, True, "blocked", detail)
    if line is None or returncode != 0:
        tail = stderr.decode(errors="replace").strip().splitlines()
        return RunResult(0, total, False, False, "crashed", f"exit {returncode}: {tail[-1] if tail else ''}"[:300])
    data = json.loads(line[len(nonce):])
    passed = int(data["passed"])
    status = "ok" if passed == total and total > 0 else "failed"
    return RunResult(passed, total, False, False, status, data.get("error", ""), data.get("layers"))


_reported = threading.Event()


def _report_missing_layers(layers: dict | None) -> None:
    """Print once per process which kernel layer this machine lacks (the run goes on with the others)."""
    if not layers or _reported.is_set():
        return
    missing = []
    if not layers.get("landlock_abi"):
        missing.append("Landlock (a write outside the run's directory through libc, not Python, is not stopped)")
    if not layers.get("seccomp"):
        missing.append("seccomp (no kernel block of sockets and new processes: only the Python audit hook)")
    if missing:
        _reported.set()
        print("opd_verl.rewards: the code sandbox runs without " + "; without ".join(missing) +
              " on this machine; see opd_verl/rewards/sandbox_child.py", file=sys.stderr, flush=True)


def _tail(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - OUTPUT_TAIL))
        return f.read()


def run_python(
    program: str, tests: list[str], setup: str = "", module: str = "", limits: Limits = Limits()
) -> RunResult:
    """Run ``program``, then ``setup``, then each of ``tests`` (Python source; a test passes when it raises
    nothing) in one confined process; with ``module``, the program is written to ``<module>.py`` in the working
    directory for ``setup`` and the tests to import, instead. Never raises on anything the code does."""
    root = Path(tempfile.mkdtemp(prefix="opd_code_"))
    proc = None
    try:
        work = root / "work"
        work.mkdir()
        if os.geteuid() == 0:  # the child may drop to nobody (sandbox_child.drop_root): it may enter, not list,
            os.chmod(root, 0o711)  # the run's directory (its output files stay root's), and owns `work`
            os.chown(work, 65534, 65534)
        nonce = secrets.token_hex(16)
        job = {"nonce": nonce, "workdir": str(work), "program": program, "setup": setup, "module": module,
               "tests": list(tests),
               "limits": asdict(limits)}
        env = {**CHILD_ENV, "HOME": str(work), "TMPDIR": str(work)}  # tempfile and ~ point into its directory
        out_path, err_path = root / "stdout", root / "stderr"
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", str(CHILD)], stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=work,
                env=env, start_new_session=True, close_fds=True,
            )
        try:
            proc.stdin.write(json.dumps(job).encode())
            proc.stdin.close()
        except BrokenPipeError:
            pass
        timed_out = False
        try:
            proc.wait(timeout=limits.wall_seconds)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
            proc.wait()
        result = _result(proc.returncode, _tail(out_path), _tail(err_path), nonce, len(tests), timed_out)
        _report_missing_layers(result.layers)
        return result
    except Exception as exc:  # noqa: BLE001 - the trainer must never see an exception from untrusted code
        return RunResult(0, len(tests), False, False, "error", f"{type(exc).__name__}: {exc}"[:300])
    finally:
        if proc is not None:
            _kill_group(proc)
            if proc.poll() is None:
                proc.wait()
        shutil.rmtree(root, ignore_errors=True)
