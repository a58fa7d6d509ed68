"""opd_verl.cpu.varlen_attention: the pure-torch flash-attention stand-in that lets verl's Ulysses SP run on CPU.

The kernels against a float64 brute force (softmax(QK^T * scale + mask) V, loop by loop); a tiny Qwen2 selected with
attn_implementation=opd_cpu_varlen (as verl loads it) against eager on each sequence alone, on packed rows and on
padded batches; SP=2 over gloo through verl 0.9.1's own Ulysses code (apply_monkey_patch, ulysses_pad_and_slice_inputs,
gather_outputs_and_unpad) against one process, and sdpa's SP=2 error, which this test would catch.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch

import verl  # noqa: F401  (loads the opd_verl plugin: the CPU patch cpu_varlen_attention registers the name)
from opd_verl import patches
from opd_verl.cpu import varlen_attention as va
from opd_verl.cpu.varlen_attention import ATTN_IMPLEMENTATION

LENGTHS = (7, 1, 12, 1, 6)  # 27 tokens: one-token sequences; at SP=2 one pad token, shards cut the 12 in two


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------------------------
# The kernels against a float64 brute force
# ---------------------------------------------------------------------------------------------------------------


def _allowed(i: int, j: int, q_len: int, k_len: int, causal: bool, window) -> bool:
    """flash-attn's rule, entry by entry: query i sits at key i + k_len - q_len."""
    d = j - (i + k_len - q_len)
    left, right = window
    return not ((causal and d > 0) or (left >= 0 and d < -left) or (right >= 0 and d > right))


