"""Which device a run is on (opd_verl.checks.device): an explicit accelerator is never turned into a CPU run."""

from __future__ import annotations

import io

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from opd_verl.checks import device
from opd_verl.checks.errors import OPDConfigError
from opd_verl.cpu.defaults import apply_cpu_defaults

from conftest import REPO, run_main_opd


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(REPO / "opd_verl" / "config"), version_base=None):
        return compose(config_name="opd_trainer", overrides=overrides)


@pytest.fixture
def no_accelerator(monkeypatch):
    monkeypatch.setattr(device, "torch_has_accelerator", lambda: False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


@pytest.mark.parametrize(
    "overrides, env_address, cpu",
    [
        ([], None, True),  # nothing says otherwise: no device given, no cluster, no accelerator
        (["trainer.device=cpu"], None, True),
        (["trainer.device=cuda"], None, False),  # explicit: never rewritten
        (["trainer.device=npu"], None, False),
        ([], "10.0.0.1:6379", False),  # a cluster to join (its workers may have GPUs)
        (["++ray_kwargs.ray_init.address=auto"], None, False),
        (["trainer.device=cpu"], "10.0.0.1:6379", True),
    ],
)
def test_cpu_run_rule(no_accelerator, monkeypatch, overrides, env_address, cpu):
    if env_address:
        monkeypatch.setenv("RAY_ADDRESS", env_address)
    cfg = _compose(overrides)
    assert device.is_cpu_run(cfg, device.user_override_keys(overrides)) is cpu


def test_explicit_cuda_is_left_alone_by_the_cpu_defaults(no_accelerator):
    overrides = ["trainer.device=cuda", "trainer.n_gpus_per_node=8"]
    cfg = _compose(overrides)
    before = OmegaConf.to_container(cfg)
    out = io.StringIO()
    assert apply_cpu_defaults(cfg, overrides=overrides, out=out) == []
    assert OmegaConf.to_container(cfg) == before and out.getvalue() == ""


def test_explicit_cuda_without_accelerator_or_cluster_is_an_error(no_accelerator):
    overrides = ["trainer.device=cuda"]
    with pytest.raises(OPDConfigError, match=r"trainer.device=cuda but this machine has no accelerator.*trainer.device=cpu"):
        device.check_device(_compose(overrides), device.user_override_keys(overrides))
    device.check_device(_compose(["trainer.device=cpu"]), {"trainer.device"})  # fine
    device.check_device(_compose(overrides + ["++ray_kwargs.ray_init.address=auto"]), {"trainer.device"})  # fine


def test_cfg_job_with_explicit_cuda_prints_no_cpu_changes():
    """On this CPU machine, `trainer.device=cuda --cfg job` used to print `opd_verl[cpu]: trainer.device=cpu (was
    cuda)` and rewrite the run into a CPU run."""
    result = run_main_opd("trainer.device=cuda", "trainer.n_gpus_per_node=8", "actor_rollout_ref.rollout.name=vllm", "--cfg", "job", env={"RAY_ADDRESS": ""})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "opd_verl[cpu]" not in result.stderr
    cfg = OmegaConf.create(result.stdout)
    assert cfg.trainer.device == "cuda" and cfg.trainer.n_gpus_per_node == 8


def test_running_explicit_cuda_without_accelerator_stops_before_ray():
    result = run_main_opd("trainer.device=cuda", "actor_rollout_ref.rollout.name=vllm", env={"RAY_ADDRESS": ""})
    assert result.returncode == 2, result.stderr[-2000:]
    assert "opd_verl: error: trainer.device=cuda but this machine has no accelerator" in result.stderr
