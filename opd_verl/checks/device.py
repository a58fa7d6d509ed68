"""Which device a run is on, decided before Ray starts: the CPU support (opd_verl.cpu) is loaded only for a CPU run.

A run is a CPU run when the user says `trainer.device=cpu`, or when nothing says otherwise: no `trainer.device` on
the command line, no Ray cluster to join (RAY_ADDRESS, ray_kwargs.ray_init.address) and no accelerator visible to
torch. An explicit `trainer.device=cuda|npu|...` is never turned into a CPU run (a head node without a GPU launches
GPU runs on its cluster's workers).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
from omegaconf import OmegaConf

from opd_verl.checks.options import OPDConfigError

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


def user_override_keys(overrides: Iterable[str] | None = None) -> set[str]:
    """Keys set on the command line (default: Hydra's task overrides of the running app), without +/++/~."""
    if overrides is None:
        try:
            from hydra.core.hydra_config import HydraConfig

            overrides = list(HydraConfig.get().overrides.task)
        except Exception:
            overrides = []
    return {item.split("=", 1)[0].lstrip("+~") for item in overrides}


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


def check_device(config, explicit_keys: set[str]) -> None:
    """An accelerator run with nothing to run on would wait forever for Ray's GPU resources: say so now."""
    if is_cpu_run(config, explicit_keys) or ray_address(config) or torch_has_accelerator():
        return
    raise OPDConfigError(
        f"trainer.device={_device(config)} but this machine has no accelerator and no Ray cluster is given; "
        f"set trainer.device=cpu, or join a cluster with GPUs (RAY_ADDRESS or {RAY_ADDRESS_KEY}=...)"
    )
