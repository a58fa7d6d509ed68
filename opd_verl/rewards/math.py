"""Math answers: GSM8K ``####`` numbers and ``\\boxed{}`` answers checked with math-verify (issue 12's pool).

Scoring, 1.0 or 0.0:

- GSM8K style (``data_source`` contains "gsm8k"): the number after the *last* ``####`` in the response,
  normalised (commas, ``$``, trailing ``.0``/``.``), compared exactly as a rational number with the ground
  truth; a response without ``####`` falls back to its last ``\\boxed{}``.
- Math sets (DeepMath, AIME, MATH-500, OpenThoughts3 and anything whose name says math/aime/amc): the content
  of the response's last ``\\boxed{}`` checked against the ground truth with math-verify.
- Any other source: both checkers, the better score.

A missing answer, a parse error or a math-verify timeout scores 0.0; nothing here raises on bad model output.

math-verify at scale. Each math-verify check gets its own budget, ``OPD_REWARD_MV_TIMEOUT`` seconds (default
``MV_TIMEOUT_SECONDS`` = 10) for both parses and the comparison, timed by a ``signal.setitimer`` around that one
check in the thread that runs it. Signals only work in the main thread, while verl calls the reward from executor
threads, so off the main thread the checks run in a spawned process pool of min(CPUs available to the reward
worker, ``OPD_REWARD_MV_WORKERS``, default ``MV_MAX_WORKERS`` = 8) processes, started as the load needs them:
the budget starts when a pool process picks the check up, so time spent queueing behind other checks never turns
a correct answer into 0.0. The caller only keeps a backstop deadline scaled to the queue ahead of it, for a
check stuck where the timer cannot interrupt it. A timed-out check scores 0.0 and is counted (the
``math_verify_timeout`` key of ``opd_verl.rewards.compute_score_with_info``); every process also prints a counter
line on its first timeout and at most once a minute after that (``opd_verl.rewards: math-verify timed out on T of
N checks ...``), and ``math_verify_stats()`` returns the counters.

math-verify is loaded on first use, so importing this module is cheap.
"""

from __future__ import annotations

import os
import re
import threading
from fractions import Fraction
from typing import Any

from opd_verl.rewards.sources import ANSWER_STYLE

_MATH_NAME_HINTS = ("math", "aime", "amc", "deepmath", "openthoughts", "olympiad")

# --------------------------------------------------------------------------------------------------------------
# GSM8K '####' answers
# --------------------------------------------------------------------------------------------------------------

_NUMBER = re.compile(r"-?(?:\d+(?:\.\d+)?|\.\d+)(?:/\d+)?")


def normalize_number(text: str) -> str | None:
    """The first number in ``text`` in canonical form ("1,234.00" -> "1234", "$-3.50" -> "-3.5"), or None."""
    if text is None:
        return None
    cleaned = str(text).replace(",", "").replace("$", "").replace("\\$", "")
    cleaned = re.sub(r"(?<=-)\s+", "", cleaned.strip())
    match = _NUMBER.search(cleaned)
    if not match:
        return None
    try:
        value = Fraction(match.group(0))
    except (ValueError, ZeroDivisionError):
        return None
    if value.denominator == 1:
        return str(value.numerator)
    as_float = float(value)
    # a terminating decimal prints exactly; anything else stays a fraction
    if Fraction(repr(as_float)) == value:
        return repr(as_float)
    return f"{value.numerator}/{value.denominator}"


def extract_hash_answer(solution_str: str) -> str | None:
    """The normalised number after the last ``####`` (on that line), or None if there is none."""
    if not solution_str or "####" not in solution_str:
        return None
    tail = solution_str.rsplit("####", 1)[1].strip()
    line = tail.splitlines()[0] if tail else ""
    return normalize_number(line)


def gsm8k_score(solution_str: str, ground_truth: Any) -> float:
    """1.0 if the number after the last ``####`` equals the ground truth (exactly, as a rational), else 0.0."""
    answer = extract_hash_answer(solution_str)
    gold = normalize_number(str(ground_truth).rsplit("####", 1)[-1]) if ground_truth is not None else None
    if answer is None or gold is None:
        return 0.0
    try:
        return 1.0 if Fraction(answer) == Fraction(gold) else 0.0
    except (ValueError, ZeroDivisionError):
        return 0.0


