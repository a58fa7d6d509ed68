"""OPD policy losses (verl extension point: core_algos.register_policy_loss).

- `importance_sampling`: the unclipped importance-sampled policy gradient, loss = -ratio * A (the seeds' loss
  for pure OPD, where A is the per-token teacher-student advantage).
- `ppo_plus_distill` (formerly `opd_distill`, still registered): the policy-gradient part of the loss-level hybrid L = lambda_rl * L_pg + lambda_distill * L_distill.
  Its L_pg is verl's PPO clip loss; the OPD actor loss (opd_verl.verl_ext.distill_actor_loss) weights it and adds the
  distillation term over distributions, which needs the student's logits that a policy loss never sees.
"""

from __future__ import annotations

import torch
from verl.trainer.ppo.core_algos import agg_loss, compute_policy_loss_vanilla, register_policy_loss
from verl.utils.torch_functional import masked_mean

LOG_RATIO_CLAMP = 20.0


def importance_sampling_loss_matrix(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor):
    """Per-token -A * exp(log_prob - old_log_prob) (log-ratio clamped to ±20 as verl does) and the ratio."""
    ratio = torch.exp(torch.clamp(log_prob - old_log_prob, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    return -advantages * ratio, ratio


@register_policy_loss("importance_sampling")
def compute_policy_loss_importance_sampling(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config=None,
    rollout_is_weights: torch.Tensor | None = None,
):
    """Unclipped importance sampling: loss = agg(-ratio * A)."""
    loss_mat, ratio = importance_sampling_loss_matrix(old_log_prob, log_prob, advantages)
    if rollout_is_weights is not None:
        loss_mat = loss_mat * rollout_is_weights
    batch_info = getattr(config, "global_batch_info", None) or {}
    loss = agg_loss(loss_mat=loss_mat, loss_mask=response_mask, loss_agg_mode=loss_agg_mode, **batch_info)
    metrics = {
        "actor/ppo_kl": masked_mean(old_log_prob - log_prob, response_mask).detach().item(),
        "actor/is_ratio_mean": masked_mean(ratio, response_mask).detach().item(),
    }
    return loss, metrics


@register_policy_loss("opd_distill")  # the old name (deprecated; main_opd prints a line)
@register_policy_loss("ppo_plus_distill")
def compute_policy_loss_ppo_plus_distill(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config=None,
    rollout_is_weights: torch.Tensor | None = None,
):
    """L_pg of the loss-level hybrid: verl's PPO clip loss (weighted and combined by opd_verl.verl_ext.distill_actor_loss)."""
    return compute_policy_loss_vanilla(
        old_log_prob=old_log_prob,
        log_prob=log_prob,
        advantages=advantages,
        response_mask=response_mask,
        loss_agg_mode=loss_agg_mode,
        config=config,
        rollout_is_weights=rollout_is_weights,
    )
