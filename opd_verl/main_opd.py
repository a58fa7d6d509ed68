"""`python -m opd_verl.main_opd [+recipes=NAME] [hydra overrides]`: verl's PPO entry point with the `opd:` section.

Our options are validated before Ray starts. `--cfg job [--package KEY] [--resolve]` composes, validates and prints
the config (or its KEY section, as Hydra does), then exits. `--help` is ours (opd_verl.usage); Hydra's own flags are
at `--hydra-help`.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import Container, DictConfig, OmegaConf

from opd_verl.checks.critic import apply_critic_default
from opd_verl.checks.device import check_device, device_note, is_cpu_run, user_override_keys
from opd_verl.checks.errors import OPDConfigError
from opd_verl.checks.keys import check_override_keys
from opd_verl.checks.modes import deprecation_notes, uses_opd
from opd_verl.checks.options import validate_config
from opd_verl.checks.recipes import check_recipe_overrides
from opd_verl.checks.teacher_views import view_notes
from opd_verl.checks.verl_config import check_verl_config

#: what `--cfg job` asked to print ({} for a run): {"package": KEY or None, "resolve": bool}
_PRINT_ONLY: dict = {}


def _fail(message: str) -> None:
    for line in message.splitlines():  # one line per problem
        print(f"opd_verl: error: {line}", file=sys.stderr)
    sys.exit(2)


def _flag_value(argv: list[str], i: int, names: tuple[str, ...]) -> tuple[str | None, int]:
    """(value, args used) when argv[i] is `NAME VALUE` or `--NAME=VALUE` for one of `names`, else (None, 0)."""
    arg = argv[i]
    if arg in names and i + 1 < len(argv):
        return argv[i + 1], 2
    for name in names:
        if name.startswith("--") and arg.startswith(name + "="):
            return arg.split("=", 1)[1], 1
    return None, 0


def _print_request(argv: list[str]) -> tuple[list[str], dict]:
    """Take `--cfg job` (`-c job`, `--cfg=job`) with Hydra's `--package KEY` (`-p`) and `--resolve` out of argv:
    (the rest, what to print or {} when --cfg job is not there)."""
    rest, request, extra, i = [], {}, [], 0
    while i < len(argv):
        cfg, used = _flag_value(argv, i, ("--cfg", "-c"))
        if cfg == "job":
            request, i = {"package": None, "resolve": False}, i + used
            continue
        package, used = _flag_value(argv, i, ("--package", "-p"))
        if used:
            extra.append(("package", package, argv[i:i + used]))
            i += used
            continue
        if argv[i] == "--resolve":
            extra.append(("resolve", True, [argv[i]]))
            i += 1
            continue
        rest.append(argv[i])
        i += 1
    for key, value, args in extra:  # ours with --cfg job; Hydra's otherwise (e.g. with --cfg hydra)
        if request:
            request[key] = value
        else:
            rest += args
    return rest, request


def _print_config(config: DictConfig, package: str | None, resolve: bool) -> None:
    """What Hydra's `--cfg job [--package KEY] [--resolve]` prints (hydra._internal.hydra.Hydra.show_cfg)."""
    if package in (None, "_global_"):
        node, package = config, None
    else:
        node = OmegaConf.select(config, package)
        if node is None:
            _fail(f"--package {package}: no such key in the config (e.g. --package opd)")
    if not isinstance(node, Container):
        print(node)
        return
    if package is not None:
        print(f"# @package {package}")
    if resolve:
        OmegaConf.resolve(node)
    sys.stdout.write(OmegaConf.to_yaml(node))


def prepare(config: DictConfig, explicit_keys: set[str] | None = None) -> None:
    """Validate everything of ours and apply platform defaults; raises OPDConfigError on bad input.
    `explicit_keys`: the keys the user set (checks.device.user_override_keys; computed when not given)."""
    explicit_keys = user_override_keys() if explicit_keys is None else explicit_keys
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
    critic_line = apply_critic_default(config)
    if critic_line:
        print(f"opd_verl: {critic_line}", file=sys.stderr)
    if is_cpu_run(config, explicit_keys):  # the CPU support is loaded for a CPU run only
        from opd_verl.cpu.defaults import apply_cpu_defaults

        apply_cpu_defaults(config)
    from opd_verl.verl_ext.served_teacher import apply_served_teacher

    apply_served_teacher(config, explicit_keys)
    check_verl_config(config)


@hydra.main(config_path="config", config_name="opd_trainer", version_base=None)
def main(config: DictConfig) -> None:
    from opd_verl.checks.data import check_data

    explicit_keys = user_override_keys()  # the command line's keys and its recipes' (read once)
    try:
        prepare(config, explicit_keys)
        if _PRINT_ONLY:
            note = device_note(config, explicit_keys)
            if note:
                print(f"opd_verl: {note}", file=sys.stderr)
        else:
            check_device(config, explicit_keys)
            if uses_opd(config):  # the models must load here: a mistyped name is one line, not verl's traceback
                from opd_verl.checks.preflight import check_model_sources

                check_model_sources(OmegaConf.to_container(config, resolve=True))
            check_data(OmegaConf.to_container(OmegaConf.masked_copy(config, ["data", "opd"]), resolve=True))
    except OPDConfigError as err:
        _fail(str(err))
    if _PRINT_ONLY:
        _print_config(config, _PRINT_ONLY["package"], _PRINT_ONLY["resolve"])
        return
    from opd_verl.verl_ext.task_runner import run

    run(config)


def cli() -> None:
    if "--help" in sys.argv[1:] or "-h" in sys.argv[1:]:
        from opd_verl.usage import usage_text

        print(usage_text(), end="")
        return
    argv, print_request = _print_request(sys.argv[1:])
    try:
        check_recipe_overrides(argv)
        check_override_keys(argv)
    except OPDConfigError as err:
        _fail(str(err))
    _PRINT_ONLY.clear()
    _PRINT_ONLY.update(print_request)
    sys.argv = [sys.argv[0], *argv]
    main()


if __name__ == "__main__":
    cli()
