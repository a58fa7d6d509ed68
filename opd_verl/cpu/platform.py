"""The CPU platform for verl 0.9.1 (verl extension point: verl.plugin.platform.PlatformRegistry).

verl has no CPU platform: without an accelerator it falls back to "nvidia" (nccl, `model.to(0)` → cuda, ...).
`PlatformCPU` is registered as "cpu" when this module is imported (the plugin imports it in every verl process).

How verl picks it (`verl.plugin.platform.platform_manager._detect_platform_name`, once per process):
1. `VERL_PLATFORM=cpu` in the environment: `opd_verl.cpu.defaults.apply_cpu_defaults` sets it in the driver and
   in Ray's runtime_env (so every Ray worker and the vLLM server get it) whenever the run is a CPU run.
2. Otherwise auto-detection probes the registered platforms in order (nvidia, npu, rocm, then ours): ours
   answers "available" only when torch has no accelerator build and sees no device, so a GPU machine never
   selects it by detection.

The device module is a no-op stand-in for `torch.cuda`: `current_device()` is the string "cpu" so that verl's
`tensor.to(get_device_id())` stays on the CPU; memory queries answer from the host's RAM.
"""

from __future__ import annotations

import os
import types
from contextlib import contextmanager
from typing import Any, Optional

import torch

from verl.plugin.platform import PlatformBase, PlatformRegistry

from opd_verl.checks.device import torch_is_cpu_only_build

PLATFORM_NAME = "cpu"
PLATFORM_ENV = "VERL_PLATFORM"


def _host_memory() -> tuple[int, int]:
    """(free, total) bytes of host RAM."""
    try:
        import psutil

        vm = psutil.virtual_memory()
        return int(vm.available), int(vm.total)
    except Exception:  # pragma: no cover - psutil is a Ray dependency
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return pages, pages


def _noop(*args, **kwargs):
    return None


def _zero(*args, **kwargs) -> int:
    return 0


def _build_device_module() -> types.ModuleType:
    """A module with the `torch.cuda` functions verl calls, as CPU no-ops (streams/events from torch.cpu)."""
    mod = types.ModuleType("opd_verl_cpu_device")
    mod.__doc__ = "CPU stand-in for torch.cuda used by verl through get_torch_device()."
    mod.is_available = lambda: True
    mod.device_count = lambda: 1
    mod.current_device = lambda: "cpu"
    mod.set_device = _noop
    mod.synchronize = _noop
    mod.get_device_name = lambda device=None: "CPU"
    mod.get_device_capability = lambda device=None: (None, None)
    mod.empty_cache = _noop
    mod.ipc_collect = _noop
    mod.set_per_process_memory_fraction = _noop
    mod.reset_peak_memory_stats = _noop
    mod.reset_max_memory_allocated = _noop
    mod.memory_allocated = _zero
    mod.max_memory_allocated = _zero
    mod.memory_reserved = _zero
    mod.max_memory_reserved = _zero
    mod.memory_stats = lambda device=None: {}
    mod.mem_get_info = lambda device=None: _host_memory()
    mod.manual_seed = torch.manual_seed
    mod.manual_seed_all = torch.manual_seed
    mod.seed = torch.seed
    mod.initial_seed = torch.initial_seed
    mod.get_rng_state = lambda device=None: torch.get_rng_state()
    mod.set_rng_state = lambda state, device=None: torch.set_rng_state(state)
    mod.get_rng_state_all = lambda: [torch.get_rng_state()]
    mod.set_rng_state_all = lambda states: torch.set_rng_state(states[0])
    mod.Stream = torch.cpu.Stream
    mod.Event = torch.cpu.Event if hasattr(torch.cpu, "Event") else object
    mod.current_stream = torch.cpu.current_stream
    mod.stream = torch.cpu.stream
    mod.StreamContext = getattr(torch.cpu, "StreamContext", None)
    mod.is_initialized = lambda: True
    mod.init = _noop
    mod.nvtx = types.SimpleNamespace(range_push=_noop, range_pop=_noop, mark=_noop)
    return mod


CPU_DEVICE_MODULE = _build_device_module()


@PlatformRegistry.register(platform=PLATFORM_NAME)
class PlatformCPU(PlatformBase):
    """verl platform for running on the host CPU: gloo, no device memory, fake "GPU" Ray resources.

    Ray resources: verl's placement groups ask for GPUs; the CPU run starts Ray with `num_gpus` equal to
    `trainer.n_gpus_per_node` (opd_verl.cpu.defaults), so the resource name stays "GPU".
    """

    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self) -> types.ModuleType:
        return CPU_DEVICE_MODULE

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check: bool = False) -> bool:
        # Auto-detection: only when torch itself has no accelerator; a GPU machine never picks "cpu" unless
        # VERL_PLATFORM=cpu says so.
        return torch_is_cpu_only_build()

    def current_device(self) -> str:  # verl does tensor.to(get_device_id())
        return "cpu"

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        return None

    def synchronize(self, device_index: Optional[int] = None) -> None:
        return None

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        return None

    def empty_cache(self) -> None:
        return None

    def get_device_capability(self, device_index: int = 0) -> tuple[Optional[int], Optional[int]]:
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        # Ray sets CUDA_VISIBLE_DEVICES for the fake GPUs; a CPU build of torch ignores it.
        return "CUDA_VISIBLE_DEVICES"

    @contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None:
        return None

    def profiler_stop(self) -> None:
        return None

    def ray_resource_name(self) -> str:
        return "GPU"

    def ray_resource_options(self, num_gpus: float) -> dict[str, Any]:
        return {"num_gpus": num_gpus}

    def ray_noset_envvars(self) -> list[str]:
        return ["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"]

    def is_ipc_supported(self) -> bool:
        return False

    def rollout_env_vars(self) -> dict[str, str]:
        # The vLLM server gets the platform too; vLLM's CPU KV-cache size (GiB) is passed on only if the user set
        # it (it overrides --kv-cache-memory-bytes, which opd_verl.cpu.defaults sets otherwise).
        env = {PLATFORM_ENV: PLATFORM_NAME}
        if os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            env["VLLM_CPU_KVCACHE_SPACE"] = os.environ["VLLM_CPU_KVCACHE_SPACE"]
        return env

    def cudart(self) -> Any:
        return None


def use_cpu_platform() -> None:
    """Make this process (and the processes it starts) use the CPU platform, even if already resolved."""
    from verl.plugin.platform import get_platform, platform_manager, set_platform

    os.environ[PLATFORM_ENV] = PLATFORM_NAME
    if platform_manager._current_platform is not None and not isinstance(get_platform(), PlatformCPU):
        set_platform(PlatformCPU())
