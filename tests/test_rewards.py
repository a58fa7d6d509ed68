"""Math rule rewards (opd_verl/rewards/math.py): '####' and \\boxed{} answers, data_source routing, error guards, and the
way verl 0.9.1 loads and calls a custom reward function."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from opd_verl import rewards
from opd_verl.rewards import math as math_rewards
from opd_verl.rewards import (
    AIME2024,
    DATA_SOURCES,
    DEEPMATH,
    GSM8K,
    MATH500,
    OPENTHOUGHTS3,
    answer_style,
    compute_score,
    compute_score_with_info,
    extract_hash_answer,
    last_boxed_content,
)

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------------
# GSM8K '####'
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("solution", "ground_truth", "expected"),
    [
        ("2 + 2 = 4\n#### 1,234", "1234", 1.0),
        ("#### 1234", "1,234", 1.0),
        ("#### $1,234.00.", "1234", 1.0),
        ("#### 1234.0", "1234", 1.0),
        ("####1234 apples", "1234", 1.0),
        ("#### -5", "-5", 1.0),
        ("#### 0.5", "1/2", 1.0),
        ("#### .5", "0.5", 1.0),
        ("first #### 12, then corrected\n#### 1234", "1234", 1.0),  # the last '####' counts
        ("#### 1234\n#### 12", "1234", 0.0),
        ("#### 1235", "1234", 0.0),
        ("#### 1234.5", "1234", 0.0),
        ("#### twelve", "12", 0.0),  # malformed: no number after '####'
        ("####", "12", 0.0),
        ("The answer is 1234.", "1234", 0.0),  # no '####' and no \boxed{}
        ("The answer is \\boxed{1234}.", "1234", 1.0),  # gsm8k falls back to \boxed{}
        ("The answer is \\boxed{1,234}.", "1234", 1.0),
        ("", "1234", 0.0),
        ("#### 1234", "#### 1,234", 1.0),  # a ground truth given as the full source answer line
        ("#### 1234", None, 0.0),
    ],
)
def test_gsm8k_answers(solution, ground_truth, expected):
    assert compute_score(GSM8K, solution, ground_truth) == expected


def test_extract_hash_answer_normalises():
    assert extract_hash_answer("work\n#### $1,234.00") == "1234"
    assert extract_hash_answer("#### -3.50 dollars") == "-3.5"
    assert extract_hash_answer("no marker 42") is None
    assert extract_hash_answer("#### none") is None


# ---------------------------------------------------------------------------------------------------------------
# \boxed{} with math-verify
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("solution", "ground_truth", "expected"),
    [
        ("so \\boxed{\\frac{1}{2}}", "0.5", 1.0),
        ("so \\boxed{0.5}", "\\frac{1}{2}", 1.0),
        ("\\boxed{\\dfrac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}", 1.0),
        ("\\boxed{x^2+2x+1}", "(x+1)^2", 1.0),
        ("\\boxed{023}", "23", 1.0),
        ("\\boxed{\\text{(C)}}", "(C)", 1.0),
        ("\\boxed{1} first, then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}", 1.0),  # the last box counts
        ("\\boxed{\\frac{1}{2}} then \\boxed{1}", "\\frac{1}{2}", 0.0),
        ("so \\boxed{\\frac{1}{3}}", "0.5", 0.0),
        ("\\boxed{x^2+1}", "(x+1)^2", 0.0),
        ("the answer is 0.5", "0.5", 0.0),  # no \boxed{}: no answer
        ("\\boxed{\\frac{1}{2", "0.5", 0.0),  # malformed (truncated) box
        ("\\boxed{}", "0.5", 0.0),
        ("\\boxed{\\frac{1}{2}}", "", 0.0),
        ("", "0.5", 0.0),
    ],
)
def test_boxed_answers(solution, ground_truth, expected):
    assert compute_score(MATH500, solution, ground_truth) == expected


@pytest.mark.parametrize("source", [DEEPMATH, AIME2024, MATH500, OPENTHOUGHTS3, "math_dapo", "aime2025"])
def test_math_sources_use_boxed_not_hash(source):
    assert compute_score(source, "\\boxed{42}", "42") == 1.0
    assert compute_score(source, "#### 42", "42") == 0.0


@pytest.mark.parametrize(
    ("solution", "expected"),
    [("#### 7", 1.0), ("\\boxed{7}", 1.0), ("#### 8", 0.0), ("\\boxed{8}", 0.0), ("7", 0.0)],
)
def test_unknown_source_tries_both(solution, expected):
    assert compute_score("some/unknown-set", solution, "7") == expected


def test_last_boxed_content():
    assert last_boxed_content("a \\boxed{1} b \\boxed{\\frac{a}{b}} c") == "\\frac{a}{b}"
    assert last_boxed_content("\\fbox{3}") == "3"
    assert last_boxed_content("\\boxed{2} and \\boxed{\\frac{1}{") == "2"  # truncated last box: previous one
    assert last_boxed_content("\\boxed 5") == "5"
    assert last_boxed_content("nothing here") is None


def test_data_sources_all_have_a_checker():
    from opd_verl.rewards import task_of

    math_sets = {"gsm8k", "deepmath", "openthoughts3", "aime2024", "math500"}
    assert set(DATA_SOURCES) == math_sets | {"humaneval", "mbpp", "kodcode", "ifeval"}
    assert {name: task_of(DATA_SOURCES[name]) for name in DATA_SOURCES} == {
        **dict.fromkeys(math_sets, "math"), "humaneval": "code", "mbpp": "code", "kodcode": "code", "ifeval": "ifeval"
    }
    assert task_of("my/eval") == "math"  # an unlisted source keeps the math checkers
    assert answer_style(DATA_SOURCES["gsm8k"]) == "gsm8k"
    for name in ("deepmath", "openthoughts3", "aime2024", "math500"):
        assert answer_style(DATA_SOURCES[name]) == "boxed"
    assert answer_style("openai/gsm8k-platinum") == "gsm8k"
    assert answer_style("my/eval") == "unknown"


# ---------------------------------------------------------------------------------------------------------------
# Guards: never raise, timeouts and errors score 0.0
# ---------------------------------------------------------------------------------------------------------------


def test_math_verify_timeout_scores_zero(monkeypatch):
    import math_verify
    from math_verify.errors import TimeoutException

    def timed_out(*args, **kwargs):
        raise TimeoutException("simulated")

    monkeypatch.setattr(math_verify, "parse", timed_out)
    assert compute_score(MATH500, "\\boxed{0.5}", "\\frac{1}{2}") == 0.0
    # the plain-text fast path needs no math-verify
    assert compute_score(MATH500, "\\boxed{\\frac{1}{2}}", "\\frac{1}{2}") == 1.0


def test_math_verify_error_scores_zero(monkeypatch):
    import math_verify

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(math_verify, "verify", broken)
    assert compute_score(MATH500, "\\boxed{0.5}", "\\frac{1}{2}") == 0.0


@pytest.mark.parametrize("solution", [None, 123, b"#### 1", ["\\boxed{1}"]])
def test_non_text_response_scores_zero(solution):
    assert compute_score(GSM8K, solution, "1") == 0.0
    assert compute_score(MATH500, solution, "1") == 0.0


def test_extra_kwargs_are_accepted():
    score = compute_score(
        data_source=GSM8K,
        solution_str="#### 3",
        ground_truth="3",
        extra_info={"split": "test", "index": 0, "num_turns": 2, "rollout_reward_scores": {}},
        reward_router_address=None,
        some_reward_kwarg=1,
    )
    assert score == 1.0


def test_off_main_thread_uses_worker_process():
    """verl calls the reward from an executor thread, where math-verify's signal timeouts cannot work."""
    cases = [
        ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
        ("\\boxed{x^2+2x+1}", "(x+1)^2", 1.0),
        ("\\boxed{3}", "(x+1)^2", 0.0),
    ]
    seen_threads = []

    def score(case):
        seen_threads.append(threading.current_thread() is threading.main_thread())
        return compute_score(MATH500, case[0], case[1])

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(score, cases))
    assert not any(seen_threads)
    assert results == [c[2] for c in cases]
    assert math_rewards._pool is not None  # the spawned math-verify worker was used


