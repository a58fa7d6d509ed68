"""The full support from hidden states and lm-head weights: the lm-head matmul done chunk by chunk, so no ``[T, V]``
logits are ever held."""

from __future__ import annotations

import torch
from torch import Tensor

from opd_verl.algorithms.divergences.chunked_full import _value_and_grad
from opd_verl.algorithms.divergences.core import _canonical, _check_chunk_size, _check_temperature, _compute_dtype
from opd_verl.algorithms.divergences.passes import _pass_rows


def _rows_in_passes(
    zs: Tensor, zt: Tensor, kind: str, beta: float, temperature: float, need_grad: bool
) -> tuple[Tensor, Tensor | None]:
    """`_value_and_grad` of fresh logits ``zs``/``zt`` ``[c, V]`` in passes of `_pass_rows` rows; the gradient
    (if ``need_grad``) overwrites ``zs`` pass by pass and is returned as it."""
    dtype = _compute_dtype(zs.dtype)
    out = torch.empty(zs.shape[0], dtype=dtype, device=zs.device)
    step = _pass_rows(zs.shape[0], zs.shape[-1], zs.device)
    for a in range(0, zs.shape[0], step):
        b = min(a + step, zs.shape[0])
        out[a:b], g = _value_and_grad(zs[a:b], zt[a:b], kind, beta, temperature, temperature, need_grad, dtype,
                                      owned=True)
        if need_grad:
            zs[a:b] = g
        del g
    return out, (zs if need_grad else None)


class _ChunkedHiddenDivergence(torch.autograd.Function):
    """Divergence from hidden states and lm-head weights, the lm-head matmul done per chunk.

    With a gradient to compute, forward computes it too (one pass over the logits, as Liger-Kernel's chunked
    losses do): the gradients w.r.t. the hidden states ``[T, H]`` and the head weight ``[V, H]`` (accumulated in
    float32) for a uniform ``grad_out``, kept to backward. ``grad_out`` is uniform for a sum or mean of the values
    (the token-mean over the selected response rows of the trainer); a non-uniform ``grad_out`` (per-row weights)
    recomputes the logits chunk by chunk in backward with it. Without a gradient, forward computes values only.
    """

    @staticmethod
    def forward(
        ctx, hs: Tensor, ws: Tensor, ht: Tensor, wt: Tensor, kind: str, beta: float, temperature: float, chunk: int,
        need_grad: bool,
    ) -> Tensor:
        need_h, need_w = need_grad and ctx.needs_input_grad[0], need_grad and ctx.needs_input_grad[1]
        out, grads = _hidden_pass(hs, ws, ht, wt, kind, beta, temperature, chunk, need_h, need_w, None)
        ctx.save_for_backward(hs, ws, ht, wt)
        ctx.cfg = (kind, beta, temperature, chunk)
        ctx.grads = grads
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        grads, ctx.grads = ctx.grads, None  # a second backward (retain_graph, gradcheck) recomputes
        if grads is not None and bool((grad_out == grad_out[:1]).all()):
            grad_hs, grad_ws = grads
            if grad_out.numel():  # no rows: the gradients are empty / zero as they are
                scale = grad_out[:1].to(_compute_dtype(grad_out.dtype))
                grad_hs = None if grad_hs is None else grad_hs.mul_(scale.to(grad_hs.dtype))
                grad_ws = None if grad_ws is None else grad_ws.mul_(scale.to(grad_ws.dtype))
        else:  # per-row weights: recompute with them
            hs, ws, ht, wt = ctx.saved_tensors
            need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            _, (grad_hs, grad_ws) = _hidden_pass(hs, ws, ht, wt, *ctx.cfg, need_h, need_w, grad_out)
        if grad_ws is not None:
            grad_ws = grad_ws.to(ctx.saved_tensors[1].dtype)
        return grad_hs, grad_ws, None, None, None, None, None, None, None


