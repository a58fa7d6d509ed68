"""The top-k support: the teacher's top-k tokens plus one tail bucket. The float64 reference, the memory-bounded
chunked path beside it, the teacher's top-k taken chunk by chunk, and the top-k overlap diagnostic."""

from __future__ import annotations

import torch
from torch import Tensor

from opd_verl.algorithms.divergences.core import (
    _canonical,
    _check_chunk_size,
    _check_temperature,
    _compute_dtype,
    _divergence_from_logp,
    _scaled,
)
from opd_verl.algorithms.divergences.passes import _pass_rows, _RowwiseAnalytic, _rows_of, _student_rows

# Smallest tail mass of the top-k support: keeps log(tail) finite when the top-k covers (numerically) all mass.
_TAIL_FLOOR = 1e-12


def _append_log_tail(logp_k: Tensor) -> Tensor:
    """Append log(1 − Σ_i p_i) (tail mass clamped to ≥ ``_TAIL_FLOOR``) to ``logp_k [..., k]`` → ``[..., k+1]``."""
    total = logp_k.exp().sum(-1, keepdim=True)
    tail = torch.log1p(-total.clamp(max=1.0 - _TAIL_FLOOR))
    return torch.cat([logp_k, tail], dim=-1)


def _check_topk_inputs(divergence: str, beta: float, temperature: float, ids: Tensor, logp: Tensor) -> str:
    """Validate the arguments of the top-k divergences; returns the canonical divergence."""
    kind = _canonical(divergence, beta)
    _check_temperature(temperature)
    if ids.shape != logp.shape:
        raise ValueError(f"top-k ids / logp shapes differ: {tuple(ids.shape)} vs {tuple(logp.shape)}")
    return kind


def topk_divergence(
    student_logits: Tensor,
    teacher_topk_ids: Tensor,
    teacher_topk_logp: Tensor,
    divergence: str = "reverse_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
) -> Tensor:
    """Divergence over the support {teacher's top-k ids} ∪ {tail bucket}, per token.

    ``student_logits [..., V]``, ``teacher_topk_ids [..., k]`` (long, distinct per row),
    ``teacher_topk_logp [..., k]`` = the teacher's full-vocabulary log-probs at those ids, *already at the loss
    temperature* (no temperature is applied to them). Teacher distribution: (p_1..p_k, 1 − Σp); student:
    softmax(student_logits/τ) at the ids plus 1 − Σ. Tail masses are floored at 1e-12 so a tail of ~0 (k = V)
    gives a ~0 term and no NaN; −inf teacher log-probs are zero-probability entries. The (k+1)-point
    divergence is evaluated in float64; the result has the student's compute dtype (≥ float32).
    """
    kind = _check_topk_inputs(divergence, beta, temperature, teacher_topk_ids, teacher_topk_logp)
    dtype = _compute_dtype(student_logits.dtype)
    z = student_logits.to(dtype)
    if temperature != 1.0:
        z = z / temperature
    ls_k = z.gather(-1, teacher_topk_ids.long()) - torch.logsumexp(z, dim=-1, keepdim=True)
    ls = _append_log_tail(ls_k.to(torch.float64))
    lt = _append_log_tail(teacher_topk_logp.detach().to(torch.float64))
    return _divergence_from_logp(ls, lt, kind, beta).to(dtype)


def chunked_teacher_topk(
    teacher_logits: Tensor, k: int, temperature: float = 1.0, chunk_size: int = 1024
) -> tuple[Tensor, Tensor]:
    """The teacher's ``k`` most likely ids per row (k capped at V) and their log-probs log_softmax(z / τ) (compute
    dtype ≥ float32): ``(ids long [..., k], logp [..., k])``, the inputs of `topk_divergence` /
    `chunked_topk_divergence`. Per pass of `_pass_rows` rows (``chunk_size``, on CPU cache-sized): the top-k of the
    scaled logits minus their logsumexp (no ``[rows, V]`` log-softmax is written); O(pass·V) temporaries (none when
    the logits already are float32 at τ = 1), O(k) per row kept."""
    _check_temperature(temperature)
    _check_chunk_size(chunk_size)
    vocab = teacher_logits.shape[-1]
    k = min(int(k), vocab)
    z = teacher_logits.detach().reshape(-1, vocab)
    dtype = _compute_dtype(z.dtype)
    ids = torch.empty(z.shape[0], k, dtype=torch.long, device=z.device)
    logp = torch.empty(z.shape[0], k, dtype=dtype, device=z.device)
    step = _pass_rows(chunk_size, vocab, z.device)
    for a in range(0, z.shape[0], step):
        zc = _scaled(z[a:a + step], dtype, temperature)
        top, ids[a:a + step] = zc.topk(k, dim=-1)
        logp[a:a + step] = top.sub_(torch.logsumexp(zc, dim=-1, keepdim=True))
    lead = teacher_logits.shape[:-1]
    return ids.reshape(*lead, k), logp.reshape(*lead, k)


