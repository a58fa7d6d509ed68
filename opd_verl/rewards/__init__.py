"""Rule rewards for the data sets the OPD recipes train and validate on: math answers, code run against its
tests, and IFEval's verifiable instructions, dispatched by ``data_source``.

Use it as verl 0.9.1's custom reward function (verl calls it, in the reward loop's naive manager, as
``compute_score(data_source=..., solution_str=..., ground_truth=..., extra_info=..., **reward_kwargs)``
and accepts a float, or a dict with a ``score`` whose other keys become reward extra info; ``reward_kwargs``
come from ``reward.custom_reward_function.reward_kwargs``)::

    reward.custom_reward_function.path=pkg://opd_verl.rewards
    reward.custom_reward_function.name=compute_score

``path`` may also be the file itself (``reward.custom_reward_function.path=/path/to/opd_verl/rewards/__init__.py``);
verl's legacy top-level keys ``custom_reward_function.path`` / ``custom_reward_function.name`` are migrated
to the ``reward.`` ones by verl. Rows are routed by their ``data_source`` column (verl's
``data.reward_fn_key=data_source``, the default), through ``sources.task_of``:

- math (GSM8K, DeepMath, OpenThoughts3, AIME 2024, MATH-500 and any source not named below): ``math.py``;
- code (HumanEval, MBPP, KodCode, or a name containing humaneval/mbpp/kodcode): the completion's code run against
  the row's tests in a confined process, ``code.py`` and ``sandbox.py``; 1.0 when every test passes;
- ifeval (IFEval, or a name containing ifeval): lm-eval's IFEval instruction checks, ``ifeval.py``; 1.0 when
  every instruction of the prompt is followed (prompt-level strict).

Every response scores 0.0 or 1.0 and nothing here raises on bad model output. ``compute_score_with_info``
(``reward.custom_reward_function.name=compute_score_with_info``) returns the same score as a dict with the same
keys for every task (``INFO_KEYS``; verl's agent loop takes a batch's keys from its first row, so a mixed batch
needs one key set; a key that does not apply to a row's task is 0): ``score``, ``acc`` (the same value),
``math_verify_timeout``, ``code_tests_passed`` (fraction of the row's tests that passed), ``code_timeout`` (the
run hit its wall or CPU time limit), ``code_blocked`` (the sandbox stopped a forbidden operation: a network
socket, a new process, a write outside the working directory), ``ifeval_prompt_strict``, ``ifeval_prompt_loose``
(1 when all instructions are followed), ``ifeval_inst_total``, ``ifeval_inst_strict``, ``ifeval_inst_loose``
(instruction counts; instruction-level accuracy = followed / total). verl's validation logs each key as
``val-aux/<data_source>/<key>/mean@N``; verl 0.9.1 logs no reward extra info of training batches (it keeps them
in the rollout dumps).

Importing this package is cheap (math-verify, the sandbox and lm-eval load on first use), so the preprocess
scripts import the ``data_source`` strings from it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

if __name__ != "opd_verl.rewards":  # loaded by file path (verl's custom_module_<hash>): make the package importable
    _root = str(Path(__file__).resolve().parents[2])
    if _root not in sys.path:
        sys.path.append(_root)

from opd_verl.rewards.math import (  # noqa: E402
    answer_style,
    boxed_score,
    extract_hash_answer,
    gsm8k_score,
    last_boxed_content,
    math_score,
    math_verify_equal,
    math_verify_stats,
    normalize_number,
)
from opd_verl.rewards.sources import (  # noqa: E402
    AIME2024,
    ANSWER_STYLE,
    DATA_SOURCES,
    DEEPMATH,
    GSM8K,
    HUMANEVAL,
    IFEVAL,
    INSTRUCTIONS,
    KODCODE,
    MATH500,
    MBPP,
    OPENTHOUGHTS3,
    TASKS,
    task_of,
)

__all__ = [
    "AIME2024", "ANSWER_STYLE", "DATA_SOURCES", "DEEPMATH", "GSM8K", "HUMANEVAL", "IFEVAL", "INFO_KEYS",
    "INSTRUCTIONS", "KODCODE", "MATH500", "MBPP", "OPENTHOUGHTS3", "TASKS", "answer_style", "boxed_score",
    "compute_score", "compute_score_with_info", "extract_hash_answer", "gsm8k_score", "last_boxed_content",
    "math_score", "math_verify_equal", "math_verify_stats", "normalize_number", "task_of",
]

#: The keys of every ``compute_score_with_info`` dict, whatever the row's task.
INFO_KEYS = (
    "score", "acc", "math_verify_timeout", "code_tests_passed", "code_timeout", "code_blocked",
    "ifeval_prompt_strict", "ifeval_prompt_loose", "ifeval_inst_total", "ifeval_inst_strict", "ifeval_inst_loose",
)


def _info(data_source: str, solution_str: str, ground_truth: Any, extra_info: dict | None, kwargs: dict) -> dict:
    from opd_verl.rewards.code import code_score, limits_from

    limits_from(kwargs)  # a mistyped code_* kwarg is an error at the first row, whatever its task
    info: dict[str, float | int] = dict.fromkeys(INFO_KEYS, 0)
    task = task_of(data_source)
    if task == "code":
        info.update(code_score(solution_str, ground_truth, **kwargs).info())
    elif task == "ifeval":
        from opd_verl.rewards.ifeval import ifeval_score

        info.update(ifeval_score(solution_str, ground_truth).info())
    else:
        score, timed_out = math_score(data_source, solution_str, ground_truth)
        info.update(score=score, math_verify_timeout=int(timed_out))
    info["score"] = float(info["score"])
    info["acc"] = info["score"]
    return info


def compute_score(
    data_source: str, solution_str: str, ground_truth: Any, extra_info: dict | None = None, **kwargs: Any
) -> float:
    """verl custom reward function: 1.0 for a correct answer / passing code / all instructions followed, else 0.0.

    ``kwargs`` (``reward.custom_reward_function.reward_kwargs``): the code sandbox's limits (``code.LIMIT_KWARGS``);
    other keys verl passes are ignored."""
    return _info(data_source, solution_str, ground_truth, extra_info, kwargs)["score"]


def compute_score_with_info(
    data_source: str, solution_str: str, ground_truth: Any, extra_info: dict | None = None, **kwargs: Any
) -> dict[str, float | int]:
    """``compute_score`` as the dict verl's reward managers accept, with the ``INFO_KEYS`` (see the docstring)."""
    return _info(data_source, solution_str, ground_truth, extra_info, kwargs)
