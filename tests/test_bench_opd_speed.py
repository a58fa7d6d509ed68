"""The reference loop's sweep knobs (bench/reference_loop.py: discount, a second update on stale log-probs, typed
--set overrides) against brute-force float64 references and opd_verl's own loss, and bench/opd_speed.py's summary.
No training runs."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))


import opd_speed as speed  # noqa: E402  (bench/ is on sys.path)
import reference_loop as ref  # noqa: E402


def _toy(seed=0, rows=4, length=5):
    g = torch.Generator().manual_seed(seed)
    s = -torch.rand(rows, length, generator=g, dtype=torch.float64) * 4
    q = -torch.rand(rows, length, generator=g, dtype=torch.float64) * 12
    lengths = torch.tensor([1, 3, 5, 2])[:rows]
    mask = (torch.arange(length)[None, :] < lengths[:, None]).double()
    return s, q, mask


@pytest.mark.parametrize("gamma", [0.0, 0.9, 1.0])
def test_discounted_advantage_is_the_brute_force_reward_to_go(gamma):
    s, q, mask = _toy()
    ours = ref.opd_advantage(q, s, mask, -5.0, 5.0, discount=gamma)
    rows, length = s.shape
    for b in range(rows):
        for t in range(length):
            r = [min(5.0, max(-5.0, (q[b, j] - s[b, j]).item())) * mask[b, j].item() for j in range(length)]
            expected = sum(gamma ** (j - t) * r[j] for j in range(t, length)) * mask[b, t].item()
            assert math.isclose(ours[b, t].item(), expected, abs_tol=1e-12), (b, t)


def test_a_later_update_uses_the_step_s_old_log_probs():
    """With s_old given (a second mini-batch or epoch), the loss is opd_verl's importance-sampling loss with ratio
    exp(s - s_old) != 1 and the advantage from s_old, token-mean; gradient -A * ratio / tokens."""
    from verl.trainer.ppo.core_algos import agg_loss

    from opd_verl.algorithms.advantages import opd_token_advantage
    from opd_verl.verl_ext.policy_losses import importance_sampling_loss_matrix

    s_old, q, mask = _toy(1)
    s_now = (s_old + 0.1 * torch.randn(s_old.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    ours_in = s_now.clone().requires_grad_(True)
    ours = ref.sampled_opd_loss(ours_in, q, mask, -5.0, 5.0, s_old=s_old)
    ours.backward()
    theirs_in = s_now.clone().requires_grad_(True)
    adv = opd_token_advantage(q, s_old, mask, -5.0, 5.0).advantages
    loss_mat, ratio = importance_sampling_loss_matrix(s_old, theirs_in, adv)
    theirs = agg_loss(loss_mat=loss_mat, loss_mask=mask, loss_agg_mode="token-mean")
    theirs.backward()
    assert not torch.allclose(ratio[mask.bool()], torch.ones(()).double())
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
    torch.testing.assert_close(ours_in.grad, -adv * torch.exp(s_now - s_old) * mask / mask.sum(), rtol=0, atol=1e-12)


def test_set_overrides_are_typed_by_the_config_and_unknown_fields_refused():
    got = ref.parse_overrides(["mini_batches=4", "betas=0.9,0.99", "mode=full", "lr=1e-3", "discount=1"])
    assert got == {"mini_batches": 4, "betas": (0.9, 0.99), "mode": "full", "lr": 1e-3, "discount": 1.0}
    assert ref.LoopConfig(**got).mini_batches == 4
    with pytest.raises(SystemExit, match="minibatches"):
        ref.parse_overrides(["minibatches=4"])


def test_every_variant_is_a_loop_config():
    for name, fields in speed.VARIANTS.items():
        assert isinstance(ref.LoopConfig(**fields), ref.LoopConfig), name
    assert speed.VARIANTS["base"] == {}


def test_summary_gap_closed_and_kl_of_the_opd_steps_only():
    val, kl = speed.VAL_KEY, speed.KL_KEY

    def run(vals, kls, sft_steps=0):
        out = {0: {val: vals[0]}}
        for step, k in enumerate(kls, start=1):
            out[step] = {kl: k, "timing_s/step": 0.5}
            if step <= sft_steps:
                out[step]["sft/nll_per_token"] = 1.0
        out[10] = {**out.get(10, {}), val: vals[1]}
        return out

    runs = {"a": {0: run([0.4, 0.6], [9.0] * 2 + [1.0] * 8, sft_steps=2), 1: run([0.4, 0.7], [9.0] * 2 + [1.0] * 8, sft_steps=2)}}
    row = speed.summarize(runs, teacher=0.9, report_steps=(10,))["a"]
    assert row["val_10"] == pytest.approx(0.65)
    assert row["gap_closed_10"] == pytest.approx((0.65 - 0.4) / (0.9 - 0.4))
    assert row["kl_first3"] == pytest.approx(1.0)  # the two SFT steps (KL 9) are left out
    assert row["steps_to_gap_30"] == 10 and row["steps_to_gap_60"] is None  # 50% of the gap at step 10
    assert speed.gap_closed(0.5, 0.6, 0.5) != speed.gap_closed(0.5, 0.6, 0.5)  # nan when there is no gap


def test_prompt_batches_are_verl_s_epochs_of_randperm_without_the_partial_batch():
    """Epoch 1 is torch.randperm(rows) from a generator seeded with data.seed (the order the parity runs used);
    later epochs continue the same generator (RandomSampler), and drop_last drops each epoch's partial batch."""
    batches = ref.prompt_batches(rows=10, prompts=4, steps=5, seed=3)
    g = torch.Generator().manual_seed(3)
    first, second, third = (torch.randperm(10, generator=g).tolist() for _ in range(3))
    assert batches == [first[0:4], first[4:8], second[0:4], second[4:8], third[0:4]]
    assert all(len(b) == 4 for b in batches)


@pytest.mark.parametrize("warmup,min_ratio", [(5, 0.0), (0, 0.1)])
def test_cosine_schedule_matches_verl_get_cosine_schedule_with_warmup(warmup, min_ratio):
    from verl.utils.torch_functional import get_cosine_schedule_with_warmup

    steps = 20
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=warmup, num_training_steps=steps,
                                            min_lr_ratio=min_ratio)
    used = []
    for _ in range(steps):  # verl: optimizer.step() with the current lr, then lr_scheduler.step()
        used.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    cfg = ref.LoopConfig(schedule="cosine", warmup_steps=warmup, steps=steps, min_lr_ratio=min_ratio)
    assert used == pytest.approx([3e-4 * ref.lr_factor(k, cfg) for k in range(1, steps + 1)], abs=1e-15)
    assert used[warmup] == pytest.approx(3e-4) and used[-1] < 3e-4 * (min_ratio + 0.02)
    with pytest.raises(ValueError, match="schedule="):
        ref.lr_factor(1, ref.LoopConfig(schedule="linear"))
