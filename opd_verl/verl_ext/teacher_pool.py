"""The teachers on a Ray resource pool of their own (opd.teacher_pool; verl extension points: the trainer's
`_init_resource_pool_mgr` / `_setup`, verl 0.9.1 `verl/trainer/ppo/v1/trainer_base.py`).

Colocated, verl's hybrid worker group holds actor, rollout and the reference (our teachers) on the student's GPUs.
With a pool the student keeps the hybrid actor + rollout (Role.ActorRollout on "global_pool") and the teachers are
verl's RefPolicy role on "opd_teacher_pool": verl's ResourcePoolManager places both pools (placement groups on
the cluster's GPUs). verl's `_setup` builds a separate reference worker group only beside a non-hybrid actor
(Role.Actor), so the teachers' group is built here after it, as verl builds each group (one RayWorkerGroup per
pool), and becomes `ref_policy_wg`: the reference pass (`_compute_ref_log_prob`) runs there unchanged.

Resident: verl 0.9.1's FSDP engine wraps every forward-only module with CPU offload (`FSDPEngine.
_build_fsdp_module`: FSDP1 `CPUOffload(offload_params=True)`, FSDP2 `CPUOffloadPolicy`), streaming the weights
host -> GPU each pass. On its own pool the teacher has the GPUs to itself: `resident_build` makes that wrap
build no offload (what verl does for the actor), for the teachers' build only.
"""

from __future__ import annotations

from contextlib import contextmanager

POOL_NAME = "opd_teacher_pool"
STUDENT_POOL = "global_pool"


def pool_spec(shape: tuple[int, int]) -> list[int]:
    """verl's resource-pool spec of a pool of n_gpus_per_node x nnodes: GPUs per node, one entry per node."""
    n_gpus_per_node, nnodes = shape
    return [n_gpus_per_node] * nnodes


def place_on_pool(role_worker_mapping: dict, mapping: dict, worker_cls, roles) -> None:
    """Roles and pools with the teachers on their own pool: the student's hybrid role without the reference
    (ActorRollout on the student's pool), the teachers as RefPolicy on POOL_NAME; both with ``worker_cls``.
    ``roles``: verl's Role enum. In place."""
    for role in (roles.ActorRolloutRef, roles.ActorRollout):
        role_worker_mapping.pop(role, None)
        mapping.pop(role, None)
    role_worker_mapping[roles.ActorRollout] = worker_cls
    mapping[roles.ActorRollout] = STUDENT_POOL
    role_worker_mapping[roles.RefPolicy] = worker_cls
    mapping[roles.RefPolicy] = POOL_NAME


def build_teacher_group(trainer, roles):
    """The teachers' worker group on their pool (verl's `_setup` step 3 for one pool), models loaded."""
    from verl.single_controller.ray import RayClassWithInitArgs, RayWorkerGroup, create_colocated_worker_cls

    role = str(roles.RefPolicy)
    pool = trainer.resource_pool_manager.get_resource_pool(roles.RefPolicy)
    cls = RayClassWithInitArgs(cls=trainer.role_worker_mapping[roles.RefPolicy],
                               config=trainer.config.actor_rollout_ref, role=role)
    group = RayWorkerGroup(resource_pool=pool, ray_cls_with_init=create_colocated_worker_cls(class_dict={role: cls}),
                           device_name=trainer.config.trainer.device)
    teachers = group.spawn(prefix_set=[role])[role]
    teachers.init_model()
    return teachers


def _no_offload(*args, **kwargs):
    return None  # the FSDP1 / FSDP2 wrap's "no CPU offload" (as verl's actor is built)


@contextmanager
def resident_build():
    """Within it, verl's FSDP engine wraps a forward-only module without CPU offload (its parameters stay on the
    device). Swaps the two names `FSDPEngine._build_fsdp_module` reads (pinned in upstream.MIRRORS) and restores
    them on exit; meant for the teachers' worker process, which builds nothing else meanwhile."""
    import torch.distributed.fsdp as fsdp
    from verl.workers.engine.fsdp import transformer_impl

    saved = fsdp.CPUOffload, transformer_impl.CPUOffloadPolicy
    fsdp.CPUOffload, transformer_impl.CPUOffloadPolicy = _no_offload, _no_offload
    try:
        yield
    finally:
        fsdp.CPUOffload, transformer_impl.CPUOffloadPolicy = saved


def offloads_params(module) -> bool:
    """Whether an FSDP-wrapped module keeps its parameters on CPU between passes (FSDP1 cpu_offload, FSDP2 an
    offload policy)."""
    cpu_offload = getattr(module, "cpu_offload", None)  # FSDP1
    if cpu_offload is not None:
        return bool(cpu_offload.offload_params)
    state = getattr(module, "_get_fsdp_state", None)  # FSDP2
    if state is None:
        return False
    from torch.distributed.fsdp import CPUOffloadPolicy

    param_group = state()._fsdp_param_group
    return param_group is not None and isinstance(param_group.offload_policy, CPUOffloadPolicy)
