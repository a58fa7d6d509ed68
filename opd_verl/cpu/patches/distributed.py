"""Patches for verl 0.9.1's trainer side on CPU: the process group and the FSDP engines.

    gloo_process_group         verl/utils/distributed.py: initialize_global_process_group_ray (Ray workers) and
                               initialize_global_process_group (torchrun: verl's SFT trainer)
    fsdp_engine_cpu_registry   verl/workers/engine/base.py: EngineRegistry (engines of verl/workers/engine/fsdp/transformer_impl.py)
    fsdp2_ref_offload_no_pin   verl/workers/engine/fsdp/transformer_impl.py: CPUOffloadPolicy in FSDPEngine._build_fsdp_module
"""

from __future__ import annotations

import sys

from opd_verl.patches import _MARK, _register, _wrap_once

from . import _on_cpu_platform


# --- verl 0.9.1: the process group backend. `initialize_global_process_group_ray` builds
# f"cpu:gloo,{get_device_name()}:{get_nccl_backend()}", which on the CPU platform is "cpu:gloo,cpu:gloo"
# (device type twice: torch rejects it). On CPU the backend becomes plain "gloo". The torchrun variant
# `initialize_global_process_group` (verl's SFT trainer) builds the same string and takes no backend: on CPU it is
# mirrored with "gloo" (set_device, a no-op on CPU, left out).
@_register(
    "gloo_process_group",
    "verl.utils.distributed",
    "verl",
    "0.9.1",
    'the backend string "cpu:gloo,cpu:gloo" (device type twice) must be "gloo" on CPU',
    {
        "verl.utils.distributed:initialize_global_process_group_ray": "e9ec517a0089c3c5e6917f28bdd2f55bf493b452aa70fd85c7c17bd12a3e485f",
        "verl.utils.distributed:initialize_global_process_group": "c0dcd8ce78be8d832148d570cad848afe305478a7a8ad4b396ccb12973b58aa9",
    },
)
def _patch_gloo_process_group(module) -> None:
    def make_torchrun(original):
        def initialize_global_process_group(timeout_second=36000):
            if module.get_device_name() != "cpu":
                return original(timeout_second)
            import os
            from datetime import timedelta

            import torch.distributed

            torch.distributed.init_process_group(backend="gloo", timeout=timedelta(seconds=timeout_second),
                                                 init_method=os.environ.get("DIST_INIT_METHOD", None))
            return int(os.environ["LOCAL_RANK"]), int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])

        return initialize_global_process_group

    _wrap_once(module, "initialize_global_process_group", make_torchrun)

    def make(original):
        def initialize_global_process_group_ray(timeout_second=None, backend=None):
            if backend is None and module.get_device_name() == "cpu":
                backend = "gloo"
            return original(timeout_second=timeout_second, backend=backend)

        return initialize_global_process_group_ray

    patched = _wrap_once(module, "initialize_global_process_group_ray", make)
    if patched is None:
        return
    # modules that imported the name before the patch
    for name in ("verl.workers.engine_workers", "verl.checkpoint_engine.base"):
        importer = sys.modules.get(name)
        if importer is not None and getattr(importer, "initialize_global_process_group_ray", None) is patched.__wrapped__:
            importer.initialize_global_process_group_ray = patched


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
