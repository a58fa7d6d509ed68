"""What the top-k and full paths share: the divergence over normalized log-probs (with its p = 0 and mixture
conventions), the argument checks, the compute dtype and the temperature scaling of logits."""

from __future__ import annotations

import math

import torch
from torch import Tensor

DIVERGENCES = ("reverse_kl", "forward_kl", "jsd")
SUPPORTS = ("sampled", "topk", "full")


def _canonical(divergence: str, beta: float) -> str:
    """Validate (divergence, beta); map jsd with β = 0 / 1 to forward / reverse KL (TRL's convention)."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; expected one of {DIVERGENCES}")
    if divergence == "jsd":
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"jsd beta must be in [0, 1], got {beta}")
        if beta == 0.0:
            return "forward_kl"
        if beta == 1.0:
            return "reverse_kl"
    return divergence


def _kl(logp: Tensor, logr: Tensor) -> Tensor:
    """KL(p‖r) = Σ_i p_i (log p_i − log r_i) over the last dim, with 0 where p_i = 0 (NaN-free grads)."""
    p = logp.exp()
    pos = p > 0
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    diff = torch.where(pos, logp, zero) - torch.where(pos, logr, zero)
    return torch.where(pos, p * diff, zero).sum(-1)


def _log_mixture(ls: Tensor, lt: Tensor, beta: float) -> Tensor:
    """log m = logsumexp(log β + log πt, log(1−β) + log πs) for 0 < β < 1.

    Entries where both log-probs are −inf are replaced by 0 before the logsumexp (their value is never used,
    p = 0 there) so that its backward cannot produce NaN.
    """
    dead = torch.isneginf(ls) & torch.isneginf(lt)
    zero = torch.zeros((), dtype=ls.dtype, device=ls.device)
    a = torch.where(dead, zero, lt) + math.log(beta)
    b = torch.where(dead, zero, ls) + math.log1p(-beta)
    return torch.logaddexp(a, b)


def _divergence_from_logp(ls: Tensor, lt: Tensor, kind: str, beta: float) -> Tensor:
    """Divergence over the last dim from normalized student / teacher log-probs (``kind`` canonical)."""
    if kind == "reverse_kl":
        return _kl(ls, lt)
    if kind == "forward_kl":
        return _kl(lt, ls)
    lm = _log_mixture(ls, lt, beta)
    return beta * _kl(lt, lm) + (1.0 - beta) * _kl(ls, lm)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _check_chunk_size(chunk_size: int) -> None:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _teacher_temperature(temperature: float, teacher_temperature: float | None) -> float:
    """The teacher's divisor: ``temperature`` unless given (e.g. logits already scaled, or scaled differently)."""
    tt = temperature if teacher_temperature is None else float(teacher_temperature)
    _check_temperature(tt)
    return tt


def _scaled_fresh(z: Tensor, dtype: torch.dtype, temperature: float, owned: bool = False) -> tuple[Tensor, bool]:
    """(z / τ in ``dtype``, whether that is a fresh tensor); ``z`` is modified in place only if ``owned``."""
    zc = z.to(dtype)
    fresh = owned or zc is not z
    if temperature != 1.0:
        zc, fresh = (zc.div_(temperature) if fresh else zc / temperature), True
    return zc, fresh


def _scaled(z: Tensor, dtype: torch.dtype, temperature: float, owned: bool = False) -> Tensor:
    """z / τ in ``dtype``; ``z`` is modified in place only if ``owned`` (a fresh temporary)."""
    return _scaled_fresh(z, dtype, temperature, owned)[0]
