"""The configured teachers (opd.teacher, or the opd.teachers list) as plain entries, and what each one reads."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from opd_verl.checks.errors import OPDConfigError
from opd_verl.checks.keys import REMOVED_KEYS
from opd_verl.checks.teacher_model import check_teacher_model

TEACHER_ENTRY_KEYS = ("path", "weight", "data_source", "tokenizer_path", "model", "prompt", "wrap_chat", "cross_tokenizer")
#: a teacher's view of each sample (opd.teacher.prompt / wrap_chat / cross_tokenizer): the defaults, today's path
VIEW_DEFAULTS = {"prompt": "student", "wrap_chat": True, "cross_tokenizer": False}


def _plain(value: Any) -> Any:
    """A plain dict/list copy of a (possibly OmegaConf) mapping or list."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_plain(v) for v in value]
    return value


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
