"""The OPD trainer: verl's synchronous v1 PPO trainer with OPD advantages (verl extension point: the trainer)."""

from __future__ import annotations

from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync


class OPDTrainer(PPOTrainerSync):
    """PPOTrainerSync whose advantage step sees the teacher's and the student's log-probs."""


def trainer_class(config):
    # trainer_base compares trainer_mode == "sync" in several places, so the mode stays "sync" and the class is ours.
    mode = config.trainer.v1.trainer_mode
    if mode != "sync":
        raise ValueError(f"trainer.v1.trainer_mode={mode} is not supported by opd_verl; set trainer.v1.trainer_mode=sync")
    return OPDTrainer
