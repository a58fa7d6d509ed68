"""How the chunked divergences walk the rows: rows per pass (cache-sized on CPU), the autograd Function that computes
each pass's gradient in forward, and the optional selection of student rows."""

from __future__ import annotations

import torch
from torch import Tensor

from opd_verl.algorithms.divergences.core import _compute_dtype


# Rows of one pass of the chunked divergences on CPU: a [rows, V] float32 buffer of about this many bytes, so that
# a pass's 4–5 buffers stay in the last-level cache instead of streaming [chunk_size, V] buffers through memory
# (bench/full_vocab_divergence.py measures it). On GPU a pass is chunk_size rows (fewer, larger kernels).
_CPU_PASS_BYTES = 2 * 1024 * 1024


def _pass_rows(chunk_size: int, vocab: int, device: torch.device) -> int:
    """Rows per pass: ``chunk_size`` (the memory cap), on CPU at most ~``_CPU_PASS_BYTES`` per [rows, V] buffer."""
    if device.type != "cpu":
        return chunk_size
    return max(1, min(chunk_size, _CPU_PASS_BYTES // (4 * vocab)))


class _RowwiseAnalytic(torch.autograd.Function):
    """Per-row values of the student's logits ``zs [N, V]`` with the gradient computed in forward, pass by pass
    (`_pass_rows`: ``chunk`` rows, on CPU fewer, sized to the cache).

    ``chunk_fn(a, b, need_grad) -> (values [b−a], grad [b−a, V] or None)`` evaluates rows a:b of the selection
    (``zs[rows[a:b]]``, or ``zs[a:b]`` when ``rows`` is None); it closes over the teacher's side, which ctx does
    not keep. Kept for backward: no input tensor, only the ``[N, V]`` gradient in the dtype of ``zs`` (O(V) per
    row, 0 on rows not selected; the tensor backward returns anyway, scaled there in place by ``grad_out``) and
    ``rows`` (``[n]``). So a second backward through the same graph (``retain_graph=True``, gradcheck) is an
    error: run the forward again.
    """

    @staticmethod
    def forward(ctx, zs: Tensor, rows: Tensor | None, n: int, chunk: int, need_grad: bool, chunk_fn) -> Tensor:
        out = torch.empty(n, dtype=_compute_dtype(zs.dtype), device=zs.device)
        grad = (torch.empty_like(zs) if rows is None else torch.zeros_like(zs)) if need_grad else None
        step = _pass_rows(chunk, zs.shape[-1], zs.device)
        for a in range(0, n, step):
            b = min(a + step, n)
            out[a:b], g = chunk_fn(a, b, need_grad)
            if need_grad:
                if rows is None:
                    grad[a:b] = g
                else:
                    grad.index_copy_(0, rows[a:b], g.to(grad.dtype))
            del g  # free this chunk's buffers before the next chunk allocates its own
        ctx.grad, ctx.rows = grad, rows
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            raise RuntimeError(
                "opd_verl: a second backward through a chunked divergence: its gradient, computed in forward, went "
                "to the first backward and nothing else is kept; run the forward again")
        scale = grad_out.to(grad.dtype)
        if ctx.rows is not None:  # one grad_out per selected row; the other rows' gradient is 0 already
            scale = scale.new_zeros(grad.shape[0]).index_copy_(0, ctx.rows, scale)
        return grad.mul_(scale.unsqueeze(-1)), None, None, None, None, None


def _student_rows(rows: Tensor | None, zs: Tensor, n: int) -> Tensor | None:
    """Validate ``student_rows`` (long ``[n]``, indices into the rows of ``zs [N, V]``)."""
    if rows is None:
        if zs.shape[0] != n:
            raise ValueError(f"student rows {zs.shape[0]} vs teacher rows {n}")
        return None
    if rows.dim() != 1 or rows.numel() != n:
        raise ValueError(f"student_rows must be 1-D with one index per teacher row ({n}), got {tuple(rows.shape)}")
    return rows.to(device=zs.device, dtype=torch.long)


def _rows_of(zs: Tensor, rows: Tensor | None, a: int, b: int) -> Tensor:
    """Rows a:b of the selection: a view of ``zs`` or (``rows`` given) a fresh ``[b−a, V]`` copy."""
    return zs[a:b] if rows is None else zs.index_select(0, rows[a:b])
