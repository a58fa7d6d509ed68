"""The loss-level multi-teacher mixtures (opd_verl.algorithms.teachers.teacher_mixture_at) are computed
opd.chunk_size rows at a time: the same values as the whole-tensor formula (float64 brute force), and peak memory
above the inputs of one [n, V] float32 output plus chunk temporaries, not K float32 copies and their stack."""

from __future__ import annotations

import os

import pytest
import torch

from opd_verl.algorithms.teachers import mix_teacher_logits, teacher_mixture_at

F64 = torch.float64


def brute_force(logits, weights, mode, tau):
    """log πt at τ in float64, by definition of each mixture."""
    w = torch.tensor(weights, dtype=F64)
    w = w / w.sum()
    if mode == "mean_logit":
        return torch.log_softmax(sum(wk * z.double() for wk, z in zip(w, logits)) / tau, -1)
    return torch.log(sum(wk * torch.softmax(z.double() / tau, -1) for wk, z in zip(w, logits)))


@pytest.mark.parametrize("mode", ["mean_prob", "mean_logit"])
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, F64])
def test_chunked_mixture_equals_the_float64_formula(mode, k, dtype):
    g = torch.Generator().manual_seed(k)
    logits = [(torch.randn(11, 7, generator=g, dtype=F64) * 4).to(dtype) for _ in range(k)]
    weights, tau = [3.0, 1.0, 0.5][:k], 0.7
    expected = brute_force(logits, weights, mode, tau)
    mixed, divisor = teacher_mixture_at(logits, weights, mode, tau, chunk_size=4)  # 11 rows: chunks 4, 4, 3
    assert mixed.dtype == (torch.float32 if dtype == torch.bfloat16 else F64) and mixed.shape == (11, 7)
    ours = torch.log_softmax(mixed.double() / divisor, -1)
    assert (ours - expected).abs().max() < (2e-6 if dtype == torch.bfloat16 else 1e-12)
    whole, _ = teacher_mixture_at(logits, weights, mode, tau, chunk_size=11)
    assert (mixed - whole).abs().max() <= 4 * torch.finfo(mixed.dtype).eps * whole.abs().max()  # vector tails
    assert torch.equal(mix_teacher_logits(logits, weights, mode, chunk_size=4),
                       teacher_mixture_at(logits, weights, mode, 1.0, chunk_size=4)[0])


def test_one_teacher_is_passed_through():
    z = torch.randn(3, 5, dtype=torch.bfloat16)
    out, divisor = teacher_mixture_at([z], [1.0], "mean_prob", 0.7, chunk_size=2)
    assert out is z and divisor == 0.7


# ----------------------------------------------------------------------------------------------------------
# peak memory
# ----------------------------------------------------------------------------------------------------------
def _hwm_and_rss() -> tuple[int, int]:
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                values[key] = int(value.split()[0]) * 1024
    return values["VmHWM"], values["VmRSS"]


def peak_extra_bytes(fn):
    """Peak resident memory of this process while ``fn()`` runs, above the resident memory before it (bytes), and
    fn's result. Linux: writing 5 to /proc/self/clear_refs resets the peak (VmHWM) to the current RSS. torch's CPU
    allocator takes tensors of this size from mmap and returns them on free, so RSS follows live tensors; a
    temporary counts once written (as memory a GPU would need)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    hwm, before = _hwm_and_rss()
    assert hwm - before < 2**20  # the reset worked
    out = fn()
    return _hwm_and_rss()[0] - before, out


def _can_measure() -> bool:
    try:
        peak_extra_bytes(lambda: None)
    except (OSError, AssertionError, KeyError):
        return False
    return True


N, V = 1024, 32768  # 128 MiB per [n, V] float32 copy
BOUND = 2.5  # peak above the inputs, in [n, V] float32 copies: the output (1) + chunk temporaries (chunk = n / 4)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs") or not _can_measure(),
                    reason="needs Linux's /proc/self/clear_refs to reset the peak RSS")
def test_mixture_peak_memory_is_one_output_plus_chunks():
    g = torch.Generator().manual_seed(0)
    # bf16 inputs, drawn in place (no float32 [n, V] temporary before the measurement)
    logits = [torch.empty(N, V, dtype=torch.bfloat16).uniform_(-6.0, 6.0, generator=g) for _ in range(2)]
    one = N * V * 4
    weights = [3.0, 1.0]
    for mode in ("mean_prob", "mean_logit"):
        extra, out = peak_extra_bytes(lambda: teacher_mixture_at(logits, weights, mode, 0.7, chunk_size=N // 4))
        assert out[0].shape == (N, V)
        assert one <= extra < BOUND * one, (mode, extra / one)  # the [n, V] float32 output is there
        del out
    # the measurement sees the whole-tensor formula (the code before chunking): mean_logit's two [n, V] temporaries
    whole, _ = peak_extra_bytes(lambda: sum(w * z.float() for w, z in zip([0.75, 0.25], logits)))
    assert whole > BOUND * one, whole / one
