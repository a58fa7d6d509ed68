"""`python -m opd_verl.main_opd [hydra overrides]`: verl's PPO entry point with the `opd:` section.

Our options are validated before Ray starts. `--cfg job` composes, validates and prints the config, then exits.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from opd_verl.checks.device import check_device, device_note, is_cpu_run, user_override_keys
from opd_verl.checks.verl_config import check_verl_config
from opd_verl.checks.options import (
    OPDConfigError, check_override_keys, deprecation_notes, uses_opd, validate_config, view_notes,
)

_PRINT_ONLY = {"flag": False}


def _fail(message: str) -> None:
    for line in message.splitlines():  # one line per problem
        print(f"opd_verl: error: {line}", file=sys.stderr)
    sys.exit(2)


def _strip_cfg_job(argv: list[str]) -> tuple[list[str], bool]:
    """Remove `--cfg job` / `--cfg=job` / `-c job` from argv; report whether it was there."""
    out, found, i = [], False, 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--cfg", "-c") and i + 1 < len(argv) and argv[i + 1] == "job":
            found, i = True, i + 2
            continue
        if arg == "--cfg=job":
            found, i = True, i + 1
            continue
        out.append(arg)
        i += 1
    return out, found


def prepare(config: DictConfig) -> None:
    """Validate everything of ours and apply platform defaults; raises OPDConfigError on bad input."""
    plain = OmegaConf.to_container(config, resolve=True)
    validate_config(plain)
    for line in deprecation_notes(plain):
        print(f"opd_verl: {line}", file=sys.stderr)
    if uses_opd(plain):
        from opd_verl.checks.preflight import run_preflight

        from opd_verl.checks.teacher_pool import placement_note

        pool = placement_note(plain["opd"])
        for line in view_notes(plain["opd"]) + ([pool] if pool else []):
            print(f"opd_verl: {line}", file=sys.stderr)
        for line in run_preflight(plain):
            print(f"opd_verl: {line}", file=sys.stderr)
    if is_cpu_run(config, user_override_keys()):  # the CPU support is loaded for a CPU run only
        from opd_verl.cpu.defaults import apply_cpu_defaults

        apply_cpu_defaults(config)
    from opd_verl.verl_ext.served_teacher import apply_served_teacher

    apply_served_teacher(config, user_override_keys())
    check_verl_config(config)


@hydra.main(config_path="config", config_name="opd_trainer", version_base=None)
def main(config: DictConfig) -> None:
    from opd_verl.checks.data import check_data

    try:
        prepare(config)
        if _PRINT_ONLY["flag"]:
            note = device_note(config, user_override_keys())
            if note:
                print(f"opd_verl: {note}", file=sys.stderr)
        else:
            check_device(config, user_override_keys())
            check_data(OmegaConf.to_container(OmegaConf.masked_copy(config, ["data", "opd"]), resolve=True))
    except OPDConfigError as err:
        _fail(str(err))
    if _PRINT_ONLY["flag"]:
        print(OmegaConf.to_yaml(config))
        return
    from opd_verl.verl_ext.task_runner import run

    run(config)


def cli() -> None:
    argv, print_only = _strip_cfg_job(sys.argv[1:])
    try:
        check_override_keys(argv)
    except OPDConfigError as err:
        _fail(str(err))
    _PRINT_ONLY["flag"] = print_only
    sys.argv = [sys.argv[0], *argv]
    main()


if __name__ == "__main__":
    cli()
