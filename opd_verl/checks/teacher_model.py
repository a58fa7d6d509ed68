"""A teacher's own `model:` options (opd.teacher.model, or model: of an opd.teachers entry): verl's HFModelConfig
keys, less those the teacher cannot set."""

from __future__ import annotations

from collections.abc import Mapping

from opd_verl.checks.errors import OPDConfigError, did_you_mean

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
            settable = sorted(valid - set(TEACHER_MODEL_FIXED))
            raise OPDConfigError(f"unknown key '{key}.{name}' (not a verl HFModelConfig key);"
                                 f"{did_you_mean(name, settable, key + '.')} valid: {', '.join(settable)}")