def _hidden_pass(
    hs: Tensor, ws: Tensor, ht: Tensor, wt: Tensor, kind: str, beta: float, temperature: float, chunk: int,
    need_h: bool, need_w: bool, row_weights: Tensor | None,
) -> tuple[Tensor, tuple[Tensor | None, Tensor | None]]:
    """Values ``[T]`` and the gradients of Σ_r w_r·value_r (w = ``row_weights``, or 1) w.r.t. the student's hidden
    states (``need_h``) and head weight (``need_w``, float32 or wider), ``chunk`` rows of logits at a time."""
    dtype = _compute_dtype(hs.dtype)
    need_grad = need_h or need_w
    out = torch.empty(hs.shape[0], dtype=dtype, device=hs.device)
    grad_hs = torch.empty_like(hs) if need_h else None
    grad_ws = torch.zeros(ws.shape, dtype=_compute_dtype(ws.dtype), device=ws.device) if need_w else None
    for a in range(0, hs.shape[0], chunk):
        b = min(a + chunk, hs.shape[0])
        zs = torch.nn.functional.linear(hs[a:b], ws).to(dtype)
        out[a:b], gz = _rows_in_passes(zs, torch.nn.functional.linear(ht[a:b], wt), kind, beta, temperature,
                                       need_grad)
        if not need_grad:
            continue
        if row_weights is not None:
            gz = gz.mul_(row_weights[a:b].to(dtype).unsqueeze(-1))
        if need_h:
            grad_hs[a:b] = (gz.to(ws.dtype) @ ws).to(hs.dtype)
        if need_w:
            grad_ws.addmm_(gz.t().to(grad_ws.dtype), hs[a:b].to(grad_ws.dtype))
        del gz, zs  # free this chunk's [chunk, V] gradient before the next chunk allocates its own
    return out, (grad_hs, grad_ws)


def chunked_divergence_from_hidden(
    student_hidden: Tensor,
    student_head_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_head_weight: Tensor,
    divergence: str = "reverse_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int = 1024,
) -> Tensor:
    """Full-vocabulary divergence from hidden states: logits = hidden @ weightᵀ, computed per chunk.

    ``student_hidden [T, H]`` (or ``[..., H]``), ``student_head_weight [V, H]``, ``teacher_hidden [T, H']``,
    ``teacher_head_weight [V, H']`` → values ``[T]``, equal to
    ``full_divergence(student_hidden @ Wsᵀ, teacher_hidden @ Wtᵀ, ...)``. No ``[T, V]`` logits are ever held:
    peak extra memory is one ``[chunk_size, V]`` logits chunk of each model plus O(pass·V) temporaries (passes of
    `_pass_rows` rows) and the ``[T, H]`` / ``[V, H]`` gradients (the weight's accumulated in float32), which
    forward computes with the values when a gradient is needed (`_ChunkedHiddenDivergence`: one pass over the
    logits for a sum or mean of the values). Logits are the lm-head output in the hidden dtype
    (bf16 hidden → bf16-rounded logits, as a normal bf16 lm-head), then upcast.
    Gradients flow to ``student_hidden`` and ``student_head_weight``; the teacher is constant. Both heads must
    have the same V (slice the weights to the shared vocabulary first if the padded sizes differ).
    """
    kind = _canonical(divergence, beta)
    _check_temperature(temperature)
    _check_chunk_size(chunk_size)
    if student_head_weight.shape[0] != teacher_head_weight.shape[0]:
        raise ValueError(
            f"vocab sizes differ: student {student_head_weight.shape[0]} vs teacher {teacher_head_weight.shape[0]}"
        )
    lead = student_hidden.shape[:-1]
    if teacher_hidden.shape[:-1] != lead:
        raise ValueError(f"token shapes differ: {tuple(lead)} vs {tuple(teacher_hidden.shape[:-1])}")
    out = _ChunkedHiddenDivergence.apply(
        student_hidden.reshape(-1, student_hidden.shape[-1]),
        student_head_weight,
        teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]),
        teacher_head_weight.detach(),
        kind,
        float(beta),
        float(temperature),
        int(chunk_size),
        torch.is_grad_enabled() and (student_hidden.requires_grad or student_head_weight.requires_grad),
    )
    return out.reshape(lead)
