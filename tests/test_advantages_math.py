"""opd_verl.algorithms.advantages against plain-Python loop references."""

from __future__ import annotations

import math

import pytest
import torch

from opd_verl.algorithms.advantages import (
    OPDAdvantage,
    discounted_reward_to_go,
    distill_loss_mix,
    hybrid_advantage,
    opd_token_advantage,
)

NEG_INF, NAN, POS_INF = float("-inf"), float("nan"), float("inf")


def _ragged_mask(B: int = 5, T: int = 9) -> torch.Tensor:
    mask = torch.zeros(B, T, dtype=torch.int64)
    mask[0, :9] = 1  # full row
    mask[1, :4] = 1  # right padding
    mask[2, :] = 0  # empty row
    mask[3, [0, 1, 2, 5, 6]] = 1  # a masked gap (e.g. a tool observation) inside the response
    mask[4, :1] = 1  # single token
    return mask


def _logps(B: int, T: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = -torch.rand(B, T, generator=g, dtype=torch.float64) * 12
    s = -torch.rand(B, T, generator=g, dtype=torch.float64) * 12
    return q, s


def _ref_opd(q, s, mask, lo, hi, gamma, floor=-50.0):
    """Loop reference: returns advantages, rewards (lists of lists), num_clipped, num_invalid, num_tokens."""
    B, T = len(mask), len(mask[0])
    r = [[0.0] * T for _ in range(B)]
    n_clip = n_inv = n_tok = 0
    for b in range(B):
        for t in range(T):
            if not mask[b][t]:
                continue
            n_tok += 1
            if not math.isfinite(q[b][t]):
                r[b][t] = lo
                n_inv += 1
                n_clip += 1
                continue
            raw = q[b][t] - s[b][t]
            r[b][t] = min(max(raw, lo), hi)
            n_clip += r[b][t] != raw
    adv = [[0.0] * T for _ in range(B)]
    for b in range(B):
        for t in range(T):
            if mask[b][t]:
                adv[b][t] = sum(gamma ** (j - t) * r[b][j] for j in range(t, T) if mask[b][j])
    return adv, r, n_clip, n_inv, n_tok


def _check(out: OPDAdvantage, q, s, mask, lo, hi, gamma):
    adv, r, n_clip, n_inv, n_tok = _ref_opd(q.tolist(), s.tolist(), mask.tolist(), lo, hi, gamma)
    assert torch.isfinite(out.advantages).all() and torch.isfinite(out.token_rewards).all()
    assert (out.advantages.double() - torch.tensor(adv, dtype=torch.float64)).abs().max().item() <= 1e-6
    assert (out.token_rewards.double() - torch.tensor(r, dtype=torch.float64)).abs().max().item() <= 1e-6
    assert (out.num_clipped.item(), out.num_invalid.item(), out.num_tokens.item()) == (n_clip, n_inv, n_tok)
    assert abs(out.clip_frac.item() - n_clip / max(n_tok, 1)) <= 1e-12
    assert abs(out.invalid_frac.item() - n_inv / max(n_tok, 1)) <= 1e-12


@pytest.mark.parametrize("gamma", [0.0, 0.9, 1.0])
@pytest.mark.parametrize("clip", [(-10.0, 10.0), (-2.0, 1.5), (-0.5, 0.5)])
def test_opd_token_advantage_vs_loop(gamma, clip):
    q, s = _logps(5, 9, seed=0)
    mask = _ragged_mask()
    out = opd_token_advantage(q, s, mask, clip[0], clip[1], gamma)
    _check(out, q, s, mask, clip[0], clip[1], gamma)
    assert (out.advantages[mask == 0] == 0).all() and (out.token_rewards[mask == 0] == 0).all()
    if gamma == 0.0:
        assert torch.equal(out.advantages, out.token_rewards)


def test_opd_token_advantage_counts_clipping():
    q, s = _logps(5, 9, seed=1)
    mask = _ragged_mask()
    wide = opd_token_advantage(q, s, mask, -100.0, 100.0)
    assert wide.num_clipped.item() == 0 and wide.clip_frac.item() == 0.0
    tight = opd_token_advantage(q, s, mask, -0.1, 0.1)
    diff = (q - s)[mask.bool()]
    assert tight.num_clipped.item() == int(((diff < -0.1) | (diff > 0.1)).sum()) > 0
    # the empty row / masked positions never count
    assert tight.num_tokens.item() == int(mask.sum())


@pytest.mark.parametrize("gamma", [0.0, 0.9])
def test_opd_token_advantage_invalid_teacher(gamma):
    q, s = _logps(5, 9, seed=2)
    mask = _ragged_mask()
    q[0, 2] = NEG_INF
    q[0, 5] = NAN
    q[1, 1] = POS_INF
    q[3, 5] = NEG_INF
    q[1, 7] = NAN  # outside the mask: not counted
    q[2, 0] = NEG_INF  # empty row: not counted
    out = opd_token_advantage(q, s, mask, -3.0, 3.0, gamma)
    _check(out, q, s, mask, -3.0, 3.0, gamma)
    assert out.num_invalid.item() == 4
    assert out.token_rewards[0, 2].item() == -3.0 and out.token_rewards[1, 1].item() == -3.0
    # invalid tokens get exactly clip_min even when clip_min is below the sanitize floor
    wide = opd_token_advantage(q, s, mask, -100.0, 100.0, gamma)
    _check(wide, q, s, mask, -100.0, 100.0, gamma)
    assert wide.token_rewards[0, 2].item() == -100.0 and wide.token_rewards[3, 5].item() == -100.0
    assert wide.num_clipped.item() == wide.num_invalid.item() == 4


def test_opd_token_advantage_dtypes_and_no_grad():
    q, s = _logps(2, 5, seed=3)
    s = s.bfloat16().requires_grad_(True)
    out = opd_token_advantage(q.bfloat16(), s, torch.ones(2, 5, dtype=torch.bool), -1.0, 1.0, 0.5)
    assert out.advantages.dtype == torch.float32 and not out.advantages.requires_grad
    with pytest.raises(ValueError):
        opd_token_advantage(q, q, torch.ones(2, 5), 1.0, -1.0)
    with pytest.raises(ValueError):
        opd_token_advantage(q, q, torch.ones(2, 5), -1.0, 1.0, gamma=1.5)


def test_discounted_reward_to_go_vs_loop():
    g = torch.Generator().manual_seed(4)
    r = torch.randn(5, 9, generator=g, dtype=torch.float64)
    mask = _ragged_mask()
    for gamma in (0.0, 0.5, 0.99, 1.0):
        out = discounted_reward_to_go(r, mask, gamma)
        for b in range(5):
            for t in range(9):
                exp = 0.0
                if mask[b, t]:
                    exp = sum(gamma ** (j - t) * r[b, j].item() for j in range(t, 9) if mask[b, j])
                assert abs(out[b, t].item() - exp) <= 1e-12
    # values outside the mask (even NaN) never leak in
    r_nan = r.clone()
    r_nan[mask == 0] = NAN
    assert torch.equal(discounted_reward_to_go(r_nan, mask, 0.9), discounted_reward_to_go(r, mask, 0.9))


def test_hybrid_alpha_zero_is_bit_exact():
    g = torch.Generator().manual_seed(5)
    base = torch.randn(5, 9, generator=g) * 3
    base[2] = 0.7  # values outside the mask are passed through too
    q, s = _logps(5, 9, seed=6)
    q[0, 0] = NAN
    q[1, 2] = NEG_INF
    mask = _ragged_mask()
    s[3, 1] = NAN  # even a broken student log-prob cannot touch the base advantages when α = 0
    for a in (0, 0.0):
        out = hybrid_advantage(base, q, s, mask, a)
        assert torch.equal(out, base) and out.dtype == base.dtype
        assert out.data_ptr() != base.data_ptr()
    base64 = base.double()
    assert torch.equal(hybrid_advantage(base64, q, s, mask, 0.0), base64)


@pytest.mark.parametrize("alpha", [0.1, 1.0])
@pytest.mark.parametrize("clip", [(None, None), (-2.0, 2.0)])
def test_hybrid_advantage_vs_loop(alpha, clip):
    g = torch.Generator().manual_seed(7)
    base = torch.randn(5, 9, generator=g, dtype=torch.float64)
    q, s = _logps(5, 9, seed=8)
    q[0, 3] = NEG_INF
    q[3, 6] = NAN
    q[1, 6] = NEG_INF  # outside the mask
    mask = _ragged_mask()
    out = hybrid_advantage(base, q, s, mask, alpha, clip_min=clip[0], clip_max=clip[1])
    assert torch.isfinite(out).all() and out.dtype == torch.float64
    for b in range(5):
        for t in range(9):
            exp = base[b, t].item()
            if mask[b, t]:
                qi = q[b, t].item() if math.isfinite(q[b, t].item()) else -50.0
                term = qi - s[b, t].item()  # −(s − q)
                if clip[0] is not None:
                    term = min(max(term, clip[0]), clip[1])
                exp += alpha * term
            assert abs(out[b, t].item() - exp) <= 1e-9, (b, t)


def test_distill_loss_mix():
    pg = torch.tensor(2.0, requires_grad=True)
    dl = torch.tensor(3.0, requires_grad=True)
    out = distill_loss_mix(pg, dl, 0.25, 2.0)
    assert out.item() == 0.25 * 2.0 + 2.0 * 3.0
    gp, gd = torch.autograd.grad(out, (pg, dl))
    assert gp.item() == 0.25 and gd.item() == 2.0
    # a zero weight drops its term entirely (a NaN pg loss cannot leak into pure distillation)
    assert distill_loss_mix(torch.tensor(NAN), dl, 0.0, 1.0).item() == 3.0
    assert distill_loss_mix(pg, torch.tensor(NAN), 1.0, 0.0).item() == 2.0
    z = distill_loss_mix(pg, dl, 0.0, 0.0)
    assert z.item() == 0.0 and z.requires_grad
    vec = distill_loss_mix(torch.ones(3), torch.arange(3.0), 0.5, 0.5)
    assert torch.equal(vec, torch.tensor([0.5, 1.0, 1.5]))
