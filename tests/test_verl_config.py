"""Checks of verl's own keys before Ray (opd_verl.checks.verl_config): what verl 0.9.1 reports only inside a Ray
worker after the models load (or as a hang)."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from opd_verl.checks.errors import OPDConfigError
from opd_verl.checks.verl_config import (
    check_batch_arithmetic,
    check_loss_level_support,
    check_missing_values,
    check_sequence_parallel_attention,
    replay_poll_interval,
)

from conftest import REPO, run_main_opd

BASE = ["actor_rollout_ref.rollout.name=vllm", "trainer.n_gpus_per_node=8", "data.train_batch_size=64",
        "actor_rollout_ref.rollout.n=4", "actor_rollout_ref.actor.ppo_mini_batch_size=16",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4"]


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "opd_verl" / "config"), version_base=None):
        return compose(config_name="opd_trainer", overrides=[*BASE, *overrides])


def test_a_consistent_config_passes():
    check_batch_arithmetic(_compose())
    check_missing_values(_compose())


def test_missing_mandatory_value_is_named():
    with initialize_config_dir(config_dir=str(REPO / "opd_verl" / "config"), version_base=None):
        cfg = compose(config_name="opd_trainer")
    # reward.reward_model.rollout.name is ??? too, but its section is disabled (reward.reward_model.enable=False)
    assert OmegaConf.select(cfg, "reward.reward_model.enable") is False
    with pytest.raises(OPDConfigError, match=r"^actor_rollout_ref.rollout.name is not set .*set actor_rollout_ref.rollout.name=<value>$"):
        check_missing_values(cfg)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.train_batch_size=3", "actor_rollout_ref.rollout.n=1", "actor_rollout_ref.actor.ppo_mini_batch_size=3"],
         r"data.train_batch_size x actor_rollout_ref.rollout.n = 3 x 1 is not divisible by the 8 data-parallel"),
        (["actor_rollout_ref.actor.ppo_mini_batch_size=3", "actor_rollout_ref.rollout.n=2"],
         r"ppo_mini_batch_size x actor_rollout_ref.rollout.n = 3 x 2 is not divisible by the 8"),
        (["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=3"],
         r"per-GPU mini-batch .* = 8\) is not divisible by actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=3"),
        (["actor_rollout_ref.actor.fsdp_config.ulysses_sequence_parallel_size=2", "actor_rollout_ref.model.use_remove_padding=False"],
         r"ulysses_sequence_parallel_size=2 needs actor_rollout_ref.model.use_remove_padding=True"),
        (["actor_rollout_ref.actor.fsdp_config.ulysses_sequence_parallel_size=3", "actor_rollout_ref.model.use_remove_padding=True"],
         r"fsdp_config.ulysses_sequence_parallel_size=3 does not divide the 8 GPUs"),
        (["actor_rollout_ref.rollout.tensor_model_parallel_size=3"],
         r"tensor_model_parallel_size x data_parallel_size x pipeline_model_parallel_size = 3 does not divide the 8"),
        (["actor_rollout_ref.actor.use_dynamic_bsz=true", "actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=false"],
         r"use_dynamic_bsz=True but .*log_prob_use_dynamic_bsz=False"),
    ],
)
def test_batch_arithmetic_errors_name_the_keys(overrides, message):
    with pytest.raises(OPDConfigError, match=message):
        check_batch_arithmetic(_compose(*overrides))


def test_sequence_parallel_divides_the_data_parallel_size():
    # 8 GPUs / sp 2 = 4 data-parallel ranks: 16 x 4 / 4 = 16 per rank, micro 4 divides it
    check_batch_arithmetic(_compose("actor_rollout_ref.actor.ulysses_sequence_parallel_size=2",
                                    "actor_rollout_ref.model.use_remove_padding=True"))


def test_sequence_parallel_on_cpu_runs_the_varlen_kernel():
    """A CPU run keeps remove-padding (sdpa packs rows) and gives Ulysses the pure-torch varlen kernel, the attention
    verl's Ulysses patch reaches; without remove-padding it stops before Ray, naming the key."""
    sp = ["trainer.device=cpu", "trainer.n_gpus_per_node=2", "actor_rollout_ref.model.path=/nonexistent",
          "actor_rollout_ref.actor.fsdp_config.ulysses_sequence_parallel_size=2", "--cfg", "job"]
    result = run_main_opd(*sp)
    assert result.returncode == 0, result.stderr[-2000:]
    model = OmegaConf.create(result.stdout).actor_rollout_ref.model
    assert model.use_remove_padding is True and model.override_config.attn_implementation == "opd_cpu_varlen"
    result = run_main_opd(*sp, "actor_rollout_ref.model.use_remove_padding=False")
    assert result.returncode == 2
    assert "needs actor_rollout_ref.model.use_remove_padding=True" in result.stderr, result.stderr[-2000:]


SP2 = "actor_rollout_ref.actor.fsdp_config.ulysses_sequence_parallel_size=2"
TEACHER_SP2 = "actor_rollout_ref.ref.ulysses_sequence_parallel_size=2"
SDPA = "+actor_rollout_ref.model.override_config.attn_implementation=sdpa"


