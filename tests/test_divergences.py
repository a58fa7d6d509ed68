"""opd_verl.algorithms.divergences against brute-force float64 references (explicit loops over a tiny vocabulary)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from opd_verl.algorithms.divergences import (
    DIVERGENCES,
    KL_ESTIMATORS,
    SUPPORTS,
    chunked_divergence_from_hidden,
    chunked_full_divergence,
    chunked_teacher_topk,
    chunked_topk_divergence,
    full_divergence,
    leave_one_out_baseline,
    sampled_kl_surrogate,
    sampled_reverse_kl,
    sanitize_teacher_logp,
    topk_divergence,
)

TOL = 1e-6
NEG_INF = float("-inf")
F64 = torch.float64

# (divergence, beta) cases; jsd at the exact endpoints too.
CASES = [
    ("reverse_kl", 0.5),
    ("forward_kl", 0.5),
    ("jsd", 0.5),
    ("jsd", 0.1),
    ("jsd", 0.9),
    ("jsd", 0.0),
    ("jsd", 1.0),
]


# ----------------------------------------------------------------------------------------------------------
# brute-force references: one token at a time, one vocabulary entry at a time (torch scalars for autograd)
# ----------------------------------------------------------------------------------------------------------
def _ref_logp(row: torch.Tensor, tau: float) -> list[torch.Tensor]:
    scaled = [row[i] / tau for i in range(row.shape[0])]
    log_z = torch.log(sum(torch.exp(v) for v in scaled))
    return [v - log_z for v in scaled]


def _ref_kl(logp: list[torch.Tensor], logr: list[torch.Tensor]) -> torch.Tensor:
    """Σ_i p_i (log p_i − log r_i), skipping p_i = 0."""
    total = torch.zeros((), dtype=F64)
    for a, b in zip(logp, logr):
        if a.item() == NEG_INF:
            continue
        total = total + torch.exp(a) * (a - b)
    return total


def _ref_from_logp(ls: list[torch.Tensor], lt: list[torch.Tensor], divergence: str, beta: float) -> torch.Tensor:
    if divergence == "reverse_kl" or (divergence == "jsd" and beta == 1.0):
        return _ref_kl(ls, lt)
    if divergence == "forward_kl" or (divergence == "jsd" and beta == 0.0):
        return _ref_kl(lt, ls)
    # mixture in probability space (independent of the implementation's log-space logsumexp)
    lm = []
    for a, b in zip(ls, lt):
        m = beta * torch.exp(b) + (1.0 - beta) * torch.exp(a)
        lm.append(torch.log(m) if m.item() > 0 else torch.tensor(NEG_INF, dtype=F64))
    return beta * _ref_kl(lt, lm) + (1.0 - beta) * _ref_kl(ls, lm)


def ref_full(zs: torch.Tensor, zt: torch.Tensor, divergence: str, beta: float, tau: float) -> torch.Tensor:
    """[T, V] float64 logits → [T] reference divergence."""
    out = []
    for t in range(zs.shape[0]):
        ls = _ref_logp(zs[t], tau)
        lt = _ref_logp(zt[t].detach(), tau)
        out.append(_ref_from_logp(ls, lt, divergence, beta))
    return torch.stack(out)


def ref_topk(zs, ids, t_logp, divergence, beta, tau) -> torch.Tensor:
    """Top-k + tail bucket reference: (k+1)-point distributions built entry by entry."""
    out = []
    for t in range(zs.shape[0]):
        ls_full = _ref_logp(zs[t], tau)
        ls = [ls_full[int(i)] for i in ids[t]]
        lt = [t_logp[t, j].detach() for j in range(ids.shape[1])]
        for lst in (ls, lt):
            tail = 1.0 - sum(torch.exp(v) for v in lst)
            lst.append(torch.log(tail) if tail.item() > 0 else torch.tensor(NEG_INF, dtype=F64))
        out.append(_ref_from_logp(ls, lt, divergence, beta))
    return torch.stack(out)


def _logits(t: int, v: int, seed: int, scale: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(t, v, generator=g, dtype=F64) * scale, torch.randn(t, v, generator=g, dtype=F64) * scale)


def _grad(f, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    x = x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad((f(x) * w).sum(), x)
    return g


def _kind(divergence: str, beta: float) -> str:
    """jsd at β = 0 / 1 is forward / reverse KL."""
    if divergence == "jsd":
        return {0.0: "forward_kl", 1.0: "reverse_kl"}.get(beta, "jsd")
    return divergence


def _maxerr(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _relerr(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| relative to max |b| (at least 1)."""
    return _maxerr(a.double(), b.double()) / max(1.0, b.abs().max().item())


