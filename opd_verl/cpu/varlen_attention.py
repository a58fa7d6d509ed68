"""A pure-torch variable-length attention, so that verl's Ulysses sequence parallel works on CPU.

verl 0.9.1's Ulysses patch (verl.models.transformers.monkey_patch.apply_monkey_patch) replaces
`_flash_attention_forward` in transformers.integrations.flash_attention; sdpa and eager never reach it, so SP>1 with
them attends within each rank's shard only. This module gives transformers' flash path kernels that need no
flash-attn: `varlen_attention` (flash_attn_varlen_func's calling convention, one sdpa call per sequence of cu_seqlens)
and `flash_attn_func` (the dense [batch, seq, heads, dim] one). `register()` names them ATTN_IMPLEMENTATION:

    actor_rollout_ref.model.override_config.attn_implementation=opd_cpu_varlen

The name holds no "flash", so transformers 5.10's flash availability checks (`is_flash_attention_requested`) never run
for it; it maps to transformers' own `flash_attention_forward` (AttentionInterface) and `flash_attention_mask`
(AttentionMaskInterface: no 4-D mask; a 2-D padding mask only when there is padding), and transformers' kernel lookup
(`modeling_flash_attention_utils._lazy_imports`, wrapped) returns our functions for it. The wrap is the CPU patch
`cpu_varlen_attention` (opd_verl.cpu.patches.attention, which pins the transformers code relied on).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from opd_verl.checks.verl_config import CPU_VARLEN_ATTENTION as ATTN_IMPLEMENTATION  # the name, one copy


def _allowed_keys(q_len: int, k_len: int, causal: bool, window_size: tuple[int, int], device) -> torch.Tensor | None:
    """Bool [q_len, k_len] (True: attend) with flash-attn's alignment (query i sits at key i + k_len - q_len; a
    window of (left, right) keys around it, -1: unbounded; causal: right = 0); None when every key is allowed."""
    left, right = window_size
    if causal:
        right = 0
    if left < 0 and right < 0:
        return None
    offset = torch.arange(k_len, device=device) - torch.arange(q_len, device=device)[:, None] - (k_len - q_len)
    allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=device)
    if left >= 0:
        allowed &= offset >= -left
    if right >= 0:
        allowed &= offset <= right
    return allowed


def _attend(q, k, v, causal: bool, softmax_scale, dropout_p: float, window_size) -> torch.Tensor:
    """q [b, hq, lq, d], k/v [b, hk, lk, d] -> [b, hq, lq, d]. GQA: query head h reads kv head h // (hq // hk)."""
    n_rep = q.size(1) // k.size(1)
    if n_rep > 1:
        k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    q_len, k_len = q.size(2), k.size(2)
    plain_causal = causal and window_size[0] < 0 and q_len == k_len  # sdpa's is_causal is top-left aligned
    mask = None if plain_causal else _allowed_keys(q_len, k_len, causal, window_size, q.device)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=plain_causal, scale=softmax_scale
    )


def _check_supported(softcap, s_aux) -> None:
    # transformers passes these only when the model uses them; dropping them silently would be wrong
    if softcap:
        raise NotImplementedError(f"{ATTN_IMPLEMENTATION}: logit softcapping is not supported")
    if s_aux is not None:
        raise NotImplementedError(f"{ATTN_IMPLEMENTATION}: attention sinks (s_aux) are not supported")


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = True,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    deterministic: bool = False,
    s_aux: torch.Tensor | None = None,
) -> torch.Tensor:
    """flash_attn_varlen_func's convention: q [total_q, hq, d], k/v [total_k, hk, d], sequence i is rows
    cu_seqlens[i]:cu_seqlens[i+1]; returns [total_q, hq, d_v] (rows outside every sequence are 0). causal defaults to
    True (flash-attn's default is False; transformers always passes it). max_seqlen_*/deterministic: accepted, unused.
    """
    _check_supported(softcap, s_aux)
    out = q.new_zeros(q.size(0), q.size(1), v.size(-1))
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for q0, q1, k0, k1 in zip(bounds_q[:-1], bounds_q[1:], bounds_k[:-1], bounds_k[1:]):
        if q1 == q0 or k1 == k0:
            continue
        seq = [x[a:b].transpose(0, 1).unsqueeze(0) for x, a, b in ((q, q0, q1), (k, k0, k1), (v, k0, k1))]
        out[q0:q1] = _attend(*seq, causal, softmax_scale, dropout_p, window_size)[0].transpose(0, 1)
    return out


def flash_attn_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """flash_attn_func's convention: q [b, lq, hq, d], k/v [b, lk, hk, d] -> [b, lq, hq, d_v] (no padding); the
    options (dropout_p, softmax_scale, causal, ...) are varlen_attention's, each row one sequence."""
    batch, q_len, k_len = q.size(0), q.size(1), k.size(1)
    cu_q, cu_k = (torch.arange(batch + 1, device=q.device) * n for n in (q_len, k_len))
    out = varlen_attention(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu_q, cu_k, q_len, k_len, *args, **kwargs)
    return out.view(batch, q_len, *out.shape[1:])


def _make_lazy_imports(original):
    """transformers 5.10.4 modeling_flash_attention_utils._lazy_imports, answering our name with our kernels (and
    transformers' own pure-torch pad/unpad); every other name goes to the original."""

    def _lazy_imports(implementation, attention_wrapper=None, allow_all_kernels=False):
        if implementation == ATTN_IMPLEMENTATION:
            from transformers import modeling_flash_attention_utils as fa_utils

            return flash_attn_func, varlen_attention, None, fa_utils._pad_input, fa_utils._unpad_input
        return original(implementation, attention_wrapper, allow_all_kernels=allow_all_kernels)

    return _lazy_imports


def register() -> None:
    """Make ATTN_IMPLEMENTATION a valid attn_implementation of transformers in this process (idempotent)."""
    from transformers import modeling_flash_attention_utils as fa_utils
    from transformers.integrations.flash_attention import flash_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
    from transformers.modeling_utils import AttentionInterface

    from opd_verl.patches import _wrap_once

    AttentionInterface.register(ATTN_IMPLEMENTATION, flash_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, flash_attention_mask)
    _wrap_once(fa_utils, "_lazy_imports", _make_lazy_imports)