# ---------------------------------------------------------------------------------------------------------------
# math-verify at scale: the pool's size, each check on its own budget, timeouts counted (issue 12)
# ---------------------------------------------------------------------------------------------------------------


def math_keys(info: dict) -> dict:
    """The math keys of a compute_score_with_info dict (the others belong to the code and IFEval rewards)."""
    return {k: info[k] for k in ("score", "acc", "math_verify_timeout")}


def _ones(n: int) -> str:
    """ "1+1+...+1" (n terms): math-verify really parses it, in a time that grows with n (no mock, no hook)."""
    return "+".join(["1"] * n)


@pytest.fixture(scope="module")
def one_process_pool():
    """One math-verify process for the tests below (shared, so it starts once)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPD_REWARD_MV_WORKERS", "1")
        mp.delenv("OPD_REWARD_MV_TIMEOUT", raising=False)
        math_rewards._reset_pool()
        yield
        math_rewards._reset_pool()


def test_pool_size_follows_the_setting(monkeypatch):
    real = math_rewards._available_cpus()
    assert 1 <= real <= (os.cpu_count() or 1)
    monkeypatch.setattr(math_rewards, "_available_cpus", lambda: 4)
    monkeypatch.delenv("OPD_REWARD_MV_WORKERS", raising=False)
    assert math_rewards.mv_pool_size() == min(4, math_rewards.MV_MAX_WORKERS)
    monkeypatch.setattr(math_rewards, "MV_MAX_WORKERS", 3)
    assert math_rewards.mv_pool_size() == 3
    for value, size in (("2", 2), ("16", 4), ("0", 1), ("not-a-number", 3)):
        monkeypatch.setenv("OPD_REWARD_MV_WORKERS", value)
        assert math_rewards.mv_pool_size() == size, value
    monkeypatch.setenv("OPD_REWARD_MV_WORKERS", "2")
    math_rewards._reset_pool()
    try:
        pool = math_rewards._get_pool()
        assert pool._max_workers == 2
        assert len(pool._processes) == 0  # processes start with the load, not with the pool
    finally:
        math_rewards._reset_pool()


def test_per_check_budget_setting(monkeypatch):
    monkeypatch.delenv("OPD_REWARD_MV_TIMEOUT", raising=False)
    assert math_rewards.mv_timeout_seconds() == math_rewards.MV_TIMEOUT_SECONDS
    monkeypatch.setenv("OPD_REWARD_MV_TIMEOUT", "2.5")
    assert math_rewards.mv_timeout_seconds() == 2.5


def test_queued_checks_are_timed_on_their_own(one_process_pool, monkeypatch):
    """64 checks at once on one process: a few slow ones ahead put the rest behind a queue longer than the
    per-check budget, while each check alone is well inside it. No check may score a spurious 0.0."""
    n0 = 120
    monkeypatch.setattr(math_rewards, "MV_TIMEOUT_SECONDS", 60.0)
    with ThreadPoolExecutor(max_workers=1) as ex:
        # start the process (its start-up is not the point here), then time one slow check in it, alone
        assert ex.submit(compute_score, MATH500, "\\boxed{0.5}", "\\frac{1}{2}").result() == 1.0
        slow = 0.02
        for n in (n0 - 2, n0 - 1):
            start = time.monotonic()
            assert ex.submit(compute_score, MATH500, f"\\boxed{{{_ones(n)}}}", str(n)).result() == 1.0
            slow = max(slow, time.monotonic() - start)
    budget = max(1.0, 4 * slow)  # each slow check alone: a quarter of the budget or less
    k = min(48, math.ceil(4 * budget / slow))  # the slow ones together: about four budgets
    monkeypatch.setattr(math_rewards, "MV_TIMEOUT_SECONDS", budget)

    cases = [(f"\\boxed{{{_ones(n0 + 1 + j)}}}", str(n0 + 1 + j), 1.0) for j in range(k)]
    for i in range(64 - k):  # fast ones, queued behind the slow ones; half of them wrong
        numerator = 2 * i + 2 if i % 2 else 2 * i + 3
        cases.append((f"\\boxed{{\\frac{{{numerator}}}{{2}}}}", str(i + 1), 1.0 if i % 2 else 0.0))
    before = math_rewards.math_verify_stats()
    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=len(cases)) as ex:
        results = list(ex.map(lambda case: compute_score(MATH500, case[0], case[1]), cases))
    wall = time.monotonic() - start
    after = math_rewards.math_verify_stats()

    assert results == [case[2] for case in cases]
    assert after["timeouts"] == before["timeouts"]
    assert after["checks"] - before["checks"] == len(cases)
    assert wall > budget, (wall, budget)  # the queue really was longer than one check's budget
    assert len(math_rewards._pool._processes) == 1


def test_slow_check_times_out_and_is_counted(one_process_pool, monkeypatch, capfd):
    monkeypatch.setenv("OPD_REWARD_MV_TIMEOUT", "0.2")
    monkeypatch.setattr(math_rewards, "_last_timeout_log", [None])
    n = 900  # about a second of parsing, or more
    before = math_rewards.math_verify_stats()
    with ThreadPoolExecutor(max_workers=1) as ex:
        info = ex.submit(compute_score_with_info, MATH500, f"\\boxed{{{_ones(n)}}}", str(n)).result()
        # the process that timed out still checks
        assert ex.submit(compute_score, MATH500, "\\boxed{0.25}", "\\frac{1}{4}").result() == 1.0
    after = math_rewards.math_verify_stats()
    assert math_keys(info) == {"score": 0.0, "acc": 0.0, "math_verify_timeout": 1}
    assert after["timeouts"] - before["timeouts"] == 1
    assert "opd_verl.rewards: math-verify timed out on" in capfd.readouterr().err


def test_main_thread_check_times_out_alone_and_cleans_up(monkeypatch):
    monkeypatch.setenv("OPD_REWARD_MV_TIMEOUT", "0.2")
    handler = signal.getsignal(signal.SIGALRM)
    before = math_rewards.math_verify_stats()
    start = time.monotonic()
    info = compute_score_with_info(MATH500, f"\\boxed{{{_ones(901)}}}", "901")
    assert time.monotonic() - start < 5
    assert math_keys(info) == {"score": 0.0, "acc": 0.0, "math_verify_timeout": 1}
    assert math_rewards.math_verify_stats()["timeouts"] - before["timeouts"] == 1
    assert signal.getsignal(signal.SIGALRM) is handler
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    # scores are those of compute_score; a check that finishes reports no timeout
    assert math_keys(compute_score_with_info(MATH500, "\\boxed{0.5}", "\\frac{1}{2}")) == {
        "score": 1.0,
        "acc": 1.0,
        "math_verify_timeout": 0,
    }
    assert math_keys(compute_score_with_info(GSM8K, "#### 7", "8")) == {"score": 0.0, "acc": 0.0, "math_verify_timeout": 0}


# ---------------------------------------------------------------------------------------------------------------
# verl 0.9.1 loads the function as documented
# ---------------------------------------------------------------------------------------------------------------


VERL_CALL_SCRIPT = r"""
import asyncio
import sys

