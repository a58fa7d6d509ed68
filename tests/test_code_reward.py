"""The code reward (opd_verl/rewards/code.py) and its sandbox (sandbox.py, sandbox_child.py) on hand-made cases:
correct, wrong and empty completions of HumanEval-, MBPP- and KodCode-style rows, and malicious ones (an infinite
loop, repeated forks, writes outside the working directory, network connections, signals to other processes,
memory), each run for real in the confined process; the reward dispatch and verl's thread call."""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from opd_verl.rewards import HUMANEVAL, INFO_KEYS, KODCODE, MBPP, compute_score, compute_score_with_info
from opd_verl.rewards.code import build_program, code_ground_truth, code_score, extract_code, limits_from
from opd_verl.rewards.sandbox import Limits, run_python

FAST = {"code_wall_seconds": 3.0, "code_cpu_seconds": 2}

HUMANEVAL_PROMPT = 'from typing import List\n\n\ndef add_all(xs: List[int]) -> int:\n    """Sum of xs."""\n'
HUMANEVAL_TEST = "def check(candidate):\n    assert candidate([1, 2, 3]) == 6\n    assert candidate([]) == 0\n"
HUMANEVAL_TRUTH = code_ground_truth([HUMANEVAL_TEST + "\ncheck(add_all)\n"], entry_point="add_all",
                                    prompt=HUMANEVAL_PROMPT)
MBPP_TRUTH = code_ground_truth(["assert square(2) == 4", "assert square(3) == 9", "assert square(-1) == 1"])


def fenced(code: str) -> str:
    return f"Here is my solution.\n```python\n{code}\n```\nIt works."


def mbpp(code: str, **kwargs) -> dict:
    return compute_score_with_info(MBPP, fenced(code), MBPP_TRUTH, {}, **{**FAST, **kwargs})


@pytest.fixture(autouse=True)
def own_tempdir(tmp_path, monkeypatch):
    """Each run's directory is made here, so a test can see that it is gone afterwards."""
    root = tmp_path / "sandbox_tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    yield root
    assert list(root.iterdir()) == []  # every run removed its directory, whatever the program did


