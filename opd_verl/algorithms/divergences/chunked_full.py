"""The full support, memory-bounded: `full_divergence`'s values with an analytic gradient, computed pass by pass
from each pass's softmaxes (no autograd graph over ``[T, V]``)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from opd_verl.algorithms.divergences.core import (
    _canonical,
    _check_chunk_size,
    _check_temperature,
    _compute_dtype,
    _scaled,
    _scaled_fresh,
    _teacher_temperature,
)
from opd_verl.algorithms.divergences.passes import _RowwiseAnalytic, _rows_of, _student_rows


def _logp(z: Tensor, dtype: torch.dtype, temperature: float, owned: bool = False) -> Tensor:
    """log_softmax(z / τ) in ``dtype``; ``z`` is modified in place only if ``owned`` (a fresh temporary)."""
    return torch.log_softmax(_scaled(z, dtype, temperature, owned), dim=-1)


def _logp_and_p(z: Tensor, dtype: torch.dtype, temperature: float, owned: bool = False) -> tuple[Tensor, Tensor]:
    """(log_softmax(z / τ), softmax(z / τ)) with one exp per entry (log_softmax then exp would take two):
    e = exp(z − max), p = e / Σe, log p = z − max − log Σe. ``z`` is modified in place only if ``owned``."""
    zc, fresh = _scaled_fresh(z, dtype, temperature, owned)
    top = zc.amax(-1, keepdim=True)
    logp = zc.sub_(top) if fresh else zc - top
    p = logp.exp()
    total = p.sum(-1, keepdim=True)
    return logp.sub_(total.log()), p.div_(total)



def _has_no_neg_inf(*logps: Tensor) -> bool:
    """True when no entry is -inf (or NaN): then p·(log p − x) is finite even where p underflows to 0, and the
    p = 0 masks can be skipped. One reduction per tensor, no ``[n, V]`` temporary."""
    return all(bool(x.amin() > -math.inf) for x in logps)


def _value_and_grad(
    zs: Tensor, zt: Tensor, kind: str, beta: float, temperature: float, teacher_temperature: float,
    need_grad: bool, dtype: torch.dtype, owned: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Per-row divergence from the student / teacher logits ``zs`` / ``zt`` ``[n, V]`` (divided by τ / τt here)
    and (optionally) its gradient w.r.t. ``zs`` (ls = log_softmax(zs/τ), ps = exp(ls)):

      reverse_kl: dD/dzs = ps·(ls − lt − D)/τ;   forward_kl: (ps − pt)/τ;
      jsd:        (1−β)·ps·(ls − lm − KL(πs‖m))/τ,  lm = log(β·pt + (1−β)·ps).

    No autograd; ``zs`` is overwritten only if ``owned``, ``zt`` never; ~4–5 live ``[n, V]`` buffers. Entries with
    p = 0 contribute 0 to values and (reverse_kl, jsd) get gradient 0; the masks that enforce this are applied
    only when a chunk has a −inf/NaN log-prob (or, for jsd, a mixture probability that underflows).
    """
    ls, ps = _logp_and_p(zs, dtype, temperature, owned)
    if kind == "reverse_kl":
        lt, pt = _logp(zt, dtype, teacher_temperature), None
    else:
        lt, pt = _logp_and_p(zt, dtype, teacher_temperature)
    masked = not _has_no_neg_inf(ls, lt)
    if kind == "forward_kl":
        d = lt.sub_(ls)
        if masked:
            d = d.masked_fill_(pt == 0, 0.0)
        value = d.mul_(pt).sum(-1)  # Σ πt·(lt − ls), 0 where πt = 0
        del d, lt, ls
        if not need_grad:
            return value, None
        grad = ps.sub_(pt)
    elif kind == "reverse_kl":
        zero = (ps == 0) if masked else None
        d = ls.sub_(lt)
        if masked:
            d = d.masked_fill_(zero, 0.0)
        d = d.mul_(ps)  # πs·(ls − lt), 0 where πs = 0
        del lt
        value = d.sum(-1)
        if not need_grad:
            return value, None
        grad = d.addcmul_(ps, value.unsqueeze(-1), value=-1.0)
        if masked:
            grad = grad.masked_fill_(zero, 0.0)
    else:
        lm = torch.lerp(ps, pt, beta)  # β·πt + (1−β)·πs
        masked = masked or not bool(lm.amin() > 0)
        lm = lm.log_()
        dt = lt.sub_(lm)
        if masked:
            dt = dt.masked_fill_(pt == 0, 0.0)
        kt = dt.mul_(pt).sum(-1)  # Σ πt·(lt − lm)
        del dt, lt, pt
        zero = (ps == 0) if masked else None
        ds = ls.sub_(lm)
        if masked:
            ds = ds.masked_fill_(zero, 0.0)
        ds = ds.mul_(ps)  # πs·(ls − lm)
        del lm
        ks = ds.sum(-1)
        value = beta * kt + (1.0 - beta) * ks
        if not need_grad:
            return value, None
        grad = ds.addcmul_(ps, ks.unsqueeze(-1), value=-1.0)
        if masked:
            grad = grad.masked_fill_(zero, 0.0)
        grad = grad.mul_(1.0 - beta)
    if temperature != 1.0:
        grad = grad.div_(temperature)
    return value, grad