CASES = [
    ("openai/gsm8k", "#### 1,234", "1234", 1.0),
    ("HuggingFaceH4/MATH-500", "\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("HuggingFaceH4/MATH-500", "\\boxed{0.3}", "0.5", 0.0),
]


async def main():
    # imported here, not at the top, so the spawned math-verify worker does not import verl (torch) again
    from verl.utils.import_utils import load_extern_object

    loop = asyncio.get_running_loop()
    # a code row too: its tests run in the sandbox, from the package loaded either way
    code = ("google-research-datasets/mbpp", "```python\ndef f():\n    return 1\n```",
            '{"tests": ["assert f() == 1"]}', 1.0)
    for path in ("pkg://opd_verl.rewards", sys.argv[1]):
        fn = load_extern_object(module_path=path, object_name="compute_score")
        for ds, sol, gt, want in CASES + [code]:
            got = await loop.run_in_executor(
                None, lambda: fn(data_source=ds, solution_str=sol, ground_truth=gt, extra_info={"index": 0})
            )
            assert got == want, (path, ds, sol, gt, got)
    # the dict entry point: verl's validation turns each extra key into val-aux/<data_source>/<key>/mean@N
    from verl.trainer.ppo.metric_utils import process_validation_metrics

    fn = load_extern_object(module_path="pkg://opd_verl.rewards", object_name="compute_score_with_info")
    infos = {}
    for ds, sol, gt, want in CASES:
        got = await loop.run_in_executor(
            None, lambda: fn(data_source=ds, solution_str=sol, ground_truth=gt, extra_info={"index": 0})
        )
        # one key set for every task (a mixed batch's rows must agree); the math keys carry the math result
        from opd_verl.rewards import INFO_KEYS

        assert tuple(got) == INFO_KEYS, got
        assert {k: got[k] for k in ("score", "acc", "math_verify_timeout")} == {
            "score": want, "acc": want, "math_verify_timeout": 0
        }, got
        assert all(got[k] == 0 for k in INFO_KEYS if k.startswith(("code_", "ifeval_"))), got
        for key, value in got.items():
            infos.setdefault(key, []).append(value)
    metrics = process_validation_metrics([c[0] for c in CASES], [str(i) for i in range(len(CASES))], infos)
    assert metrics["HuggingFaceH4/MATH-500"]["math_verify_timeout"]["mean@1"] == 0.0, metrics
    assert metrics["HuggingFaceH4/MATH-500"]["acc"]["mean@1"] == 0.5, metrics
    print("verl-ok")


if __name__ == "__main__":
    asyncio.run(main())
"""


def test_verl_loads_and_calls_compute_score(tmp_path):
    """Both documented values of reward.custom_reward_function.path resolve with verl's own loader, and the
    function answers verl's keyword call from an executor thread (as the naive reward manager makes it)."""
    script = tmp_path / "call_like_verl.py"
    script.write_text(VERL_CALL_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), str(REPO / "opd_verl" / "rewards" / "__init__.py")],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "verl-ok" in proc.stdout


def test_override_lines_in_docstring_name_real_verl_keys():
    """The docstring's override keys exist in verl 0.9.1's reward config."""
    import importlib.util

    import yaml

    doc = rewards.__doc__
    assert "reward.custom_reward_function.path=pkg://opd_verl.rewards" in doc
    assert "reward.custom_reward_function.name=compute_score" in doc
    verl_dir = Path(importlib.util.find_spec("verl").origin).parent  # without importing verl (torch)
    cfg_path = verl_dir / "trainer" / "config" / "reward" / "reward.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    assert set(cfg["custom_reward_function"]) >= {"path", "name"}
