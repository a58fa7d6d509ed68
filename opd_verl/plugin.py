"""Entry point of group `verl.plugins`: verl imports this module in every process that imports verl.

Importing it registers our advantage estimators, policy losses, the CPU platform and the verl/vLLM patches.
verl logs entry-point load errors only at DEBUG level, so a failure is kept in LOAD_ERROR and
`require_plugin_loaded()` (called by our trainer and workers) turns it into a real error.
"""

from __future__ import annotations

import traceback

LOAD_ERROR: str | None = None
LOADED = False


def _register_all() -> None:
    from opd_verl.cpu import patches

    patches.apply_import_time_patches()
    from opd_verl.cpu import platform  # noqa: F401  (registers the "cpu" platform; selected only on a CPU run)
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