def _fd_grad(f, x: torch.Tensor, w: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Central finite differences of Σ w·f(x), one entry of x at a time (a fresh forward each: gradcheck's numerical
    Jacobian-vector product, for Functions that allow one backward per forward)."""
    out = torch.empty_like(x)
    for i in range(x.numel()):
        d = torch.zeros_like(x).view(-1)
        d[i] = eps
        d = d.view_as(x)
        out.view(-1)[i] = ((f(x + d) * w).sum() - (f(x - d) * w).sum()) / (2 * eps)
    return out


# ----------------------------------------------------------------------------------------------------------
# sampled support
# ----------------------------------------------------------------------------------------------------------
def test_sanitize_teacher_logp():
    x = torch.tensor([-1.0, NEG_INF, float("nan"), -70.0, float("inf"), 0.0])
    clean, invalid = sanitize_teacher_logp(x, floor=-50.0)
    assert invalid.tolist() == [False, True, True, False, True, False]
    assert clean.tolist() == [-1.0, -50.0, -50.0, -70.0, -50.0, 0.0]
    clean2, _ = sanitize_teacher_logp(x, floor=-7.0)
    assert clean2[1].item() == -7.0


@pytest.mark.parametrize("estimator", KL_ESTIMATORS)
def test_sampled_reverse_kl_vs_reference(estimator):
    g = torch.Generator().manual_seed(0)
    s = -torch.rand(4, 9, generator=g, dtype=F64) * 6
    q = -torch.rand(4, 9, generator=g, dtype=F64) * 6
    out = sampled_reverse_kl(s, q, estimator)
    for i in range(4):
        for j in range(9):
            si, qi = s[i, j].item(), q[i, j].item()
            ref = si - qi if estimator != "k3" else math.exp(qi - si) - (qi - si) - 1.0
            assert abs(out[i, j].item() - ref) <= 1e-12
    # gradient w.r.t. the student: k1' = 1, k3' = 1 - exp(q - s)
    w = torch.randn(4, 9, generator=g, dtype=F64)
    gs = _grad(lambda x: sampled_reverse_kl(x, q, estimator), s, w)
    ref_g = w if estimator != "k3" else w * (1.0 - torch.exp(q - s))
    assert _maxerr(gs, ref_g) <= 1e-12


def test_sampled_reverse_kl_invalid_teacher_is_finite():
    s = torch.tensor([-0.5, -2.0, -3.0, -1.0])
    q = torch.tensor([NEG_INF, float("nan"), -1.0, float("inf")])
    for est in KL_ESTIMATORS:
        out = sampled_reverse_kl(s, q, est, floor=-50.0)
        assert torch.isfinite(out).all(), (est, out)
        d = -50.0 - (-0.5)
        expect = (-0.5 + 50.0) if est != "k3" else math.exp(d) - d - 1.0
        assert abs(out[0].item() - expect) <= 1e-4
    s.requires_grad_(True)
    (g,) = torch.autograd.grad(sampled_reverse_kl(s, q, "k3").sum(), s)
    assert torch.isfinite(g).all()


def test_k3_nonnegative_and_zero_at_equality():
    g = torch.Generator().manual_seed(1)
    s = -torch.rand(20000, generator=g) * 20
    q = torch.cat([s[:5000], s[5000:10000] + 1e-7, -torch.rand(10000, generator=g) * 20])
    k3 = sampled_reverse_kl(s, q, "k3")
    assert (k3 >= 0).all()
    assert (k3[:5000] == 0).all()
    k1 = sampled_reverse_kl(s, q, "k1")
    assert (k1 < 0).any()  # k1 is signed


def test_k1_k3_unbiased_monte_carlo():
    """E_{x~πs}[k1] = E_{x~πs}[k3] = KL(πs‖πt) (exact, over V = 7)."""
    g = torch.Generator().manual_seed(2)
    zs, zt = torch.randn(7, generator=g, dtype=F64), torch.randn(7, generator=g, dtype=F64)
    ls, lt = torch.log_softmax(zs, -1), torch.log_softmax(zt, -1)
    exact = sum(math.exp(ls[i]) * (ls[i] - lt[i]) for i in range(7)).item()
    n = 200_000
    x = torch.multinomial(ls.exp(), n, replacement=True, generator=g)
    for est in KL_ESTIMATORS:
        vals = sampled_reverse_kl(ls[x], lt[x], est)
        stderr = vals.std().item() / math.sqrt(n)
        assert abs(vals.mean().item() - exact) <= 5 * stderr, (est, vals.mean().item(), exact, stderr)


# ----------------------------------------------------------------------------------------------------------
# what each sampled estimator optimises: E_{x~πs}[∇θ loss(x)] by exact enumeration (float64, V = 6)
# ----------------------------------------------------------------------------------------------------------
V6 = 6


def _exact_kl_grads(theta: torch.Tensor, q_all: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """∇θ KL(πs‖πt) and ∇θ KL(πt‖πs) for πs = softmax(θ), πt = exp(q_all), by autograd on the exact sums."""
    th = theta.detach().clone().requires_grad_(True)
    ls = torch.log_softmax(th, -1)
    pt = q_all.exp()
    (g_rev,) = torch.autograd.grad((ls.exp() * (ls - q_all)).sum(), th)
    th2 = theta.detach().clone().requires_grad_(True)
    (g_fwd,) = torch.autograd.grad((pt * (q_all - torch.log_softmax(th2, -1))).sum(), th2)
    return g_rev, g_fwd


def _expected_surrogate_grad(theta, q_all, estimator, others=()):
    """Σ_x πs(x)·∇θ loss(x): the loss of a micro-batch whose first sequence is the token x ~ πs and whose other
    sequences are the fixed tokens ``others`` (one token each); only the first sequence's loss is differentiated
    at x, the expectation over the others' tokens is taken below where needed."""
    ps = torch.softmax(theta, -1)
    total = torch.zeros_like(theta)
    for x in range(V6):
        th = theta.detach().clone().requires_grad_(True)
        ls = torch.log_softmax(th, -1)
        tokens = torch.tensor([x, *others])
        s = ls[tokens].view(-1, 1)  # [sequences, 1 token]
        q = q_all[tokens].view(-1, 1)
        loss = sampled_kl_surrogate(s, q, estimator, torch.ones_like(s))[0, 0]
        (g,) = torch.autograd.grad(loss, th)
        total = total + ps[x] * g
    return total


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_expected_gradient_k1_is_reverse_kl_and_k3_is_forward_kl(seed):
    """k1's score-function gradient optimises KL(πs‖πt); the pathwise k3 loss optimises KL(πt‖πs)."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(V6, generator=g, dtype=F64) * 1.5
    q_all = torch.log_softmax(torch.randn(V6, generator=g, dtype=F64) * 1.5, -1)
    g_rev, g_fwd = _exact_kl_grads(theta, q_all)
    assert _maxerr(g_rev, g_fwd) > 1e-2  # the two KLs have different gradients here
    assert _maxerr(_expected_surrogate_grad(theta, q_all, "k1"), g_rev) <= 1e-12
    k3 = _expected_surrogate_grad(theta, q_all, "k3")
    assert _maxerr(k3, g_fwd) <= 1e-12
    assert _maxerr(k3, g_rev) > 1e-2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_expected_gradient_k1_baseline_is_reverse_kl(seed):
    """k1_baseline: (s − q − b)·∇s with b the leave-one-out mean over the other sequences. Exactly ∇ KL(πs‖πt)
    for any fixed other tokens (b does not depend on x), and for the joint enumeration of two sequences."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(V6, generator=g, dtype=F64) * 1.5
    q_all = torch.log_softmax(torch.randn(V6, generator=g, dtype=F64) * 1.5, -1)
    g_rev, _ = _exact_kl_grads(theta, q_all)
    for others in [(), (0,), (3, 5), (1, 1, 4)]:
        assert _maxerr(_expected_surrogate_grad(theta, q_all, "k1_baseline", others), g_rev) <= 1e-12
    # joint: both sequences sampled from πs, the whole micro-batch loss differentiated: 2·∇ KL
    ps = torch.softmax(theta, -1)
    total = torch.zeros_like(theta)
    for x0 in range(V6):
        for x1 in range(V6):
            th = theta.detach().clone().requires_grad_(True)
            ls = torch.log_softmax(th, -1)
            tokens = torch.tensor([x0, x1])
            loss = sampled_kl_surrogate(ls[tokens].view(2, 1), q_all[tokens].view(2, 1), "k1_baseline").sum()
            (gr,) = torch.autograd.grad(loss, th)
            total = total + ps[x0] * ps[x1] * gr
    assert _maxerr(total, 2 * g_rev) <= 1e-12


def test_k1_baseline_lowers_the_gradient_variance_when_kl_is_large():
    """Exact second moments (enumeration): with a teacher far from the student, subtracting b ≈ KL shrinks
    E‖(s − q − b)∇s‖² well below k1's E‖(s − q)∇s‖²."""
    g = torch.Generator().manual_seed(5)
    theta = torch.randn(V6, generator=g, dtype=F64)
    q_all = torch.log_softmax(torch.randn(V6, generator=g, dtype=F64) * 4, -1)
    ls = torch.log_softmax(theta, -1)
    ps = ls.exp()
    kl = float((ps * (ls - q_all)).sum())
    assert kl > 1.0
    score = torch.eye(V6, dtype=F64) - ps  # ∇θ log πs(x), row x
    k1 = sum(float(ps[x]) * float((ls[x] - q_all[x]) ** 2 * score[x].pow(2).sum()) for x in range(V6))
    base = sum(float(ps[x]) * float((ls[x] - q_all[x] - kl) ** 2 * score[x].pow(2).sum()) for x in range(V6))
    assert base < 0.7 * k1, (base, k1)


def test_leave_one_out_baseline_and_surrogate_values():
    v = torch.tensor([[1.0, 2.0, 0.0], [4.0, 0.0, 0.0], [6.0, 8.0, 10.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]])
    b = leave_one_out_baseline(v, mask)
    assert torch.allclose(b[:, 0], torch.tensor([28.0 / 4, 27.0 / 5, 7.0 / 3], dtype=F64))
    assert torch.equal(leave_one_out_baseline(v[:1], mask[:1]), torch.zeros(1, 3, dtype=F64))  # one sequence: 0
    s = -torch.rand(3, 3, dtype=F64)
    q = -torch.rand(3, 3, dtype=F64)
    for est in KL_ESTIMATORS:
        assert torch.allclose(sampled_kl_surrogate(s, q, est, mask), sampled_reverse_kl(s, q, est))


# ----------------------------------------------------------------------------------------------------------
# full support
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tau,teacher_tau", [(0.5, 1.0), (2.0, 0.7), (1.0, 3.0)])
def test_teacher_temperature_scales_the_teacher_only(tau, teacher_tau):
    """full_divergence / chunked_full_divergence with a separate teacher divisor: values and gradient equal the
    same divergence on pre-scaled logits (student z/τ, teacher z/τt at temperature 1)."""
    zs, zt = _logits(5, 7, seed=41)
    for div, beta in [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.3)]:
        ref = full_divergence(zs / tau, zt / teacher_tau, div, beta, 1.0)
        for fn in (full_divergence, lambda *a, **k: chunked_full_divergence(*a, chunk_size=2, **k)):
            x = zs.clone().requires_grad_(True)
            out = fn(x, zt, div, beta, tau, teacher_temperature=teacher_tau)
            assert _maxerr(out, ref) <= 1e-12
            w = torch.randn(5, dtype=F64)
            (gx,) = torch.autograd.grad((out * w).sum(), x)
            x2 = zs.clone().requires_grad_(True)
            (gr,) = torch.autograd.grad((full_divergence(x2 / tau, zt / teacher_tau, div, beta) * w).sum(), x2)
            assert _maxerr(gx, gr) <= 1e-10


