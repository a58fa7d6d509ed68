"""verl's critic in an OPD run. verl 0.9.1's need_critic warns "Disabled critic as algorithm.adv_estimator != gae"
whenever critic.enable is null and the estimator is not gae, so on every run of an OPD estimator. Those train no
critic, so critic.enable=false is set (and printed) where the user left it null; a user's value is kept as verl
reads it. opd_hybrid on gae needs the critic's values: critic.enable=true, or an error."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf, open_dict

from opd_verl.checks.errors import OPDConfigError
from opd_verl.checks.modes import OPD_ESTIMATORS

KEY = "critic.enable"


def apply_critic_default(config: DictConfig) -> str | None:
    """Set critic.enable=false for an OPD estimator without a critic (where it is null); the line saying so, or None
    when nothing changed. Raises OPDConfigError for opd_hybrid on gae without critic.enable=true."""
    estimator = OmegaConf.select(config, "algorithm.adv_estimator")
    if estimator not in OPD_ESTIMATORS:
        return None  # verl's own rule, and its warning, for verl's estimators
    enable = OmegaConf.select(config, KEY)
    if estimator == "opd_hybrid" and OmegaConf.select(config, "opd.hybrid_base_estimator") == "gae":
        if enable is not True:
            raise OPDConfigError(f"opd.hybrid_base_estimator=gae needs verl's critic (its values); set {KEY}=true "
                                 f"(it is {enable}), or pick another base estimator (grpo, rloo, ...)")
        return None
    if enable is not None:
        return None
    with open_dict(config):
        OmegaConf.update(config, KEY, False)
    return f"{KEY}=false (was null: algorithm.adv_estimator={estimator} trains no critic)"
