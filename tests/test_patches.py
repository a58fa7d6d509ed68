"""Every patch: the mechanism and the patches of every platform in opd_verl/patches/ (weight_sync), the CPU ones in
opd_verl/cpu/patches/ (vllm_cpu, distributed): the upstream code each relies on is unchanged (pinned source hashes
and the exact lines used), and, where cheap, the patch does what it claims, on CPU and, for the patches of every
platform, on an emulated GPU platform too. Also the CPU platform.

When an upstream pin fails after a verl/vLLM upgrade: read the new upstream code, check whether the patch is still
needed and still right, then update the hash in the patch's topic module (PATCHES[name].pins; the failure names it).
"""

from __future__ import annotations

import importlib.metadata as metadata
import json
import os
import socket
import subprocess
import sys
import time
import types

from pathlib import Path

import pytest
from weight_sync_paths import socket_paths

import verl  # noqa: F401  (loads the opd_verl plugin, which installs the patches)
from opd_verl import patches
from opd_verl.cpu import patches as cpu_patches
from opd_verl.cpu.patches import vllm_cpu
from opd_verl.patches import weight_sync

EVERY_PLATFORM = ("weight_sync_fail_fast", "weight_sync_socket_per_ray_session")

ALL_PINS = [(name, target, sha) for name, p in patches.PATCHES.items() for target, sha in p.pins.items()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------------------------
# Upstream code unchanged
# ---------------------------------------------------------------------------------------------------------------


def test_every_patch_names_a_version_and_reason():
    expected = [  # in order of application
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
        "weight_sync_fail_fast",
        "weight_sync_socket_per_ray_session",
    ]
    assert list(patches.PATCHES) == expected
    assert list(patches.ORDER) == expected, "every patch is listed in patches.ORDER or opd_verl.cpu.patches.ORDER"
    assert list(cpu_patches.ORDER) + list(EVERY_PLATFORM) == expected
    for p in patches.PATCHES.values():
        assert p.package in ("verl", "vllm-cpu", "transformers") and p.version and p.reason and p.pins
        # the patches of every platform live in opd_verl.patches and are strict; the CPU ones in opd_verl.cpu.patches
        every_platform = p.name in EVERY_PLATFORM
        assert p.apply.__module__.startswith("opd_verl.patches." if every_platform else "opd_verl.cpu.patches."), p.name
        assert p.strict == every_platform, p.name


@pytest.mark.parametrize("name,target,sha", ALL_PINS, ids=[f"{n}:{t.split(':')[1]}" for n, t, _ in ALL_PINS])
def test_upstream_source_is_the_patched_version(name, target, sha):
    actual = patches.upstream_sha(target)
    assert actual == sha, (
        f"patch {name!r}: upstream {target} changed (sha256 {actual} != pinned {sha}). Re-check the patch against "
        f"the new code, then update PATCHES[{name!r}].pins in {sys.modules[patches.PATCHES[name].apply.__module__].__file__}."
    )


def test_installed_versions_are_the_targeted_ones():
    assert metadata.version("verl") == patches.VERL_VERSION
    assert metadata.version("vllm-cpu") == cpu_patches.VLLM_CPU_VERSION
    for p in patches.PATCHES.values():
        assert metadata.version(p.package).split("+")[0] == p.version, p.name


@pytest.mark.parametrize(
    "target,line",
    [
        # gloo_process_group: the backend string we replace
        (
            "verl.utils.distributed:initialize_global_process_group_ray",
            'backend = backend or f"cpu:gloo,{get_device_name()}:{get_nccl_backend()}"',
        ),
        ("verl.utils.distributed:initialize_global_process_group", 'backend = f"cpu:gloo,{get_device_name()}:{get_nccl_backend()}"'),
        # fsdp2_ref_offload_no_pin: the forced pinned-memory policy of forward-only engines
        ("verl.workers.engine.fsdp.transformer_impl:FSDPEngine._build_fsdp_module", "offload_policy = CPUOffloadPolicy(pin_memory=True)"),
        # fsdp_engine_cpu_registry: the lookup falls back to the device-only key we register
        ("verl.workers.engine.base:EngineRegistry.get_engine_cls", "if device in registry:"),
        # vllm_cpu_live_weight_linear: the CPU gemm calls layer.cpu_linear with the weight the layer passes...
        ("vllm.model_executor.layers.utils:cpu_unquantized_gemm", "return layer.cpu_linear(x, weight, bias)"),
        # ... which is the live layer.weight ...
        ("vllm.model_executor.layers.linear:UnquantizedLinearMethod.apply", "return self._gemm_impl(layer, x, layer.weight, bias)"),
        ("vllm.model_executor.layers.vocab_parallel_embedding:UnquantizedEmbeddingMethod.apply", "(layer, x, layer.weight, bias)"),
        # ... and the dispatch is looked up at call time (a module attribute we can replace)
        (
            "vllm.model_executor.layers.linear:UnquantizedLinearMethod.process_weights_after_loading",
            "from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm",
        ),
        # weight_sync_fail_fast: the receiver is started non-blocking, then the sender blocks on the ack
        ("verl.workers.rollout.vllm_rollout.vllm_rollout:ServerAdapter.update_weights", '"update_weights_from_ipc",'),
        ("verl.workers.rollout.vllm_rollout.bucketed_weight_transfer:BucketedWeightSender.async_send_weights", "self.socket.recv()"),
        # weight_sync_socket_per_ray_session: the sender names the socket after the Ray job id ...
        ("verl.workers.rollout.vllm_rollout.vllm_rollout:ServerAdapter.__init__", "job_id = ray.get_runtime_context().get_job_id()"),
        (
            "verl.workers.rollout.vllm_rollout.vllm_rollout:ServerAdapter.__init__",
            'self.zmq_handle = f"ipc:///tmp/rl-colocate-zmq-{job_id}-replica-{self.replica_rank}-rank-{local_rank}.sock"',
        ),
        # ... the vLLM server hands it to its engine's worker processes through the environment ...
        (
            "verl.workers.rollout.vllm_rollout.vllm_async_server:vLLMHttpServer.__init__",
            'os.environ["VERL_RAY_JOB_ID"] = ray.get_runtime_context().get_job_id()',
        ),
        # ... where the receiver builds the same path from it
        ("verl.workers.rollout.vllm_rollout.utils:vLLMColocateWorkerExtension._get_zmq_handle", 'job_id = os.environ.get("VERL_RAY_JOB_ID", "0")'),
        (
            "verl.workers.rollout.vllm_rollout.utils:vLLMColocateWorkerExtension._get_zmq_handle",
            'return f"ipc:///tmp/rl-colocate-zmq-{job_id}-replica-{replica_rank}-rank-{trainer_rank}.sock"',
        ),
        # vllm_cpu_distribution_alias: verl asks importlib.metadata for "vllm"
        ("verl.third_party.vllm:get_version", "return version(pkg)"),
    ],
)
def test_exact_upstream_lines_relied_on(target, line):
    assert line in patches.upstream_source(target), f"{target} no longer contains {line!r}"


def test_fsdp_engines_still_registered_for_cuda_and_npu_only():
    text = patches.upstream_source("verl.workers.engine.fsdp.transformer_impl:FSDPEngineWithLMHead")
    assert 'backend=["fsdp", "fsdp2"], device=["cuda", "npu"]' in text


# ---------------------------------------------------------------------------------------------------------------
# Patches applied and working
# ---------------------------------------------------------------------------------------------------------------


def test_plugin_loaded_and_patches_idempotent():
    from opd_verl import plugin

    plugin.require_plugin_loaded()
    before = {n: p.applied for n, p in patches.PATCHES.items()}
    patches.apply_import_time_patches()
    patches.apply_import_time_patches()
    assert {n: p.applied for n, p in patches.PATCHES.items() if before[n]} == {n: True for n in before if before[n]}
    assert sum(isinstance(f, patches._PostImportFinder) for f in sys.meta_path) <= 1
    assert sum(isinstance(f, vllm_cpu._VllmCpuFinder) for f in sys.meta_path) == 1


def test_vllm_distribution_alias():
    version = metadata.version("vllm")
    assert version == metadata.version("vllm-cpu") + "+cpu"
    from verl.third_party.vllm import get_version

    assert get_version("vllm") == version


def test_gloo_process_group_on_cpu():
    import torch.distributed as dist

    import verl.utils.distributed as vdist

    assert getattr(vdist.initialize_global_process_group_ray, patches._MARK, False)
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0", "WORLD_SIZE": "1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        vdist.initialize_global_process_group_ray(timeout_second=None)
        assert dist.get_backend() == "gloo"
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_gloo_process_group_under_torchrun_on_cpu(monkeypatch):
    """verl's SFT trainer (torchrun) builds "cpu:gloo,cpu:gloo" as well, in initialize_global_process_group."""
    import torch.distributed as dist

    import verl.utils.distributed as vdist

    assert getattr(vdist.initialize_global_process_group, patches._MARK, False)
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    try:
        assert vdist.initialize_global_process_group(timeout_second=60) == (0, 0, 1)
        assert dist.get_backend() == "gloo"
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_engine_registry_has_cpu_fsdp_engines():
    from verl.workers.engine.base import EngineRegistry
    from verl.workers.engine.fsdp import transformer_impl as impl

    assert patches.PATCHES["fsdp_engine_cpu_registry"].applied
    for backend in ("fsdp", "fsdp2"):
        assert EngineRegistry.get_engine_cls("language_model", backend) is impl.FSDPEngineWithLMHead
        assert EngineRegistry.get_engine_cls("value_model", backend) is impl.FSDPEngineWithValueHead
    # the GPU keys are untouched
    assert EngineRegistry._engines["language_model"]["fsdp2"]["cuda"] is impl.FSDPEngineWithLMHead


def test_fsdp2_offload_policy_without_pinned_memory_on_cpu():
    from torch.distributed.fsdp import CPUOffloadPolicy as TorchPolicy

    from verl.workers.engine.fsdp import transformer_impl as impl

    policy = impl.CPUOffloadPolicy(pin_memory=True)
    assert isinstance(policy, TorchPolicy)
    assert policy.pin_memory is False


_FSDP2_FORWARD = r"""
import os, sys, torch, torch.distributed as dist
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1")
dist.init_process_group("gloo")
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard
mesh = init_device_mesh("cpu", (1,))
model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
fully_shard(model, mesh=mesh, offload_policy=CPUOffloadPolicy(pin_memory=sys.argv[1] == "1"))
with torch.no_grad():
    print(tuple(model(torch.randn(3, 8)).shape))
"""


def test_fsdp2_forward_with_offload_policy_needs_unpinned_memory_on_cpu():
    """Why the patch exists: FSDP2 + CPUOffloadPolicy(pin_memory=True) cannot run without an accelerator."""
    runs = {}
    for pin in ("1", "0"):
        runs[pin] = subprocess.run(
            [sys.executable, "-c", _FSDP2_FORWARD, pin, str(_free_port())], capture_output=True, text=True, timeout=120
        )
    assert runs["0"].returncode == 0 and "(3, 2)" in runs["0"].stdout, runs["0"].stderr[-2000:]
    assert runs["1"].returncode != 0 and "accelerator" in runs["1"].stderr


def test_vllm_cpu_linear_uses_the_live_weight():
    import torch
    from vllm.model_executor.layers import utils as vllm_utils

    assert getattr(vllm_utils.dispatch_cpu_unquantized_gemm, patches._MARK, False)
    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(torch.randn(64, 128), requires_grad=False)
    vllm_utils.dispatch_cpu_unquantized_gemm(layer, remove_weight=True)
    assert layer.weight.shape == (64, 128), "the patched dispatch must keep layer.weight"
    x = torch.randn(3, 128)
    out = vllm_utils.cpu_unquantized_gemm(layer, x, layer.weight, None)
    torch.testing.assert_close(out, x @ layer.weight.T)
    # verl's weight sync writes in place: the next forward must see it
    layer.weight.data.copy_(torch.randn(64, 128))
    out = vllm_utils.cpu_unquantized_gemm(layer, x, layer.weight, None)
    torch.testing.assert_close(out, x @ layer.weight.T)


def test_vllm_cpu_linear_unpatched_drops_the_weight():
    """Why the patch exists: upstream replaces layer.weight by an empty tensor (or a packed copy)."""
    import torch
    from vllm.model_executor.layers import utils as vllm_utils

    original = vllm_utils.dispatch_cpu_unquantized_gemm.__wrapped__
    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(torch.randn(64, 128), requires_grad=False)
    original(layer, remove_weight=True)
    x = torch.randn(3, 128)
    before = layer.cpu_linear(x, layer.weight, None)
    if layer.weight.numel() == 0:
        return  # weight removed: an in-place weight update has nothing to write to
    layer.weight.data.copy_(torch.randn(64, 128))  # fallback kernel: stays live, nothing to show
    assert not torch.allclose(layer.cpu_linear(x, layer.weight, None), before)


def _spin_condition_pair(make_reader):
    import zmq

    context = zmq.Context()
    address = f"ipc:///tmp/opd-verl-test-spin-{os.getpid()}-{time.monotonic_ns()}"
    from vllm.distributed.device_communicators import shm_broadcast

    writer = shm_broadcast.SpinCondition(False, context, address)
    reader = make_reader(shm_broadcast.SpinCondition, context, address)
    time.sleep(0.2)  # the SUB socket's subscription reaches the PUB socket
    return context, writer, reader


def _cpu_seconds_of_waits(reader, seconds: float) -> float:
    """CPU seconds this thread spends in reader.wait() calls (as acquire_read makes them) for `seconds` of wall."""
    start_cpu, end = time.thread_time(), time.monotonic() + seconds
    while time.monotonic() < end:
        reader.wait(timeout_ms=50)
    return time.thread_time() - start_cpu


def test_vllm_cpu_shm_reader_waits_on_the_notification_without_spinning():
    context, writer, reader = _spin_condition_pair(lambda cls, ctx, addr: cls(True, ctx, addr))
    try:
        assert reader.busy_loop_s == 0.0
        reader.record_read()  # just read: upstream would now spin for a second
        assert _cpu_seconds_of_waits(reader, 0.5) < 0.1
        writer.notify()  # a write wakes a waiting reader at once
        start = time.monotonic()
        reader.wait(timeout_ms=5000)
        assert time.monotonic() - start < 1.0
    finally:
        context.destroy(linger=0)


def test_vllm_shm_reader_unpatched_spins_for_a_second_after_a_read():
    """Why the patch exists: upstream's reader burns a core (sched_yield in a loop) for 1 s after every read."""
    from vllm.distributed.device_communicators import shm_broadcast

    original = shm_broadcast.SpinCondition.__init__.__wrapped__

    def unpatched(cls, ctx, addr):
        reader = cls.__new__(cls)
        original(reader, True, ctx, addr)
        return reader

    context, _, reader = _spin_condition_pair(unpatched)
    try:
        assert reader.busy_loop_s == 1
        reader.record_read()
        assert _cpu_seconds_of_waits(reader, 0.5) > 0.25
    finally:
        context.destroy(linger=0)


def test_vllm_cpu_shm_reader_rechecks_the_buffer_every_20_ms():
    """A lost notification (the writer's PUB socket drops at its high-water mark of 1) stalled a reader that no
    longer spins for upstream's 5 s recheck interval; on CPU the reader rechecks every 20 ms."""
    from vllm.distributed.device_communicators import shm_broadcast

    timeouts = shm_broadcast.MessageQueue.ReadTimeoutWithWarnings
    for timeout, should_warn in ((None, True), (None, False), (30.0, True)):
        assert timeouts(timeout, should_warn).timeout_ms() == vllm_cpu.SHM_READER_RECHECK_MS_CPU == 20
    unpatched = timeouts.timeout_ms.__wrapped__
    assert unpatched(timeouts(None, True)) == shm_broadcast.SHM_READER_RECHECK_INTERVAL_MS == 5000


def test_logprobs_from_logits_on_cpu_is_unchanged_and_not_row_by_row():
    """logprobs_chunked_logsumexp: the same values and gradients as verl's per-row loop, in one logsumexp call per
    chunk instead of one per token (verl's loop: 5000 calls here)."""
    import torch
    from torch.overrides import TorchFunctionMode
    from verl.utils import torch_functional

    from opd_verl.cpu.patches import step_overhead

    class CountLogsumexp(TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.logsumexp:
                CountLogsumexp.calls += 1
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        logits = torch.randn(5000, 163, dtype=dtype, requires_grad=True)
        labels = torch.randint(0, 163, (5000,))
        results = []
        for fn in (torch_functional.logprobs_from_logits_v2.__wrapped__, torch_functional.logprobs_from_logits):
            CountLogsumexp.calls = 0
            with CountLogsumexp():
                out = fn(logits, labels)
            (grad,) = torch.autograd.grad((out * torch.linspace(-1, 1, 5000, dtype=dtype)).sum(), logits)
            results.append((out, grad, CountLogsumexp.calls))
        (ref, ref_grad, ref_calls), (out, grad, calls) = results
        assert torch.equal(out, ref) and torch.equal(grad, ref_grad)
        assert ref_calls == 5000 and calls == 1
    # chunks: at most max_elements logits each, at least one row; 3-D logits are split along the first dimension
    x = torch.randn(10, 7, 5, dtype=torch.float64)
    for max_elements in (1, 35, 70, 10**6):
        assert torch.allclose(step_overhead.chunked_logsumexp(x, max_elements), torch.logsumexp(x, -1), atol=0, rtol=0)


def test_agent_loop_reuse_keeps_one_single_turn_text_loop_per_worker():
    """agent_loop_reuse_single_turn: verl builds an agent loop per sample; on CPU the single-turn text loop is built
    once per worker and agent name; any other loop, or a multimodal processor, is built per sample as upstream."""
    import types as pytypes

    from verl.experimental.agent_loop import agent_loop
    from verl.experimental.agent_loop.single_turn_agent_loop import SingleTurnAgentLoop

    from opd_verl.cpu.patches.step_overhead import _reusable_agent_loop

    assert patches.PATCHES["agent_loop_reuse_single_turn"].applied
    assert getattr(agent_loop.AgentLoopWorker._run_agent_loop, patches._MARK, False)

    class OtherLoop(SingleTurnAgentLoop):
        pass

    def build_count(worker, cls, name="single_turn_agent", calls=3):
        built = []

        def build():
            built.append(cls.__new__(cls))
            return built[-1]

        loops = [_reusable_agent_loop(worker, name, build) for _ in range(calls)]
        return len(built), len({id(loop) for loop in loops})

    text_worker = pytypes.SimpleNamespace(processor=None)
    assert build_count(text_worker, SingleTurnAgentLoop) == (1, 1)
    assert build_count(text_worker, SingleTurnAgentLoop, name="another_agent") == (1, 1)
    assert build_count(pytypes.SimpleNamespace(processor=None), OtherLoop) == (3, 3)
    assert build_count(pytypes.SimpleNamespace(processor=object()), SingleTurnAgentLoop) == (3, 3)


def test_micro_batch_on_cpu_is_not_rebuilt_by_forward_step():
    """micro_batch_on_cpu_no_copy: on CPU, forward_step's `micro_batch.to(device)` returns the micro-batch itself
    instead of rebuilding it (every per-sample non-tensor entry included); the caller's data is unchanged."""
    import torch
    from tensordict import NonTensorData, NonTensorStack, TensorDict
    from verl.workers.engine.fsdp import transformer_impl

    from opd_verl.cpu.patches.step_overhead import mark_on_cpu

    assert patches.PATCHES["micro_batch_on_cpu_no_copy"].applied
    assert getattr(transformer_impl.FSDPEngineWithLMHead.forward_step, patches._MARK, False)

    def micro_batch():
        td = TensorDict({"input_ids": torch.arange(12).view(3, 4)}, batch_size=[3])
        td["raw_prompt"] = NonTensorStack(*[NonTensorData(f"prompt {i}") for i in range(3)])
        return td

    unpatched = micro_batch()
    assert unpatched.to("cpu") is not unpatched  # what verl does on CPU without the patch: a rebuilt copy
    td = micro_batch()
    mark_on_cpu(td)
    assert td.device == torch.device("cpu") and td.to("cpu") is td
    assert torch.equal(td["input_ids"], torch.arange(12).view(3, 4)) and td["raw_prompt"] == [f"prompt {i}" for i in range(3)]


def test_weight_sync_recv_times_out_instead_of_hanging():
    import time

    import zmq

    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    addr = f"ipc:///tmp/opd-verl-test-{os.getpid()}.sock"
    sock.bind(addr)
    try:
        wrapped = weight_sync._FailFastSocket(sock, timeout_s=1.0)
        start = time.monotonic()
        with pytest.raises(weight_sync.WeightSyncError, match="no answer from the rollout server"):
            wrapped.recv()
        assert time.monotonic() - start < 5
    finally:
        sock.close(linger=0)


def test_weight_sync_patch_installed():
    from verl.workers.rollout.vllm_rollout import bucketed_weight_transfer, vllm_rollout

    assert patches.PATCHES["weight_sync_fail_fast"].applied
    assert getattr(bucketed_weight_transfer.BucketedWeightSender._init_socket, patches._MARK, False)
    assert getattr(vllm_rollout.ServerAdapter._execute_method, patches._MARK, False)


def _emulate_gpu_platform(monkeypatch):
    """What every "on CPU?" check of verl and opd_verl reads (get_platform().device_name) says "cuda" from now on."""
    from verl.plugin.platform import platform_manager
    from verl.plugin.platform.platform_cuda import PlatformCUDA

    monkeypatch.setattr(platform_manager, "_current_platform", PlatformCUDA())
    from verl.plugin.platform import get_platform

    assert get_platform().device_name == "cuda"


@pytest.mark.parametrize("platform", ["cpu", "cuda"])
def test_weight_sync_sender_fails_fast_on_every_platform(monkeypatch, platform):
    from verl.workers.rollout.vllm_rollout.bucketed_weight_transfer import BucketedWeightSender

    if platform == "cuda":
        _emulate_gpu_platform(monkeypatch)
    path = f"/tmp/opd-verl-test-sender-{os.getpid()}.sock"
    sender = BucketedWeightSender(zmq_handle=f"ipc://{path}")
    sender._init_socket()
    try:
        assert isinstance(sender.socket, weight_sync._FailFastSocket)
    finally:
        sender.socket.close(linger=0)
        if os.path.exists(path):
            os.remove(path)


@pytest.mark.parametrize("platform", ["cpu", "cuda"])
def test_weight_sync_socket_unique_per_ray_session(monkeypatch, platform):
    """On every platform: sender and receiver use the same path, and two Ray clusters (both job 01000000) differ."""
    from verl.workers.rollout.vllm_rollout import vllm_async_server, vllm_rollout

    if platform == "cuda":
        _emulate_gpu_platform(monkeypatch)
    assert patches.PATCHES["weight_sync_socket_per_ray_session"].applied
    assert getattr(vllm_rollout.ServerAdapter.__init__, patches._MARK, False)
    assert getattr(vllm_async_server.vLLMHttpServer.__init__, patches._MARK, False)

    session_a = "session_2026-11-29_13-00-00_123456_4242"
    session_b = "session_2026-11-29_13-00-01_654321_4343"
    sender_a, receiver_a = socket_paths(monkeypatch, session_a)
    sender_b, receiver_b = socket_paths(monkeypatch, session_b)
    again_a, _ = socket_paths(monkeypatch, session_a)
    assert sender_a == receiver_a and sender_b == receiver_b, "both ends of the socket must use the same path"
    assert sender_a != sender_b, "two Ray clusters (same job id 01000000) must not share the socket"
    assert again_a == sender_a, "the path depends only on the Ray session and the job id"
    suffix = weight_sync.colocate_zmq_job_id("01000000", session_a).split("-")[1]
    assert sender_a == f"ipc:///tmp/rl-colocate-zmq-01000000-{suffix}-replica-0-rank-0.sock"
    assert len(sender_a[len("ipc://"):].encode()) < 107 - 10  # AF_UNIX sun_path, room for larger ranks
    assert weight_sync.colocate_zmq_job_id("02000000", session_a) != weight_sync.colocate_zmq_job_id("01000000", session_a)


def test_weight_sync_socket_unpatched_is_shared_by_ray_sessions(monkeypatch):
    """Why the patch exists: upstream's path depends on the job id only, which every fresh Ray cluster numbers 01000000."""
    sender_a, receiver_a = socket_paths(monkeypatch, "session_a", patched=False)
    sender_b, receiver_b = socket_paths(monkeypatch, "session_b", patched=False)
    assert sender_a == receiver_a == sender_b == receiver_b == "ipc:///tmp/rl-colocate-zmq-01000000-replica-0-rank-0.sock"


def test_weight_sync_socket_session_from_older_ray(monkeypatch):
    """Ray < late 2025 has no RuntimeContext.get_session_name (verl 0.9.1 allows Ray >= 2.41): the same name from
    the attribute it returns."""
    import ray

    node = types.SimpleNamespace(session_name="session_old_ray")
    monkeypatch.setattr(ray._private.worker.global_worker, "node", node, raising=False)
    monkeypatch.setattr(ray, "get_runtime_context", lambda: types.SimpleNamespace(get_job_id=lambda: "01000000"))
    assert weight_sync._ray_job_and_session() == ("01000000", "session_old_ray")


# A fresh interpreter that sees a CUDA build of torch (VERL_PLATFORM unset): the plugin loads no CPU support there,
# as on a GPU machine. A vLLM distribution stands in for the GPU build (vllm-cpu installs its module as "vllm-cpu").
_GPU_PROCESS = r"""
import json, os, sys

import pytest
import torch

torch.version.cuda = "12.4"  # what opd_verl.plugin.cpu_support_wanted reads: a CUDA build of torch
import verl  # noqa: F401  (loads the plugin)
from verl.plugin.platform import get_platform
from verl.workers.rollout.vllm_rollout import vllm_async_server, vllm_rollout  # noqa: F401

from opd_verl import patches
from weight_sync_paths import socket_paths

report = {
    "platform": get_platform().device_name,
    "cpu_support": sorted(m for m in sys.modules if m.startswith("opd_verl.cpu")),
    "patches": {n: [p.applied, p.error] for n, p in patches.PATCHES.items()},
}
with pytest.MonkeyPatch.context() as mp:
    report["a"] = socket_paths(mp, "session_2026-11-29_13-00-00_123456_4242")
with pytest.MonkeyPatch.context() as mp:
    report["b"] = socket_paths(mp, "session_2026-11-29_13-00-01_654321_4343")
from verl.workers.rollout.vllm_rollout.bucketed_weight_transfer import BucketedWeightSender

path = f"/tmp/opd-verl-test-gpu-sender-{os.getpid()}.sock"
sender = BucketedWeightSender(zmq_handle="ipc://" + path)
sender._init_socket()
report["sender_socket"] = type(sender.socket).__name__
sender.socket.close(linger=0)
os.remove(path)
print("REPORT " + json.dumps(report))
"""


def test_weight_sync_socket_patched_where_no_cpu_run_is_possible(tmp_path):
    """The plugin installs the patches of every platform in a process that loads no CPU support (a GPU machine)."""
    dist = tmp_path / f"vllm-{metadata.version('vllm-cpu')}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {metadata.version('vllm-cpu')}+cpu\n")
    tests = Path(__file__).resolve().parent
    env = {k: v for k, v in os.environ.items() if k not in ("VERL_PLATFORM", patches.DISABLE_ENV)}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(tests), *filter(None, [env.get("PYTHONPATH")])])
    out = subprocess.run([sys.executable, "-c", _GPU_PROCESS], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.split("REPORT ", 1)[1])
    assert report["platform"] == "cuda"
    assert report["cpu_support"] == [], "no CPU support where no CPU run is possible"
    assert report["patches"] == {name: [True, None] for name in EVERY_PLATFORM}
    (sender_a, receiver_a), (sender_b, receiver_b) = report["a"], report["b"]
    assert sender_a == receiver_a and sender_b == receiver_b, "both ends of the socket must use the same path"
    assert sender_a != sender_b, "two Ray clusters (same job id 01000000) must not share the socket"
    suffix = weight_sync.colocate_zmq_job_id("01000000", "session_2026-11-29_13-00-00_123456_4242").split("-")[1]
    assert sender_a == f"ipc:///tmp/rl-colocate-zmq-01000000-{suffix}-replica-0-rank-0.sock"
    assert report["sender_socket"] == "_FailFastSocket"