def sandbox_children() -> list[int]:
    """Live processes whose parent is this test process and that run the sandbox child."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == os.getpid() and b"sandbox_child.py" in cmdline:
            found.append(int(pid))
    return found


# ---------------------------------------------------------------------------------------------------------------
# correct, wrong, empty
# ---------------------------------------------------------------------------------------------------------------


def test_humaneval_full_function_and_body_only_completions_pass():
    full = fenced("def add_all(xs: List[int]) -> int:\n    return sum(xs)")
    info = compute_score_with_info(HUMANEVAL, full, HUMANEVAL_TRUTH, {}, **FAST)
    assert (info["score"], info["code_tests_passed"], info["code_timeout"], info["code_blocked"]) == (1.0, 1.0, 0, 0)
    assert tuple(info) == INFO_KEYS
    body = "    total = 0\n    for x in xs:\n        total += x\n    return total\n"  # continues the prompt
    assert compute_score(HUMANEVAL, body, HUMANEVAL_TRUTH, {}, **FAST) == 1.0
    assert build_program(body, json.loads(HUMANEVAL_TRUTH)).startswith(HUMANEVAL_PROMPT)


def test_mbpp_correct_wrong_and_partly_right():
    assert mbpp("def square(x):\n    return x * x")["score"] == 1.0
    wrong = mbpp("def square(x):\n    return x + x")  # right for 2 only
    assert (wrong["score"], wrong["code_tests_passed"]) == (0.0, pytest.approx(1 / 3))
    assert mbpp("def square(x):\n    return x ** 3")["code_tests_passed"] == 0.0
    syntax = mbpp("def square(x) return x")
    assert (syntax["score"], syntax["code_tests_passed"], syntax["code_blocked"]) == (0.0, 0.0, 0)


def test_kodcode_tests_import_the_solution_module():
    test_file = ("from solution import double\n\n"
                 "def test_double():\n    assert double(2) == 4\n\n"
                 "def test_negative():\n    assert double(-3) == -6\n")
    truth = code_ground_truth(["test_double()", "test_negative()"], entry_point="double", setup=test_file,
                              module="solution")
    assert compute_score(KODCODE, fenced("def double(x):\n    return 2 * x"), truth, {}, **FAST) == 1.0
    half = compute_score_with_info(KODCODE, fenced("def double(x):\n    return abs(2 * x)"), truth, {}, **FAST)
    assert (half["score"], half["code_tests_passed"]) == (0.0, 0.5)


def test_empty_and_unusable_inputs_score_zero_without_running():
    for completion in ("", "   \n", "```python\n```"):
        assert code_score(completion, MBPP_TRUTH).run is None
        assert compute_score(MBPP, completion, MBPP_TRUTH) == 0.0
    assert code_score("def f(): pass", "not json").run is None
    assert code_score("def f(): pass", code_ground_truth([])).run is None
    assert code_score("def f(): pass", json.dumps({"tests": ["pass"], "module": "../x"})).run is None


def test_code_extraction():
    assert extract_code("```python\na = 1\n```\ntext\n```py\nb = 2\n```") == "b = 2"
    assert extract_code("```bash\nls\n```") == "ls"
    assert extract_code("```\nx = 1\n```\n```bash\nls\n```") == "x = 1"  # an untagged block counts as Python
    assert extract_code("no fence\n  indented") == "no fence\n  indented"
    assert extract_code("```python\nunclosed = 1\n") == "unclosed = 1"  # a truncated response


def test_unknown_code_kwarg_is_an_error():
    with pytest.raises(ValueError, match="code_wall_secs.*code_wall_seconds"):
        compute_score(MBPP, fenced("x = 1"), MBPP_TRUTH, {}, code_wall_secs=3)
    with pytest.raises(ValueError, match="code_wall_secs"):  # on a math row too: the first row tells
        compute_score("openai/gsm8k", "#### 4", "4", {}, code_wall_secs=3)
    assert compute_score("openai/gsm8k", "#### 4", "4", {}, code_wall_seconds=3, reward_router_address=None) == 1.0
    for bad in ("ten", 0, -1, None, True):
        with pytest.raises(ValueError, match="code_cpu_seconds=.* must be a positive integer"):
            compute_score(MBPP, fenced("x = 1"), MBPP_TRUTH, {}, code_cpu_seconds=bad)
    assert limits_from({"code_wall_seconds": "2.5", "code_memory_mb": 256.0}) == Limits(wall_seconds=2.5,
                                                                                         memory_mb=256)


# ---------------------------------------------------------------------------------------------------------------
# malicious completions
# ---------------------------------------------------------------------------------------------------------------


def test_infinite_loop_times_out_and_leaves_no_process():
    start = time.monotonic()
    info = mbpp("def square(x):\n    return x * x\nwhile True:\n    pass")
    assert time.monotonic() - start < 3.0 + 2.0
    assert (info["score"], info["code_timeout"], info["code_blocked"]) == (0.0, 1, 0)
    sleeper = run_python("import time\ntime.sleep(60)", ["pass"], limits=Limits(wall_seconds=1.0))
    assert (sleeper.status, sleeper.timed_out) == ("timeout", True)
    assert sandbox_children() == []


def test_cpu_limit_ends_a_busy_loop_before_the_wall_clock():
    run = run_python("while True:\n    pass", ["pass"], limits=Limits(wall_seconds=30.0, cpu_seconds=1))
    assert (run.status, run.timed_out, run.detail) == ("timeout", True, "CPU time limit")


def test_repeated_forks_are_stopped():
    # bounded: at most 20 children even if nothing stopped them, each exits at once
    forks = "import os\nfor _ in range(20):\n    if os.fork() == 0:\n        os._exit(0)\n"
    info = mbpp("def square(x):\n    return x * x\n" + forks)
    assert (info["score"], info["code_blocked"]) == (0.0, 1)
    # past the Python-level hook, straight to libc: seccomp kills the process at the first fork
    raw = ("import ctypes\nlibc = ctypes.CDLL(None)\nfor _ in range(20):\n    if libc.fork() == 0:\n"
           "        libc._exit(0)\n")
    run = run_python("def square(x):\n    return x * x\n" + raw, ["assert square(2) == 4"])
    assert (run.status, run.blocked, run.detail) == ("blocked", True, "seccomp killed a forbidden syscall")
    threads = "import threading\nt = threading.Thread(target=lambda: None)\nt.start()\nt.join()\n"
    assert run_python(threads, ["pass"]).status == "ok"  # threads are not processes
    assert sandbox_children() == []


def test_writes_outside_the_directory_fail_and_leave_no_file(tmp_path):
    target = tmp_path / "escaped.txt"
    write = f"open({str(target)!r}, 'w').write('x')\n"
    info = mbpp("def square(x):\n    return x * x\n" + write)
    assert (info["score"], info["code_blocked"]) == (0.0, 1)
    caught = f"try:\n    {write}except Exception:\n    pass\n"  # catching the error does not help
    assert mbpp("def square(x):\n    return x * x\n" + caught)["score"] == 0.0
    # past the Python-level hook, straight to libc: Landlock refuses the open (O_WRONLY | O_CREAT)
    probe = run_python("pass", ["pass"])
    raw = f"import ctypes\nfd = ctypes.CDLL(None).open({str(target).encode()!r}, 0o101, 0o644)\nassert fd < 0\n"
    run = run_python(raw, ["pass"])
    if not probe.layers["landlock_abi"]:
        pytest.skip("this kernel has no Landlock: a write through libc is not stopped (see sandbox_child.py)")
    assert run.status == "ok", run  # the program saw its open fail
    assert not target.exists()
    keep = tmp_path / "keep.txt"
    keep.write_text("data")
    assert run_python(f"import os\nos.remove({str(keep)!r})\n", ["pass"]).status == "blocked"  # the hook
    unlink = f"import ctypes\nassert ctypes.CDLL(None).unlink({str(keep).encode()!r}) != 0\n"  # Landlock: EACCES
    assert run_python(unlink, ["pass"]).status == "ok"
    assert keep.read_text() == "data"
    inside = ("import tempfile\ntempfile.TemporaryFile().write(b'x')\n"  # TMPDIR is its own directory
              "open('notes.txt', 'w').write('x')\nassert open('notes.txt').read() == 'x'\n")
    assert run_python(inside, ["pass"]).status == "ok"  # its own directory is writable


def test_network_connections_never_connect():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(4)
        server.settimeout(0.5)
        port = server.getsockname()[1]
        connect = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'x')\n"
        info = mbpp("def square(x):\n    return x * x\n" + connect)
        assert (info["score"], info["code_blocked"]) == (0.0, 1)
        # past the Python-level hook: the socket() syscall itself kills the process (seccomp)
        raw = "import ctypes\nctypes.CDLL(None).socket(2, 1, 0)\n"
        run = run_python(raw, ["pass"])
        assert (run.status, run.detail) == ("blocked", "seccomp killed a forbidden syscall")
        with pytest.raises(socket.timeout):
            server.accept()  # nothing ever connected


def test_signals_to_other_processes_are_stopped():
    parent = os.getpid()
    run = run_python(f"import ctypes\nctypes.CDLL(None).kill({parent}, 0)\n", ["pass"])
    assert (run.status, run.blocked) == ("blocked", True)
    assert run_python("import os, signal\nos.kill(os.getpid(), 0)\n", ["pass"]).status == "blocked"  # via os: hook


def test_memory_limit_and_early_exit_score_zero():
    assert mbpp("x = bytearray(8 * 1024 ** 3)\ndef square(x):\n    return x * x", code_memory_mb=512)["score"] == 0.0
    # exiting with status 0 before the tests run is not a pass
    assert mbpp("import os\ndef square(x):\n    return x * x\nos._exit(0)")["score"] == 0.0
    assert mbpp("import sys\ndef square(x):\n    return x * x\nsys.exit(0)")["score"] == 0.0


def test_flooded_output_is_bounded():
    run = run_python("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n", ["pass"],
                     limits=Limits(wall_seconds=5.0, file_size_mb=1))
    assert run.status in ("crashed", "failed") and not run.all_passed


def test_verl_calls_from_threads_in_a_mixed_batch():
    rows = [(MBPP, fenced("def square(x):\n    return x * x"), MBPP_TRUTH, 1.0),
            (MBPP, fenced("while True:\n    pass"), MBPP_TRUTH, 0.0),
            ("openai/gsm8k", "#### 4", "4", 1.0)]
    with ThreadPoolExecutor(max_workers=3) as pool:
        infos = list(pool.map(lambda r: compute_score_with_info(data_source=r[0], solution_str=r[1],
                                                                ground_truth=r[2], extra_info={}, **FAST), rows))
    assert [i["score"] for i in infos] == [r[3] for r in rows]
    assert all(tuple(i) == INFO_KEYS for i in infos)  # one key set, as verl's agent loop needs
    assert [i["code_timeout"] for i in infos] == [0, 1, 0]


def test_as_root_with_a_world_readable_interpreter_the_child_runs_as_nobody(monkeypatch, tmp_path):
    """The path a root trainer with a system-wide Python takes (here the interpreter lies under /root and pytest's
    temporary directories are root's only, so the other tests run the child as root): the child becomes nobody
    and the layers still hold."""
    import sys

    system = Path("/usr/bin/python3")
    if os.geteuid() != 0 or not system.exists() or not os.stat(system.resolve()).st_mode & 0o001:
        pytest.skip("needs root and a world-readable /usr/bin/python3")
    monkeypatch.setattr(sys, "executable", str(system))
    monkeypatch.setattr(tempfile, "tempdir", None)  # the system's, which any user may enter (pytest's may not)
    who = run_python("import os\nassert os.getuid() == 65534, os.getuid()\n", ["pass"])
    assert (who.status, who.layers["nobody"]) == ("ok", True), who
    module = run_python("def f():\n    return 1\n", ["assert f() == 1"], setup="from solution import f",
                        module="solution")
    assert module.status == "ok", module  # the tests import the program from its directory
    target = tmp_path / "escaped.txt"
    assert run_python(f"open({str(target)!r}, 'w')", ["pass"]).status == "blocked"
    assert run_python("import ctypes\nctypes.CDLL(None).fork()", ["pass"]).status == "blocked"
    assert not target.exists()
