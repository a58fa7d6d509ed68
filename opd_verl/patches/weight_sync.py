"""Patches for verl 0.9.1's weight sync from the trainer to the vLLM rollout server (colocated, through ZMQ IPC), on
every platform: both fix hangs that a GPU run hits just as a CPU run does (the code patched has no device branch).

    weight_sync_fail_fast                verl/workers/rollout/vllm_rollout/vllm_rollout.py: ServerAdapter._execute_method,
                                         verl/workers/rollout/vllm_rollout/bucketed_weight_transfer.py:
                                         BucketedWeightSender._init_socket
    weight_sync_socket_per_ray_session   verl/workers/rollout/vllm_rollout/vllm_rollout.py: ServerAdapter.__init__,
                                         verl/workers/rollout/vllm_rollout/vllm_async_server.py: vLLMHttpServer.__init__
"""

from __future__ import annotations

import hashlib
import os
import time

from . import PATCHES, _imported, _record_error, _register, _then, _wrap_once, when_imported

# --- verl 0.9.1: weight sync to vLLM hangs forever when the rollout side fails. `ServerAdapter.update_weights`
# starts the receiver (`collective_rpc("update_weights_from_ipc", non_block=True)`) and then sends buckets through a
# ZMQ REQ socket whose `recv()` (the receiver's ack) has no timeout: if the vLLM worker raises while receiving, the
# trainer waits forever. The sender polls instead: it fails as soon as the receiver's call has failed (with the
# receiver's error), or after $OPD_VERL_WEIGHT_SYNC_TIMEOUT seconds (default 600) without an ack. A healthy run is
# unchanged: poll() returns as soon as the ack is there (the wait is the same as recv()'s), Ray is asked only while
# no ack has come for 0.5 s, and the timeout counts one wait for one ack (the receiver mapping the buffer, or loading
# one bucket, at most update_weights_bucket_megabytes, or one tensor larger than that), not the whole sync: seconds
# on a GPU, not minutes.
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
    strict=True,  # every platform: applied only on the pinned code
)
def _patch_weight_sync_fail_fast(module) -> None:
    from verl.workers.rollout.vllm_rollout import bucketed_weight_transfer as transfer

    def fail_fast_socket(sender):
        sender.socket = _FailFastSocket(sender.socket, float(os.environ.get(WEIGHT_SYNC_TIMEOUT_ENV, "600")))

    _then(transfer.BucketedWeightSender, "_init_socket", fail_fast_socket)

    def make(original_execute):
        async def _execute_method(self, method, non_block=False, *args, **kwargs):
            result = await original_execute(self, method, non_block, *args, **kwargs)
            if non_block and method == "update_weights_from_ipc":
                _PENDING_RECEIVER["future"] = result
            return result

        return _execute_method

    _wrap_once(module.ServerAdapter, "_execute_method", make)


# --- verl 0.9.1: the IPC socket of the weight sync is ipc:///tmp/rl-colocate-zmq-<Ray job id>-replica-<r>-rank-<k>.sock.
# The sender (ServerAdapter.__init__, in the trainer's worker) reads the job id from Ray; the receiver
# (vLLMColocateWorkerExtension._get_zmq_handle, in vLLM's worker process, not a Ray worker) reads $VERL_RAY_JOB_ID,
# which vLLMHttpServer.__init__ (a Ray actor) sets before it launches the engine. The job id is "01000000" in every
# fresh Ray cluster, so two runs on one host (each with its own local Ray) share the path, cross-connect and hang
# (vLLM worker: KeyError 'name' in BucketedWeightSender/Receiver._init_buffer). This is the same code on every
# platform (the rollout registry maps ("vllm", "async") to this ServerAdapter whatever the device; vLLMReplica
# launches vLLMHttpServer, whose engine runs its workers as child processes, distributed_executor_backend "mp", with
# verl's vLLMColocateWorkerExtension; the PD layout of vllm_pd_replica.py builds the same vLLMHttpServer): both sides
# use "<job id>-<hash of the Ray session name>" instead. The session name identifies the Ray cluster
# ("session_<date>_<time>_<µs>_<head pid>") and is the same in every process of it, so both sides agree.
def colocate_zmq_job_id(job_id: str, session_name: str) -> str:
    """The job id part of the weight-sync socket path, unique per Ray cluster: "<job id>-<10 hex digits>"."""
    return f"{job_id}-{hashlib.sha256(session_name.encode()).hexdigest()[:10]}"


def _ray_job_and_session() -> tuple[str, str]:
    import ray

    context = ray.get_runtime_context()
    # the public API is recent (ray-project/ray#59469, Dec 2025); verl 0.9.1 allows Ray >= 2.41, which has only
    # the private attribute the public one returns
    get_session_name = getattr(context, "get_session_name", None)
    if get_session_name is not None:
        session_name = get_session_name()
    else:
        session_name = ray._private.worker.global_worker.node.session_name
    return context.get_job_id(), session_name


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
    strict=True,  # every platform: applied only on the pinned code
)
def _patch_weight_sync_socket(module) -> None:
    def session_socket(adapter):
        job_id, session_name = _ray_job_and_session()
        old = f"/rl-colocate-zmq-{job_id}-"
        if old not in adapter.zmq_handle:
            raise RuntimeError(f"unexpected weight-sync socket {adapter.zmq_handle!r} (verl changed?)")
        new = f"/rl-colocate-zmq-{colocate_zmq_job_id(job_id, session_name)}-"
        adapter.zmq_handle = adapter.zmq_handle.replace(old, new, 1)

    _then(module.ServerAdapter, "__init__", session_socket)

    # the receiver side, in the process of the vLLM server (the package __init__ imported this module first)
    server_module = "verl.workers.rollout.vllm_rollout.vllm_async_server"
    loaded = _imported(server_module)
    if loaded is not None:
        _patch_weight_sync_socket_receiver(loaded)  # an error here is recorded by _apply
    else:
        when_imported(server_module, _patch_weight_sync_socket_receiver_hook)


def _patch_weight_sync_socket_receiver(module) -> None:
    def session_job_id(_server):  # the original __init__ set $VERL_RAY_JOB_ID; the engine is launched later
        job_id, session_name = _ray_job_and_session()
        os.environ["VERL_RAY_JOB_ID"] = colocate_zmq_job_id(job_id, session_name)

    _then(module.vLLMHttpServer, "__init__", session_job_id)


def _patch_weight_sync_socket_receiver_hook(module) -> None:
    try:
        _patch_weight_sync_socket_receiver(module)
    except Exception:  # runs inside the import of vllm_async_server: never break it
        patch = PATCHES["weight_sync_socket_per_ray_session"]
        patch.applied = False
        _record_error(patch, "opd_verl patch %s (receiver side) could not be applied:\n%s")
