"""Both ends of verl 0.9.1's weight-sync IPC socket, as the real code names them (used by tests/test_patches.py,
in its own process and in a fresh one that emulates a GPU machine). Imports no opd_verl module: what is patched is
whatever the plugin installed in the process."""

from __future__ import annotations

import types


def socket_paths(monkeypatch, session_name: str, job_id: str = "01000000", patched: bool = True) -> tuple[str, str]:
    """(sender path, receiver path) as verl 0.9.1 builds them in a Ray cluster with this session name and job id.

    The sender is a real ServerAdapter, the receiver path comes from the real vLLMColocateWorkerExtension._get_zmq_handle
    with the environment a real vLLMHttpServer.__init__ leaves for its engine; only Ray's runtime context is faked.
    patched=False: the upstream __init__s (the patch's wrappers skipped).
    """
    import ray

    from verl.utils.device import get_visible_devices_keyword
    from verl.workers.rollout.vllm_rollout import utils as vllm_utils
    from verl.workers.rollout.vllm_rollout import vllm_async_server, vllm_rollout

    context = types.SimpleNamespace(get_job_id=lambda: job_id, get_session_name=lambda: session_name)
    monkeypatch.setattr(ray, "get_runtime_context", lambda: context)
    # set here so that monkeypatch restores what the server's __init__ writes into os.environ
    for key in ("RANK", "RAY_LOCAL_WORLD_SIZE", "VERL_REPLICA_RANK", "VERL_RAY_JOB_ID", get_visible_devices_keyword()):
        monkeypatch.setenv(key, "0")
    monkeypatch.setenv("RAY_LOCAL_WORLD_SIZE", "1")
    monkeypatch.delenv("VERL_ZMQ_BASE_TRAINER_RANK", raising=False)
    config = types.SimpleNamespace(
        tensor_model_parallel_size=1,
        data_parallel_size=1,
        pipeline_model_parallel_size=1,
        disaggregation=None,
        layered_summon=False,
        full_determinism=False,
        profiler=None,
    )

    adapter_init = vllm_rollout.ServerAdapter.__init__
    server_init = vllm_async_server.vLLMHttpServer.__init__
    if not patched:
        adapter_init, server_init = adapter_init.__wrapped__, server_init.__wrapped__

    class Adapter(vllm_rollout.ServerAdapter):
        __init__ = adapter_init

    class Server(vllm_async_server.vLLMHttpServer):
        __init__ = server_init

        def _validate_configs(self):  # needs a real HF config; irrelevant here
            pass

    sender = Adapter(config, types.SimpleNamespace(), None).zmq_handle
    # node_rank=1: no ports are opened
    Server(config, types.SimpleNamespace(), None, [], replica_rank=0, node_rank=1, gpus_per_node=1, nnodes=1, cuda_visible_devices="")
    worker = types.SimpleNamespace(local_rank=0, model_runner=None)  # vLLM's worker: no Ray, only the environment
    receiver = vllm_utils.vLLMColocateWorkerExtension._get_zmq_handle(worker)
    return sender, receiver