# --------------------------------------------------------------------------------------------------------------
# \boxed{} answers with math-verify
# --------------------------------------------------------------------------------------------------------------

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")


def last_boxed_content(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, braces balanced; None if none."""
    if not text:
        return None
    starts = [m.end() for m in _BOXED.finditer(text)]
    for start in reversed(starts):
        depth = 1
        for pos in range(start, len(text)):
            char = text[pos]
            if char == "{":
                depth += 1
            elif char == "}":
                depth -= 1
                if depth == 0:
                    return text[start:pos].strip()
        # unbalanced (e.g. truncated response): try the previous one
    # "\boxed 5" form
    match = re.findall(r"\\boxed\s+([^\s$]+)", text)
    return match[-1].strip() if match else None


def _plain(text: str) -> str:
    text = re.sub(r"\\text\{([^{}]*)\}", r"\1", text)
    text = text.replace("\\!", "").replace("\\,", "").replace("\\ ", "").replace("$", "")
    text = text.replace("\\left", "").replace("\\right", "").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    return re.sub(r"\s+", "", text).rstrip(".")


#: Seconds one math-verify check (both parses and the comparison) may take, counted from when a worker process
#: picks the check up, not from when it is queued; the environment variable ``OPD_REWARD_MV_TIMEOUT`` overrides it.
MV_TIMEOUT_SECONDS = 10.0
#: Upper bound on the math-verify processes of one reward worker; the pool has
#: min(CPUs available to the worker, ``OPD_REWARD_MV_WORKERS`` or this) processes, started as the load needs them.
MV_MAX_WORKERS = 8
#: The parent's backstop, for a check stuck where the worker's timer cannot interrupt it (a long C call): it waits
#: at most this grace (process start-up) plus one per-check budget (+ slack) per wave of the queue ahead of the check.
MV_START_GRACE_SECONDS = 60.0
MV_WAVE_SLACK_SECONDS = 2.0
#: Seconds between two "math-verify timed out" counter lines of one process (the first one is always printed).
MV_TIMEOUT_LOG_INTERVAL_SECONDS = 60.0


class _CheckTimeout(BaseException):
    """Raised by the per-check timer; a BaseException, so that math-verify's ``except Exception`` cannot swallow it."""


def _math_verify_check(pred: str, gold: str, timeout_seconds: float | None) -> tuple[bool, bool]:
    """(equal, timed_out) for two answer strings, in this thread; the whole check gets ``timeout_seconds``.

    The budget is one ``signal.setitimer`` around the check (math-verify's own per-operation alarms are off, as
    nested alarms would cancel each other), so it needs the main thread: elsewhere a set budget scores
    (False, False), as math-verify's signal-based timeouts did.
    """
    import signal
    import time

    timed = timeout_seconds is not None and timeout_seconds > 0
    armed = [False]
    installed = False
    old_handler = None
    old_timer = (0.0, 0.0)

    def on_alarm(signum, frame):
        if armed[0]:
            raise _CheckTimeout()

    start = time.monotonic()
    try:
        import math_verify.grader
        import math_verify.parser
        from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

        # math-verify's own alarms stay off (timeout None): the timer here replaces them, so skip its warning
        math_verify.parser.TIMEOUT_WARNING_SHOWN = True
        math_verify.grader.TIMEOUT_WARNING_SHOWN = True

        def _parse(text: str):
            parsed = parse("\\boxed{" + text + "}", extraction_config=[LatexExtractionConfig()], parsing_timeout=None)
            if not parsed:
                parsed = parse(
                    text, extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()], parsing_timeout=None
                )
            return parsed

        if timed:
            old_handler = signal.signal(signal.SIGALRM, on_alarm)  # ValueError off the main thread
            installed = True
            armed[0] = True
            # re-fires every 0.25 s, in case some library code catches BaseException and carries on
            old_timer = signal.setitimer(signal.ITIMER_REAL, float(timeout_seconds), 0.25)
        try:
            gold_parsed = _parse(gold)
            pred_parsed = _parse(pred)
            if not gold_parsed or not pred_parsed:
                return False, False
            return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None)), False
        finally:
            armed[0] = False
            if installed:
                signal.setitimer(signal.ITIMER_REAL, 0)
    except _CheckTimeout:
        return False, True
    except BaseException as exc:  # noqa: BLE001 - math-verify's TimeoutException is not an Exception subclass
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        try:
            from math_verify.errors import TimeoutException

            return False, isinstance(exc, TimeoutException)
        except Exception:  # noqa: BLE001
            return False, False
    finally:
        armed[0] = False
        if installed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old_handler if old_handler is not None else signal.SIG_DFL)
            if old_timer[0] > 0:  # a timer the caller had set: put back what is left of it
                remaining = max(old_timer[0] - (time.monotonic() - start), 1e-3)
                signal.setitimer(signal.ITIMER_REAL, remaining, old_timer[1])


