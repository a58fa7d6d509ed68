"""bench/step_overhead.py: run order, warm-up handling, medians and ratios, argument wiring, method overrides."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("step_overhead", REPO / "bench" / "step_overhead.py")
so = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(so)


def test_runs_are_interleaved():
    assert so.run_order(2) == [("opd", 0), ("grpo", 0), ("opd", 1), ("grpo", 1)]


def test_timed_steps_drop_warmup_and_step_zero_and_subtract_gen():
    metrics = {
        0: {"val-core/x": 0.3},
        1: {"timing_s/step": 25.0, "timing_s/gen": 20.0},
        2: {"timing_s/step": 3.0, "timing_s/gen": 2.0, "timing_s/ref": 0.2, "actor/pg_loss": 1.0},
        3: {"timing_s/step": 3.5, "timing_s/gen": 2.1, "timing_s/ref": 0.3},
    }
    steps = so.timed_steps(metrics, warmup=1)
    assert steps["timing_s/step"] == [3.0, 3.5]
    assert steps["timing_s/ref"] == [0.2, 0.3]
    assert steps[so.NO_GEN] == pytest.approx([1.0, 1.4])
    assert "actor/pg_loss" not in steps


def test_ratio_table_and_pair_ratios():
    opd = [{"timing_s/step": [2.0, 2.2, 2.1]}, {"timing_s/step": [3.0]}]
    grpo = [{"timing_s/step": [2.0, 2.0, 2.0], "timing_s/ref": [0.1]}, {"timing_s/step": [2.5]}]
    table = so.ratio_table(so.pool(opd), so.pool(grpo))
    assert table["timing_s/step"]["opd_median_s"] == pytest.approx(2.15)
    assert table["timing_s/step"]["grpo_median_s"] == 2.0
    assert table["timing_s/step"]["ratio"] == pytest.approx(1.075)
    assert table["timing_s/ref"]["ratio"] is None and table["timing_s/ref"]["opd_n"] == 0
    assert so.pair_ratios(opd, grpo, "timing_s/step") == pytest.approx([1.05, 1.2])
    assert so.pair_ratios(opd, grpo, "timing_s/ref") == [None, None]


def test_parse_args_presets_and_validation():
    full = so.parse_args([])
    assert full["pairs"] == so.FULL["pairs"] and full["out"].endswith("bench/results/step_overhead.json")
    quick = so.parse_args(["--quick"])
    assert quick["steps"] == so.QUICK["steps"] and quick["out"].endswith("step_overhead_quick.json")
    assert so.parse_args(["--pairs", "5", "--steps", "8", "--warmup", "3"])["pairs"] == 5
    with pytest.raises(SystemExit):
        so.parse_args(["--steps", "2", "--warmup", "2"])


def test_overrides_give_each_method_a_same_size_second_model():
    built = SimpleNamespace(student="/s", teacher="/t")
    opd = so.overrides_for("opd", built, seed=0)
    grpo = so.overrides_for("grpo", built, seed=0)
    # OPD: the student is its own teacher (later overrides win over the demo's opd.teacher.path)
    assert "opd.teacher.path=/s" in opd and "algorithm.adv_estimator=grpo" not in opd
    assert "actor_rollout_ref.actor.use_kl_loss=True" in grpo and "algorithm.adv_estimator=grpo" in grpo
    assert all("trainer.val_before_train=False" in o for o in (opd, grpo))


def test_bench_runs_save_nothing_and_their_overrides_come_last(tmp_path):
    from opd_verl.demo.build import Built
    from opd_verl.demo.runs import opd_command

    built = Built(root="/r", data={"train": "/r/train.parquet", "val": "/r/val.parquet"}, teacher="/t", student="/s")
    extra = so.overrides_for("opd", built, seed=0)
    cmd = opd_command(built, tmp_path, steps=5, test_freq=-1, extra=extra, save_freq=-1)
    assert "trainer.save_freq=-1" in cmd and "trainer.test_freq=-1" in cmd
    # Hydra applies the last of repeated overrides: the bench's teacher replaces the demo's
    assert cmd.index("opd.teacher.path=/s") > cmd.index("opd.teacher.path=/t")
    assert "trainer.save_freq=5" in opd_command(built, tmp_path, steps=5, test_freq=-1)  # the demo's default