@pytest.mark.parametrize("overrides, message", [
    ([SP2, SDPA], r"^actor_rollout_ref.actor.fsdp_config.ulysses_sequence_parallel_size=2 with "
                  r"actor_rollout_ref.model.override_config.attn_implementation=sdpa: .* patches the flash-attention"),
    ([TEACHER_SP2, "opd.teacher.path=/t", SDPA], r"^actor_rollout_ref.ref.ulysses_sequence_parallel_size=2 with "
                                                  r"actor_rollout_ref.model.override_config.attn_implementation=sdpa"),
    ([TEACHER_SP2, "opd.teacher.path=/t", "+opd.teacher.model.override_config.attn_implementation=eager"],
     r"ref.ulysses_sequence_parallel_size=2 with opd.teacher.model.override_config.attn_implementation=eager"),
    ([TEACHER_SP2, "opd.teachers=[{path:/a},{path:/b,model:{override_config:{attn_implementation:sdpa}}}]"],
     r"with opd.teachers.1.model.override_config.attn_implementation=sdpa"),
])
def test_sequence_parallel_with_an_attention_ulysses_does_not_reach_is_rejected(overrides, message):
    """verl's Ulysses patch replaces transformers' flash-attention forward only: sdpa/eager at SP > 1 attend over
    each rank's slice of the sequence (0.17 nats off at SP=2 in verl's code, up to 0.99 for a teacher)."""
    with pytest.raises(OPDConfigError, match=message):
        check_sequence_parallel_attention(_compose(*overrides))


def test_sequence_parallel_with_flash_or_the_cpu_varlen_kernel_passes():
    check_sequence_parallel_attention(_compose(SP2, TEACHER_SP2, "opd.teacher.path=/t"))  # verl's default: flash
    check_sequence_parallel_attention(_compose(SP2, "+actor_rollout_ref.model.override_config.attn_implementation="
                                               "opd_cpu_varlen"))
    check_sequence_parallel_attention(_compose(SDPA))  # no sequence parallel: any attention
    check_sequence_parallel_attention(_compose(TEACHER_SP2, SDPA))  # no teacher: the reference is verl's own


def test_poll_interval():
    assert replay_poll_interval(_compose()) is None
    assert replay_poll_interval(_compose("+trainer.v1.sampler.sampler_kwargs.poll_interval=0.1")) == 0.1
    with pytest.raises(OPDConfigError, match="poll_interval=0 must be a number of seconds > 0"):
        replay_poll_interval(_compose("+trainer.v1.sampler.sampler_kwargs.poll_interval=0"))


def test_missing_rollout_name_stops_before_ray_in_one_line():
    """verl 0.9.1 reported this ~40 s later as an OmegaConf traceback inside a Ray worker."""
    result = run_main_opd("trainer.device=cuda", "--cfg", "job")
    assert result.returncode == 2, result.stderr[-2000:]
    assert ("opd_verl: error: actor_rollout_ref.rollout.name is not set (verl's config has no default for it); "
            "set actor_rollout_ref.rollout.name=<value>") in result.stderr
    assert "Traceback" not in result.stderr


def test_cpu_run_defaults_the_rollout_to_vllm():
    result = run_main_opd("trainer.device=cpu", "--cfg", "job")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "opd_verl[cpu]: actor_rollout_ref.rollout.name=vllm (was None)" in result.stderr
    assert OmegaConf.create(result.stdout).actor_rollout_ref.rollout.name == "vllm"


LOSS_LEVEL = ["actor_rollout_ref.actor.policy_loss.loss_mode=ppo_plus_distill", "opd.teacher.path=/t"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["opd.support=full", "actor_rollout_ref.actor.fsdp_config.ulysses_sequence_parallel_size=2"],
         r"opd.support=full with Ulysses sequence parallel .*=2\) is not supported"),
        (["opd.support=topk", "actor_rollout_ref.actor.ulysses_sequence_parallel_size=2"],
         r"opd.support=topk with Ulysses sequence parallel"),
        # the teacher's shards: its logits would be a slice of the packed rows the loss indexes (IndexError)
        (["opd.support=full", "actor_rollout_ref.ref.ulysses_sequence_parallel_size=2"],
         r"opd.support=full with Ulysses sequence parallel \(actor_rollout_ref.ref.ulysses_sequence_parallel_size=2\)"),
        (["opd.support=topk", "actor_rollout_ref.ref.fsdp_config.ulysses_sequence_parallel_size=2"],
         r"opd.support=topk with Ulysses sequence parallel \(actor_rollout_ref.ref"),
        (["opd.support=full", "actor_rollout_ref.model.use_fused_kernels=true"],
         r"opd.support=full needs the student's logits, which use_fused_kernels=True never materialises"),
        (["actor_rollout_ref.actor.entropy_coeff=0.01"],
         r"opd.lambda_rl=0 skips verl's PPO loss, and with it actor_rollout_ref.actor.entropy_coeff=0.01"),
        (["actor_rollout_ref.actor.use_kl_loss=true"], r"opd.lambda_rl=0 skips .*use_kl_loss=True"),
    ],
)
def test_loss_level_combinations_verl_cannot_run_are_rejected(overrides, message):
    with pytest.raises(OPDConfigError, match=message):
        check_loss_level_support(_compose(*LOSS_LEVEL, *overrides))


def test_loss_level_combinations_that_work():
    check_loss_level_support(_compose(*LOSS_LEVEL, "opd.support=sampled",
                                      "actor_rollout_ref.actor.fsdp_config.ulysses_sequence_parallel_size=2"))
    check_loss_level_support(_compose(*LOSS_LEVEL, "opd.lambda_rl=1", "actor_rollout_ref.actor.entropy_coeff=0.01",
                                      "actor_rollout_ref.actor.use_kl_loss=true"))
    check_loss_level_support(_compose("actor_rollout_ref.actor.entropy_coeff=0.01"))  # not the loss-level mode