def test_disabled_patches_env():
    code = "import verl; from opd_verl import patches; print(sorted(n for n, p in patches.PATCHES.items() if n in patches.disabled_patches()))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, patches.DISABLE_ENV: "vllm_cpu_live_weight_linear"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "['vllm_cpu_live_weight_linear']"


# ---------------------------------------------------------------------------------------------------------------
# The CPU platform
# ---------------------------------------------------------------------------------------------------------------


def test_cpu_platform_registered_and_selected():
    from verl.plugin.platform import PlatformRegistry, get_platform
    from verl.utils.device import get_device_id, get_device_name, get_nccl_backend, get_torch_device

    from opd_verl.cpu.platform import PlatformCPU

    assert PlatformRegistry.get("cpu") is PlatformCPU
    assert isinstance(get_platform(), PlatformCPU)
    assert get_device_name() == "cpu"
    assert get_nccl_backend() == "gloo"
    assert get_device_id() == "cpu"
    dev = get_torch_device()
    assert dev.current_device() == "cpu" and dev.get_device_name() == "CPU" and dev.is_available()
    dev.synchronize()
    dev.empty_cache()
    free, total = dev.mem_get_info()
    assert 0 < free <= total
    import torch

    assert torch.zeros(2).to(get_device_id()).device.type == "cpu"


