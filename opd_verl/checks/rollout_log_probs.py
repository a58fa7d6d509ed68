"""verl's bypass mode (algorithm.rollout_correction.bypass_mode=true), where the student's s_t in the OPD advantage
q_t - s_t is the rollout engine's log-prob: when that happens, and when it is allowed."""

from __future__ import annotations

from collections.abc import Mapping

from opd_verl.checks.errors import OPDConfigError
from opd_verl.checks.modes import LOSS_LEVEL, OPD_ESTIMATORS, uses_distill_loss

BYPASS_KEY = "algorithm.rollout_correction.bypass_mode"
ACCEPT_ROLLOUT_KEY = "accept_rollout_log_probs"
ACCEPT_ROLLOUT_NEEDS = (f"{BYPASS_KEY}=true and the OPD advantage in a loss (algorithm.adv_estimator=opd, or "
                        f"opd_hybrid with opd.hybrid_alpha > 0; with {LOSS_LEVEL} also opd.lambda_rl > 0)")


def bypass_mode(config: Mapping) -> bool:
    """verl's bypass mode: old_log_probs (the student's s_t) are the rollout's log-probs, not the actor's."""
    return bool((config["algorithm"].get("rollout_correction") or {}).get("bypass_mode", False))


def opd_advantage_in_loss(config: Mapping) -> bool:
    """s_t (old_log_probs) enters a loss through the OPD advantage: adv_estimator=opd, or opd_hybrid with
    hybrid_alpha > 0 (alpha = 0 returns the base advantage), except in the loss-level mode with opd.lambda_rl=0
    (the advantage then enters no loss, only the opd/* metrics)."""
    opd, estimator = config["opd"], config["algorithm"]["adv_estimator"]
    if estimator == "opd_hybrid" and float(opd["hybrid_alpha"]) == 0.0:
        return False
    return estimator in OPD_ESTIMATORS and not (uses_distill_loss(config) and float(opd["lambda_rl"]) == 0.0)


def reads_rollout_log_probs(config: Mapping) -> bool:
    """The OPD advantage of a loss takes s_t from the rollout (where opd.accept_rollout_log_probs is read)."""
    return bypass_mode(config) and opd_advantage_in_loss(config)


def check_rollout_log_probs(config: Mapping) -> None:
    """Bypass mode puts vLLM's processed log-probs in s_t of A_t = q_t - s_t: never of a truncated distribution
    (top_p < 1 or top_k > 0), otherwise only with opd.accept_rollout_log_probs=true."""
    if not reads_rollout_log_probs(config):
        return
    rollout, estimator = config["actor_rollout_ref"]["rollout"], config["algorithm"]["adv_estimator"]
    top_p, top_k = rollout.get("top_p", 1.0), rollout.get("top_k", -1)
    truncated = ([f"actor_rollout_ref.rollout.top_p={top_p}"] if float(top_p) < 1.0 else []) + (
        [f"actor_rollout_ref.rollout.top_k={top_k}"] if int(top_k) > 0 else [])
    if truncated:
        raise OPDConfigError(
            f"{BYPASS_KEY}=true with {' and '.join(truncated)}: s_t of the OPD advantage q_t - s_t would be the "
            "rollout's log-prob of a truncated, renormalised distribution (opd.accept_rollout_log_probs cannot allow "
            f"it); set {BYPASS_KEY}=false (the actor recomputes s_t), or actor_rollout_ref.rollout.top_p=1 and top_k=-1"
        )
    if not config["opd"][ACCEPT_ROLLOUT_KEY]:
        raise OPDConfigError(
            f"{BYPASS_KEY}=true with algorithm.adv_estimator={estimator}: s_t of the OPD advantage q_t - s_t is then "
            "the rollout engine's (e.g. vLLM's) log-prob, not the actor's, and their mismatch enters every token's "
            f"advantage; set {BYPASS_KEY}=false, or opd.{ACCEPT_ROLLOUT_KEY}=true to accept it"
        )