def math_verify_equal(pred: str, gold: str, timeout_seconds: float | None = MV_TIMEOUT_SECONDS) -> bool:
    """math-verify equivalence of two answer strings (LaTeX or plain); False on any error or timeout.

    ``timeout_seconds`` bounds the whole check and needs the main thread (``signal.setitimer``).
    """
    return _math_verify_check(pred, gold, timeout_seconds)[0]


def _worker_init() -> None:
    """Pool initializer: import and warm math-verify, so that no check's budget pays for it."""
    _math_verify_check("1", "1", None)  # never raises


def _worker_check(pred: str, gold: str, timeout_seconds: float) -> tuple[bool, bool]:
    """One check in a pool process (its main thread): the per-check timer starts here, when the check starts."""
    return _math_verify_check(pred, gold, timeout_seconds)


def _available_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota if there is one."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def mv_timeout_seconds() -> float:
    """The per-check math-verify budget: ``OPD_REWARD_MV_TIMEOUT`` if set (seconds), else ``MV_TIMEOUT_SECONDS``."""
    value = os.environ.get("OPD_REWARD_MV_TIMEOUT")
    try:
        return float(value) if value not in (None, "") and float(value) > 0 else float(MV_TIMEOUT_SECONDS)
    except ValueError:
        return float(MV_TIMEOUT_SECONDS)


def mv_pool_size() -> int:
    """Processes of the math-verify pool: min(available CPUs, ``OPD_REWARD_MV_WORKERS`` or ``MV_MAX_WORKERS``)."""
    cap = MV_MAX_WORKERS
    value = os.environ.get("OPD_REWARD_MV_WORKERS")
    if value not in (None, ""):
        try:
            cap = int(value)
        except ValueError:
            pass
    return max(1, min(_available_cpus(), cap))


_pool = None
_pool_size = 0
_pool_lock = threading.Lock()
_inflight = 0  # checks submitted to the pool and not finished: the queue a new check joins
_inflight_lock = threading.Lock()
_stats = {"checks": 0, "timeouts": 0}
_stats_lock = threading.Lock()
_last_timeout_log = [None]


def _get_pool():
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            init = _pool_target("_worker_init")
            _pool_size = mv_pool_size()
            _pool = ProcessPoolExecutor(
                max_workers=_pool_size, mp_context=multiprocessing.get_context("spawn"), initializer=init
            )
        return _pool


def _reset_pool(only=None) -> None:
    """Shut the pool down (``only``: just if it is still that pool, e.g. the one a check found broken)."""
    global _pool, _pool_size
    with _pool_lock:
        if only is not None and _pool is not only:
            return
        if _pool is not None:
            _pool.shutdown(wait=False, cancel_futures=True)
        _pool = None
        _pool_size = 0


def _pool_target(name: str = "_worker_check"):
    """``name`` of this module under an importable module name, so a spawned process can unpickle it.

    verl loads a file-path reward module under a made-up name (``custom_module_<hash>``) that a fresh process
    cannot import; the package imports this module by its real name, so a worker can import it too.
    """
    if __name__ == "opd_verl.rewards.math":
        return globals()[name]
    try:
        import importlib

        return getattr(importlib.import_module("opd_verl.rewards.math"), name)
    except Exception:  # noqa: BLE001
        return None


def math_verify_stats() -> dict[str, int]:
    """This process's math-verify counters: checks run and checks that timed out."""
    with _stats_lock:
        return dict(_stats)


def _count_check(timed_out: bool, budget: float) -> None:
    import sys
    import time

    with _stats_lock:
        _stats["checks"] += 1
        if not timed_out:
            return
        _stats["timeouts"] += 1
        timeouts, checks = _stats["timeouts"], _stats["checks"]
        now = time.monotonic()
        last = _last_timeout_log[0]
        if last is not None and now - last < MV_TIMEOUT_LOG_INTERVAL_SECONDS:
            return
        _last_timeout_log[0] = now
    print(
        f"opd_verl.rewards: math-verify timed out on {timeouts} of {checks} checks in this process "
        f"(pid {os.getpid()}; {budget:g} s per check, OPD_REWARD_MV_TIMEOUT; scored 0.0)",
        file=sys.stderr,
        flush=True,
    )