def topk_overlap(student_logits: Tensor, teacher_topk_ids: Tensor) -> Tensor:
    """|teacher's top-k ∩ student's top-k| / k per row (``student_logits [..., V]``, ``teacher_topk_ids [..., k]``,
    distinct per row; the student's top-k taken with the same k): verl's distillation/overlap_ratio, the diagnostic
    of arXiv 2604.13016. One top-k over V and an O(k log k) sorted search per row; no gradient."""
    k = teacher_topk_ids.shape[-1]
    ids = teacher_topk_ids.long().to(student_logits.device).contiguous()
    with torch.no_grad():
        own = student_logits.detach().topk(k, dim=-1).indices.sort(dim=-1).values.contiguous()
        found = own.gather(-1, torch.searchsorted(own, ids).clamp_(max=k - 1)) == ids
    return found.to(_compute_dtype(student_logits.dtype)).mean(-1)


def _topk_value_and_grad(
    z: Tensor, ids: Tensor, lt_k: Tensor, kind: str, beta: float, need_grad: bool, stats: tuple | None = None
) -> tuple[Tensor, Tensor | None]:
    """One chunk of `chunked_topk_divergence` from the student's scaled logits ``z = logits / τ [c, V]`` (not
    modified) and the teacher's top-k (``ids``, log-probs ``lt_k`` ``[c, k]``): values ``[c]`` and, if
    ``need_grad``, the gradient w.r.t. ``z`` ``[c, V]``. ``stats``: ``(mass [c], overlap [c])`` filled in place with
    the student's mass on the teacher's top-k (from the log-probs computed here) and `topk_overlap`.

    The (k+1)-point part is `topk_divergence`'s own float64 code (tail bucket, floor, p = 0 conventions),
    differentiated by autograd on the ``[c, k]`` leaf ls_k = z[ids] − logsumexp(z), giving g = ∂D/∂ls_k; over the
    vocabulary the gradient is analytic: ∂D/∂z = scatter(g at ids) − (Σ_i g_i)·softmax(z).
    """
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    ls_k = (z.gather(-1, ids) - lse).to(torch.float64).requires_grad_(need_grad)
    if stats is not None:
        stats[0].copy_(ls_k.detach().exp().sum(-1))
        stats[1].copy_(topk_overlap(z, ids))
    with torch.enable_grad():
        value = _divergence_from_logp(_append_log_tail(ls_k), _append_log_tail(lt_k.to(torch.float64)), kind, beta)
        if not need_grad:
            return value.to(z.dtype), None
        (g,) = torch.autograd.grad(value.sum(), ls_k)
    g = g.to(z.dtype)
    grad = z.sub(lse).exp_().mul_(-g.sum(-1, keepdim=True)).scatter_add_(-1, ids, g)
    return value.detach().to(z.dtype), grad


def chunked_topk_divergence(
    student_logits: Tensor,
    teacher_topk_ids: Tensor,
    teacher_topk_logp: Tensor,
    divergence: str = "reverse_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    student_rows: Tensor | None = None,
    student_stats: dict | None = None,
) -> Tensor:
    """Same values and gradients as `topk_divergence` (the float64-checked reference), ``chunk_size`` rows at a
    time; ``student_rows`` as in `chunked_full_divergence` (the teacher's top-k then has one row per index).
    ``student_stats`` (a dict): receives ``mass`` (the student's probability on the teacher's top-k at τ) and
    ``overlap`` (`topk_overlap`), one value per teacher row, detached, from the same chunks (one top-k over V per
    row more; the mass comes from the log-probs the divergence computes anyway).

    A custom autograd Function (`_RowwiseAnalytic`): the gradient is computed in forward per chunk
    (`_topk_value_and_grad`). Memory beyond the inputs: the ``[N, V]`` gradient (O(V) per row, what backward
    returns; nothing else is saved) plus O(chunk_size·V) temporaries (about 2–3 ``[chunk_size, V]`` buffers of
    the compute dtype); the teacher enters as its top-k only (O(k) per row, `chunked_teacher_topk`), so its
    ``[N, V]`` logits can be freed before the student's pass.
    """
    kind = _check_topk_inputs(divergence, beta, temperature, teacher_topk_ids, teacher_topk_logp)
    _check_chunk_size(chunk_size)
    beta, temperature = float(beta), float(temperature)
    vocab, k = student_logits.shape[-1], teacher_topk_ids.shape[-1]
    zs = student_logits.reshape(-1, vocab)
    ids = teacher_topk_ids.reshape(-1, k).long().to(zs.device)
    lt = teacher_topk_logp.detach().reshape(-1, k)
    rows = _student_rows(student_rows, zs, ids.shape[0])
    dtype = _compute_dtype(zs.dtype)

    stats = None
    if student_stats is not None:
        stats = tuple(torch.empty(ids.shape[0], dtype=dtype, device=zs.device) for _ in range(2))
        student_stats.update(mass=stats[0], overlap=stats[1])

    def chunk_fn(a: int, b: int, need_grad: bool):
        z = _scaled(_rows_of(zs, rows, a, b), dtype, temperature, owned=rows is not None)
        chunk_stats = None if stats is None else (stats[0][a:b], stats[1][a:b])
        value, grad = _topk_value_and_grad(z, ids[a:b], lt[a:b], kind, beta, need_grad, chunk_stats)
        return value, (grad.div_(temperature) if grad is not None and temperature != 1.0 else grad)

    need_grad = torch.is_grad_enabled() and student_logits.requires_grad
    out = _RowwiseAnalytic.apply(zs, rows, ids.shape[0], int(chunk_size), need_grad, chunk_fn)
    return out if rows is not None else out.reshape(student_logits.shape[:-1])