def test_cpu_platform_auto_detected_without_env():
    """On a CPU-only torch the platform is picked by auto-detection (no VERL_PLATFORM needed)."""
    code = "from verl.plugin.platform import get_platform; print(type(get_platform()).__name__)"
    env = {k: v for k, v in os.environ.items() if k != "VERL_PLATFORM"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "PlatformCPU"


def test_cpu_platform_not_auto_detected_with_an_accelerator(monkeypatch):
    import torch

    from opd_verl.cpu import platform as platform_cpu

    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert not platform_cpu.PlatformCPU().is_platform_available(use_smi_check=True)


def test_no_patch_failed_to_apply():
    from verl.workers.engine.fsdp import transformer_impl  # noqa: F401
    from verl.workers.rollout.vllm_rollout import vllm_async_server, vllm_rollout  # noqa: F401
    from verl.utils import distributed  # noqa: F401
    from vllm.distributed.device_communicators import shm_broadcast  # noqa: F401
    from vllm.model_executor.layers import utils  # noqa: F401

    failed = {n: p.error for n, p in patches.PATCHES.items() if p.error}
    assert not failed, failed
    assert all(p.applied for p in patches.PATCHES.values()), {n: p.applied for n, p in patches.PATCHES.items()}


def test_a_strict_patch_is_not_applied_on_changed_upstream_code(monkeypatch):
    """A patch of every platform runs on GPU too: on other upstream code it is skipped (verl's own behaviour)."""
    calls = []
    pins = {"verl.workers.rollout.vllm_rollout.vllm_rollout:ServerAdapter.__init__": "0" * 64}
    patch = patches.Patch("test_strict", "json", "verl", patches.VERL_VERSION, "test", pins, calls.append, strict=True)
    monkeypatch.setitem(patches.PATCHES, "test_strict", patch)
    patches._apply("test_strict", sys.modules["json"])
    assert not patch.applied and not calls
    assert "upstream changed, not applied" in patch.error and "ServerAdapter.__init__" in patch.error
    # the same patch on the pinned code is applied
    target = next(iter(pins))
    patch.pins, patch.error = {target: patches.upstream_sha(target)}, None
    patches._apply("test_strict", sys.modules["json"])
    assert patch.applied and calls == [sys.modules["json"]] and patch.error is None


def test_apply_is_idempotent_before_the_import(monkeypatch):
    """The plugin applies twice where a CPU run is possible (opd_verl.cpu.activate, then the plugin): one hook."""
    module = "opd_verl_test_module_never_imported"
    patch = patches.Patch("test_hook_once", module, "verl", patches.VERL_VERSION, "test", {}, lambda m: None)
    monkeypatch.setitem(patches.PATCHES, "test_hook_once", patch)
    try:
        patches.apply_import_time_patches()
        patches.apply_import_time_patches()
        assert patch.scheduled and len(patches._HOOKS[module]) == 1
    finally:
        patches._HOOKS.pop(module, None)


def test_a_failing_patch_does_not_break_the_import(monkeypatch):
    def boom(module):
        raise RuntimeError("upstream changed")

    patch = patches.Patch("test_boom", "json", "verl", patches.VERL_VERSION, "test", {}, boom)
    monkeypatch.setitem(patches.PATCHES, "test_boom", patch)
    patches._apply("test_boom", sys.modules["json"])
    assert not patch.applied and "upstream changed" in patch.error
