"""The roles and pools of opd.teacher_pool (opd_verl.verl_ext.teacher_pool), and the resident build's swap."""

import torch.distributed.fsdp as fsdp
from verl.trainer.ppo.utils import Role

from opd_verl.verl_ext.teacher_pool import POOL_NAME, STUDENT_POOL, place_on_pool, pool_spec, resident_build


def test_pool_spec_is_gpus_per_node_for_each_node():
    assert pool_spec((2, 3)) == [2, 2, 2]


def test_the_student_keeps_the_hybrid_role_and_the_teachers_take_the_reference_role_on_their_pool():
    worker = object()
    for start in (Role.ActorRolloutRef, Role.ActorRollout):  # verl's choice depends on need_reference_policy
        roles, mapping = {start: "verl's worker"}, {start: STUDENT_POOL}
        place_on_pool(roles, mapping, worker, Role)
        assert roles == {Role.ActorRollout: worker, Role.RefPolicy: worker}
        assert mapping == {Role.ActorRollout: STUDENT_POOL, Role.RefPolicy: POOL_NAME}


def test_resident_build_swaps_the_offload_names_and_restores_them():
    from verl.workers.engine.fsdp import transformer_impl

    before = fsdp.CPUOffload, transformer_impl.CPUOffloadPolicy
    with resident_build():
        assert fsdp.CPUOffload(offload_params=True) is None  # FSDP1: cpu_offload=None, as verl's actor
        assert transformer_impl.CPUOffloadPolicy(pin_memory=True) is None  # FSDP2: offload_policy=None
    assert (fsdp.CPUOffload, transformer_impl.CPUOffloadPolicy) == before
