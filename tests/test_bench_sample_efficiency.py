"""bench/sample_efficiency.py: steps to a threshold, censored comparisons, summaries, argument wiring, the plot."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


se = _load("sample_efficiency")


def test_steps_to_threshold_is_the_first_step_at_or_above():
    points = [(20, 0.9), (0, 0.3), (10, 0.6), (30, 0.5)]  # unordered; dips after crossing do not matter
    assert se.steps_to_threshold(points, 0.6) == 10
    assert se.steps_to_threshold(points, 0.3) == 0
    assert se.steps_to_threshold(points, 0.85) == 20
    assert se.steps_to_threshold(points, 0.95) is None
    assert se.steps_to_threshold([], 0.1) is None


def test_trailing_mean_uses_the_last_window_points():
    pts = [(1, 0.0), (2, 1.0), (3, 0.5), (4, 0.5)]
    assert se.trailing_mean(pts, 2) == [(1, 0.0), (2, 0.5), (3, 0.75), (4, 0.5)]
    assert se.trailing_mean(pts, 1) == pts


def test_compare_steps_exact_and_censored():
    exact = se.compare_steps([10, 20, 30], [70, 140, 210], budget=300)
    assert exact["ratio_grpo_over_opd"] == {"value": 7.0, "kind": "exact", "text": "7.0x"}
    assert [r["value"] for r in exact["ratio_per_seed"]] == [7.0, 7.0, 7.0]

    # GRPO misses on one seed: its mean counts the budget, the ratio is a lower bound
    lower = se.compare_steps([10, 10, 10], [40, None, 40], budget=80)
    assert lower["grpo"]["mean"] == pytest.approx(160 / 3)
    assert lower["ratio_grpo_over_opd"]["kind"] == "lower_bound"
    assert lower["ratio_grpo_over_opd"]["text"].startswith(">= ")
    assert lower["ratio_per_seed"][1] == {"value": 8.0, "kind": "lower_bound"}

    # GRPO never reaches it: "> budget" steps and a ratio > budget / OPD's mean
    never = se.compare_steps([20, 20], [None, None], budget=80)
    assert never["grpo"]["text"] == "> 80"
    assert never["ratio_grpo_over_opd"] == {"value": 4.0, "kind": "lower_bound", "text": "> 4.0x"}

    # OPD misses: upper bound; neither reaches: undefined
    assert se.compare_steps([None, 40], [60, 60], budget=80)["ratio_grpo_over_opd"]["kind"] == "upper_bound"
    none = se.compare_steps([None], [None], budget=80)
    assert none["ratio_grpo_over_opd"]["kind"] == "undefined" and none["opd"]["text"] == "> 80"
    # already there at step 0: no ratio (division by zero steps)
    assert se.compare_steps([0], [0], budget=80)["ratio_grpo_over_opd"]["kind"] == "undefined"


def test_compare_steps_censors_each_method_at_its_own_budget():
    """GRPO given 10x OPD's budget: a GRPO miss counts its own budget (not OPD's), an OPD miss OPD's."""
    lower = se.compare_steps([10, 20], [400, None], budget=150, grpo_budget=1500)
    assert lower["grpo"]["mean"] == 950 and lower["grpo"]["text"] == ">= 950.0"
    assert lower["ratio_per_seed"][1] == {"value": 75.0, "kind": "lower_bound"}
    never = se.compare_steps([30, 30], [None, None], budget=150, grpo_budget=1500)
    assert never["grpo"]["text"] == "> 1500" and never["ratio_grpo_over_opd"]["value"] == 50.0
    upper = se.compare_steps([None, 50], [600, 600], budget=150, grpo_budget=1500)
    assert upper["opd"]["mean"] == 100 and upper["ratio_per_seed"][0] == {"value": 4.0, "kind": "upper_bound"}


def test_thresholds_of_teacher_and_of_gap():
    rows = se.thresholds(teacher=0.9, start=0.3, teacher_fractions=[0.5, 0.9], gap_fractions=[0.5])
    assert [r["name"] for r in rows] == ["50% of teacher", "90% of teacher", "50% of gap"]
    assert [r["value"] for r in rows] == pytest.approx([0.45, 0.81, 0.6])
    assert all(r["above_start"] for r in rows)
    assert not se.thresholds(0.9, 0.5, [0.5], [])[0]["above_start"]


def _run(val, sampled):
    return {"curves": {"val_greedy": val, "val_greedy_smoothed": se.trailing_mean(val, 2), "train_sampled": sampled}}