def chunked_full_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    divergence: str = "reverse_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    teacher_temperature: float | None = None,
    student_rows: Tensor | None = None,
) -> Tensor:
    """Same values as `full_divergence` for logits ``[T, V]`` (or ``[..., V]``), ``chunk_size`` rows at a time
    (``teacher_temperature`` as there).

    ``student_rows`` (long ``[n]``, optional): only these rows of ``student_logits [N, V]`` are evaluated, against
    ``teacher_logits [n, V]`` (one row per index) → values ``[n]``; the gradient is 0 on the other rows.

    A custom autograd Function (`_RowwiseAnalytic`): each pass's softmaxes are computed once (one exp per entry
    and model, `_logp_and_p`), giving the values and the analytic gradient. A pass is ``chunk_size`` rows, on CPU
    fewer (`_pass_rows`: ~2 MB per ``[rows, V]`` buffer, so its buffers stay in cache). Memory beyond the inputs:
    the ``[N, V]`` gradient (O(V) per row, what backward returns; kept from forward to backward, nothing else is
    saved: no teacher logits) plus O(pass·V) temporaries (about 4 live ``[pass, V]`` buffers of the compute
    dtype, 5 for jsd). Gradient flows to ``student_logits`` only; the input logits are never modified.
    """
    kind = _canonical(divergence, beta)
    _check_temperature(temperature)
    tt = _teacher_temperature(temperature, teacher_temperature)
    _check_chunk_size(chunk_size)
    if student_logits.shape[-1] != teacher_logits.shape[-1] or (
        student_rows is None and student_logits.shape != teacher_logits.shape
    ):
        raise ValueError(f"logit shapes differ: {tuple(student_logits.shape)} vs {tuple(teacher_logits.shape)}")
    beta, temperature = float(beta), float(temperature)
    vocab = student_logits.shape[-1]
    zs, zt = student_logits.reshape(-1, vocab), teacher_logits.detach().reshape(-1, vocab)
    rows = _student_rows(student_rows, zs, zt.shape[0])
    dtype = _compute_dtype(zs.dtype)

    def chunk_fn(a: int, b: int, need_grad: bool):
        return _value_and_grad(_rows_of(zs, rows, a, b), zt[a:b], kind, beta, temperature, tt, need_grad, dtype,
                               owned=rows is not None)

    need_grad = torch.is_grad_enabled() and student_logits.requires_grad
    out = _RowwiseAnalytic.apply(zs, rows, zt.shape[0], int(chunk_size), need_grad, chunk_fn)
    return out if rows is not None else out.reshape(student_logits.shape[:-1])
