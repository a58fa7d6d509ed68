"""Which device a run is on, decided before Ray starts: the CPU support (opd_verl.cpu) is loaded only for a CPU run.

A run is a CPU run when the user says `trainer.device=cpu`, or when nothing says otherwise: no `trainer.device` set
by the user (on the command line or in a recipe), no Ray cluster to join (RAY_ADDRESS, ray_kwargs.ray_init.address)
and no accelerator visible to torch. An explicit `trainer.device=cuda|npu|...` is never turned into a CPU run (a
head node without a GPU launches GPU runs on its cluster's workers).

What the user set (`user_override_keys`): the keys of the command-line overrides and every key a selected recipe
(`+recipes=NAME`, a Hydra config group, with the recipes its own `defaults:` list names) writes. Both count as
explicit: a recipe's value is never rewritten by a platform default.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch
from omegaconf import OmegaConf

from opd_verl.checks.errors import OPDConfigError
from opd_verl.checks.recipes import RECIPE_GROUP

RAY_ADDRESS_KEY = "ray_kwargs.ray_init.address"


def torch_has_accelerator() -> bool:
    """True when this torch can see an accelerator (CUDA, ROCm, NPU, XPU, MPS)."""
    if torch.version.cuda is not None or torch.version.hip is not None:
        try:
            return torch.cuda.is_available()
        except Exception:
            return False
    for name in ("npu", "xpu", "mps"):
        backend = getattr(torch, name, None)
        if backend is not None and hasattr(backend, "is_available"):
            try:
                if backend.is_available():
                    return True
            except Exception:
                pass
    return False


def torch_is_cpu_only_build() -> bool:
    """True for a CPU build of torch (no CUDA/ROCm compiled in and no other accelerator package)."""
    return torch.version.cuda is None and torch.version.hip is None and not torch_has_accelerator()



def _hydra_runtime():
    """(task overrides, config search directories) of the running Hydra app, or None outside one."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hydra_cfg = HydraConfig.get()
    except Exception:
        return None
    dirs = []
    for source in hydra_cfg.runtime.config_sources:
        if source.schema == "file":
            dirs.append(Path(source.path))
        elif source.schema == "pkg":
            try:
                from importlib import resources

                dirs.append(Path(str(resources.files(source.path.replace("/", ".")))))
            except Exception:
                pass
    return list(hydra_cfg.overrides.task), dirs


def _leaf_keys(node, prefix: str = "") -> set[str]:
    """Dotted paths of the leaves of a recipe's YAML mapping (a list is one leaf)."""
    if not isinstance(node, dict) or not node:
        return {prefix} if prefix else set()
    keys = set()
    for key, value in node.items():
        keys |= _leaf_keys(value, f"{prefix}.{key}" if prefix else str(key))
    return keys


def recipe_keys(name: str, search_dirs: Iterable[Path], _seen: frozenset = frozenset()) -> set[str]:
    """The keys recipe `name` sets (recipes/NAME.yaml in the first of `search_dirs` that has it), with those of the
    recipes its `defaults:` list names. A recipe that is not found sets nothing here (Hydra reports it)."""
    import yaml

    path = next((Path(d) / RECIPE_GROUP / f"{name}.yaml" for d in search_dirs
                 if (Path(d) / RECIPE_GROUP / f"{name}.yaml").is_file()), None)
    if path is None or name in _seen:
        return set()
    body = yaml.safe_load(path.read_text()) or {}
    keys = set()
    for entry in body.pop("defaults", None) or []:
        if isinstance(entry, str) and entry != "_self_":
            keys |= recipe_keys(entry, search_dirs, _seen | {name})
    return keys | _leaf_keys(body)


def user_override_keys(overrides: Iterable[str] | None = None, search_dirs: Iterable[Path] | None = None) -> set[str]:
    """Keys the user set (see the module doc): the command-line overrides' (default: Hydra's task overrides of the
    running app), without +/++/~, and those of the recipes they select (found in `search_dirs`, default: the
    running app's config search path)."""
    runtime = _hydra_runtime() if overrides is None or search_dirs is None else None
    if overrides is None:
        overrides = runtime[0] if runtime else []
    if search_dirs is None:
        search_dirs = runtime[1] if runtime else []
    overrides, search_dirs = list(overrides), list(search_dirs)
    keys = set()
    for item in overrides:
        key, _, value = item.partition("=")
        key = key.lstrip("+~")
        if key == RECIPE_GROUP or key.startswith(RECIPE_GROUP + "@"):
            keys |= recipe_keys(value, search_dirs)
        else:
            keys.add(key)
    return keys


def ray_address(config) -> str | None:
    """The Ray cluster the run joins, if any (verl passes ray_kwargs.ray_init to ray.init; Ray reads RAY_ADDRESS)."""
    address = OmegaConf.select(config, RAY_ADDRESS_KEY, default=None) if not isinstance(config, dict) else (
        ((config.get("ray_kwargs") or {}).get("ray_init") or {}).get("address"))
    return address or os.environ.get("RAY_ADDRESS") or None


def _device(config) -> str | None:
    if isinstance(config, dict):
        return (config.get("trainer") or {}).get("device")
    return OmegaConf.select(config, "trainer.device", default=None)


def is_cpu_run(config, explicit_keys: set[str]) -> bool:
    """See the module doc. `explicit_keys`: the keys the user set on the command line (user_override_keys)."""
    if _device(config) == "cpu":
        return True
    if "trainer.device" in explicit_keys or ray_address(config):
        return False
    return not torch_has_accelerator()


def _runs_elsewhere(config, explicit_keys: set[str]) -> bool:
    """An accelerator run on a host that has none and joins no cluster."""
    return not (is_cpu_run(config, explicit_keys) or ray_address(config) or torch_has_accelerator())


def device_note(config, explicit_keys: set[str]) -> str | None:
    """For `--cfg job`: says that the printed accelerator config is not runnable on this host (None when it is)."""
    if not _runs_elsewhere(config, explicit_keys):
        return None
    return (f"this host has no accelerator: the config below is the trainer.device={_device(config)} run as it will "
            f"run on a cluster with GPUs; launched here it stops before Ray unless a Ray cluster is given "
            f"(RAY_ADDRESS or {RAY_ADDRESS_KEY}=...), or trainer.device=cpu is set")


def check_device(config, explicit_keys: set[str]) -> None:
    """An accelerator run with nothing to run on would wait forever for Ray's GPU resources: say so now."""
    if not _runs_elsewhere(config, explicit_keys):
        return
    raise OPDConfigError(
        f"trainer.device={_device(config)} but this machine has no accelerator and no Ray cluster is given; "
        f"set trainer.device=cpu, or join a cluster with GPUs (RAY_ADDRESS or {RAY_ADDRESS_KEY}=...)"
    )