def _brute_force(q, k, v, cu_q, cu_k, causal=True, window=(-1, -1), scale=None):
    """float64 [total_q, hq, d_v]: per sequence and head, explicit masked softmax(q k^T * scale) v."""
    q, k, v = q.double(), k.double(), v.double()
    n_rep = q.size(1) // k.size(1)
    scale = q.size(-1) ** -0.5 if scale is None else scale
    out = torch.zeros(q.size(0), q.size(1), v.size(-1), dtype=torch.float64)
    for q0, q1, k0, k1 in zip(cu_q[:-1], cu_q[1:], cu_k[:-1], cu_k[1:]):
        q_len, k_len = q1 - q0, k1 - k0
        for h in range(q.size(1)):
            scores = (q[q0:q1, h] @ k[k0:k1, h // n_rep].T) * scale
            for i in range(q_len):
                for j in range(k_len):
                    if not _allowed(i, j, q_len, k_len, causal, window):
                        scores[i, j] = float("-inf")
            weights = torch.exp(scores - scores.max(-1, keepdim=True).values)
            out[q0:q1, h] = (weights / weights.sum(-1, keepdim=True)) @ v[k0:k1, h // n_rep]
    return out


def _qkv(total_q, total_k, dtype, hq=4, hk=2, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, h, d, generator=g, dtype=dtype) for n, h in ((total_q, hq), (total_k, hk), (total_k, hk))]


def _cu(lengths) -> list[int]:
    return [0, *torch.tensor(lengths).cumsum(0).tolist()]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_varlen_matches_brute_force_gqa_causal_mixed_lengths(dtype, tol):
    cu = _cu(LENGTHS)
    q, k, v = _qkv(cu[-1], cu[-1], dtype)
    cu_t = torch.tensor(cu, dtype=torch.int32)
    out = va.varlen_attention(q, k, v, cu_t, cu_t, max(LENGTHS), max(LENGTHS), causal=True)
    assert out.dtype == dtype and out.shape == (cu[-1], 4, 32)
    ref = _brute_force(q, k, v, cu, cu)
    assert (out.double() - ref).abs().max().item() < tol
    # the one-token sequences attend to themselves only: their output is their own value row
    for one in (7, 20):
        torch.testing.assert_close(out[one], v[one].repeat_interleave(2, dim=0))


@pytest.mark.parametrize(
    "causal,window", [(True, (-1, -1)), (False, (-1, -1)), (True, (2, -1)), (False, (1, 2))], ids=["causal", "full", "causal-window", "window"]
)
def test_varlen_query_and_key_lengths_differ(causal, window):
    """flash-attn's bottom-right alignment when a sequence has fewer queries than keys (decoding with a cache), and
    its sliding windows."""
    cu_q, cu_k = _cu((2, 3, 1)), _cu((5, 3, 4))
    q, k, v = _qkv(cu_q[-1], cu_k[-1], torch.float64, seed=1)
    out = va.varlen_attention(
        q, k, v, torch.tensor(cu_q), torch.tensor(cu_k), causal=causal, window_size=window, softmax_scale=0.3
    )
    ref = _brute_force(q, k, v, cu_q, cu_k, causal=causal, window=window, scale=0.3)
    assert (out - ref).abs().max().item() < 1e-12


def test_varlen_gradients_match_brute_force():
    cu = _cu(LENGTHS)
    inputs = [x.requires_grad_() for x in _qkv(cu[-1], cu[-1], torch.float64, seed=2)]
    weight = torch.randn(cu[-1], 4, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    cu_t = torch.tensor(cu, dtype=torch.int32)
    grads = torch.autograd.grad((va.varlen_attention(*inputs, cu_t, cu_t) * weight).sum(), inputs)
    ref_grads = torch.autograd.grad((_brute_force(*inputs, cu, cu) * weight).sum(), inputs)
    for g, r in zip(grads, ref_grads):
        assert (g - r).abs().max().item() < 1e-12


@pytest.mark.parametrize("causal", [True, False])
def test_dense_matches_brute_force(causal):
    batch, seq = 3, 9
    q, k, v = (x.view(batch, seq, x.size(1), x.size(2)) for x in _qkv(batch * seq, batch * seq, torch.float64, seed=4))
    out = va.flash_attn_func(q, k, v, causal=causal)
    cu = _cu([seq] * batch)
    ref = _brute_force(*(x.reshape(batch * seq, x.size(2), x.size(3)) for x in (q, k, v)), cu, cu, causal=causal)
    assert (out.reshape(batch * seq, 4, 32) - ref).abs().max().item() < 1e-12


def test_unsupported_features_raise_instead_of_being_dropped():
    q, k, v = _qkv(4, 4, torch.float32)
    cu = torch.tensor([0, 4])
    with pytest.raises(NotImplementedError, match="softcapping"):
        va.varlen_attention(q, k, v, cu, cu, softcap=30.0)
    with pytest.raises(NotImplementedError, match="sinks"):
        va.flash_attn_func(q[None], k[None], v[None], s_aux=torch.zeros(4))


# ---------------------------------------------------------------------------------------------------------------
# Registration: by the plugin, in every process that imports verl
# ---------------------------------------------------------------------------------------------------------------


def test_registered_by_the_plugin_on_import_verl():
    from transformers import modeling_flash_attention_utils as fa_utils
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.utils.generic import is_flash_attention_requested

    assert patches.PATCHES["cpu_varlen_attention"].applied
    assert getattr(fa_utils._lazy_imports, patches._MARK, False)
    assert ALL_ATTENTION_FUNCTIONS[ATTN_IMPLEMENTATION] is ALL_ATTENTION_FUNCTIONS["flash_attention_2"]
    assert ALL_MASK_ATTENTION_FUNCTIONS[ATTN_IMPLEMENTATION] is flash_attention_mask
    # no "flash" in the name: transformers' flash-attn availability checks never run for it
    assert not is_flash_attention_requested(requested_attention_implementation=ATTN_IMPLEMENTATION)
    funcs, _ = fa_utils.lazy_import_flash_attention(ATTN_IMPLEMENTATION)
    assert funcs[:2] == (va.flash_attn_func, va.varlen_attention)
    va.register()  # idempotent
    assert getattr(fa_utils._lazy_imports.__wrapped__, patches._MARK, False) is False


# ---------------------------------------------------------------------------------------------------------------
# A tiny Qwen2 loaded as verl loads it (AutoConfig with attn_implementation, then from_pretrained)
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from opd_verl.demo.tiny_models import build_qwen2, build_tokenizer, save_model_dir

    tok = build_tokenizer()
    # 4 query heads, 2 kv heads (GQA), head_dim 32
    model = build_qwen2(tok, hidden_size=128, num_layers=2, head_dim=32, num_kv_heads=2, seed=0)
    return save_model_dir(tmp_path_factory.mktemp("tiny_qwen2"), tok, model)


def _load(path, attn: str, dtype=torch.float32):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, attn_implementation=attn)  # verl 0.9.1 HFModelConfig does this
    model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype)
    assert model.config._attn_implementation == attn
    return model.eval()


def _token_ids(lengths, vocab: int, seed: int = 5) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, vocab, (n,), generator=g) for n in lengths]


