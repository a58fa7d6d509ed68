"""Which of the three modes a config runs: the OPD advantage (algorithm.adv_estimator=opd), the advantage-level
hybrid (opd_hybrid) or the loss-level mode (actor.policy_loss.loss_mode=ppo_plus_distill)."""

from __future__ import annotations

from collections.abc import Mapping

OPD_ESTIMATORS = ("opd", "opd_hybrid")
#: actor.policy_loss.loss_mode of the loss-level mode: L = lambda_rl * (verl's PPO loss) + lambda_distill * L_distill.
DISTILL_LOSS_MODE = "ppo_plus_distill"
#: its name before 0.2 (still accepted, with a deprecation line; to be removed in 0.3)
DEPRECATED_DISTILL_LOSS_MODES = ("opd_distill",)
DISTILL_LOSS_MODES = (DISTILL_LOSS_MODE, *DEPRECATED_DISTILL_LOSS_MODES)
#: how messages name the loss-level mode
LOSS_LEVEL = f"actor_rollout_ref.actor.policy_loss.loss_mode={DISTILL_LOSS_MODE}"


def uses_opd(config: Mapping) -> bool:
    """True when the run needs a teacher: an OPD advantage estimator or the distillation policy loss."""
    estimator = config["algorithm"]["adv_estimator"]
    return estimator in OPD_ESTIMATORS or uses_distill_loss(config)


def uses_distill_loss(config: Mapping) -> bool:
    """True for the loss-level mode (actor.policy_loss.loss_mode=ppo_plus_distill, or its old name)."""
    return config["actor_rollout_ref"]["actor"].get("policy_loss", {}).get("loss_mode") in DISTILL_LOSS_MODES


def deprecation_notes(config: Mapping) -> list[str]:
    """One line per deprecated name the config uses (printed by main_opd; the names still work)."""
    loss_mode = config["actor_rollout_ref"]["actor"].get("policy_loss", {}).get("loss_mode")
    if loss_mode in DEPRECATED_DISTILL_LOSS_MODES:
        return [f"deprecated: actor_rollout_ref.actor.policy_loss.loss_mode={loss_mode} is now called "
                f"{DISTILL_LOSS_MODE} (the old name works until opd_verl 0.3)"]
    return []