@pytest.mark.parametrize("divergence,beta", CASES)
@pytest.mark.parametrize("tau", [1.0, 0.7, 2.5])
def test_full_divergence_vs_reference(divergence, beta, tau):
    zs, zt = _logits(5, 7, seed=3)
    ref = ref_full(zs, zt, divergence, beta, tau)
    out = full_divergence(zs, zt, divergence, beta, tau)
    assert out.dtype == F64 and out.shape == (5,)
    assert _maxerr(out, ref) <= TOL
    assert (out >= -1e-12).all()
    w = torch.randn(5, generator=torch.Generator().manual_seed(4), dtype=F64)
    g_ref = _grad(lambda x: ref_full(x, zt, divergence, beta, tau), zs, w)
    g_out = _grad(lambda x: full_divergence(x, zt, divergence, beta, tau), zs, w)
    g_chk = _grad(lambda x: chunked_full_divergence(x, zt, divergence, beta, tau, chunk_size=2), zs, w)
    assert _maxerr(g_out, g_ref) <= TOL
    assert _maxerr(g_chk, g_ref) <= TOL
    assert _maxerr(chunked_full_divergence(zs, zt, divergence, beta, tau, chunk_size=2), ref) <= TOL


def test_full_divergence_float32_close_to_reference():
    zs, zt = _logits(6, 11, seed=5)
    for divergence, beta in CASES:
        ref = ref_full(zs, zt, divergence, beta, 1.3)
        out = full_divergence(zs.float(), zt.float(), divergence, beta, 1.3)
        chk = chunked_full_divergence(zs.float(), zt.float(), divergence, beta, 1.3, chunk_size=4)
        assert out.dtype == torch.float32
        assert _maxerr(out.double(), ref) <= 1e-5
        assert _maxerr(chk.double(), ref) <= 1e-5


def test_full_divergence_bf16_inputs():
    zs, zt = _logits(6, 11, seed=6)
    zs16 = zs.bfloat16().requires_grad_(True)
    out = chunked_full_divergence(zs16, zt.bfloat16(), "jsd", 0.5, 1.0, chunk_size=4)
    assert out.dtype == torch.float32
    ref = ref_full(zs.bfloat16().double(), zt.bfloat16().double(), "jsd", 0.5, 1.0)
    assert _maxerr(out.double(), ref) <= 1e-5
    (g,) = torch.autograd.grad(out.sum(), zs16)
    assert g.dtype == torch.bfloat16 and torch.isfinite(g.float()).all()


def test_jsd_beta_endpoints_are_exact_kls():
    zs, zt = _logits(6, 9, seed=7)
    for tau in (1.0, 0.5):
        fkl = full_divergence(zs, zt, "forward_kl", temperature=tau)
        rkl = full_divergence(zs, zt, "reverse_kl", temperature=tau)
        assert torch.equal(full_divergence(zs, zt, "jsd", 0.0, tau), fkl)
        assert torch.equal(full_divergence(zs, zt, "jsd", 1.0, tau), rkl)
        for beta, kind in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
            assert torch.equal(
                chunked_full_divergence(zs, zt, "jsd", beta, tau, 4), chunked_full_divergence(zs, zt, kind, 0.5, tau, 4)
            )
        # and they differ from each other / from a proper JSD
        assert _maxerr(fkl, rkl) > 1e-3
        assert _maxerr(full_divergence(zs, zt, "jsd", 0.5, tau), rkl) > 1e-3


def test_jsd_limits():
    """JSD_β/β → KL(πt‖πs) as β → 0 and JSD_β/(1−β) → KL(πs‖πt) as β → 1 (error O(β), O(1−β))."""
    zs, zt = _logits(5, 8, seed=8, scale=1.0)
    fkl = ref_full(zs, zt, "forward_kl", 0.5, 1.0)
    rkl = ref_full(zs, zt, "reverse_kl", 0.5, 1.0)
    errs_f, errs_r = [], []
    for eps in (1e-2, 1e-3, 1e-4):
        errs_f.append(((full_divergence(zs, zt, "jsd", eps) / eps - fkl).abs() / fkl).max().item())
        errs_r.append(((full_divergence(zs, zt, "jsd", 1.0 - eps) / eps - rkl).abs() / rkl).max().item())
    assert errs_f[-1] <= 2e-3 and errs_r[-1] <= 2e-3, (errs_f, errs_r)
    # first-order convergence: each 10x smaller β gives a ~10x smaller error
    for errs in (errs_f, errs_r):
        assert errs[1] < errs[0] / 5 and errs[2] < errs[1] / 5, errs


def test_divergences_nonnegative_and_zero_when_equal():
    zs, zt = _logits(8, 10, seed=9)
    for divergence, beta in CASES:
        assert (full_divergence(zs, zt, divergence, beta) > 0).all()
        same = full_divergence(zs, zs + 3.0, divergence, beta)  # shift-invariant softmax → identical dists
        assert same.abs().max().item() <= 1e-12