def _packed(seqs):
    """verl's packed row: input_ids [1, nnz], position_ids restarting at each sequence, no attention_mask."""
    return torch.cat(seqs)[None], torch.cat([torch.arange(len(s)) for s in seqs])[None]


@torch.no_grad()
def _per_sequence(model_dir, seqs, dtype=torch.float32, attn="eager") -> torch.Tensor:
    """[nnz, vocab] log-probs, each sequence run alone."""
    model = _load(model_dir, attn, dtype)
    return torch.cat([torch.log_softmax(model(input_ids=s[None]).logits[0], -1) for s in seqs])


# eager's softmax runs in float32 whatever the dtype (~1e-7 here), so the float64 reference is sdpa, sequence by sequence
@pytest.mark.parametrize("dtype,tol,ref_attn", [(torch.float32, 1e-5, "eager"), (torch.float64, 1e-12, "sdpa")])
@torch.no_grad()
def test_packed_rows_match_each_sequence_alone(model_dir, dtype, tol, ref_attn):
    model = _load(model_dir, ATTN_IMPLEMENTATION, dtype)
    seqs = _token_ids(LENGTHS, model.config.vocab_size)
    input_ids, position_ids = _packed(seqs)
    logp = torch.log_softmax(model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits[0], -1)
    ref = _per_sequence(model_dir, seqs, dtype, ref_attn)
    assert (logp - ref).abs().max().item() < tol
    # with a cache (use_cache left at True) transformers 5.10 skips packed-row detection for sdpa/eager masks; the flash
    # path reads the restarts from position_ids itself
    cached = torch.log_softmax(model(input_ids=input_ids, position_ids=position_ids).logits[0], -1)
    assert (cached - ref).abs().max().item() < tol
    # one sequence, no position reset: transformers' dense path (flash_attn_func)
    one = torch.log_softmax(model(input_ids=seqs[2][None]).logits[0], -1)
    assert (one - ref[8:20]).abs().max().item() < tol


@torch.no_grad()
def test_padded_batch_matches_eager_per_sequence(model_dir):
    """verl without remove-padding: [batch, seq] rows, left- and right-padded, a 2-D attention_mask and verl's
    position_ids (cumsum of the mask - 1, clipped at 0): transformers unpads, calls the varlen kernel, pads back."""
    model = _load(model_dir, ATTN_IMPLEMENTATION)
    seqs = _token_ids((5, 9, 3), model.config.vocab_size, seed=6)
    width, pad_id = 11, model.config.pad_token_id
    lefts = (2, 0, 4)  # row 1: right padding only
    input_ids = torch.full((3, width), pad_id)
    mask = torch.zeros(3, width, dtype=torch.long)
    for row, (s, left) in enumerate(zip(seqs, lefts)):
        input_ids[row, left : left + len(s)] = s
        mask[row, left : left + len(s)] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits
    logp = torch.log_softmax(logits, -1)
    ref = _per_sequence(model_dir, seqs)
    got = torch.cat([logp[row, left : left + len(s)] for row, (s, left) in enumerate(zip(seqs, lefts))])
    assert (got - ref).abs().max().item() < 1e-5


