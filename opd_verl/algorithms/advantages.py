"""Pure tensor math of OPD advantages and loss mixing (no verl import).

Notation per response token t: s_t = log πs(x_t | x_<t) (student), q_t = log πt(x_t | x_<t) (teacher).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from opd_verl.algorithms.divergences import sanitize_teacher_logp


class OPDAdvantage(NamedTuple):
    """Result of `opd_token_advantage`.

    advantages: A_t ``[B, T]`` (0 outside the mask); token_rewards: r_t ``[B, T]`` (0 outside the mask);
    num_clipped: valid tokens whose r_t differs from the raw q_t − s_t (clipped, invalid ones included);
    num_invalid: valid tokens whose teacher log-prob was −inf/NaN/+inf; num_tokens: valid tokens.
    The counts are 0-dim int64 tensors (no host sync).
    """

    advantages: Tensor
    token_rewards: Tensor
    num_clipped: Tensor
    num_invalid: Tensor
    num_tokens: Tensor

    @property
    def clip_frac(self) -> Tensor:
        """num_clipped / max(num_tokens, 1) (what a caller logs as ``opd/adv_clip_frac``)."""
        return self.num_clipped.double() / self.num_tokens.clamp_min(1).double()

    @property
    def invalid_frac(self) -> Tensor:
        """num_invalid / max(num_tokens, 1)."""
        return self.num_invalid.double() / self.num_tokens.clamp_min(1).double()


def discounted_reward_to_go(rewards: Tensor, response_mask: Tensor, gamma: float) -> Tensor:
    """A_t = Σ_{j≥t} γ^{j−t} r_j along the last dim, with r_j = 0 outside the mask and A_t = 0 outside it.

    The exponent counts positions (a masked gap inside a row still discounts). γ = 0 returns r·mask.
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    m = response_mask.to(torch.bool)
    r = torch.where(m, rewards, torch.zeros((), dtype=rewards.dtype, device=rewards.device))
    if gamma == 0.0:
        return r
    out = torch.empty_like(r)
    running = torch.zeros_like(r[..., 0])
    for t in range(r.shape[-1] - 1, -1, -1):
        running = r[..., t] + gamma * running
        out[..., t] = running
    return torch.where(m, out, torch.zeros((), dtype=out.dtype, device=out.device))


def opd_token_advantage(
    teacher_logp: Tensor,
    student_logp: Tensor,
    response_mask: Tensor,
    clip_min: float,
    clip_max: float,
    gamma: float = 0.0,
) -> OPDAdvantage:
    """Per-token OPD advantage (−k1 of reverse KL as a dense reward).

    r_t = clip(q_t − s_t, clip_min, clip_max) on valid tokens, 0 elsewhere; a non-finite teacher log-prob
    gives r_t = clip_min (and is counted in num_invalid and num_clipped).
    γ = 0: A_t = r_t;  γ > 0: A_t = Σ_{j≥t} γ^{j−t} r_j over the same row (see `discounted_reward_to_go`).
    Student log-probs must be finite. Computed in (at least) float32, without gradient.
    """
    if clip_min > clip_max:
        raise ValueError(f"clip_min {clip_min} > clip_max {clip_max}")
    dtype = torch.promote_types(student_logp.dtype, torch.float32)
    m = response_mask.to(torch.bool)
    s = student_logp.detach().to(dtype)
    q, invalid = sanitize_teacher_logp(teacher_logp.detach().to(dtype))
    raw = q - s
    clipped = raw.clamp(clip_min, clip_max)
    clipped = torch.where(invalid, torch.full_like(clipped, clip_min), clipped)
    zero = torch.zeros((), dtype=dtype, device=s.device)
    rewards = torch.where(m, clipped, zero)
    was_clipped = m & (invalid | (clipped != raw))
    return OPDAdvantage(
        advantages=discounted_reward_to_go(rewards, m, gamma),
        token_rewards=rewards,
        num_clipped=was_clipped.sum(),
        num_invalid=(m & invalid).sum(),
        num_tokens=m.sum(),
    )


def hybrid_advantage(
    base_advantages: Tensor,
    teacher_logp: Tensor,
    student_logp: Tensor,
    response_mask: Tensor,
    alpha: float,
    *,
    clip_min: float | None = None,
    clip_max: float | None = None,
) -> Tensor:
    """A = A_base − α·(s − q) on valid tokens; outside the mask A = A_base unchanged.

    α = 0 returns ``base_advantages`` exactly (a clone, bit-for-bit). The teacher log-prob is sanitized
    (−inf/NaN → −50) and the OPD term q − s is optionally clamped to [clip_min, clip_max], so the result is
    finite for finite inputs. Computed without gradient, in ``base_advantages``' dtype.
    """
    if alpha == 0:
        return base_advantages.clone()
    dtype = torch.promote_types(student_logp.dtype, torch.float32)
    q, _ = sanitize_teacher_logp(teacher_logp.detach().to(dtype))
    term = q - student_logp.detach().to(dtype)
    if clip_min is not None or clip_max is not None:
        term = term.clamp(clip_min, clip_max)
    term = torch.where(response_mask.to(torch.bool), term, torch.zeros((), dtype=dtype, device=term.device))
    return (base_advantages + alpha * term).to(base_advantages.dtype)


def distill_loss_mix(pg_loss: Tensor, distill_loss: Tensor, lambda_rl: float, lambda_distill: float) -> Tensor:
    """L = λ_rl·L_pg + λ_distill·L_distill; a term with weight 0 is dropped (so its NaN/inf cannot leak)."""
    if lambda_rl == 0 and lambda_distill == 0:
        return 0.0 * distill_loss
    if lambda_rl == 0:
        return lambda_distill * distill_loss
    if lambda_distill == 0:
        return lambda_rl * pg_loss
    return lambda_rl * pg_loss + lambda_distill * distill_loss
