"""OPD advantage estimators (verl extension point: core_algos.register_adv_est).

verl calls an estimator with token_level_rewards, response_mask, config and index only. The OPD trainer
(opd_verl.verl_ext.trainer) also passes the teacher's and the student's log-probs of the sampled tokens, the `opd:`
options and, for the hybrid, the base estimator's advantages computed (and normalised) by verl first.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from verl.trainer.ppo.core_algos import register_adv_est
from verl.utils.torch_functional import masked_mean

from opd_verl.algorithms.advantages import hybrid_advantage, opd_token_advantage


def _require(value, name: str, estimator: str):
    if value is None:
        raise ValueError(
            f"algorithm.adv_estimator={estimator} needs {name}, which verl's own trainer does not pass; "
            "run through `python -m opd_verl.main_opd`"
        )
    return value


#: opd/kl_per_token/<data_source>: the KL of one data_source's samples (logged for a batch of several data_sources
#: or routed teachers: opd_verl.verl_ext.task_metrics.per_task)
KL_PER_SOURCE_PREFIX = "opd/kl_per_token/"


def distill_metrics(teacher_log_prob, student_log_prob, response_mask, data_sources=None) -> dict[str, float]:
    """Per-token means over response tokens: student and teacher log-probs and the k1 reverse KL s - q.

    ``data_sources`` (one name per sample, the batch's data_source field): also the KL of each data_source's own
    samples, ``opd/kl_per_token/<data_source>`` (a mean over that source's tokens with a finite q; sources whose
    tokens are all invalid are left out)."""
    finite = torch.isfinite(teacher_log_prob) & response_mask.bool()
    s = student_log_prob.double()
    q = torch.where(finite, teacher_log_prob.double(), torch.zeros_like(s))
    metrics = {
        "opd/kl_per_token": masked_mean(s - q, finite).item(),
        "opd/teacher_logprob": masked_mean(q, finite).item(),
        "opd/student_logprob": masked_mean(s, response_mask).item(),
        "opd/teacher_invalid_frac": 1.0 - masked_mean(finite.double(), response_mask).item(),
    }
    if data_sources is not None:
        sources = [str(x) for x in data_sources]
        if len(sources) != s.shape[0]:
            raise ValueError(f"{len(sources)} data_source values for a batch of {s.shape[0]} samples")
        kl, count = ((s - q) * finite).sum(-1), finite.sum(-1)
        for source in sorted(set(sources)):
            rows = torch.tensor([x == source for x in sources], device=kl.device)
            tokens = int(count[rows].sum())
            if tokens:
                metrics[KL_PER_SOURCE_PREFIX + source] = float(kl[rows].sum()) / tokens
    return metrics


@register_adv_est("opd")
def compute_opd_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    config=None,
    index=None,
    *,
    teacher_log_prob: torch.Tensor | None = None,
    student_log_prob: torch.Tensor | None = None,
    opd_config: Mapping | None = None,
    metrics: dict | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A_t = clip(q_t - s_t, adv_clip_min, adv_clip_max), discounted by opd.discount (0: per token)."""
    q = _require(teacher_log_prob, "the teacher's log-probs", "opd")
    s = _require(student_log_prob, "the student's log-probs", "opd")
    opd = _require(opd_config, "the opd options", "opd")
    result = opd_token_advantage(
        q, s, response_mask, float(opd["adv_clip_min"]), float(opd["adv_clip_max"]), float(opd["discount"])
    )
    if metrics is not None:
        metrics["opd/adv_clip_frac"] = result.clip_frac.item()
        metrics["opd/kl_coef"] = 1.0
    advantages = result.advantages.to(torch.float32)
    return advantages, advantages


@register_adv_est("opd_hybrid")
def compute_opd_hybrid_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    config=None,
    index=None,
    *,
    base_advantages: torch.Tensor | None = None,
    base_returns: torch.Tensor | None = None,
    teacher_log_prob: torch.Tensor | None = None,
    student_log_prob: torch.Tensor | None = None,
    opd_config: Mapping | None = None,
    metrics: dict | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A_t = A_base,t - alpha * (s_t - q_t), the KL term added after the base estimator's normalisation."""
    base = _require(base_advantages, "the base estimator's advantages", "opd_hybrid")
    q = _require(teacher_log_prob, "the teacher's log-probs", "opd_hybrid")
    s = _require(student_log_prob, "the student's log-probs", "opd_hybrid")
    opd = _require(opd_config, "the opd options", "opd_hybrid")
    alpha = float(opd["hybrid_alpha"])
    advantages = hybrid_advantage(
        base, q, s, response_mask, alpha, clip_min=float(opd["adv_clip_min"]), clip_max=float(opd["adv_clip_max"])
    )
    if metrics is not None:
        metrics["opd/kl_coef"] = alpha
    return advantages, (base if base_returns is None else base_returns)