def _math_verify_any_thread(pred: str, gold: str) -> tuple[bool, bool]:
    """(equal, timed_out): in this thread on the main thread, else in the pool, each check on its own budget."""
    global _inflight
    budget = mv_timeout_seconds()
    if threading.current_thread() is threading.main_thread():
        equal, timed_out = _math_verify_check(pred, gold, budget)
        _count_check(timed_out, budget)
        return equal, timed_out
    target = _pool_target()
    if target is None:
        # No importable copy of this module for a worker process: check without a timeout.
        return _math_verify_check(pred, gold, None)[0], False
    from concurrent.futures import TimeoutError as FuturesTimeoutError
    from concurrent.futures.process import BrokenProcessPool

    def _done(_future) -> None:
        global _inflight
        with _inflight_lock:
            _inflight -= 1

    pool = None
    try:
        pool = _get_pool()
        size = max(1, _pool_size)
        with _inflight_lock:
            ahead = _inflight
            _inflight += 1
        try:
            future = pool.submit(target, pred, gold, budget)
        except BaseException:
            _done(None)
            raise
        future.add_done_callback(_done)
        # the worker times the check itself; this deadline only catches a worker that cannot be interrupted
        waves = ahead // size + 1
        deadline = MV_START_GRACE_SECONDS + waves * (budget + MV_WAVE_SLACK_SECONDS)
        try:
            equal, timed_out = future.result(timeout=deadline)
        except FuturesTimeoutError:
            equal, timed_out = False, True
        _count_check(timed_out, budget)
        return bool(equal), bool(timed_out)
    except BrokenProcessPool:  # a worker process died (e.g. out of memory): the next check starts a new pool
        _reset_pool(only=pool)
        return False, False
    except Exception:  # noqa: BLE001
        return False, False


def _boxed_score(solution_str: str, ground_truth: Any) -> tuple[float, bool]:
    answer = last_boxed_content(solution_str)
    if answer is None or ground_truth is None:
        return 0.0, False
    gold = str(ground_truth).strip()
    if gold.startswith("\\boxed") or gold.startswith("\\fbox"):
        gold = last_boxed_content(gold) or gold
    if not answer or not gold:
        return 0.0, False
    if _plain(answer) == _plain(gold):
        return 1.0, False
    equal, timed_out = _math_verify_any_thread(answer, gold)
    return (1.0 if equal else 0.0), timed_out


def boxed_score(solution_str: str, ground_truth: Any) -> float:
    """1.0 if the last ``\\boxed{}`` of the response is math-verify-equal to the ground truth, else 0.0."""
    return _boxed_score(solution_str, ground_truth)[0]


# --------------------------------------------------------------------------------------------------------------
# the math reward
# --------------------------------------------------------------------------------------------------------------


def answer_style(data_source: str) -> str:
    """"gsm8k", "boxed" or "unknown" for a data_source string."""
    if data_source in ANSWER_STYLE:
        return ANSWER_STYLE[data_source]
    name = str(data_source or "").lower()
    if "gsm8k" in name:
        return "gsm8k"
    if any(hint in name for hint in _MATH_NAME_HINTS):
        return "boxed"
    return "unknown"


def math_score(data_source: str, solution_str: str, ground_truth: Any) -> tuple[float, bool]:
    """(score, math-verify timed out) for one response; never raises."""
    try:
        if not isinstance(solution_str, str) or not solution_str:
            return 0.0, False
        style = answer_style(data_source)
        if style == "gsm8k":
            if extract_hash_answer(solution_str) is not None:
                return gsm8k_score(solution_str, ground_truth), False
            return _boxed_score(solution_str, ground_truth)
        if style == "boxed":
            return _boxed_score(solution_str, ground_truth)
        score = gsm8k_score(solution_str, ground_truth)
        return (score, False) if score > 0 else _boxed_score(solution_str, ground_truth)
    except Exception:  # noqa: BLE001 - a reward must never take the trainer down
        return 0.0, False