def test_temperature_edge_cases():
    zs, zt = _logits(4, 6, seed=10)
    # very small τ (near-argmax distributions, probabilities underflowing to 0) and large τ (near uniform)
    for tau in (0.05, 20.0):
        for divergence, beta in CASES:
            ref = ref_full(zs, zt, divergence, beta, tau)
            out = full_divergence(zs, zt, divergence, beta, tau)
            chk = chunked_full_divergence(zs, zt, divergence, beta, tau, chunk_size=3)
            assert _maxerr(out, ref) <= TOL and _maxerr(chk, ref) <= TOL, (tau, divergence, beta)
    # τ scales logits: divergence(z, τ) == divergence(z/τ, 1)
    assert _maxerr(full_divergence(zs, zt, "jsd", 0.3, 2.0), full_divergence(zs / 2, zt / 2, "jsd", 0.3, 1.0)) <= 1e-12
    # large τ → uniform → divergence → 0
    assert full_divergence(zs, zt, "reverse_kl", 0.5, 1e6).abs().max().item() <= 1e-9
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError):
            full_divergence(zs, zt, "reverse_kl", 0.5, bad)


# ----------------------------------------------------------------------------------------------------------
# masked vocabulary (−inf logits)
# ----------------------------------------------------------------------------------------------------------
def _masked_logits(seed: int):
    zs, zt = _logits(5, 9, seed=seed)
    zs[:, 7:] = NEG_INF  # vocabulary padding masked in both
    zt[:, 7:] = NEG_INF
    zs[0, 1] = NEG_INF  # student-only mask
    zs[2, 4] = NEG_INF
    zt[1, 3] = NEG_INF  # teacher-only mask
    zt[3, 0] = NEG_INF
    return zs, zt


def _all_impls(zs, zt, divergence, beta, tau):
    return {
        "full": full_divergence(zs, zt, divergence, beta, tau),
        "chunk2": chunked_full_divergence(zs, zt, divergence, beta, tau, chunk_size=2),
        "chunk9": chunked_full_divergence(zs, zt, divergence, beta, tau, chunk_size=9),
    }


@pytest.mark.parametrize("tau", [1.0, 0.6])
def test_shared_neg_inf_logits(tau):
    """Entries masked in both distributions contribute 0: finite values/grads for every divergence."""
    zs, zt = _logits(5, 9, seed=11)
    zs[:, 6:] = NEG_INF
    zt[:, 6:] = NEG_INF
    w = torch.randn(5, generator=torch.Generator().manual_seed(12), dtype=F64)
    for divergence, beta in CASES:
        ref = ref_full(zs, zt, divergence, beta, tau)
        # masking entries out equals dropping them from the vocabulary
        assert _maxerr(ref, ref_full(zs[:, :6], zt[:, :6], divergence, beta, tau)) <= 1e-12
        g_ref = _grad(lambda x: ref_full(x, zt, divergence, beta, tau), zs, w)
        for name, out in _all_impls(zs, zt, divergence, beta, tau).items():
            assert torch.isfinite(out).all() and _maxerr(out, ref) <= TOL, (name, divergence, beta)
        for name, fn in (
            ("full", lambda x: full_divergence(x, zt, divergence, beta, tau)),
            ("chunk", lambda x: chunked_full_divergence(x, zt, divergence, beta, tau, chunk_size=2)),
        ):
            g = _grad(fn, zs, w)
            assert torch.isfinite(g).all(), (name, divergence, beta)
            assert (g[:, 6:] == 0).all()
            assert _maxerr(g, g_ref) <= TOL, (name, divergence, beta)


@pytest.mark.parametrize("divergence,beta", CASES)
def test_float32_probabilities_that_underflow_to_zero(divergence, beta):
    """Finite logits whose probabilities are exactly 0 in float32 (log-prob ≈ −300, both models, and one side
    only): values and gradient stay finite and match float64 (where those entries contribute ~e^−300)."""
    zs, zt = _logits(6, 11, seed=28)
    zs[:, 0] = zt[:, 0] = -300.0
    zs[:3, 1] = -300.0
    zt[3:, 2] = -300.0
    w = torch.randn(6, generator=torch.Generator().manual_seed(29), dtype=F64)
    ref = ref_full(zs, zt, divergence, beta, 1.0)
    g_ref = _grad(lambda x: ref_full(x, zt, divergence, beta, 1.0), zs, w)
    zs32, zt32 = zs.float(), zt.float()
    out = chunked_full_divergence(zs32, zt32, divergence, beta, 1.0, chunk_size=4)
    g = _grad(lambda x: chunked_full_divergence(x, zt32, divergence, beta, 1.0, chunk_size=4), zs32, w.float())
    assert torch.isfinite(out).all() and torch.isfinite(g).all()
    assert _maxerr(out.double(), ref) <= 1e-5 * max(1.0, ref.abs().max().item())  # float32: relative
    assert _maxerr(g.double(), g_ref) <= 1e-5


def test_one_sided_neg_inf_logits():
    """Student-only / teacher-only masks: the finite cases match the reference, the infinite KLs are +inf."""
    zs, zt = _masked_logits(13)
    w = torch.randn(5, generator=torch.Generator().manual_seed(14), dtype=F64)
    student_only_rows, teacher_only_rows = [0, 2], [1, 3]
    for divergence, beta in CASES:
        ref = ref_full(zs, zt, divergence, beta, 1.0)
        outs = _all_impls(zs, zt, divergence, beta, 1.0)
        for name, out in outs.items():
            assert not torch.isnan(out).any(), (name, divergence, beta)
            assert torch.equal(torch.isinf(out), torch.isinf(ref)), (name, divergence, beta, out, ref)
            fin = torch.isfinite(ref)
            assert _maxerr(out[fin], ref[fin]) <= TOL
        kind = _kind(divergence, beta)
        inf_rows = torch.isinf(ref).nonzero().flatten().tolist()
        if kind == "jsd":
            assert inf_rows == []  # the mixture covers both supports
        elif kind == "forward_kl":
            assert inf_rows == student_only_rows  # πt > 0 where πs = 0
        else:
            assert inf_rows == teacher_only_rows  # πs > 0 where πt = 0
        if kind == "reverse_kl":
            continue  # the gradient of an infinite reverse KL is not finite (documented)
        # forward KL: ∞ value but finite gradient (πs − πt)/τ; jsd: everything finite
        g_ref = _grad(lambda x: ref_full(x, zt, divergence, beta, 1.0), zs, w)
        for fn in (
            lambda x: full_divergence(x, zt, divergence, beta),
            lambda x: chunked_full_divergence(x, zt, divergence, beta, 1.0, chunk_size=3),
        ):
            g = _grad(fn, zs, w)
            assert torch.isfinite(g).all(), (divergence, beta)
            assert _maxerr(g, g_ref) <= TOL, (divergence, beta)
    # reverse KL gradients on rows whose value is finite are still exact
    g_ref = _grad(lambda x: ref_full(x, zt, "reverse_kl", 0.5, 1.0), zs, w)
    g = _grad(lambda x: chunked_full_divergence(x, zt, "reverse_kl", 0.5, 1.0, chunk_size=1), zs, w)
    rows = [0, 2, 4]
    assert torch.isfinite(g[rows]).all() and _maxerr(g[rows], g_ref[rows]) <= TOL


