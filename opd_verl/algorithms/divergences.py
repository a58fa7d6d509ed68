"""Per-token divergences between a student policy πs and a teacher πt (pure torch, no verl).

Notation for a response token t: s_t = log πs(x_t | x_<t), q_t = log πt(x_t | x_<t).

Supports of the divergence:

* ``sampled``: only the sampled token's log-probs (`sampled_reverse_kl`: the value; `sampled_kl_surrogate`: the
  per-token loss whose gradient each estimator uses, see "What each sampled estimator optimises" below).
* ``topk``: the teacher's top-k tokens plus one tail bucket holding the remaining mass (`topk_divergence`, the
  reference, and the memory-bounded `chunked_topk_divergence` with `chunked_teacher_topk`).
* ``full``: the whole vocabulary (`full_divergence`, and the memory-bounded `chunked_full_divergence` /
  `chunked_divergence_from_hidden`).

Divergences (``reverse_kl`` = KL(πs‖πt), ``forward_kl`` = KL(πt‖πs), ``jsd``): the generalized JSD of GKD
(arXiv 2306.13649) / TRL's ``generalized_jsd_loss``: m = β·πt + (1−β)·πs,
JSD_β = β·KL(πt‖m) + (1−β)·KL(πs‖m); β = 0 is forward KL exactly and β = 1 reverse KL exactly.

Conventions: a term p·(log p − log r) is 0 where p = 0 (masked vocabulary entries with −inf logits give
no NaN). A KL whose first distribution puts mass where the second has none is +inf, as in the math
(e.g. reverse KL when only the teacher masks a token the student can emit); its gradient is then not
finite either. The teacher is always a constant (detached). Values are computed in at least float32.

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

import math

import torch
from torch import Tensor

DIVERGENCES = ("reverse_kl", "forward_kl", "jsd")
SUPPORTS = ("sampled", "topk", "full")
KL_ESTIMATORS = ("k1", "k3", "k1_baseline")

# Smallest tail mass of the top-k support: keeps log(tail) finite when the top-k covers (numerically) all mass.
_TAIL_FLOOR = 1e-12


# ----------------------------------------------------------------------------------------------------------
# sampled support
# ----------------------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------------------
# shared core on log-probabilities
# ----------------------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------------------
# full support
# ----------------------------------------------------------------------------------------------------------
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


# Rows of one pass of the chunked divergences on CPU: a [rows, V] float32 buffer of about this many bytes, so that
# a pass's 4–5 buffers stay in the last-level cache instead of streaming [chunk_size, V] buffers through memory
# (bench/full_vocab_divergence.py measures it). On GPU a pass is chunk_size rows (fewer, larger kernels).
_CPU_PASS_BYTES = 2 * 1024 * 1024


def _pass_rows(chunk_size: int, vocab: int, device: torch.device) -> int:
    """Rows per pass: ``chunk_size`` (the memory cap), on CPU at most ~``_CPU_PASS_BYTES`` per [rows, V] buffer."""
    if device.type != "cpu":
        return chunk_size
    return max(1, min(chunk_size, _CPU_PASS_BYTES // (4 * vocab)))


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


# ----------------------------------------------------------------------------------------------------------
# top-k support
# ----------------------------------------------------------------------------------------------------------
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
