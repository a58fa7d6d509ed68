"""The full-vocabulary reference: the exact divergence by plain autograd, the values the chunked paths must equal
(checked against float64 brute force in tests/test_divergences.py)."""

from __future__ import annotations

import torch
from torch import Tensor

from opd_verl.algorithms.divergences.core import (
    _canonical,
    _check_temperature,
    _compute_dtype,
    _divergence_from_logp,
    _teacher_temperature,
)


def full_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    divergence: str = "reverse_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    teacher_temperature: float | None = None,
) -> Tensor:
    """Exact per-token divergence over the vocabulary for logits ``[..., V]`` → values ``[...]``.

    log πs = log_softmax(student_logits / τ), log πt = log_softmax(teacher_logits / τt) (τt =
    ``teacher_temperature``, default τ: the two differ when the inputs come scaled differently); then
    reverse_kl = Σ πs (log πs − log πt), forward_kl = Σ πt (log πt − log πs),
    jsd = β·KL(πt‖m) + (1−β)·KL(πs‖m) with log m = logsumexp(log β + log πt, log(1−β) + log πs).
    Plain autograd (materializes several ``[..., V]`` tensors); differentiable w.r.t. ``student_logits``.
    """
    kind = _canonical(divergence, beta)
    _check_temperature(temperature)
    tt = _teacher_temperature(temperature, teacher_temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"logit shapes differ: {tuple(student_logits.shape)} vs {tuple(teacher_logits.shape)}")
    dtype = _compute_dtype(student_logits.dtype)
    ls = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    lt = torch.log_softmax(teacher_logits.detach().to(dtype) / tt, dim=-1)
    return _divergence_from_logp(ls, lt, kind, beta)
