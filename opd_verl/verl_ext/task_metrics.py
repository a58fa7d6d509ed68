"""Per-task (per data_source) reward metrics of a training step (pure; the OPD trainer feeds it the batch).

verl 0.9.1 logs the reward of a training batch only as a whole (critic/score/*) and its reward extra info not at
all (only validation splits both by data_source). A run over several tasks (math, code, instruction following)
needs each task's own numbers:

- ``opd/reward/<data_source>``: the mean sequence score of that data_source's samples;
- ``opd/reward_extra/<key>/<data_source>``: the mean of each numeric reward extra info ``key`` the reward function
  returned for that data_source's samples (``reward.custom_reward_function.name=compute_score_with_info``: e.g.
  code_tests_passed, code_timeout, code_blocked of a code source; ifeval_prompt_strict, ifeval_inst_strict /
  ifeval_inst_total of an IFEval source); samples without the key, or with a non-numeric value, are left out of
  its mean. ``score`` and ``acc`` (the reward itself) and the keys of another task (opd_verl.rewards gives every
  row every task's keys, 0 where they do not apply: ``code_*`` on a math source) are left out.

The per-task KL (``opd/kl_per_token/<data_source>``) comes from `opd_verl.verl_ext.estimators.distill_metrics`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

REWARD_PREFIX = "opd/reward/"
REWARD_EXTRA_PREFIX = "opd/reward_extra/"


def per_task(data_sources: Sequence[str], routed: bool) -> bool:
    """Per-task metrics are logged for a batch of several data_sources, or whenever the teachers are routed."""
    return routed or len(set(data_sources)) > 1


#: Reward extra info keys that repeat the score (opd/reward/<data_source> has it).
SCORE_KEYS = ("score", "acc")


def applies(key: str, data_source: str) -> bool:
    """Whether a reward extra info key belongs to the data_source's task: a key named after a task (``code_*``,
    ``ifeval_*``, ``math_*``: opd_verl.rewards.TASKS) only to that task's sources; any other key to every source."""
    from opd_verl.rewards import TASKS, task_of

    prefix = key.split("_", 1)[0]
    return key not in SCORE_KEYS and (prefix not in set(TASKS.values()) or prefix == task_of(data_source))


def _number(value) -> float | None:
    if isinstance(value, bool):
        return float(value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def reward_metrics(
    data_sources: Sequence[str], scores: Sequence[float], extra_infos: Sequence[Mapping | None] | None = None
) -> dict[str, float]:
    """{opd/reward/<source>: mean score, opd/reward_extra/<key>/<source>: mean of key} over each source's
    samples (``scores``: one sequence score per sample; ``extra_infos``: one reward extra info dict per sample)."""
    sources = [str(x) for x in data_sources]
    if len(scores) != len(sources) or (extra_infos is not None and len(extra_infos) != len(sources)):
        raise ValueError(f"{len(sources)} data_source values for {len(scores)} scores"
                         + ("" if extra_infos is None else f" and {len(extra_infos)} reward extra infos"))
    metrics: dict[str, float] = {}
    for source in sorted(set(sources)):
        rows = [i for i, x in enumerate(sources) if x == source]
        metrics[REWARD_PREFIX + source] = sum(float(scores[i]) for i in rows) / len(rows)
        values: dict[str, list[float]] = {}
        for i in rows:
            for key, value in ((extra_infos[i] or {}) if extra_infos is not None else {}).items():
                number = _number(value)
                if number is not None and applies(str(key), source):
                    values.setdefault(str(key), []).append(number)
        for key, numbers in sorted(values.items()):
            metrics[f"{REWARD_EXTRA_PREFIX}{key}/{source}"] = sum(numbers) / len(numbers)
    return metrics
