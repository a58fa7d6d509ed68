"""The keys the `opd:` section accepts (its schema: the packaged opd_trainer.yaml) and the one-line error for any
other, on the command line before Hydra composes and in a composed config (e.g. from a recipe)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from importlib import resources
from typing import Any

import yaml

from opd_verl.checks.errors import OPDConfigError, did_you_mean
from opd_verl.checks.teacher_model import check_teacher_model

#: removed opd keys -> why (a one-line error before Hydra composes, and on a composed config, e.g. from a recipe)
REMOVED_KEYS = {
    "teacher.param_offload": "verl 0.9.1 always keeps a forward-only engine's parameters (the teacher's) offloaded to "
    "CPU between passes; nothing to set, drop it",
}


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
    valid = _flat_keys(opd_defaults())
    hint = did_you_mean(key, valid, "opd.")
    return OPDConfigError(f"unknown key 'opd.{key}';{hint} valid opd keys: {', '.join(valid)}")


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
