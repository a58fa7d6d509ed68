"""bench/sample_efficiency_loop.py and the reference loop's baselines (bench/reference_loop.py: GRPO's advantage
and PPO clip loss) against verl's own functions and brute-force float64 references; FLOPs, thresholds, the lr
choice and the summary on synthetic curves. No training runs."""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import reference_loop as ref  # noqa: E402  (bench/ is on sys.path)
import sample_efficiency_loop as sel  # noqa: E402


def test_grpo_advantage_is_verl_s_and_the_brute_force_group_z_score():
    from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage

    n, prompts, length = 4, 5, 6
    scores = torch.tensor([1, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0.5, 1, 0, 1], dtype=torch.float64)
    lengths = torch.tensor([1, 6, 3, 2, 6] * 4)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).double()
    rewards = torch.zeros(n * prompts, length, dtype=torch.float64)
    rewards[torch.arange(n * prompts), lengths - 1] = scores  # verl puts the score on the last response token
    theirs, _ = compute_grpo_outcome_advantage(rewards, mask, np.repeat(np.arange(prompts), n))
    ours = ref.grpo_advantage(scores, n).unsqueeze(-1) * mask
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
    for b in range(n * prompts):
        group = scores[(b // n) * n : (b // n + 1) * n].tolist()
        expected = (scores[b].item() - statistics.mean(group)) / (statistics.stdev(group) + 1e-6)
        assert math.isclose(ours[b, 0].item(), expected, abs_tol=1e-9), b
    assert torch.all(ours[4:8] == 0)  # a group that all got the same reward has nothing to learn from


def test_ppo_clip_loss_is_verl_s_vanilla_loss_with_its_gradient():
    from omegaconf import OmegaConf
    from verl.trainer.ppo.core_algos import compute_policy_loss_vanilla

    g = torch.Generator().manual_seed(0)
    s_old = -torch.rand(6, 5, generator=g, dtype=torch.float64) * 3
    s_now = s_old + torch.randn(6, 5, generator=g, dtype=torch.float64) * 0.6  # ratios well outside [0.8, 1.2]
    adv = torch.randn(6, 1, generator=g, dtype=torch.float64).expand(6, 5) * 2
    mask = (torch.arange(5)[None, :] < torch.tensor([5, 2, 4, 1, 3, 5])[:, None]).double()
    config = OmegaConf.create({"clip_ratio": 0.2, "clip_ratio_low": 0.2, "clip_ratio_high": 0.2, "clip_ratio_c": 3.0,
                               "global_batch_info": {}})
    ours_in, theirs_in = s_now.clone().requires_grad_(True), s_now.clone().requires_grad_(True)
    ours = ref.ppo_clip_loss(ours_in, s_old, adv, mask)
    theirs, metrics = compute_policy_loss_vanilla(s_old, theirs_in, adv, mask, "token-mean", config)
    ours.backward()
    theirs.backward()
    assert 0 < metrics["actor/pg_clipfrac"] < 1 and metrics["actor/pg_clipfrac_lower"] > 0  # every branch is hit
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
    torch.testing.assert_close(ours_in.grad, theirs_in.grad, rtol=0, atol=1e-12)


def test_an_unknown_mode_is_refused_before_anything_loads():
    with pytest.raises(ValueError, match="mode='grp'"):
        ref.run(ref.LoopConfig(mode="grp"), built=object())


def test_flop_params_leave_out_the_input_embedding_unless_the_head_is_tied():
    from transformers import LlamaConfig, LlamaForCausalLM

    for tied in (False, True):
        cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tied)
        model = LlamaForCausalLM(cfg)
        total = sum(p.numel() for p in model.parameters())  # a tied weight is listed once
        assert sel.flop_params(model) == (total if tied else total - 50 * 16)


def test_step_flops_count_what_each_method_needs():
    tokens, ns, nt = 1000, 10, 40
    assert sel.step_flops("opd", tokens, ns, nt) == 2 * ns * tokens * 2 + 2 * nt * tokens + 6 * ns * tokens
    assert sel.step_flops("grpo", tokens, ns, nt) == 2 * ns * tokens * 2 + 6 * ns * tokens
    assert sel.step_flops("sft", tokens, ns, nt) == 2 * nt * tokens + 6 * ns * tokens
    assert sel.step_flops("opd", tokens, ns, nt, epochs=2) - sel.step_flops("opd", tokens, ns, nt) == 6 * ns * tokens
    with pytest.raises(ValueError):
        sel.step_flops("ppo", tokens, ns, nt)


def test_a_threshold_counts_from_two_validations_in_a_row():
    pts = [(0, 0.3), (10, 0.72), (20, 0.6), (30, 0.71), (40, 0.75), (50, 0.8)]
    assert sel.SUSTAINED == 2
    assert sel.steps_to_threshold(pts, 0.7, sel.SUSTAINED) == 30  # step 10 was one lucky validation
    assert sel.steps_to_threshold(pts, 0.3, sel.SUSTAINED) == 0
    assert sel.steps_to_threshold(pts, 0.8, sel.SUSTAINED) is None  # the last validation alone does not count
    assert sel.steps_to_threshold(pts, 0.8) == 50


def test_cumulative_sums_steps_from_one_and_best_lr_is_the_highest_mean_val():
    metrics = {0: {}, 1: {"t": 0.5}, 2: {"t": 0.25}, 3: {"t": 1.0}}
    assert sel.cumulative(metrics, "t") == {0: 0.0, 1: 0.5, 2: 0.75, 3: 1.75}
    key = sel.VAL_KEY
    grid = {1e-4: {0: {key: 0.9}, 10: {key: 0.4}, 20: {key: 0.5}},  # step 0 does not count
            3e-4: {0: {key: 0.3}, 10: {key: 0.5}, 20: {key: 0.6}},
            1e-3: {0: {key: 0.3}, 10: {key: 0.7}, 20: {key: 0.1}}}
    assert sel.best_lr(grid) == 3e-4


def test_summary_steps_wall_flops_and_bounded_ratios():
    key = sel.VAL_KEY

    def run(vals, freq):
        out = {0: {key: 0.4}}
        for i, v in enumerate(vals, 1):
            for s in range((i - 1) * freq + 1, i * freq + 1):
                out[s] = {"timing_s/step": 0.5}
            out[i * freq][key] = v
        return out

    cfg = {"teacher_fractions": [0.5, 0.7, 0.9], "budget": {"opd": 30, "grpo": 300, "sft": 30}}
    runs = {"opd": {0: run([0.55, 0.6, 0.8], 10)},            # 50% (0.475) from 10, 70% (0.665) at 30 alone: not
            "grpo": {0: run([0.5] * 9 + [0.6] * 21, 10)},       # 50% from 10; 70% never within 300
            "sft": {0: run([0.4, 0.5, 0.5], 10)}}               # 50% from 20
    flops = {m: {0: {s: 2.0 * s for s in r[0]}} for m, r in runs.items()}
    summary = sel.summarize(runs, 0.95, cfg, flops)
    half, seventy = summary["rows"][0], summary["rows"][1]
    assert half["methods"]["opd"]["per_seed"][0] == {"seed": 0, "steps": 10, "wall_s": 5.0, "flops": 20.0}
    assert half["methods"]["sft"]["mean_steps"] == 20
    assert half["grpo_over_opd_steps"]["ratio"]["value"] == 1.0
    assert half["sft_over_opd_steps"]["ratio"]["value"] == 2.0
    assert seventy["methods"]["opd"]["mean_steps"] is None and seventy["methods"]["grpo"]["reached"] == 0
    assert seventy["grpo_over_opd_steps"]["ratio"]["kind"] == "undefined"
    table = sel.format_table(summary, ["opd", "grpo", "sft"])
    assert "| 50% of teacher | 47.5% | 10 (10) / 5 / 0 |" in table and "0/1 reached" in table


def test_grid_summary_reports_every_lr_with_its_steps_to_the_thresholds():
    key = sel.VAL_KEY
    grid = {"opd": {3e-4: {0: {key: 0.4}, 10: {key: 0.6}, 20: {key: 0.7}, 30: {key: 0.72}},
                    1e-3: {0: {key: 0.4}, 10: {key: 0.2}, 20: {key: 0.3}, 30: {key: 0.5}}}}
    out = sel.grid_summary(grid, 0.95, [0.5, 0.7])
    assert out["opd"]["0.0003"]["steps_to"] == {"50%": 10, "70%": 20}
    assert out["opd"]["0.001"]["steps_to"] == {"50%": None, "70%": None}  # 0.5 >= 0.475 at the last one only
    assert out["opd"]["0.001"]["last_val"] == 0.5 and out["opd"]["0.0003"]["mean_val"] == pytest.approx((0.6 + 0.7 + 0.72) / 3)
    table = sel.format_grid(out)
    assert "| opd | 0.0003 | 67.3% | 72.0% | 10 | 20 |" in table and "| opd | 0.001 | 33.3% | 50.0% | — | — |" in table


def test_budgets_are_parsed_per_method_and_bad_ones_refused():
    assert sel.parse_budgets(["opd=300", "grpo=3000"]) == {"opd": 300, "grpo": 3000}
    for bad in ("ppo=10", "opd=0", "opd=ten", "opd"):
        with pytest.raises(SystemExit, match="--budget"):
            sel.parse_budgets([bad])


def test_cumulative_flops_sum_each_step_s_tokens():
    metrics = {0: {sel.VAL_KEY: 0.3}, 1: {"tokens": 100}, 2: {"tokens": 50}}
    params = {"student": 10, "teacher": 40}
    out = sel.cumulative_flops("grpo", metrics, params)
    assert out == {0: 0.0, 1: 10 * 10 * 100, 2: 10 * 10 * 150}  # grpo: (2 + 2 + 6) * N_student per token


def test_each_other_method_is_compared_with_each_opd_recipe():
    key = sel.VAL_KEY
    run = lambda vals: {0: {key: 0.4}, **{10 * i: {key: v, "timing_s/step": 1.0} for i, v in enumerate(vals, 1)}}
    cfg = {"teacher_fractions": [0.5], "budget": {"opd": 30, "opd128": 30, "grpo": 60}}
    runs = {"opd": {0: run([0.3, 0.5, 0.5])}, "opd128": {0: run([0.5, 0.5, 0.5])},  # 50% (0.475) from 20 / 10
            "grpo": {0: run([0.3, 0.3, 0.3, 0.5, 0.5, 0.5])}}                     # from 40
    flops = {m: {0: {s: float(s) for s in r[0]}} for m, r in runs.items()}
    row = sel.summarize(runs, 0.95, cfg, flops)["rows"][0]
    assert row["grpo_over_opd_steps"]["ratio"]["value"] == 2.0
    assert row["grpo_over_opd128_steps"]["ratio"]["value"] == 4.0
    assert "opd128_over_opd_steps" not in row  # the two OPD recipes are references, not compared with each other
    table = sel.format_table(sel.summarize(runs, 0.95, cfg, flops), ["opd", "opd128", "grpo"])
    assert "GRPO / OPD128 steps" in table and table.splitlines()[-1].endswith("| 2.0x | — | 4.0x | — |")


def test_stored_methods_are_added_only_when_run_with_the_same_settings():
    cfg = {"seeds": [0], "test_freq": 10, "teacher_fractions": [0.5]}
    old = {"settings": {**cfg, "budget": {"grpo": 60, "opd": 30}}, "best_lr": {"grpo": 1e-4, "opd": 3e-4},
           "methods": {"grpo": dict(sel.METHODS["grpo"]), "opd": dict(sel.METHODS["opd"])},
           "grid": {"grpo": {"0.0001": {}}, "opd": {}},
           "runs": {"grpo": {"0": {"0": {sel.VAL_KEY: 0.4}, "10": {sel.VAL_KEY: 0.5}}}, "opd": {"0": {}}}}
    out = sel.stored_methods(old, "old.json", cfg, running=["opd", "opd128"])
    assert list(out) == ["grpo"]  # opd runs now: its stored runs are not used
    assert out["grpo"]["runs"] == {0: {0: {sel.VAL_KEY: 0.4}, 10: {sel.VAL_KEY: 0.5}}}
    assert out["grpo"]["best_lr"] == 1e-4 and out["grpo"]["budget"] == 60
    with pytest.raises(SystemExit, match="seeds"):
        sel.stored_methods(old, "old.json", {**cfg, "seeds": [0, 1]}, running=["opd128"])
    changed = {**old, "methods": {**old["methods"], "grpo": {**sel.METHODS["grpo"], "mini_batches": 1}}}
    with pytest.raises(SystemExit, match="'grpo' was run with fields"):
        sel.stored_methods(changed, "old.json", cfg, running=["opd128"])


def test_flops_count_the_opd128_recipe_as_opd_with_its_two_epochs():
    metrics = {0: {sel.VAL_KEY: 0.3}, 1: {"tokens": 100}}
    params = {"student": 10, "teacher": 40}
    assert sel.cumulative_flops("opd128", metrics, params)[1] == sel.step_flops("opd", 100, 10, 40, epochs=2)
    assert sel.cumulative_flops("opd", metrics, params)[1] == sel.step_flops("opd", 100, 10, 40)
