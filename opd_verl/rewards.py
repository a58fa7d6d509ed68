"""Rule rewards for the math data sets the OPD recipes train and validate on.

Use it as verl 0.9.1's custom reward function (verl calls it, in the reward loop's naive manager, as
``compute_score(data_source=..., solution_str=..., ground_truth=..., extra_info=..., **reward_kwargs)``
and accepts a float; ``reward_kwargs`` come from ``reward.custom_reward_function.reward_kwargs``)::

    reward.custom_reward_function.path=pkg://opd_verl.rewards
    reward.custom_reward_function.name=compute_score

``path`` may also be the file itself (``reward.custom_reward_function.path=/path/to/opd_verl/rewards.py``);
verl's legacy top-level keys ``custom_reward_function.path`` / ``custom_reward_function.name`` are migrated
to the ``reward.`` ones by verl. Rows are routed by their ``data_source`` column (verl's
``data.reward_fn_key=data_source``, the default).

Scoring, 1.0 or 0.0:

- GSM8K style (``data_source`` contains "gsm8k"): the number after the *last* ``####`` in the response,
  normalised (commas, ``$``, trailing ``.0``/``.``), compared exactly as a rational number with the ground
  truth; a response without ``####`` falls back to its last ``\\boxed{}``.
- Math sets (DeepMath, AIME, MATH-500, OpenThoughts3 and anything whose name says math/aime/amc): the content
  of the response's last ``\\boxed{}`` checked against the ground truth with math-verify.
- Any other source: both checkers, the better score.

A missing answer, a parse error or a math-verify timeout scores 0.0; nothing here raises on bad model output.
math-verify's timeouts use ``signal.alarm``, which only works in the main thread, while verl calls the reward
from an executor thread: off the main thread the math-verify check runs in a small spawned process pool
(``OPD_REWARD_MV_WORKERS`` processes, default 1), as verl's own math-verify reward does.

This module is also the one place that names the ``data_source`` strings the preprocess scripts write
(``DATA_SOURCES``); the teacher routing (``opd.teachers[*].data_source``) must use the same strings. Where
verl's default reward knows a data set, the same string is used so verl's default scorer also applies.
It imports nothing heavy at import time (math-verify is loaded on first use), so the preprocess scripts can
import it cheaply.
"""

from __future__ import annotations

import os
import re
import threading
from fractions import Fraction
from typing import Any

# --------------------------------------------------------------------------------------------------------------
# data_source strings: the one place they are defined.
# --------------------------------------------------------------------------------------------------------------

GSM8K = "openai/gsm8k"
DEEPMATH = "zwhe99/DeepMath-103K"
OPENTHOUGHTS3 = "open-thoughts/OpenThoughts3-1.2M"
AIME2024 = "aime2024"
MATH500 = "HuggingFaceH4/MATH-500"

#: preprocess script name -> the data_source string its rows carry.
DATA_SOURCES: dict[str, str] = {
    "gsm8k": GSM8K,
    "deepmath": DEEPMATH,
    "openthoughts3": OPENTHOUGHTS3,
    "aime2024": AIME2024,
    "math500": MATH500,
}

#: data_source -> answer style ("gsm8k": ``####`` answers, "boxed": ``\boxed{}`` answers).
ANSWER_STYLE: dict[str, str] = {
    GSM8K: "gsm8k",
    DEEPMATH: "boxed",
    OPENTHOUGHTS3: "boxed",
    AIME2024: "boxed",
    MATH500: "boxed",
}

#: The instruction appended to every prompt, per answer style; the checkers below read exactly this format.
INSTRUCTIONS: dict[str, str] = {
    "gsm8k": 'Let\'s think step by step and output the final answer after "####".',
    "boxed": "Please reason step by step, and put your final answer within \\boxed{}.",
}

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


#: Seconds for each math-verify parse / comparison (math-verify's own signal-based limit).
MV_TIMEOUT_SECONDS = 5
#: Seconds to wait for the worker process off the main thread before scoring 0.0.
MV_POOL_TIMEOUT_SECONDS = 30.0


