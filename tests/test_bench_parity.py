"""bench/reference_loop.py's math against opd_verl's and verl's functions on toy batches, its EOS masking and token
alignment on a tiny real model, and bench/parity.py's verdict. No trainer runs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


ref = _load("reference_loop")
parity = _load("parity")


def _toy(seed=0, rows=5, length=6):
    g = torch.Generator().manual_seed(seed)
    s = -torch.rand(rows, length, generator=g, dtype=torch.float64) * 4
    q = -torch.rand(rows, length, generator=g, dtype=torch.float64) * 12  # some q - s beyond the clip of 5
    lengths = torch.tensor([1, 3, 6, 2, 5])[:rows]
    mask = (torch.arange(length)[None, :] < lengths[:, None]).double()
    return s, q, mask


def test_response_mask_keeps_the_first_eos_and_masks_after_it():
    eos, pad = 7, 0
    responses = torch.tensor([
        [3, 4, 7, pad, pad],   # EOS at 2: tokens 0..2 count
        [7, pad, pad, pad, pad],  # EOS first
        [3, 4, 5, 6, 3],       # truncated, no EOS: all count
        [3, 7, 4, 7, pad],     # a second EOS (cannot happen after generate stops; still masked)
    ])
    assert ref.response_mask(responses, eos).tolist() == [
        [1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]


def test_advantage_matches_opd_token_advantage():
    from opd_verl.algorithms.advantages import opd_token_advantage

    s, q, mask = _toy()
    ours = ref.opd_advantage(q, s, mask, -5.0, 5.0)
    theirs = opd_token_advantage(q, s, mask, -5.0, 5.0, 0.0)
    assert theirs.num_clipped > 0  # the clip is exercised
    torch.testing.assert_close(ours, theirs.advantages.to(ours.dtype), rtol=0, atol=1e-12)


def test_sampled_loss_matches_verl_importance_sampling_token_mean():
    """Value and gradient equal opd_verl's importance_sampling policy loss aggregated by verl's token-mean."""
    from verl.trainer.ppo.core_algos import agg_loss

    from opd_verl.algorithms.advantages import opd_token_advantage
    from opd_verl.verl_ext.policy_losses import importance_sampling_loss_matrix

    s0, q, mask = _toy(1)
    s_ours = s0.clone().requires_grad_(True)
    loss = ref.sampled_opd_loss(s_ours, q, mask, -5.0, 5.0)
    loss.backward()

    s_theirs = s0.clone().requires_grad_(True)
    adv = opd_token_advantage(q, s0, mask, -5.0, 5.0).advantages
    loss_mat, ratio = importance_sampling_loss_matrix(s0, s_theirs, adv)
    theirs = agg_loss(loss_mat=loss_mat, loss_mask=mask, loss_agg_mode="token-mean")
    theirs.backward()
    assert torch.allclose(ratio[mask.bool()], torch.ones(()).double())
    torch.testing.assert_close(loss, theirs, rtol=0, atol=1e-12)
    torch.testing.assert_close(s_ours.grad, s_theirs.grad, rtol=0, atol=1e-12)
    # brute force: d loss / d s_t = -A_t / (number of response tokens), 0 outside the mask
    torch.testing.assert_close(s_ours.grad, -adv * mask / mask.sum(), rtol=0, atol=1e-12)


def test_full_loss_is_token_mean_reverse_kl_and_matches_the_chunked_path():
    from opd_verl.algorithms.divergences import chunked_full_divergence

    g = torch.Generator().manual_seed(2)
    zs = torch.randn(3, 4, 11, generator=g, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(3, 4, 11, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.float64)
    loss = ref.full_opd_loss(zs, zt, mask)
    ps, ls, lt = zs.softmax(-1), zs.log_softmax(-1), zt.log_softmax(-1)
    brute = ((ps * (ls - lt)).sum(-1) * mask).sum() / mask.sum()
    torch.testing.assert_close(loss, brute, rtol=0, atol=1e-12)
    chunked = chunked_full_divergence(zs.reshape(12, 11), zt.reshape(12, 11), "reverse_kl", 0.5, 1.0, 5).reshape(3, 4)
    torch.testing.assert_close(loss, (chunked * mask).sum() / mask.sum(), rtol=0, atol=1e-10)
    g_ours = torch.autograd.grad(loss, zs, retain_graph=True)[0]
    g_brute = torch.autograd.grad(brute, zs)[0]
    torch.testing.assert_close(g_ours, g_brute, rtol=0, atol=1e-12)


def test_warmup_matches_verl_constant_schedule_with_warmup():
    from verl.utils.torch_functional import get_constant_schedule_with_warmup

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)
    sched = get_constant_schedule_with_warmup(opt, num_warmup_steps=5)
    used = []
    for _ in range(8):  # verl: optimizer.step() with the current lr, then lr_scheduler.step()
        used.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert used == pytest.approx([3e-4 * ref.warmup_factor(k, 5) for k in range(1, 9)])
    assert used[0] == 0.0 and used[5] == pytest.approx(3e-4)


def test_logprobs_of_left_padded_prompts_equal_unpadded_ones():
    """Token alignment: the log-prob of each response token is the same with and without left padding, so the
    loop's positions (from the attention mask) and its logits shift are right."""
    from opd_verl.demo.tiny_models import build_qwen2, build_tokenizer

    tok = build_tokenizer()
    model = build_qwen2(tok, hidden_size=64, num_layers=1, seed=0).eval()
    prompt, response = tok("abc")["input_ids"], tok("12+")["input_ids"]
    seq = torch.tensor([prompt + response])
    width = len(prompt)
    with torch.no_grad():
        _, plain = ref.logits_and_logprobs(model, seq, torch.ones_like(seq), width)
        padded = torch.tensor([[tok.pad_token_id] * 3 + prompt + response])
        attn = torch.tensor([[0] * 3 + [1] * (len(prompt) + len(response))])
        _, shifted = ref.logits_and_logprobs(model, padded, attn, width + 3)
        brute = torch.log_softmax(model(seq).logits[0].float(), -1)
    expected = torch.stack([brute[width - 1 + j, t] for j, t in enumerate(response)])
    torch.testing.assert_close(plain[0], expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(shifted[0], expected, rtol=0, atol=1e-5)


def test_compare_verdicts():
    base = {s: 0.5 + 0.01 * s for s in range(0, 31, 5)}
    noisy = [{s: v + d for s, v in base.items()} for d in (-0.02, 0.0, 0.02)]
    noisy = dict(enumerate(noisy))
    same = parity.compare(dict(enumerate({s: v + d for s, v in base.items()} for d in (-0.01, 0.0, 0.015))), noisy)
    assert same["verdict"] == "within spread"
    assert same["trainer_in_reference_spread_frac"] == 1.0
    assert same["paired_mean_diff_by_seed"] == pytest.approx({0: 0.01, 1: 0.0, 2: -0.005})
    shifted = parity.compare(dict(enumerate({s: v + 0.1 + d for s, v in base.items()} for d in (-0.01, 0.0, 0.01))), noisy)
    assert shifted["verdict"] == "differs"
    assert shifted["mean_diff_trainer_minus_reference"] == pytest.approx(0.1, abs=1e-9)
    assert shifted["paired_mean_diff"] == pytest.approx(0.1, abs=1e-9)
    assert parity.compare({}, noisy)["verdict"] == "no common steps"


def test_null_in_spread_quantile():
    """Two sets of 3 seeds of one distribution: the mean of one lies in the other's range ~63% of the steps."""
    assert 0.4 <= parity.null_in_spread_quantile(3, 3, 30) <= 0.6
    assert parity.null_in_spread_quantile(3, 3, 30, q=0.5) == pytest.approx(0.63, abs=0.05)


def test_mode_overrides_and_defaults():
    assert parity.MODES["sampled"] == []
    assert "opd.support=full" in parity.MODES["full"] and "opd.lambda_rl=0" in parity.MODES["full"]
    assert parity.DEFAULTS["seeds"] == [0, 1, 2] and parity.DEFAULTS["steps"] == 30


def test_the_demo_mode_mirrors_the_demo_recipe_in_the_reference_loop():
    """parity's demo mode runs recipes/demo_cpu_forward_kl.yaml in main_opd and LOOP_FIELDS["demo"] in the loop:
    the loop's fields must be the recipe's settings (prompts, samples, updates, epochs, lr, schedule, loss)."""
    import yaml

    recipe = yaml.safe_load((Path(parity.__file__).parents[1] / "recipes" / f"{parity.DEMO_RECIPE}.yaml").read_text())
    actor, loop = recipe["actor_rollout_ref"]["actor"], parity.LOOP_FIELDS["demo"]
    assert parity.TRAINER_RECIPE["demo"] == parity.DEMO_RECIPE and parity.MODES["demo"] == []
    assert loop["prompts"] == recipe["data"]["train_batch_size"]
    assert loop["n"] == recipe["actor_rollout_ref"]["rollout"]["n"]
    assert loop["mini_batches"] == recipe["data"]["train_batch_size"] // actor["ppo_mini_batch_size"]
    assert loop["epochs"] == actor["ppo_epochs"] and loop["lr"] == actor["optim"]["lr"]
    assert loop["schedule"] == actor["optim"]["lr_scheduler_type"]
    assert (loop["mode"], loop["divergence"]) == (recipe["opd"]["support"], recipe["opd"]["divergence"])