# ----------------------------------------------------------------------------------------------------------
# chunking
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [1, 3, 4, 10, 25])
def test_chunked_equals_unchunked(chunk):
    zs, zt = _logits(10, 8, seed=15)
    zs[:, -1] = NEG_INF
    zt[:, -1] = NEG_INF
    w = torch.randn(10, generator=torch.Generator().manual_seed(16), dtype=F64)
    for divergence, beta in CASES:
        for tau in (1.0, 0.8):
            full = full_divergence(zs, zt, divergence, beta, tau)
            chk = chunked_full_divergence(zs, zt, divergence, beta, tau, chunk_size=chunk)
            assert _maxerr(full, chk) <= 1e-12
            g_full = _grad(lambda x: full_divergence(x, zt, divergence, beta, tau), zs, w)
            g_chk = _grad(lambda x: chunked_full_divergence(x, zt, divergence, beta, tau, chunk), zs, w)
            assert _maxerr(g_full, g_chk) <= 1e-12


def test_chunked_leading_dims_and_teacher_not_differentiated():
    zs, zt = _logits(6, 7, seed=17)
    zs3, zt3 = zs.reshape(2, 3, 7), zt.reshape(2, 3, 7).clone().requires_grad_(True)
    out = chunked_full_divergence(zs3, zt3, "jsd", 0.4, 1.0, chunk_size=4)
    assert out.shape == (2, 3)
    assert _maxerr(out.reshape(-1), full_divergence(zs, zt, "jsd", 0.4)) <= 1e-12
    assert not out.requires_grad  # only the (non-differentiable here) student can carry a gradient
    zs3 = zs3.clone().requires_grad_(True)
    out = chunked_full_divergence(zs3, zt3, "jsd", 0.4, 1.0, chunk_size=4)
    gs, gt = torch.autograd.grad(out.sum(), (zs3, zt3), allow_unused=True)
    assert gt is None and gs.shape == zs3.shape


@pytest.mark.parametrize("divergence,beta", [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.3)])
def test_finite_differences_chunked_logits(divergence, beta):
    """The analytic gradients of the chunked full and top-k paths against finite differences (gradcheck needs a
    second backward through one graph, which these Functions refuse: see the memory tests)."""
    zs, zt = _logits(5, 6, seed=18, scale=1.0)
    w = torch.randn(5, generator=torch.Generator().manual_seed(19), dtype=F64)
    ids, lt = _teacher_topk(zt, 3, 0.7)
    rows = torch.tensor([4, 0, 2])
    for f in (
        lambda x: chunked_full_divergence(x, zt, divergence, beta, 0.7, chunk_size=2),
        lambda x: chunked_topk_divergence(x, ids, lt, divergence, beta, 0.7, chunk_size=2),
        lambda x: chunked_topk_divergence(x, ids[:3], lt[:3], divergence, beta, 0.7, 2, student_rows=rows),
    ):
        ww = w[: f(zs).shape[0]]
        assert _maxerr(_grad(f, zs, ww), _fd_grad(f, zs, ww)) <= 1e-7


@pytest.mark.parametrize("divergence,beta", [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.3)])
def test_gradcheck_chunked_hidden(divergence, beta):
    g = torch.Generator().manual_seed(19)
    hs = torch.randn(5, 4, generator=g, dtype=F64, requires_grad=True)
    ws = torch.randn(6, 4, generator=g, dtype=F64, requires_grad=True)
    ht, wt = torch.randn(5, 3, generator=g, dtype=F64), torch.randn(6, 3, generator=g, dtype=F64)
    assert torch.autograd.gradcheck(
        lambda h, w: chunked_divergence_from_hidden(h, w, ht, wt, divergence, beta, 1.3, chunk_size=2),
        (hs, ws),
        eps=1e-6,
        atol=1e-7,
    )


@pytest.mark.parametrize("chunk", [1, 3, 7, 16])
def test_hidden_equals_full(chunk):
    g = torch.Generator().manual_seed(20)
    T, H, Ht, V = 7, 4, 5, 9
    hs = torch.randn(T, H, generator=g, dtype=F64)
    ws = torch.randn(V, H, generator=g, dtype=F64)
    ht = torch.randn(T, Ht, generator=g, dtype=F64)
    wt = torch.randn(V, Ht, generator=g, dtype=F64)
    up = torch.randn(T, generator=g, dtype=F64)
    for divergence, beta in CASES:
        for tau in (1.0, 1.7):
            hs_a, ws_a = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
            ref = ref_full(hs_a @ ws_a.T, ht @ wt.T, divergence, beta, tau)
            g_ref = torch.autograd.grad((ref * up).sum(), (hs_a, ws_a))
            hs_b, ws_b = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
            out = chunked_divergence_from_hidden(hs_b, ws_b, ht, wt, divergence, beta, tau, chunk_size=chunk)
            g_out = torch.autograd.grad((out * up).sum(), (hs_b, ws_b))
            assert _maxerr(out, ref) <= TOL
            assert _maxerr(g_out[0], g_ref[0]) <= TOL and _maxerr(g_out[1], g_ref[1]) <= TOL
            # only the hidden-state gradient requested
            (gh,) = torch.autograd.grad(
                (chunked_divergence_from_hidden(hs_b, ws, ht, wt, divergence, beta, tau, chunk) * up).sum(), hs_b
            )
            assert _maxerr(gh, g_ref[0]) <= TOL


@pytest.mark.parametrize("reduce", ["sum", "mean", "weighted", "twice"])
def test_hidden_gradient_from_forward(monkeypatch, reduce):
    """A sum or mean of the values (uniform grad_out) takes the gradient forward computed: one pass over the logits;
    per-row weights, or a second backward through the same graph, recompute it in backward. All equal the float64
    reference."""
    import opd_verl.algorithms.divergences.hidden_states as div

    calls = []
    real_pass = div._hidden_pass
    # each call: (a gradient computed, with per-row weights)
    spy = lambda *a: calls.append((a[8] or a[9], a[10] is not None)) or real_pass(*a)  # noqa: E731
    monkeypatch.setattr(div, "_hidden_pass", spy)
    g = torch.Generator().manual_seed(23)
    T, H, V = 7, 4, 9
    hs, ws = torch.randn(T, H, generator=g, dtype=F64), torch.randn(V, H, generator=g, dtype=F64)
    ht, wt = torch.randn(T, 5, generator=g, dtype=F64), torch.randn(V, 5, generator=g, dtype=F64)
    up = torch.randn(T, generator=g, dtype=F64)
    agg = {"sum": torch.sum, "mean": torch.mean, "weighted": lambda x: (x * up).sum(), "twice": torch.sum}[reduce]
    for divergence, beta in CASES:
        hs_a, ws_a = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
        g_ref = torch.autograd.grad(agg(ref_full(hs_a @ ws_a.T, ht @ wt.T, divergence, beta, 1.3)), (hs_a, ws_a))
        calls.clear()
        hs_b, ws_b = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
        loss = agg(chunked_divergence_from_hidden(hs_b, ws_b, ht, wt, divergence, beta, 1.3, chunk_size=3))
        backwards = 2 if reduce == "twice" else 1
        grads = [torch.autograd.grad(loss, (hs_b, ws_b), retain_graph=True) for _ in range(backwards)]
        for g_out in grads:
            assert _maxerr(g_out[0], g_ref[0]) <= TOL and _maxerr(g_out[1], g_ref[1]) <= TOL
        assert calls == [(True, False)] + [(True, True)] * (reduce in ("weighted", "twice")), calls
    with torch.no_grad():  # no gradient wanted: values only
        calls.clear()
        out = chunked_divergence_from_hidden(hs.requires_grad_(True), ws, ht, wt, "jsd", 0.5, 1.3, chunk_size=3)
    assert calls == [(False, False)], calls
    assert _maxerr(out, ref_full(hs @ ws.T, ht @ wt.T, "jsd", 0.5, 1.3)) <= TOL