def test_unregistered_name_is_rejected_by_transformers(model_dir):
    with pytest.raises(ValueError, match="is not supported"):
        _load(model_dir, ATTN_IMPLEMENTATION + "_unregistered")


# ---------------------------------------------------------------------------------------------------------------
# SP=2 over gloo through verl's own Ulysses code
# ---------------------------------------------------------------------------------------------------------------


def _sp_worker(rank: int, world: int, port: int, model_dir: str, out_path: str) -> None:
    """One rank of an SP=world group: verl's apply_monkey_patch, then verl's FSDP engine's input handling
    (FSDPEngineWithLMHead.prepare_model_inputs: roll, ulysses_pad_and_slice_inputs; prepare_model_outputs:
    gather_outputs_and_unpad) for each attention; rank 0 saves the gathered log-probs of the rolled ids."""
    import torch.distributed as dist
    from transformers.integrations import flash_attention
    from verl.models.transformers import monkey_patch
    from verl.models.transformers.monkey_patch import apply_monkey_patch
    from verl.utils.ulysses import gather_outputs_and_unpad, set_ulysses_sequence_parallel_group, ulysses_pad_and_slice_inputs

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        assert patches.PATCHES["cpu_varlen_attention"].applied  # by the plugin, on `import verl`
        set_ulysses_sequence_parallel_group(dist.group.WORLD)
        results = {}
        for attn in (ATTN_IMPLEMENTATION, "sdpa"):
            model = _load(model_dir, attn)
            apply_monkey_patch(model, ulysses_sp_size=world, use_remove_padding=True)
            # verl wraps the flash path whatever the attn name: ours reaches the wrapper, sdpa never does
            assert flash_attention._flash_attention_forward is monkey_patch._ulysses_flash_attention_forward
            input_ids, position_ids = _packed(_token_ids(LENGTHS, model.config.vocab_size))
            rolled = torch.roll(input_ids, shifts=-1, dims=1)
            ids, pos, pad = ulysses_pad_and_slice_inputs(input_ids, position_ids, sp_size=world)
            rolled, _, _ = ulysses_pad_and_slice_inputs(rolled, None, sp_size=world)
            with torch.no_grad():
                logits = model(input_ids=ids, position_ids=pos, attention_mask=None, use_cache=False).logits[0]
                logp = torch.log_softmax(logits, -1).gather(-1, rolled[0, :, None])[:, 0]
                results[attn] = (gather_outputs_and_unpad(logp, gather_dim=0, unpad_dim=0, padding_size=pad), pad)
        if rank == 0:
            torch.save(results, out_path)
    finally:
        dist.destroy_process_group()


def test_ulysses_sp2_matches_one_process_and_sdpa_would_not(model_dir, tmp_path):
    import torch.multiprocessing as mp

    out_path = str(tmp_path / "sp2.pt")
    mp.spawn(_sp_worker, args=(2, _free_port(), model_dir, out_path), nprocs=2, join=True)
    results = torch.load(out_path)

    seqs = _token_ids(LENGTHS, _load(model_dir, "eager").config.vocab_size)
    rolled = torch.roll(torch.cat(seqs), -1)
    ref = _per_sequence(model_dir, seqs).gather(-1, rolled[:, None])[:, 0]

    logp, pad = results[ATTN_IMPLEMENTATION]
    assert pad == 1  # verl's ulysses pad (a one-token sequence at position 0), dropped by gather_outputs_and_unpad
    assert logp.shape == ref.shape
    err = (logp - ref).abs().max().item()
    assert err < 1e-5, err
    sdpa_logp, _ = results["sdpa"]
    sdpa_err = (sdpa_logp - ref).abs().max().item()
    assert sdpa_err > 1e-3, f"sdpa at SP=2 should attend within each shard only (error {sdpa_err})"