def math_verify_equal(pred: str, gold: str, timeout_seconds: int | None = MV_TIMEOUT_SECONDS) -> bool:
    """math-verify equivalence of two answer strings (LaTeX or plain); False on any error or timeout.

    Needs the main thread when ``timeout_seconds`` is set (math-verify uses ``signal.alarm``).
    """
    try:
        from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

        def _parse(text: str):
            parsed = parse(
                "\\boxed{" + text + "}", extraction_config=[LatexExtractionConfig()], parsing_timeout=timeout_seconds
            )
            if not parsed:
                parsed = parse(
                    text,
                    extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
                    parsing_timeout=timeout_seconds,
                )
            return parsed

        gold_parsed = _parse(gold)
        pred_parsed = _parse(pred)
        if not gold_parsed or not pred_parsed:
            return False
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout_seconds))
    except BaseException as exc:  # noqa: BLE001 - math-verify's TimeoutException is not an Exception subclass
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        return False


_pool = None
_pool_lock = threading.Lock()


def _get_pool():
    global _pool
    with _pool_lock:
        if _pool is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            workers = max(1, int(os.environ.get("OPD_REWARD_MV_WORKERS", "1")))
            _pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
        return _pool


def _reset_pool() -> None:
    global _pool
    with _pool_lock:
        if _pool is not None:
            _pool.shutdown(wait=False, cancel_futures=True)
        _pool = None


def _pool_target():
    """``math_verify_equal`` under an importable module name, so a spawned process can unpickle it.

    verl loads a file-path reward module under a made-up name (``custom_module_<hash>``) that a fresh process
    cannot import; ``pkg://opd_verl.rewards`` (or an installed opd_verl) gives the real one.
    """
    if __name__ == "opd_verl.rewards":
        return math_verify_equal
    try:
        from opd_verl.rewards import math_verify_equal as target

        return target
    except Exception:  # noqa: BLE001
        return None


def _math_verify_equal_any_thread(pred: str, gold: str) -> bool:
    if threading.current_thread() is threading.main_thread():
        return math_verify_equal(pred, gold)
    target = _pool_target()
    if target is None:
        # No importable copy of this module for a worker process: check without math-verify's timeout.
        return math_verify_equal(pred, gold, timeout_seconds=None)
    from concurrent.futures import TimeoutError as FuturesTimeoutError
    from concurrent.futures.process import BrokenProcessPool

    try:
        future = _get_pool().submit(target, pred, gold)
        return bool(future.result(timeout=MV_POOL_TIMEOUT_SECONDS))
    except FuturesTimeoutError:
        return False
    except BrokenProcessPool:
        _reset_pool()
        return False
    except Exception:  # noqa: BLE001
        return False


def boxed_score(solution_str: str, ground_truth: Any) -> float:
    """1.0 if the last ``\\boxed{}`` of the response is math-verify-equal to the ground truth, else 0.0."""
    answer = last_boxed_content(solution_str)
    if answer is None or ground_truth is None:
        return 0.0
    gold = str(ground_truth).strip()
    if gold.startswith("\\boxed") or gold.startswith("\\fbox"):
        gold = last_boxed_content(gold) or gold
    if not answer or not gold:
        return 0.0
    if _plain(answer) == _plain(gold):
        return 1.0
    return 1.0 if _math_verify_equal_any_thread(answer, gold) else 0.0


# --------------------------------------------------------------------------------------------------------------
# verl entry point
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


def compute_score(
    data_source: str, solution_str: str, ground_truth: Any, extra_info: dict | None = None, **kwargs: Any
) -> float:
    """verl custom reward function: 1.0 for a correct final answer, else 0.0 (see the module docstring)."""
    try:
        if not isinstance(solution_str, str) or not solution_str:
            return 0.0
        style = answer_style(data_source)
        if style == "gsm8k":
            if extract_hash_answer(solution_str) is not None:
                return gsm8k_score(solution_str, ground_truth)
            return boxed_score(solution_str, ground_truth)
        if style == "boxed":
            return boxed_score(solution_str, ground_truth)
        score = gsm8k_score(solution_str, ground_truth)
        return score if score > 0 else boxed_score(solution_str, ground_truth)
    except Exception:  # noqa: BLE001 - a reward must never take the trainer down
        return 0.0
