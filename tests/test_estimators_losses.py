"""The registered estimators and losses, called as verl calls them, against float64 brute force."""

import types

import numpy as np
import pytest
import torch
from verl.trainer.ppo import core_algos

import opd_verl.plugin  # noqa: F401  (registration; verl also does it through the entry point)

OPD = {"adv_clip_min": -1.0, "adv_clip_max": 0.5, "discount": 0.0, "hybrid_alpha": 0.3}


def _batch(seed=0, rows=6, length=7):
    g = torch.Generator().manual_seed(seed)
    s = -torch.rand(rows, length, generator=g, dtype=torch.float64) * 3
    q = -torch.rand(rows, length, generator=g, dtype=torch.float64) * 3
    lengths = torch.randint(1, length + 1, (rows,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).to(torch.float32)
    scores = torch.zeros(rows, length)
    scores[torch.arange(rows), lengths - 1] = torch.rand(rows, generator=g)
    return s.float(), q.float(), mask, scores


def test_opd_estimator_matches_brute_force():
    s, q, mask, scores = _batch()
    metrics = {}
    fn = core_algos.get_adv_estimator_fn("opd")
    adv, returns = fn(scores, mask, teacher_log_prob=q, student_log_prob=s, opd_config=OPD, metrics=metrics)
    for i in range(s.shape[0]):
        for t in range(s.shape[1]):
            expected = min(max(float(q[i, t]) - float(s[i, t]), -1.0), 0.5) if mask[i, t] else 0.0
            assert abs(float(adv[i, t]) - expected) < 1e-6
    assert torch.equal(adv, returns)
    clipped = sum(
        1 for i in range(s.shape[0]) for t in range(s.shape[1])
        if mask[i, t] and not -1.0 <= float(q[i, t] - s[i, t]) <= 0.5
    )
    assert metrics["opd/adv_clip_frac"] == pytest.approx(clipped / float(mask.sum()))


def test_opd_estimator_called_by_plain_verl_explains_itself():
    s, q, mask, scores = _batch()
    with pytest.raises(ValueError, match="python -m opd_verl.main_opd"):
        core_algos.get_adv_estimator_fn("opd")(scores, mask, config=None, index=np.arange(6))


def test_hybrid_alpha_zero_is_grpo_bit_for_bit():
    s, q, mask, scores = _batch(seed=3)
    index = np.array(["a", "a", "a", "b", "b", "b"], dtype=object)
    base, base_returns = core_algos.compute_grpo_outcome_advantage(scores, mask, index)
    fn = core_algos.get_adv_estimator_fn("opd_hybrid")
    adv, returns = fn(
        scores, mask, index=index, base_advantages=base, base_returns=base_returns,
        teacher_log_prob=q, student_log_prob=s, opd_config={**OPD, "hybrid_alpha": 0.0},
    )
    assert torch.equal(adv, base) and torch.equal(returns, base_returns)


def test_hybrid_adds_the_kl_term_after_normalisation():
    s, q, mask, scores = _batch(seed=4)
    index = np.array(["a", "a", "a", "b", "b", "b"], dtype=object)
    base, _ = core_algos.compute_grpo_outcome_advantage(scores, mask, index)
    adv, _ = core_algos.get_adv_estimator_fn("opd_hybrid")(
        scores, mask, index=index, base_advantages=base, teacher_log_prob=q, student_log_prob=s, opd_config=OPD
    )
    for i in range(s.shape[0]):
        for t in range(s.shape[1]):
            term = min(max(float(q[i, t]) - float(s[i, t]), -1.0), 0.5) if mask[i, t] else 0.0
            assert abs(float(adv[i, t]) - (float(base[i, t]) + 0.3 * term)) < 1e-6


def test_importance_sampling_loss_matches_brute_force():
    g = torch.Generator().manual_seed(7)
    old = -torch.rand(3, 5, generator=g, dtype=torch.float64)
    new = (old + 0.3 * torch.randn(3, 5, generator=g, dtype=torch.float64)).requires_grad_()
    adv = torch.randn(3, 5, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.float64)
    config = types.SimpleNamespace(global_batch_info={})
    loss, metrics = core_algos.get_policy_loss_fn("importance_sampling")(old, new, adv, mask, "token-mean", config)
    terms = [-float(adv[i, t]) * np.exp(float(new[i, t]) - float(old[i, t])) for i in range(3) for t in range(5) if mask[i, t]]
    assert abs(float(loss) - sum(terms) / len(terms)) < 1e-9
    # unclipped: the gradient is -A * ratio / N for every token, even far from ratio 1
    (grad,) = torch.autograd.grad(loss, new)
    expected = -adv * torch.exp(new.detach() - old) * mask / mask.sum()
    assert torch.allclose(grad, expected, atol=1e-12)
    assert "actor/is_ratio_mean" in metrics


def test_distill_metrics_per_data_source_brute_force():
    """opd/kl_per_token/<data_source> (routed teachers): the mean s - q over each source's tokens with a finite q,
    a token-weighted mean (not a mean of per-sample means); the overall metrics are unchanged; a source whose
    tokens are all invalid gets no value."""
    from opd_verl.verl_ext.estimators import distill_metrics

    s, q, mask, _ = _batch(seed=4, rows=7)
    q[1, 0] = float("-inf")  # an invalid token is left out of its source's mean
    q[6, :] = float("nan")  # source "c": no finite token at all
    sources = ["a/x", "b", "a/x", "b", "b", "a/x", "c"]
    ours = distill_metrics(q, s, mask, np.array(sources, dtype=object))
    assert ours == {**distill_metrics(q, s, mask), **{k: v for k, v in ours.items() if k.count("/") > 1}}
    for source in ("a/x", "b"):
        terms = [float(s[i, t]) - float(q[i, t]) for i in range(7) for t in range(s.shape[1])
                 if sources[i] == source and mask[i, t] and np.isfinite(float(q[i, t]))]
        assert ours[f"opd/kl_per_token/{source}"] == pytest.approx(sum(terms) / len(terms), rel=1e-12)
    assert "opd/kl_per_token/c" not in ours
    assert set(ours) - set(distill_metrics(q, s, mask)) == {"opd/kl_per_token/a/x", "opd/kl_per_token/b"}
    with pytest.raises(ValueError, match="data_source"):
        distill_metrics(q, s, mask, sources[:3])