def test_summarize_and_table_from_curves():
    cfg = {**se.FULL, "seeds": [0, 1], "steps": 40}
    runs = {
        "opd": {0: _run([(0, 0.3), (10, 0.7), (20, 0.9)], [(1, 0.3), (2, 0.8)]),
                1: _run([(0, 0.3), (10, 0.9)], [(1, 0.3), (2, 0.8)])},
        "grpo": {0: _run([(0, 0.3), (10, 0.4), (40, 0.5)], [(1, 0.3), (2, 0.4)]),
                 1: _run([(0, 0.3), (40, 0.45)], [(1, 0.3), (2, 0.3)])},
    }
    refs = {"teacher_greedy": 1.0, "teacher_sampled": 0.9}
    summary = se.summarize(runs, refs, cfg)
    val = summary["val_greedy"]
    assert val["start_mean"] == pytest.approx(0.3)
    half = next(r for r in val["rows"] if r["name"] == "50% of teacher")
    assert half["opd"]["per_seed"] == [10, 10] and half["grpo"]["per_seed"] == [40, None]
    assert half["ratio_grpo_over_opd"]["kind"] == "lower_bound"
    ninety = next(r for r in val["rows"] if r["name"] == "90% of teacher")
    assert ninety["opd"]["per_seed"] == [20, 10] and ninety["grpo"]["text"] == "> 40"
    assert summary["train_sampled"]["teacher"] == 0.9
    # 70%: raw OPD seed 0 is there at step 10; smoothed over 2 validations it is (0.3+0.7)/2 at 10, 0.8 at 20,
    # and seed 1's single validation at 0.9 gives only (0.3+0.9)/2 = 0.6
    raw70 = next(r for r in val["rows"] if r["name"] == "70% of teacher")
    smoothed70 = next(r for r in summary["val_greedy_smoothed"]["rows"] if r["name"] == "70% of teacher")
    assert raw70["opd"]["per_seed"] == [10, 10] and smoothed70["opd"]["per_seed"] == [20, None]
    assert se.METRICS[0][0] == "val_greedy_smoothed"  # the one that defines "reached"
    table = se.format_table(summary, "val_greedy")
    assert "| 90% of teacher | 90.0% | 15.0 (20, 10) | > 40 (—, —) | > 2.7x |" in table


def test_curves_of_reads_val_and_smoothed_training_accuracy():
    metrics = {0: {"val-core/x/acc/mean@1": 0.3}, 1: {se.SCORE_KEY: 0.2}, 2: {se.SCORE_KEY: 0.4},
               3: {se.SCORE_KEY: 0.6, "val-core/x/acc/mean@1": 0.5}}
    curves = se.curves_of(metrics, "val-core/x/acc/mean@1", smooth=2, val_smooth=2)
    assert curves["val_greedy"] == [(0, 0.3), (3, 0.5)]
    assert [v for _, v in curves["val_greedy_smoothed"]] == pytest.approx([0.3, 0.4])
    assert curves["train_sampled_raw"] == [(1, 0.2), (2, 0.4), (3, 0.6)]
    assert [s for s, _ in curves["train_sampled"]] == [1, 2, 3]
    assert [v for _, v in curves["train_sampled"]] == pytest.approx([0.2, 0.3, 0.5])
    ((step, value),) = se.mean_curve([[(0, 0.2), (1, 0.4)], [(0, 0.4)]])  # only steps every run has
    assert step == 0 and value == pytest.approx(0.3)


def test_parse_args_presets_and_options(tmp_path):
    _, full = se.parse_args([])
    assert full["seeds"] == [0, 1, 2] and full["methods"] == ["opd", "grpo"] and not full["quick"]
    assert full["out"].endswith("bench/results/sample_efficiency.json")
    _, quick = se.parse_args(["--quick"])
    assert quick["seeds"] == [0] and quick["steps"] < full["steps"] and quick["out"].endswith("_quick.json")
    assert "quick" in quick["work_dir"]
    _, cfg = se.parse_args(["--seeds", "2", "--steps", "30", "--lr", "1e-3", "--lr-grpo", "5e-4",
                            "--methods", "grpo", "--out", str(tmp_path / "x.json")])
    assert cfg["seeds"] == [0, 1] and cfg["steps"] == 30
    assert cfg["lr"] == {"opd": 1e-3, "grpo": 5e-4} and cfg["methods"] == ["grpo"]
    assert cfg["out"] == str(tmp_path / "x.json")
    assert se.FULL["lr"]["opd"] != 1e-3 or se.FULL["lr"]["grpo"] != 5e-4  # the preset itself is not modified
    assert se.parse_args(["--seed-list", "2,0"])[1]["seeds"] == [2, 0]
    assert se.parse_args(["--val-smooth", "1"])[1]["val_smooth"] == 1
    with pytest.raises(SystemExit):
        se.parse_args(["--methods", "ppo"])


def test_method_overrides_differ_only_in_estimator_and_loss():
    opd = se.common.method_overrides("opd", seed=3, lr=3e-4)
    grpo = se.common.method_overrides("grpo", seed=3, lr=3e-4)
    assert "data.seed=3" in opd and "actor_rollout_ref.rollout.seed=3" in opd
    assert "actor_rollout_ref.actor.optim.lr=0.0003" in grpo
    assert set(grpo) - set(opd) == {"algorithm.adv_estimator=grpo", "actor_rollout_ref.actor.policy_loss.loss_mode=vanilla",
                                    "trainer.experiment_name=bench_grpo_seed3"}
    with pytest.raises(ValueError):
        se.common.method_overrides("ppo")


def test_plot_writes_a_png(tmp_path):
    from PIL import Image

    result = {
        "references": {"k": 4, "teacher_greedy": 0.95, "teacher_sampled": 0.9},
        "settings": {"seeds": [0], "smooth": 5, "steps": 20},
        "mean_curves": {"val_greedy": {"opd": [(0, 0.3), (10, 0.6)], "grpo": [(0, 0.3), (10, 0.35)]},
                        "train_sampled": {"opd": [(1, 0.2), (20, 0.5)], "grpo": [(1, 0.2), (20, 0.3)]}},
    }
    path = se.plot(result, tmp_path / "p.png")
    with Image.open(path) as image:
        assert image.size == (900, 720)
        assert len(image.getcolors(maxcolors=1 << 16) or []) > 2  # drawn, not blank
    json.dumps(result)
