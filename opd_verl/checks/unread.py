"""Options the chosen mode never reads: a non-default value of one is an error naming what would make it count."""

from __future__ import annotations

from collections.abc import Mapping

from opd_verl.checks.errors import OPDConfigError
from opd_verl.checks.keys import opd_defaults
from opd_verl.checks.modes import LOSS_LEVEL, OPD_ESTIMATORS, uses_distill_loss
from opd_verl.checks.rollout_log_probs import ACCEPT_ROLLOUT_KEY, ACCEPT_ROLLOUT_NEEDS, reads_rollout_log_probs
from opd_verl.checks.teachers import teacher_entries


def unread_options(config: Mapping) -> dict[str, str]:
    """{opd key: what would make it take effect} for every option the chosen mode never reads."""
    opd = config["opd"]
    estimator = config["algorithm"]["adv_estimator"]
    loss_level = uses_distill_loss(config)
    support = opd["support"]
    unread = {}
    if estimator not in OPD_ESTIMATORS:
        for key in ("adv_clip_min", "adv_clip_max"):
            unread[key] = "algorithm.adv_estimator=opd|opd_hybrid"
    if estimator != "opd":
        unread["discount"] = "algorithm.adv_estimator=opd"
    if loss_level and float(opd["lambda_rl"]) == 0.0:  # the advantage reaches the loss only through the PG term
        for key in ("adv_clip_min", "adv_clip_max", "discount"):
            unread.setdefault(key, "opd.lambda_rl > 0 (the advantage enters the loss-level mode's loss only "
                                   "through the policy-gradient term)")
    if estimator != "opd_hybrid":
        unread["hybrid_alpha"] = unread["hybrid_base_estimator"] = "algorithm.adv_estimator=opd_hybrid"
    if not loss_level:
        for key in ("support", "divergence", "temperature", "kl_estimator", "topk", "beta", "chunk_size",
                    "lambda_rl", "lambda_distill"):
            unread[key] = LOSS_LEVEL
    else:
        if support != "topk":
            unread["topk"] = "opd.support=topk"
        if support == "sampled":
            unread["chunk_size"] = "opd.support=topk|full"
        if support != "sampled":
            unread["kl_estimator"] = "opd.support=sampled"
        if opd["divergence"] != "jsd":
            unread["beta"] = "opd.divergence=jsd"
    if len(teacher_entries(opd)) < 2:
        unread["multi_teacher_mode"] = "several teachers (opd.teachers: [{path: ...}, {path: ...}])"
    if not reads_rollout_log_probs(config):
        unread[ACCEPT_ROLLOUT_KEY] = ACCEPT_ROLLOUT_NEEDS
    return unread


def check_unread_options(config: Mapping, unread: Mapping[str, str] | None = None) -> None:
    """A non-default opd.* value that the chosen mode never reads is an error naming what would make it count."""
    opd, defaults = config["opd"], opd_defaults()
    for key, needs in (unread_options(config) if unread is None else unread).items():
        if opd[key] != defaults[key]:
            raise OPDConfigError(
                f"opd.{key}={opd[key]} has no effect here: it is read only with {needs}; set that, "
                f"or drop opd.{key} (default {defaults[key]})"
            )
