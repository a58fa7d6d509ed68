"""opd.teacher_pool / opd.teacher.engine checks (opd_verl.checks.teacher_pool), on the composed default config."""

import pytest
from omegaconf import OmegaConf

from opd_verl.checks.errors import OPDConfigError
from opd_verl.checks.options import validate_config
from opd_verl.checks.teacher_pool import placement_note, pool_gpus, pool_shape


def _resolved(make):
    """The composed config with verl's interpolations resolved (as main_opd validates it)."""
    return OmegaConf.to_container(OmegaConf.create(make()), resolve=True)


def _pool_config(make, n_gpus_per_node=1, nnodes=1, estimator="opd"):
    cfg = _resolved(make)
    cfg["algorithm"]["adv_estimator"] = estimator
    cfg["opd"]["teacher"]["path"] = "/models/teacher"
    cfg["opd"]["teacher_pool"] = {"n_gpus_per_node": n_gpus_per_node, "nnodes": nnodes}
    return cfg


def test_default_is_colocated(composed_config):
    cfg = composed_config()
    assert cfg["opd"]["teacher_pool"] == {"n_gpus_per_node": None, "nnodes": None}
    assert cfg["opd"]["teacher"]["engine"] == "fsdp"
    assert pool_shape(cfg["opd"]) is None and pool_gpus(cfg) == 0 and placement_note(cfg["opd"]) is None


def test_a_pool_validates_and_counts_its_gpus(composed_config):
    cfg = _pool_config(composed_config, n_gpus_per_node=2, nnodes=2)
    validate_config(cfg)
    assert pool_shape(cfg["opd"]) == (2, 2) and pool_gpus(cfg) == 4
    assert "2 GPU(s) x 2 node(s)" in placement_note(cfg["opd"])


def test_an_unknown_engine_names_the_choices(composed_config):  # engine=vllm: tests/test_served_teacher.py
    cfg = _pool_config(composed_config)
    cfg["opd"]["teacher"]["engine"] = "sglang"
    with pytest.raises(OPDConfigError, match=r"opd.teacher.engine='sglang' is not one of fsdp, vllm"):
        validate_config(cfg)


@pytest.mark.parametrize("pool, expected", [
    ({"n_gpus_per_node": 2, "nnodes": None}, r"opd.teacher_pool.n_gpus_per_node is set but opd.teacher_pool.nnodes"),
    ({"n_gpus_per_node": None, "nnodes": 1}, r"opd.teacher_pool.nnodes is set but opd.teacher_pool.n_gpus_per_node"),
    ({"n_gpus_per_node": 0, "nnodes": 1}, r"opd.teacher_pool.n_gpus_per_node=0 must be an integer >= 1"),
    ({"n_gpus_per_node": 1, "nnodes": "2"}, r"opd.teacher_pool.nnodes='2' must be an integer >= 1"),
])
def test_bad_pool_sizes_name_the_key(composed_config, pool, expected):
    cfg = _pool_config(composed_config)
    cfg["opd"]["teacher_pool"] = pool
    with pytest.raises(OPDConfigError, match=expected):
        validate_config(cfg)


def test_a_pool_without_a_teacher_run_is_unread(composed_config):
    cfg = _pool_config(composed_config, estimator="grpo")
    cfg["opd"]["teacher"]["path"] = None
    with pytest.raises(OPDConfigError, match=r"opd.teacher_pool is set but no teacher runs.*drop opd.teacher_pool"):
        validate_config(cfg)


def test_loss_level_full_on_a_pool_needs_a_head_the_student_reproduces(composed_config, tmp_path):
    import json

    cfg = _pool_config(composed_config)
    cfg["actor_rollout_ref"]["actor"]["policy_loss"]["loss_mode"] = "ppo_plus_distill"
    validate_config(cfg)  # support=sampled reads the reference pass's log-probs: the pool gives them
    cfg["opd"]["support"] = "topk"
    validate_config(cfg)  # the pool sends the loss its top-k
    cfg["opd"]["support"] = "full"
    for model_type in ("qwen2", "gemma2", "mamba"):
        (tmp_path / model_type).mkdir()
        (tmp_path / model_type / "config.json").write_text(json.dumps({"model_type": model_type}))
    cfg["opd"]["teacher"]["path"] = str(tmp_path / "qwen2")
    validate_config(cfg)  # the pool sends the final hidden states, the student's process applies the head
    cfg["opd"]["teachers"] = [{"path": str(tmp_path / "gemma2")}, {"path": str(tmp_path / "mamba")}]
    with pytest.raises(OPDConfigError, match=r"opd.teachers\[1\].path=.*mamba: opd.teacher_pool with opd.support=full"
                                             r".*model_type 'mamba' is not one.*drop opd.teacher_pool \(colocated"):
        validate_config(cfg)


def test_teacher_parallel_settings_against_the_pool(composed_config):
    cfg = _pool_config(composed_config, n_gpus_per_node=3)
    cfg["actor_rollout_ref"]["ref"]["ulysses_sequence_parallel_size"] = 2
    with pytest.raises(OPDConfigError, match=r"ref.ulysses_sequence_parallel_size=2 does not divide the teacher pool's 3"):
        validate_config(cfg)
    cfg = _pool_config(composed_config, n_gpus_per_node=2, nnodes=3)
    cfg["actor_rollout_ref"]["ref"]["fsdp_config"]["fsdp_size"] = 4
    with pytest.raises(OPDConfigError, match=r"ref.fsdp_config.fsdp_size=4 does not divide the teacher pool's 6"):
        validate_config(cfg)
    cfg["actor_rollout_ref"]["ref"]["fsdp_config"]["fsdp_size"] = 3
    validate_config(cfg)


def test_param_offload_is_not_read_on_a_pool(composed_config):
    cfg = _pool_config(composed_config)
    cfg["actor_rollout_ref"]["ref"]["fsdp_config"]["param_offload"] = True
    with pytest.raises(OPDConfigError, match=r"ref.fsdp_config.param_offload=true: on opd.teacher_pool .*resident"):
        validate_config(cfg)
    cfg["opd"]["teacher_pool"] = {"n_gpus_per_node": None, "nnodes": None}
    validate_config(cfg)  # colocated: verl's own setting, untouched


def test_pool_sizes_against_the_cluster(composed_config):
    cfg = _pool_config(composed_config, n_gpus_per_node=2)
    cfg["trainer"]["n_gpus_per_node"] = 2
    cfg["ray_kwargs"]["ray_init"]["num_gpus"] = 3
    with pytest.raises(OPDConfigError, match=r"ray_kwargs.ray_init.num_gpus=3 GPUs cannot hold the student's pool .* = 2.* \(opd.teacher_pool: 2\)"):
        validate_config(cfg)
    cfg["ray_kwargs"]["ray_init"]["num_gpus"] = 4
    validate_config(cfg)


def test_cpu_placeholder_gpus_include_the_pool(composed_config):
    from opd_verl.cpu.defaults import placeholder_gpus, required_ray_cpus

    colocated = OmegaConf.create(_pool_config(composed_config, n_gpus_per_node=None, nnodes=None))
    pooled = OmegaConf.create(_pool_config(composed_config, n_gpus_per_node=2, nnodes=1))
    trainer = colocated.trainer.n_gpus_per_node * colocated.trainer.nnodes
    assert placeholder_gpus(colocated) == trainer and placeholder_gpus(pooled) == trainer + 2
    assert required_ray_cpus(pooled) > required_ray_cpus(colocated)
