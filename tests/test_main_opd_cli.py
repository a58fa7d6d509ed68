"""`python -m opd_verl.main_opd` as a user runs it: composing, printing and rejecting bad input before Ray starts."""

import time

import yaml

from conftest import run_main_opd

# Hub names: preflight reads local model directories only, so these compose without any model on disk.
OPD = ["algorithm.adv_estimator=opd", "opd.teacher.path=Qwen/Qwen2-7B", "actor_rollout_ref.model.path=Qwen/Qwen2-0.5B"]


LOSS_LEVEL = "actor_rollout_ref.actor.policy_loss.loss_mode=ppo_plus_distill"


def test_cfg_job_prints_the_validated_config():
    result = run_main_opd(*OPD, LOSS_LEVEL, "opd.divergence=jsd", "opd.support=full", "opd.beta=0.3", "--cfg", "job")
    assert result.returncode == 0, result.stderr
    cfg = yaml.safe_load(result.stdout)
    assert cfg["algorithm"]["adv_estimator"] == "opd"
    assert cfg["opd"]["divergence"] == "jsd" and cfg["opd"]["beta"] == 0.3
    assert cfg["opd"]["teacher"]["path"] == "Qwen/Qwen2-7B"
    assert "actor_rollout_ref" in cfg and "trainer" in cfg  # verl's ppo_trainer is the base


def _assert_one_line_error(result, *fragments):
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("opd_verl: error:")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "ray init" not in result.stdout  # nothing started


def test_unknown_key_fails_before_anything_loads():
    start = time.monotonic()
    result = run_main_opd(*OPD, "opd.betta=0.5")
    _assert_one_line_error(result, "unknown key 'opd.betta'; did you mean opd.beta?", "valid opd keys:")
    assert time.monotonic() - start < 60


def test_options_the_mode_never_reads_stop_the_run():
    """The review's example: these validated and then trained sampled reverse KL (the advantage path reads none)."""
    result = run_main_opd(*OPD, "opd.support=full", "opd.divergence=jsd", "opd.temperature=2", "--cfg", "job")
    _assert_one_line_error(result, "opd.support=full has no effect here", "loss_mode=ppo_plus_distill")


def test_bad_beta_names_the_key_and_the_fix():
    result = run_main_opd(*OPD, LOSS_LEVEL, "opd.support=full", "opd.divergence=jsd", "opd.beta=1.5")
    _assert_one_line_error(result, "opd.beta=1.5", "set opd.beta between 0")


def test_missing_teacher_is_reported():
    result = run_main_opd("algorithm.adv_estimator=opd")
    _assert_one_line_error(result, "needs a teacher", "opd.teacher.path")


def test_bad_value_with_cfg_job_still_fails():
    result = run_main_opd(*OPD, "opd.topk=0", "--cfg", "job")
    _assert_one_line_error(result, "opd.topk=0 must be >= 1")


def test_missing_teacher_directory_is_reported(tmp_path):
    result = run_main_opd(
        "algorithm.adv_estimator=opd", f"opd.teacher.path={tmp_path}/nope", "actor_rollout_ref.model.path=Qwen/Qwen2-0.5B"
    )
    _assert_one_line_error(result, f"opd.teacher.path={tmp_path}/nope does not exist")


def test_removed_param_offload_is_reported_before_hydra_composes():
    result = run_main_opd(*OPD, "opd.teacher.param_offload=true", "--cfg", "job")  # hydra alone: "Key not found"
    _assert_one_line_error(result, "opd.teacher.param_offload was removed", "forward-only engine", "nothing to set")