def test_hidden_with_no_rows():
    """T = 0 (a micro-batch without response rows): values [0], zero weight gradient, empty hidden gradient."""
    hs = torch.zeros(0, 4, dtype=F64, requires_grad=True)
    ws = torch.randn(9, 4, dtype=F64, requires_grad=True)
    out = chunked_divergence_from_hidden(hs, ws, torch.zeros(0, 4, dtype=F64), torch.randn(9, 4, dtype=F64), "jsd")
    gh, gw = torch.autograd.grad(out.sum(), (hs, ws))
    assert out.shape == (0,) and gh.shape == (0, 4) and torch.equal(gw, torch.zeros_like(ws))


@pytest.mark.parametrize("rows_per_pass", [1, 2, 5])
def test_cpu_passes_split_chunks(monkeypatch, rows_per_pass):
    """On CPU a chunk is evaluated in passes of ~_CPU_PASS_BYTES per [rows, V] float32 buffer (cache-sized); any
    split gives the reference values and gradients, on the logits, top-k and hidden-state paths."""
    import opd_verl.algorithms.divergences.passes as div

    T, H, V = 11, 4, 13
    monkeypatch.setattr(div, "_CPU_PASS_BYTES", 4 * V * rows_per_pass)
    assert div._pass_rows(8, V, torch.device("cpu")) == rows_per_pass
    assert div._pass_rows(8, V, torch.device("meta")) == 8  # not CPU: a pass is the chunk
    g = torch.Generator().manual_seed(24)
    hs, ws = torch.randn(T, H, generator=g, dtype=F64), torch.randn(V, H, generator=g, dtype=F64)
    ht, wt = torch.randn(T, H, generator=g, dtype=F64), torch.randn(V, H, generator=g, dtype=F64)
    zt = ht @ wt.T
    up = torch.randn(T, generator=g, dtype=F64)
    ids, lt = chunked_teacher_topk(zt, 4, 1.0)
    for divergence, beta in CASES:
        zs = (hs @ ws.T).requires_grad_(True)
        ref = ref_full(zs, zt, divergence, beta, 1.0)
        (g_ref,) = torch.autograd.grad((ref * up).sum(), zs)
        out = chunked_full_divergence(zs, zt, divergence, beta, chunk_size=8)
        (g_out,) = torch.autograd.grad((out * up).sum(), zs)
        assert _maxerr(out, ref) <= TOL and _maxerr(g_out, g_ref) <= TOL
        ref_k = topk_divergence(zs, ids, lt, divergence, beta)
        (gk_ref,) = torch.autograd.grad((ref_k * up).sum(), zs)
        out_k = chunked_topk_divergence(zs, ids, lt, divergence, beta, chunk_size=8)
        (gk_out,) = torch.autograd.grad((out_k * up).sum(), zs)
        assert _maxerr(out_k, ref_k) <= TOL and _maxerr(gk_out, gk_ref) <= TOL
        hs_b = hs.clone().requires_grad_(True)
        out_h = chunked_divergence_from_hidden(hs_b, ws, ht, wt, divergence, beta, chunk_size=8)
        (gh,) = torch.autograd.grad(out_h.sum(), hs_b)
        hs_a = hs.clone().requires_grad_(True)
        (gh_ref,) = torch.autograd.grad(ref_full(hs_a @ ws.T, zt, divergence, beta, 1.0).sum(), hs_a)
        assert _maxerr(out_h, ref) <= TOL and _maxerr(gh, gh_ref) <= TOL


def test_hidden_bf16_weight_grad_dtype():
    g = torch.Generator().manual_seed(21)
    hs = torch.randn(6, 4, generator=g).bfloat16().requires_grad_(True)
    ws = torch.randn(10, 4, generator=g).bfloat16().requires_grad_(True)
    ht, wt = torch.randn(6, 4, generator=g).bfloat16(), torch.randn(10, 4, generator=g).bfloat16()
    out = chunked_divergence_from_hidden(hs, ws, ht, wt, "reverse_kl", chunk_size=4)
    assert out.dtype == torch.float32
    gh, gw = torch.autograd.grad(out.sum(), (hs, ws))
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
    ref = full_divergence(hs.float() @ ws.float().T, ht.float() @ wt.float().T, "reverse_kl")
    assert _maxerr(out, ref) <= 5e-2 * max(1.0, ref.abs().max().item())


