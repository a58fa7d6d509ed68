"""validate_config: every check of ours on a composed config (the `opd:` section, and the verl keys its mode
reads), run before Ray starts. Each raises OPDConfigError with one line that names the key and the fix."""

from __future__ import annotations

from collections.abc import Mapping

from opd_verl.algorithms.divergences import DIVERGENCES, KL_ESTIMATORS, SUPPORTS
from opd_verl.checks.errors import OPDConfigError
from opd_verl.checks.keys import check_unknown_keys
from opd_verl.checks.modes import OPD_ESTIMATORS, uses_distill_loss, uses_opd
from opd_verl.checks.rollout_log_probs import ACCEPT_ROLLOUT_KEY, ACCEPT_ROLLOUT_NEEDS, check_rollout_log_probs
from opd_verl.checks.routing import route_table
from opd_verl.checks.teacher_views import check_teacher_views
from opd_verl.checks.teachers import teacher_entries
from opd_verl.checks.unread import check_unread_options

MULTI_TEACHER_MODES = ("mean_prob", "mean_logit", "route")


def _choice(opd: Mapping, key: str, choices: tuple[str, ...]) -> None:
    if opd[key] not in choices:
        raise OPDConfigError(f"opd.{key}={opd[key]!r} is not one of {', '.join(choices)}; set opd.{key}=<one of them>")


def validate_opd_section(opd: Mapping) -> None:
    """Checks of the `opd:` section on its own."""
    check_unknown_keys(opd)
    _choice(opd, "divergence", DIVERGENCES)
    _choice(opd, "support", SUPPORTS)
    _choice(opd, "kl_estimator", KL_ESTIMATORS)
    _choice(opd, "multi_teacher_mode", MULTI_TEACHER_MODES)
    if not 0.0 <= float(opd["beta"]) <= 1.0:
        raise OPDConfigError(f"opd.beta={opd['beta']} is outside [0, 1]; set opd.beta between 0 (forward KL) and 1 (reverse KL)")
    if float(opd["temperature"]) <= 0:
        raise OPDConfigError(f"opd.temperature={opd['temperature']} must be > 0; set opd.temperature=1.0 for no scaling")
    if int(opd["topk"]) < 1:
        raise OPDConfigError(f"opd.topk={opd['topk']} must be >= 1; set opd.topk to e.g. 20")
    if float(opd["adv_clip_min"]) >= float(opd["adv_clip_max"]):
        raise OPDConfigError(
            f"opd.adv_clip_min={opd['adv_clip_min']} must be < opd.adv_clip_max={opd['adv_clip_max']}; "
            "set e.g. opd.adv_clip_min=-10 opd.adv_clip_max=10"
        )
    if not 0.0 <= float(opd["discount"]) <= 1.0:
        raise OPDConfigError(f"opd.discount={opd['discount']} is outside [0, 1]; set opd.discount=0 for per-token terms")
    if int(opd["chunk_size"]) < 1:
        raise OPDConfigError(f"opd.chunk_size={opd['chunk_size']} must be >= 1; set e.g. opd.chunk_size=1024")
    for key in ("lambda_rl", "lambda_distill", "hybrid_alpha"):
        if float(opd[key]) < 0:
            raise OPDConfigError(f"opd.{key}={opd[key]} must be >= 0")
    entries = teacher_entries(opd)
    if opd["multi_teacher_mode"] == "route" and len(entries) > 1:
        route_table(entries)
    if opd["multi_teacher_mode"] == "mean_logit" and len(entries) > 1 and opd["support"] == "sampled":
        raise OPDConfigError(
            "opd.multi_teacher_mode=mean_logit needs the teachers' logits; set opd.support=topk|full "
            "(loss_mode=ppo_plus_distill) or opd.multi_teacher_mode=mean_prob"
        )


def check_support_combinations(opd: Mapping) -> None:
    """What support=sampled (the sampled token only) cannot do, in the loss-level mode."""
    if opd["support"] == "sampled" and float(opd["temperature"]) != 1.0:
        raise OPDConfigError(
            "opd.temperature applies to logits, which support=sampled does not use; set opd.support=topk|full "
            "or opd.temperature=1.0"
        )
    if opd["support"] == "sampled" and opd["divergence"] != "reverse_kl":
        raise OPDConfigError(
            f"opd.divergence={opd['divergence']} needs the teacher's distribution; set opd.support=topk|full "
            "(support=sampled only estimates reverse_kl)"
        )


def validate_config(config: Mapping) -> None:
    """All checks of ours on a composed config; raises OPDConfigError before anything is loaded."""
    from opd_verl.checks.teacher_pool import check_teacher_placement  # its own module (it imports this one)

    opd = config["opd"]
    validate_opd_section(opd)
    check_teacher_placement(config)
    if not uses_opd(config):  # opd.accept_rollout_log_probs concerns verl's bypass mode, set without OPD too
        check_unread_options(config, {ACCEPT_ROLLOUT_KEY: ACCEPT_ROLLOUT_NEEDS})
        return
    if not teacher_entries(opd):
        raise OPDConfigError(
            f"algorithm.adv_estimator={config['algorithm']['adv_estimator']} needs a teacher; "
            "set opd.teacher.path=<model dir or hub name>"
        )
    check_unread_options(config)
    check_rollout_log_probs(config)
    check_support_combinations(opd)
    check_teacher_views(config)
    # verl's fused kernels return log-probs only, no logits: not for the loss-level pass over topk|full (which also
    # covers the mean_logit mixture, valid only there)
    if uses_distill_loss(config) and opd["support"] != "sampled":
        for i, entry in enumerate(teacher_entries(opd)):
            if entry["model"].get("use_fused_kernels"):
                key = f"opd.teachers[{i}].model" if opd.get("teachers") else "opd.teacher.model"
                raise OPDConfigError(
                    f"{key}.use_fused_kernels=true: opd.support={opd['support']} needs the teacher's logits, which "
                    f"fused kernels never materialise; drop {key}.use_fused_kernels"
                )
    model = config["actor_rollout_ref"]["model"]
    lora_rank = model.get("lora_rank") or (model.get("lora") or {}).get("rank") or 0
    if (lora_rank > 0 or model.get("lora_adapter_path")) and any(
        t["path"] == model["path"] for t in teacher_entries(opd)
    ):
        raise OPDConfigError(
            f"opd.teacher.path={model['path']} is the LoRA student's own base model, i.e. the adapter-off actor; "
            "set opd.teacher.path to a different (larger) model"
        )
    estimator = config["algorithm"]["adv_estimator"]
    if estimator == "opd_hybrid" and opd["hybrid_base_estimator"] in OPD_ESTIMATORS:
        raise OPDConfigError(
            "opd.hybrid_base_estimator must be an RL estimator (grpo, rloo, gae, ...), not an OPD one"
        )
