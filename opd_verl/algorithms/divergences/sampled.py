"""The sampled support: per-token reverse-KL estimates from the sampled token's log-probs only.

What each sampled estimator optimises (x ~ πs, r = πt(x)/πs(x), s = log πs(x), q = log πt(x)); every value is an
unbiased estimate of KL(πs‖πt), but the gradients differ (checked by exact enumeration in tests/test_divergences.py):

* ``k1``: value s − q, score-function gradient (s − q)·∇s. E[(s − q)·∇s] = ∇ KL(πs‖πt): reverse KL.
* ``k3``: value r − 1 − log r (≥ 0, low variance), pathwise gradient (1 − r)·∇s. E[(1 − r)·∇s] = −Σ πt·∇ log πs
  = ∇ KL(πt‖πs): this optimises FORWARD KL (mass-covering), not reverse KL, although its value estimates reverse
  KL. (verl's k3 KL *loss* has the same property.)
* ``k1_baseline``: value s − q, gradient (s − q − b)·∇s with b a baseline that does not depend on the token
  (the mean of s − q over the *other* sequences of the micro-batch, leave-one-out, detached; 0 for a single
  sequence). E[b·∇s] = 0, so the expected gradient is ∇ KL(πs‖πt) exactly, with lower variance than k1 when
  the per-token KL is far from 0. (k3 with its full gradient, score-function plus pathwise, has per-sample
  gradient (s − q)·∇s: k1's; no variance is gained that way.)
"""

from __future__ import annotations

import torch
from torch import Tensor

KL_ESTIMATORS = ("k1", "k3", "k1_baseline")


def sanitize_teacher_logp(teacher_logp: Tensor, floor: float = -50.0) -> tuple[Tensor, Tensor]:
    """Replace non-finite teacher log-probs (−inf, NaN, +inf) by ``floor``.

    Returns ``(clean, invalid)`` where ``invalid`` is the bool mask of replaced entries, so callers can
    clip and count them. Finite values (even below ``floor``) are returned unchanged.
    """
    invalid = ~torch.isfinite(teacher_logp)
    clean = torch.where(invalid, torch.full_like(teacher_logp, floor), teacher_logp)
    return clean, invalid


def sampled_reverse_kl(
    student_logp: Tensor, teacher_logp: Tensor, estimator: str = "k1", *, floor: float = -50.0
) -> Tensor:
    """Per-token estimate of KL(πs‖πt) from the sampled token (x_t ~ πs): the value only (for the gradient each
    estimator uses, see `sampled_kl_surrogate`).

    k1 = s − q (unbiased, can be negative); k3 = exp(q − s) − (q − s) − 1 (unbiased, ≥ 0, lower variance);
    k1_baseline has k1's value.
    The teacher log-prob is sanitized first (−inf/NaN → ``floor``), so the result has no NaN for any finite
    student log-prob. k3 can overflow to +inf in float32 when q − s > ~88. Differentiable w.r.t.
    ``student_logp``; the teacher is detached.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")
    dtype = torch.promote_types(student_logp.dtype, torch.float32)
    s = student_logp.to(dtype)
    q, _ = sanitize_teacher_logp(teacher_logp.detach().to(dtype), floor)
    if estimator in ("k1", "k1_baseline"):
        return s - q
    d = q - s
    # expm1(d) - d avoids the cancellation of exp(d) - 1 for small |d|; clamp removes rounding below 0.
    return (torch.expm1(d) - d).clamp_min(0.0)


def leave_one_out_baseline(values: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-sequence baseline for ``values [..., T]`` (leading dims = sequences, last = tokens): for each sequence
    the mean of ``values`` over the masked tokens of all *other* sequences (0 where there are none), detached,
    broadcast over its tokens. It does not depend on the sequence's own tokens."""
    v = values.detach()
    m = torch.ones_like(v) if mask is None else mask.to(v.dtype)
    v = torch.where(m > 0, v, torch.zeros((), dtype=v.dtype, device=v.device))
    rows_v, rows_n = v.sum(-1, keepdim=True), m.sum(-1, keepdim=True)
    others_n = rows_n.sum() - rows_n
    others_v = rows_v.sum() - rows_v
    baseline = torch.where(others_n > 0, others_v / others_n.clamp_min(1.0), torch.zeros_like(others_v))
    return baseline.expand_as(v)


def sampled_kl_surrogate(
    student_logp: Tensor, teacher_logp: Tensor, estimator: str = "k1", mask: Tensor | None = None,
    *, floor: float = -50.0
) -> Tensor:
    """Per-token loss of the sampled support: its value is `sampled_reverse_kl`'s, its gradient w.r.t.
    ``student_logp`` the estimator's (module docstring): k1 (s − q)·∇s, k3 (1 − r)·∇s (pathwise; forward KL in
    expectation), k1_baseline (s − q − b)·∇s with b = `leave_one_out_baseline` over ``mask`` (shape
    ``[..., T]``, leading dims = sequences)."""
    values = sampled_reverse_kl(student_logp, teacher_logp, estimator, floor=floor)
    if estimator == "k3":
        return values
    s = student_logp.to(values.dtype)
    advantage = values.detach()
    if estimator == "k1_baseline":
        advantage = advantage - leave_one_out_baseline(advantage, mask)
    return values.detach() + advantage * (s - s.detach())