class _MaxNumel(TorchDispatchMode):
    """Records the largest newly allocated tensor produced by any aten op (views of inputs are skipped)."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        storages = {a.untyped_storage().data_ptr() for a in inputs}
        for o in torch.utils._pytree.tree_leaves(out):
            if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in storages:
                self.max_numel = max(self.max_numel, o.numel())
                self.sizes.append(o.numel())
        return out


def test_hidden_memory_is_flat_in_T():
    """No op in forward or backward produces anything of size ≥ T·V (only O(chunk·V), [V,H], [T,H])."""
    T, H, V, chunk = 256, 8, 96, 16
    g = torch.Generator().manual_seed(22)
    hs = torch.randn(T, H, generator=g, requires_grad=True)
    ws = torch.randn(V, H, generator=g, requires_grad=True)
    ht, wt = torch.randn(T, H, generator=g), torch.randn(V, H, generator=g)
    bound = max(chunk * V, V * H, T * H)
    assert bound * 8 <= T * V
    with _MaxNumel() as fwd:
        out = chunked_divergence_from_hidden(hs, ws, ht, wt, "jsd", 0.5, 1.0, chunk_size=chunk)
    assert fwd.max_numel <= bound, fwd.max_numel
    with _MaxNumel() as bwd:
        torch.autograd.grad(out.sum(), (hs, ws))
    assert bwd.max_numel <= bound, bwd.max_numel


def _saved_tensors(fn) -> list[torch.Tensor]:
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        out = fn()
    return out, saved


@pytest.mark.parametrize("support", ["full", "topk"])
@pytest.mark.parametrize("selected", [False, True])
def test_chunked_logits_memory_and_backward_paths(support, selected):
    """Nothing is saved for backward (no input, no teacher logits): forward allocates the [T, V] gradient once
    (what backward returns) and otherwise only chunk-sized temporaries; the first backward scales that gradient
    in place (no new [T, V]); a second backward through the same graph is an error; without grad nothing of size
    T·V is allocated. With student_rows the same holds for the selected rows (gradient 0 on the others)."""
    T, V, chunk, k = 256, 64, 8, 5
    zs, zt = _logits(T, V, seed=23)
    zs = zs.float().requires_grad_(True)
    zt = zt.float()
    rows = torch.randperm(T, generator=torch.Generator().manual_seed(26))[: T // 2] if selected else None
    n = T if rows is None else rows.numel()
    zt_rows = zt if rows is None else zt[rows]
    w = torch.randn(n, generator=torch.Generator().manual_seed(27))
    ids, lt = chunked_teacher_topk(zt_rows, k, 1.0, chunk_size=chunk)

    def fn():
        if support == "full":
            return chunked_full_divergence(zs, zt_rows, "jsd", 0.3, 1.0, chunk_size=chunk, student_rows=rows)
        return chunked_topk_divergence(zs, ids, lt, "jsd", 0.3, 1.0, chunk_size=chunk, student_rows=rows)

    with _MaxNumel() as fwd:
        out, saved = _saved_tensors(fn)
    # full: nothing; top-k: only the [chunk, ≤ k+1] tensors of each chunk's own small autograd graph, freed
    # with that chunk (the (k+1)-point part is differentiated there)
    assert all(x.numel() <= chunk * (k + 1) for x in saved) and (support == "topk" or not saved)
    assert sorted(fwd.sizes)[-1] == T * V and sorted(fwd.sizes)[-2] <= chunk * V
    with _MaxNumel() as bwd:
        (g_first,) = torch.autograd.grad((out * w).sum(), zs, retain_graph=True)
    assert bwd.max_numel <= T  # scaled in place
    with pytest.raises(RuntimeError, match="second backward"):
        torch.autograd.grad((out * w).sum(), zs)
    # against the float64 references (themselves checked against brute force above / below)
    if support == "full":
        ref = lambda x: full_divergence(x, zt_rows.double(), "jsd", 0.3, 1.0)  # noqa: E731
    else:
        ref = lambda x: topk_divergence(x, ids, lt.double(), "jsd", 0.3, 1.0)  # noqa: E731
    sel = (lambda x: x) if rows is None else (lambda x: x[rows])
    g_ref = _grad(lambda x: ref(sel(x)), zs.detach().double(), w.double())
    assert _relerr(g_first, g_ref) <= 1e-6
    if rows is not None:
        others = torch.ones(T, dtype=torch.bool)
        others[rows] = False
        assert (g_first[others] == 0).all()
    with torch.no_grad(), _MaxNumel() as nograd:
        fn()
    assert nograd.max_numel <= chunk * V


@pytest.mark.parametrize("rows_per_pass", [None, 3])
def test_teacher_topk_memory_and_values(monkeypatch, rows_per_pass):
    """chunked_teacher_topk equals log_softmax + topk on the whole tensor (the same ids; log-probs to rounding), with
    pass-sized temporaries only (a pass: the chunk, or on CPU ~_CPU_PASS_BYTES)."""
    import opd_verl.algorithms.divergences.passes as div

    T, V, chunk, k = 32, 48, 8, 4  # the [T, k] outputs (128) are smaller than a pass (3·V = 144)
    if rows_per_pass:
        monkeypatch.setattr(div, "_CPU_PASS_BYTES", 4 * V * rows_per_pass)
    _, zt = _logits(T, V, seed=32)
    for dtype, tol in ((F64, 1e-12), (torch.float32, 2e-6), (torch.bfloat16, 2e-6)):
        z = zt.to(dtype)
        with _MaxNumel() as m:
            ids, lt = chunked_teacher_topk(z, k, 0.7, chunk_size=chunk)
        assert m.max_numel <= (rows_per_pass or chunk) * V
        ref_lt, ref_ids = torch.log_softmax(z.to(torch.promote_types(dtype, torch.float32)) / 0.7, -1).topk(k, -1)
        assert torch.equal(ids, ref_ids) and _maxerr(lt, ref_lt) <= tol * max(1.0, ref_lt.abs().max().item())
    ids, lt = chunked_teacher_topk(zt.reshape(4, 8, V), V + 3, 1.0, chunk_size=chunk)  # k capped at V
    assert ids.shape == (4, 8, V) and _maxerr(lt.exp().sum(-1), torch.ones(4, 8, dtype=F64)) <= 1e-12


# ----------------------------------------------------------------------------------------------------------
# top-k support
# ----------------------------------------------------------------------------------------------------------
def _teacher_topk(zt: torch.Tensor, k: int, tau: float):
    lt = torch.log_softmax(zt / tau, -1)
    vals, ids = lt.topk(k, dim=-1)
    return ids, vals


def _chunked_topk(chunk: int):
    return lambda *a, **kw: chunked_topk_divergence(*a, chunk_size=chunk, **kw)


# the float64-checked reference and the chunked path (chunk sizes below, equal to and above the rows)
TOPK_IMPLS = {"reference": topk_divergence, "chunk1": _chunked_topk(1), "chunk2": _chunked_topk(2),
              "chunk64": _chunked_topk(64)}


@pytest.mark.parametrize("divergence,beta", CASES)
@pytest.mark.parametrize("k", [1, 3, 8])
def test_topk_vs_reference(divergence, beta, k):
    zs, zt = _logits(5, 9, seed=24)
    w = torch.randn(5, generator=torch.Generator().manual_seed(25), dtype=F64)
    for tau in (1.0, 0.6):
        ids, lt = _teacher_topk(zt, k, tau)
        ref = ref_topk(zs, ids, lt, divergence, beta, tau)
        g_ref = _grad(lambda x: ref_topk(x, ids, lt, divergence, beta, tau), zs, w)
        for name, fn in TOPK_IMPLS.items():
            out = fn(zs, ids, lt, divergence, beta, tau)
            assert out.shape == (5,) and out.dtype == F64 and _relerr(out, ref) <= TOL, name
            g_out = _grad(lambda x: fn(x, ids, lt, divergence, beta, tau), zs, w)
            assert _relerr(g_out, g_ref) <= TOL, name
        # the chunked path is the reference's arithmetic: equal to rounding
        chunked = chunked_topk_divergence(zs, ids, lt, divergence, beta, tau, chunk_size=2)
        assert _maxerr(chunked, topk_divergence(zs, ids, lt, divergence, beta, tau)) <= 1e-12


@pytest.mark.parametrize("divergence,beta", CASES)
def test_topk_full_coverage_equals_full(divergence, beta):
    """k = V−1 (tail = the last token) and k = V (tail ≈ 0) reproduce the full-vocabulary divergence."""
    V = 7
    zs, zt = _logits(6, V, seed=26)
    w = torch.randn(6, generator=torch.Generator().manual_seed(27), dtype=F64)
    for tau in (1.0, 1.5):
        full = full_divergence(zs, zt, divergence, beta, tau)
        g_full = _grad(lambda x: full_divergence(x, zt, divergence, beta, tau), zs, w)
        for k in (V - 1, V):
            ids, lt = _teacher_topk(zt, k, tau)
            for name, fn in TOPK_IMPLS.items():
                out = fn(zs, ids, lt, divergence, beta, tau)
                assert _maxerr(out, full) <= TOL, (name, k, tau)
                g = _grad(lambda x: fn(x, ids, lt, divergence, beta, tau), zs, w)
                assert torch.isfinite(g).all() and _maxerr(g, g_full) <= TOL, (name, k, tau)


def test_topk_order_of_ids_irrelevant():
    zs, zt = _logits(4, 8, seed=28)
    ids, lt = _teacher_topk(zt, 4, 1.0)
    perm = torch.tensor([2, 0, 3, 1])
    for divergence, beta in CASES:
        for fn in TOPK_IMPLS.values():
            a = fn(zs, ids, lt, divergence, beta)
            b = fn(zs, ids[:, perm], lt[:, perm], divergence, beta)
            assert _maxerr(a, b) <= 1e-12


def test_topk_degenerate_tails_are_finite():
    zs, zt = _logits(4, 6, seed=29)
    ids, lt = _teacher_topk(zt, 6, 1.0)
    lt_over = lt + 1e-6  # teacher top-k sums slightly above 1 (rounding): tail clamps, no NaN
    lt_inf = lt.clone()
    lt_inf[:, -1] = NEG_INF  # a zero-probability teacher entry inside the top-k
    zs_peaked = zs.clone()
    zs_peaked[:, ids[0, 0]] = 80.0  # student tail mass underflows
    w = torch.randn(4, dtype=F64)
    for divergence, beta in CASES:
        for s_logits, t_logp in ((zs, lt_over), (zs, lt_inf), (zs_peaked, lt)):
            ref = topk_divergence(s_logits, ids, t_logp, divergence, beta)
            g_ref = _grad(lambda x: topk_divergence(x, ids, t_logp, divergence, beta), s_logits, w)
            for name, fn in TOPK_IMPLS.items():
                out = fn(s_logits, ids, t_logp, divergence, beta)
                g = _grad(lambda x: fn(x, ids, t_logp, divergence, beta), s_logits, w)
                kind = _kind(divergence, beta)
                if kind == "reverse_kl" and t_logp is lt_inf:
                    # πs > 0 where πt = 0: KL(πs‖πt) = +inf (its gradient is not finite; documented)
                    assert torch.isposinf(out).all()
                    continue
                assert torch.isfinite(out).all() and torch.isfinite(g).all(), (name, divergence, beta)
                assert _maxerr(out, ref) <= 1e-12 and _maxerr(g, g_ref) <= 1e-12, (name, divergence, beta)
    # student −inf logits outside the teacher's top-k only move mass out of the tail
    zs_m = zs.clone()
    ids3, lt3 = _teacher_topk(zt, 3, 1.0)
    for t in range(4):
        others = [i for i in range(6) if i not in ids3[t].tolist()]
        zs_m[t, others[0]] = NEG_INF
    for divergence, beta in CASES:
        ref = ref_topk(zs_m, ids3, lt3, divergence, beta, 1.0)
        for name, fn in TOPK_IMPLS.items():
            out = fn(zs_m, ids3, lt3, divergence, beta)
            assert _maxerr(out, ref) <= TOL, name
            g = _grad(lambda x: fn(x, ids3, lt3, divergence, beta), zs_m, w)
            assert torch.isfinite(g).all(), name


def test_topk_float32_and_leading_dims():
    zs, zt = _logits(6, 9, seed=30)
    ids, lt = _teacher_topk(zt, 4, 1.0)
    ref = topk_divergence(zs, ids, lt, "jsd", 0.5)
    for fn in TOPK_IMPLS.values():
        out = fn(zs.float().reshape(2, 3, 9), ids.reshape(2, 3, 4), lt.float().reshape(2, 3, 4), "jsd", 0.5)
        assert out.dtype == torch.float32 and out.shape == (2, 3)
        assert _maxerr(out.reshape(-1).double(), ref) <= 1e-5


@pytest.mark.parametrize("divergence,beta", [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.3)])
def test_chunked_topk_float32_and_bf16_inputs(divergence, beta):
    """float32 student logits: values and gradients within 1e-6 (relative) of the float64 reference on the same
    (float32-rounded) inputs; bf16: float32 values, bf16 gradient, both close to the reference."""
    zs, zt = _logits(12, 40, seed=33)
    w = torch.randn(12, generator=torch.Generator().manual_seed(34), dtype=F64)
    for tau in (1.0, 0.7):
        ids, lt = chunked_teacher_topk(zt.float(), 6, tau, chunk_size=5)
        for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2)):
            x = zs.to(dtype)
            ref = topk_divergence(x.double(), ids, lt.double(), divergence, beta, tau)
            g_ref = _grad(lambda y: topk_divergence(y, ids, lt.double(), divergence, beta, tau), x.double(), w)
            out = chunked_topk_divergence(x, ids, lt, divergence, beta, tau, chunk_size=5)
            g = _grad(lambda y: chunked_topk_divergence(y, ids, lt, divergence, beta, tau, 5), x, w.to(dtype))
            assert out.dtype == torch.float32 and g.dtype == dtype
            assert _relerr(out, ref) <= tol and _relerr(g, g_ref) <= tol, (dtype, _relerr(out, ref), _relerr(g, g_ref))


@pytest.mark.parametrize("divergence,beta", CASES)
def test_student_rows_select_rows_and_zero_the_others(divergence, beta):
    """student_rows: the values of those rows (teacher given for them only) and the gradient of Σ w·D over them,
    0 on every other row: the masked computation over all rows, for the full and the top-k paths."""
    zs, zt = _logits(9, 8, seed=35)
    rows = torch.tensor([7, 1, 2, 5])
    mask = torch.zeros(9, dtype=F64)
    mask[rows] = 1.0
    w = torch.randn(9, generator=torch.Generator().manual_seed(36), dtype=F64)
    for tau in (1.0, 1.6):
        ids, lt = _teacher_topk(zt, 3, tau)
        cases = [
            (lambda x: full_divergence(x, zt, divergence, beta, tau),
             lambda x: chunked_full_divergence(x, zt[rows], divergence, beta, tau, 3, student_rows=rows)),
            (lambda x: topk_divergence(x, ids, lt, divergence, beta, tau),
             lambda x: chunked_topk_divergence(x, ids[rows], lt[rows], divergence, beta, tau, 3, rows)),
        ]
        for masked, selected in cases:
            assert _maxerr(selected(zs), masked(zs)[rows]) <= 1e-12
            g_masked = _grad(masked, zs, w * mask)
            g_sel = _grad(selected, zs, w[rows])
            assert _maxerr(g_sel, g_masked) <= 1e-12
            assert (g_sel[mask == 0] == 0).all()
    with pytest.raises(ValueError, match="student_rows"):
        chunked_full_divergence(zs, zt[:3], student_rows=rows)


# ----------------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------------
def test_names_and_validation():
    assert DIVERGENCES == ("reverse_kl", "forward_kl", "jsd")
    assert SUPPORTS == ("sampled", "topk", "full")
    zs, zt = _logits(2, 4, seed=31)
    with pytest.raises(ValueError):
        full_divergence(zs, zt, "tv")
    with pytest.raises(ValueError):
        full_divergence(zs, zt, "jsd", beta=1.5)
    with pytest.raises(ValueError):
        chunked_full_divergence(zs, zt, chunk_size=0)
    with pytest.raises(ValueError):
        chunked_topk_divergence(zs, *_teacher_topk(zt, 2, 1.0), chunk_size=0)
    with pytest.raises(ValueError):
        chunked_full_divergence(zs, zt[:1])  # row counts differ without student_rows
    with pytest.raises(ValueError):
        full_divergence(zs, zt[:, :3])
    with pytest.raises(ValueError):
        sampled_reverse_kl(zs, zt, "k2")
