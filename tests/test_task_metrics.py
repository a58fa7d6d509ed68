"""opd_verl.verl_ext.task_metrics: per data_source reward metrics against a brute-force recount."""

from __future__ import annotations

import random

import pytest

from opd_verl.verl_ext.task_metrics import per_task, reward_metrics


def test_reward_metrics_match_a_recount_per_data_source():
    rng = random.Random(0)
    sources = [rng.choice(["openai/gsm8k", "mbpp", "google/IFEval"]) for _ in range(40)]
    scores = [rng.random() for _ in sources]
    extras = []
    for source in sources:
        if source == "mbpp":
            extras.append({"pass_rate": rng.random(), "timeout": rng.random() < 0.3, "error": "SyntaxError",
                           "score": 5.0})
        elif source == "google/IFEval":
            extras.append({"prompt_strict": rng.random() < 0.5, "inst_loose": float("nan")} if rng.random() < 0.8 else None)
        else:
            extras.append({})
    ours = reward_metrics(sources, scores, extras)
    for source in set(sources):
        rows = [i for i, x in enumerate(sources) if x == source]
        assert ours[f"opd/reward/{source}"] == pytest.approx(sum(scores[i] for i in rows) / len(rows), rel=1e-12)
    code = [i for i, x in enumerate(sources) if x == "mbpp"]
    assert ours["opd/reward_extra/pass_rate/mbpp"] == pytest.approx(sum(extras[i]["pass_rate"] for i in code) / len(code))
    assert ours["opd/reward_extra/timeout/mbpp"] == pytest.approx(sum(extras[i]["timeout"] for i in code) / len(code))
    chat = [i for i, x in enumerate(sources) if x == "google/IFEval" and extras[i]]  # samples without the info: left out
    assert ours["opd/reward_extra/prompt_strict/google/IFEval"] == pytest.approx(
        sum(extras[i]["prompt_strict"] for i in chat) / len(chat))
    # a string and a nan are no numbers: no metric
    assert not [k for k in ours if "error" in k or "inst_loose" in k]
    assert not [k for k in ours if k.startswith("opd/reward_extra/") and k.endswith("openai/gsm8k")]


def test_reward_extra_keys_of_another_task_and_the_score_are_left_out():
    """opd_verl.rewards gives every row every task's keys (0 where they do not apply): a code key is logged for a
    code source only, an IFEval key for an IFEval source only; score/acc repeat opd/reward/<data_source>."""
    from opd_verl.rewards import GSM8K, IFEVAL, INFO_KEYS, MBPP

    sources = [GSM8K, MBPP, IFEVAL, "my_set"]
    infos = [dict.fromkeys(INFO_KEYS, 1) for _ in sources]
    ours = reward_metrics(sources, [1.0] * 4, infos)
    extra = {k.removeprefix("opd/reward_extra/") for k in ours if k.startswith("opd/reward_extra/")}
    assert extra == {f"math_verify_timeout/{GSM8K}", f"math_verify_timeout/my_set",  # an unknown source is math
                     *(f"{k}/{MBPP}" for k in INFO_KEYS if k.startswith("code_")),
                     *(f"{k}/{IFEVAL}" for k in INFO_KEYS if k.startswith("ifeval_"))}


def test_reward_metrics_refuse_mismatched_lengths_and_per_task_rule():
    with pytest.raises(ValueError, match="data_source"):
        reward_metrics(["a", "b"], [1.0])
    with pytest.raises(ValueError, match="reward extra infos"):
        reward_metrics(["a", "b"], [1.0, 0.0], [{}])
    assert reward_metrics(["a", "a"], [1.0, 0.0]) == {"opd/reward/a": 0.5}
    assert per_task(["a", "b"], routed=False) and per_task(["a"], routed=True) and not per_task(["a", "a"], routed=False)
