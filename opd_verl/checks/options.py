"""The `opd:` config section: its schema (the packaged YAML) and validation that runs before Ray starts.

Every check raises OPDConfigError with one line that names the key and the fix.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any

import yaml

from opd_verl.algorithms.divergences import DIVERGENCES, KL_ESTIMATORS, SUPPORTS

OPD_ESTIMATORS = ("opd", "opd_hybrid")
#: actor.policy_loss.loss_mode of the loss-level mode: L = lambda_rl * (verl's PPO loss) + lambda_distill * L_distill.
DISTILL_LOSS_MODE = "ppo_plus_distill"
#: its name before 0.2 (still accepted, with a deprecation line; to be removed in 0.3)
DEPRECATED_DISTILL_LOSS_MODES = ("opd_distill",)
DISTILL_LOSS_MODES = (DISTILL_LOSS_MODE, *DEPRECATED_DISTILL_LOSS_MODES)
MULTI_TEACHER_MODES = ("mean_prob", "mean_logit", "route")
TEACHER_ENTRY_KEYS = ("path", "weight", "data_source", "tokenizer_path", "model", "prompt", "wrap_chat", "cross_tokenizer")
#: a teacher's view of each sample (opd.teacher.prompt / wrap_chat / cross_tokenizer): the defaults, today's path
VIEW_DEFAULTS = {"prompt": "student", "wrap_chat": True, "cross_tokenizer": False}

#: removed opd keys -> why (a one-line error before Hydra composes, and on a composed config, e.g. from a recipe)
REMOVED_KEYS = {
    "teacher.param_offload": "verl 0.9.1 always keeps a forward-only engine's parameters (the teacher's) offloaded to "
    "CPU between passes; nothing to set, drop it",
}
#: HFModelConfig keys a teacher's `model:` may not set -> why
_FROZEN = "the teacher is frozen (no LoRA): give it a merged model directory"
_DERIVED = "verl derives it from the teacher's path"
TEACHER_MODEL_FIXED = {
    "use_remove_padding": "it follows actor_rollout_ref.model.use_remove_padding: the teacher scores the student's "
    "packed tokens in the student's layout",
    "path": "set the teacher's path (opd.teacher.path, or path: in its opd.teachers entry)",
    "tokenizer_path": "set the teacher's tokenizer_path (opd.teacher.tokenizer_path, or in its opd.teachers entry)",
    "model_type": "the teacher is a language model",
    "mtp": "the teacher only scores tokens (MTP is off)",
    **dict.fromkeys(("lora_rank", "lora_alpha", "lora", "lora_adapter_path", "target_modules", "target_parameters",
                     "exclude_modules"), _FROZEN),
    **dict.fromkeys(("local_path", "local_hf_config_path", "local_tokenizer_path", "hf_config", "generation_config",
                     "tokenizer", "processor", "architectures"), _DERIVED),
}


class OPDConfigError(ValueError):
    """A bad `opd.*` (or related verl) setting; the message is one line naming the key and the fix."""


def opd_defaults() -> dict[str, Any]:
    """The `opd:` section of the packaged opd_trainer.yaml: the schema of every option we accept."""
    text = resources.files("opd_verl").joinpath("config/opd_trainer.yaml").read_text()
    return yaml.safe_load(text)["opd"]


def _flat_keys(section: Mapping, prefix: str = "") -> list[str]:
    keys = []
    for key, value in section.items():
        keys.append(prefix + key)
        if isinstance(value, Mapping):
            keys += _flat_keys(value, prefix + key + ".")
    return keys


def _unknown_key_error(key: str) -> OPDConfigError:
    if key in REMOVED_KEYS:
        return OPDConfigError(f"opd.{key} was removed: {REMOVED_KEYS[key]}")
    valid = ", ".join(k for k in _flat_keys(opd_defaults()))
    return OPDConfigError(f"unknown key 'opd.{key}'; valid opd keys: {valid}")


_OVERRIDE = re.compile(r"^[+~]{0,2}opd\.([A-Za-z0-9_.]+)(=|$)")


def check_override_keys(overrides: list[str]) -> None:
    """Reject command-line overrides of `opd.*` keys that do not exist (also with Hydra's `+`/`++` prefixes)."""
    valid = set(_flat_keys(opd_defaults()))
    for override in overrides:
        match = _OVERRIDE.match(override)
        if not match:
            continue
        key = match.group(1)
        # opd.teachers.0.path style keys address list entries of `teachers`
        if key.startswith("teachers."):
            continue
        if key.startswith("teacher.model."):  # opd.teacher.model.<HFModelConfig key>[.<sub key>]
            check_teacher_model({key.split(".")[2]: None}, "opd.teacher.model")
            continue
        if key.startswith("teacher.inference."):  # verl's teacher server keys: checks.served_teacher
            continue
        if key not in valid:
            raise _unknown_key_error(key)


def check_unknown_keys(section: Mapping, schema: Mapping | None = None, prefix: str = "") -> None:
    """Reject keys of the composed `opd:` section that the schema does not have (e.g. from a recipe YAML)."""
    schema = opd_defaults() if schema is None else schema
    for key, value in section.items():
        if key not in schema:
            raise _unknown_key_error(prefix + str(key))
        if prefix + key in ("teacher.model", "teacher.inference"):  # verl's keys, checked by check_teacher_model
            continue                                                # and checks.served_teacher
        if isinstance(schema[key], Mapping) and isinstance(value, Mapping):
            check_unknown_keys(value, schema[key], prefix + key + ".")


def _choice(opd: Mapping, key: str, choices: tuple[str, ...]) -> None:
    if opd[key] not in choices:
        raise OPDConfigError(f"opd.{key}={opd[key]!r} is not one of {', '.join(choices)}; set opd.{key}=<one of them>")


def _plain(value: Any) -> Any:
    """A plain dict/list copy of a (possibly OmegaConf) mapping or list."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_plain(v) for v in value]
    return value


def check_teacher_model(model: Mapping, key: str) -> None:
    """A teacher's `model:` mapping: verl's HFModelConfig keys, but none of TEACHER_MODEL_FIXED."""
    if not model:
        return
    import dataclasses

    from verl.workers.config.model import HFModelConfig

    valid = {f.name for f in dataclasses.fields(HFModelConfig)}
    for name in model:
        if name in TEACHER_MODEL_FIXED:
            raise OPDConfigError(f"{key}.{name} cannot be set for a teacher: {TEACHER_MODEL_FIXED[name]}")
        if name not in valid:
            settable = ", ".join(sorted(valid - set(TEACHER_MODEL_FIXED)))
            raise OPDConfigError(f"unknown key '{key}.{name}' (not a verl HFModelConfig key); valid: {settable}")


def _teacher_model(model: Any, key: str) -> dict[str, Any]:
    if model is None:
        return {}
    if not isinstance(model, Mapping):
        raise OPDConfigError(f"{key} must be a mapping of verl model keys, e.g. {{override_config: {{...}}}}")
    check_teacher_model(model, key)
    return _plain(model)


def teacher_entries(opd: Mapping) -> list[dict[str, Any]]:
    """The configured teachers as a list of {path, weight, data_source, tokenizer_path, model} (empty if none);
    `model` is the teacher's own verl model options (checked by check_teacher_model)."""
    if opd.get("teachers"):
        entries = []
        for i, entry in enumerate(opd["teachers"]):
            if isinstance(entry, str):
                entry = {"path": entry}
            if not isinstance(entry, Mapping) or not entry.get("path"):
                raise OPDConfigError(f"opd.teachers[{i}] has no path; write each teacher as {{path: ..., weight: 1.0}}")
            extra = set(entry) - set(TEACHER_ENTRY_KEYS)
            if "param_offload" in extra:
                raise OPDConfigError(
                    f"opd.teachers[{i}].param_offload was removed: {REMOVED_KEYS['teacher.param_offload']}"
                )
            if extra:
                raise OPDConfigError(
                    f"opd.teachers[{i}] has unknown key(s) {sorted(extra)}; valid: {', '.join(TEACHER_ENTRY_KEYS)}"
                )
            entries.append(
                {
                    "path": str(entry["path"]),
                    "weight": float(entry.get("weight", 1.0)),
                    "data_source": entry.get("data_source"),
                    "tokenizer_path": entry.get("tokenizer_path"),
                    "model": _teacher_model(entry.get("model"), f"opd.teachers[{i}].model"),
                    **_view_of(entry),
                }
            )
        return entries
    teacher = opd.get("teacher") or {}
    if teacher.get("path"):
        return [
            {
                "path": str(teacher["path"]),
                "weight": 1.0,
                "data_source": None,
                "tokenizer_path": teacher.get("tokenizer_path"),
                "model": _teacher_model(teacher.get("model"), "opd.teacher.model"),
                **_view_of(teacher),
            }
        ]
    return []


def _view_of(entry: Mapping) -> dict[str, Any]:
    """A teacher's view options (VIEW_DEFAULTS where it sets none)."""
    return {key: _plain(entry.get(key, default)) if entry.get(key) is not None else default
            for key, default in VIEW_DEFAULTS.items()}


def teacher_key(opd: Mapping, index: int) -> str:
    """How the config names teacher ``index``: opd.teacher, or opd.teachers[i]."""
    return f"opd.teachers[{index}]" if opd.get("teachers") else "opd.teacher"


def view_mode(prompt: Any) -> str:
    """student | chat_template | template (a template string, or a list of messages) of a teacher's prompt option."""
    if prompt in ("student", "chat_template"):
        return prompt
    return "template"


def has_view(entry: Mapping) -> bool:
    """The teacher reads something other than the student's token ids."""
    return view_mode(entry.get("prompt", "student")) != "student" or bool(entry.get("cross_tokenizer"))


ROUTE_DEFAULT = "*"


def route_table(entries: list[Mapping]) -> dict[str, int]:
    """{data_source: teacher index} for multi_teacher_mode=route; a teacher's data_source is a name, a list of
    names, or "*" (every data_source no other teacher claims)."""
    table: dict[str, int] = {}
    for i, entry in enumerate(entries):
        sources = entry.get("data_source")
        if isinstance(sources, str):
            sources = [sources]
        if not sources or not all(isinstance(s, str) and s for s in sources):
            raise OPDConfigError(
                f"opd.teachers[{i}] has no data_source; with opd.multi_teacher_mode=route write each teacher as "
                f"{{path: ..., data_source: <name, list of names, or \"{ROUTE_DEFAULT}\">}}"
            )
        for source in sources:
            if source in table:
                raise OPDConfigError(
                    f"opd.teachers[{i}] routes data_source {source!r}, already routed to opd.teachers[{table[source]}]; "
                    "give each data_source one teacher"
                )
            table[source] = i
    return table


def route_teacher_indices(sources: list[str], table: Mapping[str, int]) -> list[int]:
    """The teacher index of each sample's data_source; raises on a data_source no teacher is routed to."""
    indices = []
    for source in sources:
        index = table.get(str(source), table.get(ROUTE_DEFAULT))
        if index is None:
            routed = ", ".join(sorted(table))
            raise OPDConfigError(
                f"data_source {source!r} has no teacher (opd.multi_teacher_mode=route routes {routed}); add it to a "
                f"teacher's data_source, or give one teacher data_source: \"{ROUTE_DEFAULT}\""
            )
        indices.append(index)
    return indices


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


_LOSS_LEVEL = f"actor_rollout_ref.actor.policy_loss.loss_mode={DISTILL_LOSS_MODE}"


def template_placeholders(template: Any, key: str) -> list[list[str]]:
    """The placeholders of a prompt template (a string or a list of {role, content} messages) as field paths, e.g.
    [["prompt"], ["reward_model", "ground_truth"]]; OPDConfigError for a malformed one (one line naming the key)."""
    from opd_verl.algorithms.teacher_view import _field_path, _parse

    if isinstance(template, str):
        contents = [template]
    elif isinstance(template, Sequence) and template and all(
        isinstance(m, Mapping) and set(m) == {"role", "content"} and isinstance(m["content"], str) for m in template
    ):
        contents = [m["content"] for m in template]
    else:
        raise OPDConfigError(
            f"{key}={template!r} is neither student, chat_template, a template string nor a list of "
            "{role, content} messages; set e.g. " + key + "=chat_template"
        )
    paths = []
    try:
        for content in contents:
            paths += [_field_path(piece) for piece, is_field in _parse(content) if is_field]
    except ValueError as err:
        raise OPDConfigError(f"{key}: {str(err).removeprefix('opd_verl: opd.teacher.prompt: ')}; "
                             "write {{ and }} for literal braces") from None
    return paths


def check_teacher_views(config: Mapping) -> None:
    """Each teacher's view (prompt, wrap_chat, cross_tokenizer) on its own and with the chosen mode."""
    opd = config["opd"]
    entries = teacher_entries(opd)
    loss_level = uses_distill_loss(config)
    support = opd["support"]
    several = len(entries) > 1
    for i, entry in enumerate(entries):
        key = teacher_key(opd, i)
        prompt, cross = entry["prompt"], entry["cross_tokenizer"]
        if not isinstance(cross, bool):
            raise OPDConfigError(f"{key}.cross_tokenizer={cross!r} must be true or false")
        if not isinstance(entry["wrap_chat"], bool):
            raise OPDConfigError(f"{key}.wrap_chat={entry['wrap_chat']!r} must be true or false")
        mode = view_mode(prompt)
        if prompt == "template":
            raise OPDConfigError(f"{key}.prompt=template: write the template itself, e.g. "
                                 f"{key}.prompt='{{prompt}} The reference answer is {{reward_model[ground_truth]}}.'")
        if mode == "template":
            template_placeholders(prompt, f"{key}.prompt")
        if not entry["wrap_chat"] and not (mode == "template" and isinstance(prompt, str)):
            raise OPDConfigError(f"{key}.wrap_chat=false has no effect: it is read only with a template string as "
                                 f"{key}.prompt; set one, or drop {key}.wrap_chat (default true)")
        if cross and mode == "student":
            raise OPDConfigError(f"{key}.cross_tokenizer=true needs the teacher's own prompt (the student's prompt ids "
                                 f"are not the teacher's tokens): set {key}.prompt=chat_template or a template")
        if mode == "student" and not cross:
            continue
        what = f"{key}.cross_tokenizer=true" if cross else f"{key}.prompt={prompt!r}"
        mode_name = opd["multi_teacher_mode"]
        unsupported = [  # (when, "<what> with ...: not supported: why; fix")
            (loss_level and support != "sampled",
             f"{_LOSS_LEVEL} and opd.support={support}: not supported: the loss-level teacher forward scores the "
             f"student's own tokens; use opd.support=sampled (its teacher log-probs come from the reference pass, "
             f"which has the teacher's view) or algorithm.adv_estimator=opd|opd_hybrid without the loss-level mode"),
            (cross and loss_level and opd["kl_estimator"] == "k3",
             "opd.kl_estimator=k3: not supported: k3's per-token ratio pi_t/pi_s has no meaning for byte-span terms; "
             "set opd.kl_estimator=k1 or k1_baseline"),
            (several and mode_name == "mean_logit",
             "opd.multi_teacher_mode=mean_logit: not supported: the mixture needs every teacher's logits on the same "
             "tokens; set opd.multi_teacher_mode=mean_prob or route"),
            (cross and several and mode_name == "mean_prob",
             "opd.multi_teacher_mode=mean_prob: not supported: mean_prob mixes per-token probabilities, and a "
             "cross-tokenizer teacher gives byte-span terms; set opd.multi_teacher_mode=route"),
        ]
        for when, why in unsupported:
            if when:
                raise OPDConfigError(f"{what} with {why}")
    if opd["preflight"]["allow_template_mismatch"] and entries and all(has_view(e) for e in entries):
        raise OPDConfigError(
            "opd.preflight.allow_template_mismatch=true has no effect: every teacher reads its own view "
            "(opd.teacher.prompt), which the preflight checks instead; drop opd.preflight.allow_template_mismatch"
        )


def view_notes(opd: Mapping) -> list[str]:
    """One line per teacher saying what it reads, defaults included (printed by main_opd before Ray starts)."""
    lines = []
    for i, entry in enumerate(teacher_entries(opd)):
        key, prompt, cross = teacher_key(opd, i), entry["prompt"], entry["cross_tokenizer"]
        mode = view_mode(prompt)
        default = " (default)" if prompt == VIEW_DEFAULTS["prompt"] else ""
        how = {
            "student": "the student's prompt ids",
            "chat_template": "the sample's messages in the teacher's chat template",
            "template": "the template " + ("as the user message of the teacher's chat template"
                                           if entry["wrap_chat"] else "as the teacher's whole prompt (wrap_chat=false)"),
        }[mode]
        tokens = ("cross_tokenizer=true: the student's response re-encoded by the teacher's tokenizer, terms by "
                  "byte spans on each span's last student token, the student's eos matched with the teacher's, its "
                  "other special tokens masked" if cross else
                  "cross_tokenizer=false (default): the student's response ids")
        lines.append(f"{key}.prompt={prompt!r}{default}: {how}; {tokens}")
    return lines


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
            unread[key] = _LOSS_LEVEL
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
        unread[ACCEPT_ROLLOUT_KEY] = _ACCEPT_ROLLOUT_NEEDS
    return unread


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


def check_unread_options(config: Mapping, unread: Mapping[str, str] | None = None) -> None:
    """A non-default opd.* value that the chosen mode never reads is an error naming what would make it count."""
    opd, defaults = config["opd"], opd_defaults()
    for key, needs in (unread_options(config) if unread is None else unread).items():
        if opd[key] != defaults[key]:
            raise OPDConfigError(
                f"opd.{key}={opd[key]} has no effect here: it is read only with {needs}; set that, "
                f"or drop opd.{key} (default {defaults[key]})"
            )


BYPASS_KEY = "algorithm.rollout_correction.bypass_mode"
ACCEPT_ROLLOUT_KEY = "accept_rollout_log_probs"
_ACCEPT_ROLLOUT_NEEDS = (f"{BYPASS_KEY}=true and the OPD advantage in a loss (algorithm.adv_estimator=opd, or "
                         f"opd_hybrid with opd.hybrid_alpha > 0; with {_LOSS_LEVEL} also opd.lambda_rl > 0)")


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


def validate_config(config: Mapping) -> None:
    """All checks of ours on a composed config; raises OPDConfigError before anything is loaded."""
    from opd_verl.checks.teacher_pool import check_teacher_placement  # its own module (it imports this one)

    opd = config["opd"]
    validate_opd_section(opd)
    check_teacher_placement(config)
    if not uses_opd(config):  # opd.accept_rollout_log_probs concerns verl's bypass mode, set without OPD too
        check_unread_options(config, {ACCEPT_ROLLOUT_KEY: _ACCEPT_ROLLOUT_NEEDS})
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
