"""Several teachers as one (pure torch, no verl import): the weighted mixtures and per-sample routing.

The same functions serve the reference pass (log-probs of the sampled tokens, ``[nnz]``) and the loss-level pass
(logits over the vocabulary, ``[nnz, V]``).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _log_weights(weights: list[float], dtype: torch.dtype, device, ndim: int) -> Tensor:
    w = torch.tensor(weights, dtype=torch.float64)
    return torch.log(w / w.sum()).to(dtype=dtype, device=device).view(-1, *([1] * ndim))


def mix_log_probs(log_probs: list[Tensor], weights: list[float], dtype: torch.dtype = torch.float64) -> Tensor:
    """log Σ_k w_k·p_k, weights normalised (multi_teacher_mode=mean_prob), computed in ``dtype``, returned in the
    inputs' dtype. ``log_probs``: each teacher's log-probs of the same tokens (``[nnz]``), or log-softmaxed logits
    (``[nnz, V]``: the result is then a normalised log-distribution)."""
    stacked = torch.stack([lp.to(dtype) for lp in log_probs])
    log_w = _log_weights(weights, dtype, stacked.device, log_probs[0].dim())
    return torch.logsumexp(stacked + log_w, dim=0).to(log_probs[0].dtype)


def mean_logits(logits: list[Tensor], weights: list[float]) -> Tensor:
    """Σ_k w_k·logits_k in float32, weights normalised (multi_teacher_mode=mean_logit)."""
    w = torch.tensor(weights, dtype=torch.float64)
    w = (w / w.sum()).tolist()
    return sum(wk * lk.float() for wk, lk in zip(w, logits))


def mix_teacher_logits(logits: list[Tensor], weights: list[float], mode: str) -> Tensor:
    """One teacher's logits unchanged; several as ``mode`` says: mean_logit, else the log of the mean of the
    probabilities (float32 log-probs, a valid set of logits)."""
    if len(logits) == 1:
        return logits[0]
    if mode == "mean_logit":
        return mean_logits(logits, weights)
    return mix_log_probs([torch.log_softmax(lk.float(), dim=-1) for lk in logits], weights, dtype=torch.float32)


def route_rows(per_teacher: list[Tensor], sample_teacher: Tensor, lengths: Tensor) -> Tensor:
    """Packed rows [nnz, ...] taken from each sample's own teacher: sample i (lengths[i] rows) from
    per_teacher[sample_teacher[i]]. Rows past sum(lengths) (sequence-parallel padding) follow the last sample."""
    token_teacher = torch.repeat_interleave(sample_teacher.to(torch.long), lengths.to(torch.long))
    extra = per_teacher[0].shape[0] - token_teacher.numel()
    if extra > 0:
        token_teacher = torch.cat([token_teacher, token_teacher[-1:].expand(extra)])
    token_teacher = token_teacher.to(per_teacher[0].device)
    out = per_teacher[0].clone()
    for k in range(1, len(per_teacher)):
        rows = token_teacher == k
        out[rows] = per_teacher[k][rows].to(out.dtype)
    return out
