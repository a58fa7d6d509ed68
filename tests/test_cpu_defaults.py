"""opd_verl.cpu.defaults.apply_cpu_defaults on the composed opd_trainer config (Hydra's compose API), and the same
through `python -m opd_verl.main_opd --cfg job`."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from opd_verl.checks import device
from opd_verl.cpu.defaults import apply_cpu_defaults, required_ray_cpus
from opd_verl.checks.errors import OPDConfigError

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "opd_verl" / "config")
REPO = Path(__file__).resolve().parents[1]


def _compose(overrides=()):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose(config_name="opd_trainer", overrides=list(overrides))


def _apply(overrides=(), **kwargs):
    cfg = _compose(overrides)
    out = io.StringIO()
    changes = apply_cpu_defaults(cfg, overrides=list(overrides), out=out, **kwargs)
    return cfg, changes, out.getvalue()


@pytest.fixture(autouse=True)
def _keep_platform_env(monkeypatch):
    # apply_cpu_defaults sets VERL_PLATFORM=cpu in this process; keep the test process clean
    monkeypatch.setenv("VERL_PLATFORM", os.environ.get("VERL_PLATFORM", "cpu"))


def sel(cfg, key):
    return OmegaConf.select(cfg, key)


def test_cpu_run_sets_what_cpu_needs():
    cfg, changes, printed = _apply(["trainer.device=cpu", "algorithm.adv_estimator=grpo"])
    expected = {
        "trainer.device": "cpu",
        "trainer.n_gpus_per_node": 1,
        "actor_rollout_ref.actor.strategy": "fsdp2",
        "actor_rollout_ref.ref.strategy": "fsdp2",
        "actor_rollout_ref.model.override_config.attn_implementation": "opd_cpu_varlen",
        "actor_rollout_ref.model.use_remove_padding": True,  # verl's default, kept: sdpa packs rows on CPU
        "actor_rollout_ref.rollout.dtype": "float32",
        "actor_rollout_ref.rollout.enforce_eager": True,
        "actor_rollout_ref.rollout.enable_sleep_mode": False,
        "actor_rollout_ref.rollout.free_cache_engine": False,
        "actor_rollout_ref.rollout.tensor_model_parallel_size": 1,
        "actor_rollout_ref.rollout.max_num_seqs": 64,
        "actor_rollout_ref.rollout.max_model_len": 1024,
        "actor_rollout_ref.rollout.max_num_batched_tokens": 2048,
        "actor_rollout_ref.rollout.n_gpus_per_node": 1,
        "actor_rollout_ref.rollout.agent.num_workers": 1,
        "reward.num_workers": 1,
        "data.dataloader_num_workers": 0,
        "transfer_queue.backend.SimpleStorage.num_data_storage_units": 1,
        "ray_kwargs.ray_init.num_cpus": 16,
        "ray_kwargs.ray_init.num_gpus": 1,
        "ray_kwargs.ray_init.include_dashboard": False,
        "ray_kwargs.ray_init.runtime_env.env_vars.VERL_PLATFORM": "cpu",
    }
    for key, value in expected.items():
        assert sel(cfg, key) == value, key
    fp32 = {"param_dtype": "fp32", "reduce_dtype": "fp32", "buffer_dtype": "fp32"}
    for role in ("actor", "ref"):
        assert OmegaConf.to_container(sel(cfg, f"actor_rollout_ref.{role}.fsdp_config.mixed_precision")) == fp32
        assert sel(cfg, f"actor_rollout_ref.{role}.fsdp_config.model_dtype") == "fp32"
    # one printed line per change, in the documented format
    lines = printed.strip().splitlines()
    assert len(lines) == len(changes) > 10
    assert "opd_verl[cpu]: actor_rollout_ref.rollout.dtype=float32 (was bfloat16)" in lines
    assert "opd_verl[cpu]: actor_rollout_ref.actor.strategy=fsdp2 (was fsdp)" in lines
    assert not any("use_remove_padding" in line for line in lines)
    assert all(line.startswith("opd_verl[cpu]: ") and " (was " in line for line in lines)
    # the trainer.device the user set is not reported as a change
    assert not any(line.startswith("opd_verl[cpu]: trainer.device=") for line in lines)
    # verl's dataclasses accept the result
    OmegaConf.resolve(cfg)


def test_critic_configured_only_when_used():
    cfg, _, printed = _apply(["trainer.device=cpu", "algorithm.adv_estimator=grpo"])
    assert "critic." not in printed
    cfg, _, printed = _apply(["trainer.device=cpu", "algorithm.adv_estimator=gae"])
    assert sel(cfg, "critic.strategy") == "fsdp2"
    assert sel(cfg, "critic.model.use_remove_padding") is True
    assert sel(cfg, "critic.model.override_config.attn_implementation") == "opd_cpu_varlen"
    assert OmegaConf.to_container(sel(cfg, "critic.fsdp.mixed_precision"))["param_dtype"] == "fp32"


def test_gpu_machine_is_never_touched(monkeypatch):
    monkeypatch.setattr(device, "torch_has_accelerator", lambda: True)
    cfg = _compose(["algorithm.adv_estimator=grpo"])
    before = OmegaConf.to_container(cfg)
    out = io.StringIO()
    assert apply_cpu_defaults(cfg, overrides=[], out=out) == []
    assert OmegaConf.to_container(cfg) == before
    assert out.getvalue() == ""


def test_gpu_machine_with_device_cpu_is_a_cpu_run(monkeypatch):
    monkeypatch.setattr(device, "torch_has_accelerator", lambda: True)
    cfg, changes, _ = _apply(["trainer.device=cpu"])
    assert changes and sel(cfg, "actor_rollout_ref.actor.strategy") == "fsdp2"


def test_no_accelerator_means_cpu_even_without_device_cpu(monkeypatch):
    monkeypatch.setattr(device, "torch_has_accelerator", lambda: False)
    cfg, changes, printed = _apply([])
    assert sel(cfg, "trainer.device") == "cpu"
    assert "opd_verl[cpu]: trainer.device=cpu (was cuda)" in printed


def test_explicit_cpu_compatible_values_are_kept():
    overrides = [
        "trainer.device=cpu",
        "algorithm.adv_estimator=grpo",
        "actor_rollout_ref.rollout.dtype=bfloat16",
        "actor_rollout_ref.rollout.max_num_seqs=256",  # verl's default value, but set explicitly
        "actor_rollout_ref.rollout.enforce_eager=False",
        "+actor_rollout_ref.model.override_config.attn_implementation=eager",
        "trainer.n_gpus_per_node=2",
        "data.dataloader_num_workers=8",
        "+actor_rollout_ref.actor.fsdp_config.mixed_precision={param_dtype:bf16}",
        "ray_kwargs.ray_init.num_cpus=32",
    ]
    cfg, _, printed = _apply(overrides)
    assert sel(cfg, "actor_rollout_ref.rollout.dtype") == "bfloat16"
    assert sel(cfg, "actor_rollout_ref.rollout.max_num_seqs") == 256
    assert sel(cfg, "actor_rollout_ref.rollout.enforce_eager") is False
    assert sel(cfg, "actor_rollout_ref.model.override_config.attn_implementation") == "eager"
    assert sel(cfg, "trainer.n_gpus_per_node") == 2
    assert sel(cfg, "ray_kwargs.ray_init.num_gpus") == 2
    assert sel(cfg, "data.dataloader_num_workers") == 8
    assert OmegaConf.to_container(sel(cfg, "actor_rollout_ref.actor.fsdp_config.mixed_precision")) == {"param_dtype": "bf16"}
    assert sel(cfg, "ray_kwargs.ray_init.num_cpus") == 32
    for key in ("rollout.dtype", "rollout.max_num_seqs", "rollout.enforce_eager", "attn_implementation", "num_cpus="):
        assert key not in printed


def test_explicit_values_that_cannot_work_on_cpu_are_replaced_and_printed():
    overrides = [
        "trainer.device=cpu",
        "actor_rollout_ref.actor.strategy=fsdp",
        "actor_rollout_ref.rollout.free_cache_engine=True",
        "+actor_rollout_ref.rollout.enable_sleep_mode=True",
        "+actor_rollout_ref.model.override_config.attn_implementation=flash_attention_2",
        "actor_rollout_ref.model.use_fused_kernels=True",
    ]
    cfg, _, printed = _apply(overrides)
    assert sel(cfg, "actor_rollout_ref.actor.strategy") == "fsdp2"
    assert sel(cfg, "actor_rollout_ref.rollout.free_cache_engine") is False
    assert sel(cfg, "actor_rollout_ref.rollout.enable_sleep_mode") is False
    assert sel(cfg, "actor_rollout_ref.model.override_config.attn_implementation") == "opd_cpu_varlen"
    assert sel(cfg, "actor_rollout_ref.model.use_fused_kernels") is False
    assert "attn_implementation=opd_cpu_varlen (was flash_attention_2)" in printed
    assert "enable_sleep_mode=False (was True)" in printed


def test_max_model_len_follows_the_data_lengths():
    cfg, _, _ = _apply(["trainer.device=cpu", "data.max_prompt_length=64", "data.max_response_length=16"])
    assert sel(cfg, "actor_rollout_ref.rollout.max_model_len") == 80
    assert sel(cfg, "actor_rollout_ref.rollout.max_num_batched_tokens") == 2048
    cfg, _, _ = _apply(["trainer.device=cpu", "data.max_prompt_length=2048", "data.max_response_length=1024"])
    assert sel(cfg, "actor_rollout_ref.rollout.max_num_batched_tokens") == 3072


def test_idempotent():
    overrides = ["trainer.device=cpu"]
    cfg, changes, _ = _apply(overrides)
    assert changes
    out = io.StringIO()
    assert apply_cpu_defaults(cfg, overrides=overrides, out=out) == []
    assert out.getvalue() == ""


def test_ray_cpus_grow_with_the_workers():
    cfg, _, _ = _apply(["trainer.device=cpu", "trainer.n_gpus_per_node=8"])
    assert required_ray_cpus(cfg) == 8 * 3 + 1 + 1 + 1
    assert sel(cfg, "ray_kwargs.ray_init.num_cpus") == 27
    assert sel(cfg, "ray_kwargs.ray_init.num_gpus") == 8


def test_too_few_ray_cpus_is_a_clear_error():
    with pytest.raises(OPDConfigError, match=r"ray_kwargs.ray_init.num_cpus=2 is too few .* need 6 Ray CPUs"):
        _apply(["trainer.device=cpu", "ray_kwargs.ray_init.num_cpus=2"])
    with pytest.raises(OPDConfigError, match="num_data_storage_units"):
        _apply(["trainer.device=cpu", "ray_kwargs.ray_init.num_cpus=8", "transfer_queue.backend.SimpleStorage.num_data_storage_units=8"])
    with pytest.raises(OPDConfigError, match="ray_kwargs.ray_init.num_gpus"):
        _apply(["trainer.device=cpu", "+ray_kwargs.ray_init.num_gpus=0"])


def test_existing_ray_cluster_is_not_checked():
    cfg, _, _ = _apply(["trainer.device=cpu", "ray_kwargs.ray_init.num_cpus=2", "+ray_kwargs.ray_init.address=auto"])
    assert sel(cfg, "ray_kwargs.ray_init.num_cpus") == 2


def test_joining_a_ray_cluster_passes_no_resources_to_ray_init(monkeypatch):
    """ray.init(address=...) refuses num_cpus/num_gpus: the cluster's nodes bring their own."""
    cfg, _, printed = _apply(["trainer.device=cpu", "trainer.nnodes=2", "+ray_kwargs.ray_init.address=127.0.0.1:6379"])
    assert sel(cfg, "ray_kwargs.ray_init.num_cpus") is None
    assert sel(cfg, "ray_kwargs.ray_init.num_gpus") is None and sel(cfg, "ray_kwargs.ray_init.include_dashboard") is None
    assert "num_cpus" not in printed
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    cfg, _, _ = _apply(["trainer.device=cpu"])
    assert sel(cfg, "ray_kwargs.ray_init.num_cpus") is None


def _main_opd(*args, timeout=240):
    env = {k: v for k, v in os.environ.items() if k != "VERL_PLATFORM"}
    return subprocess.run(
        [sys.executable, "-m", "opd_verl.main_opd", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env
    )


def test_main_opd_cfg_job_prints_cpu_config():
    out = _main_opd("--cfg", "job", "trainer.device=cpu", "algorithm.adv_estimator=grpo")
    assert out.returncode == 0, out.stderr[-3000:]
    cfg = yaml.safe_load(out.stdout)  # stdout stays pure YAML: the change lines go to stderr
    assert cfg["actor_rollout_ref"]["actor"]["strategy"] == "fsdp2"
    assert cfg["actor_rollout_ref"]["rollout"]["dtype"] == "float32"
    assert cfg["ray_kwargs"]["ray_init"]["runtime_env"]["env_vars"]["VERL_PLATFORM"] == "cpu"
    assert "opd_verl[cpu]: actor_rollout_ref.rollout.dtype=float32 (was bfloat16)" in out.stderr


def test_main_opd_too_few_cpus_exits_before_ray():
    out = _main_opd("trainer.device=cpu", "algorithm.adv_estimator=grpo", "ray_kwargs.ray_init.num_cpus=1", timeout=240)
    assert out.returncode == 2
    assert "opd_verl: error: ray_kwargs.ray_init.num_cpus=1 is too few" in out.stderr
    assert "Started a local Ray instance" not in out.stdout + out.stderr


def test_lora_on_cpu_merges_the_adapter_for_vllm():
    from hydra import compose, initialize_config_dir

    from opd_verl.cpu.defaults import apply_cpu_defaults

    config_dir = str(__import__("pathlib").Path(__file__).resolve().parents[1] / "opd_verl" / "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        cfg = compose(config_name="opd_trainer", overrides=["trainer.device=cpu", "actor_rollout_ref.model.lora_rank=8"])
    changes = {key: new for key, new, _ in apply_cpu_defaults(cfg, overrides=["trainer.device=cpu"], out=open("/dev/null", "w"))}
    assert changes.get("actor_rollout_ref.model.lora.merge") is True
    assert cfg.actor_rollout_ref.model.lora.merge is True


def test_packed_rows_dynamic_batches_and_bf16_set_by_the_user_are_kept():
    """Packed rows, token-budget micro-batches and bf16 run on CPU: a CPU run never rewrites them."""
    overrides = [
        "trainer.device=cpu",
        "actor_rollout_ref.model.use_remove_padding=True",
        "actor_rollout_ref.actor.use_dynamic_bsz=True",
        "actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=True",
        "actor_rollout_ref.ref.fsdp_config.model_dtype=bf16",
        "+actor_rollout_ref.actor.fsdp_config.mixed_precision={param_dtype:bf16,reduce_dtype:fp32,buffer_dtype:fp32}",
    ]
    cfg, _, printed = _apply(overrides)
    assert sel(cfg, "actor_rollout_ref.model.use_remove_padding") is True
    assert sel(cfg, "actor_rollout_ref.actor.use_dynamic_bsz") is True
    assert sel(cfg, "actor_rollout_ref.ref.fsdp_config.model_dtype") == "bf16"
    assert sel(cfg, "actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype") == "bf16"
    for key in ("use_remove_padding", "use_dynamic_bsz", "ref.fsdp_config.model_dtype", "actor.fsdp_config.mixed"):
        assert key not in printed


RECIPE = "gsm8k_qwen2_0.5b_forward_kl"


def test_a_recipes_settings_are_explicit_like_the_command_line():
    """A recipe's values (8 GPUs, bf16 teacher, dynamic batches) are the user's: kept on a CPU run, where verl's
    defaults of the same keys would be replaced."""
    overrides = [f"+recipes={RECIPE}", "trainer.device=cpu", "opd.teacher.path=/x", "actor_rollout_ref.model.path=/y"]
    cfg = _compose([f"hydra.searchpath=[pkg://verl.trainer.config,file://{REPO}]", *overrides])
    out = io.StringIO()
    apply_cpu_defaults(cfg, overrides=overrides, out=out, search_dirs=[REPO])
    assert sel(cfg, "trainer.n_gpus_per_node") == 8  # verl's default 8 would become 1
    assert sel(cfg, "actor_rollout_ref.ref.fsdp_config.model_dtype") == "bf16"
    assert sel(cfg, "actor_rollout_ref.model.use_remove_padding") is True
    assert "n_gpus_per_node" not in out.getvalue() and "model_dtype" not in out.getvalue()
    keys = device.user_override_keys(overrides, [REPO])
    assert {"trainer.device", "trainer.n_gpus_per_node", "opd.support", "trainer.logger"} <= keys
    assert "recipes" not in keys


def test_a_recipe_with_defaults_brings_the_keys_of_the_recipes_it_extends():
    keys = device.user_override_keys(["+recipes=demo_cpu_forward_kl"], [REPO])
    assert "opd.support" in keys  # its own
    assert "actor_rollout_ref.rollout.max_num_seqs" in keys  # demo_cpu's


def test_a_teachers_own_flash_attention_takes_the_varlen_kernel_and_sdpa_set_by_the_user_stays():
    from opd_verl.checks.verl_config import CPU_VARLEN_ATTENTION

    cfg, _, printed = _apply(["trainer.device=cpu", "opd.teacher.path=/t",
                              "+opd.teacher.model.override_config.attn_implementation=flash_attention_2"])
    assert sel(cfg, "actor_rollout_ref.model.override_config.attn_implementation") == CPU_VARLEN_ATTENTION
    assert sel(cfg, "opd.teacher.model.override_config.attn_implementation") == CPU_VARLEN_ATTENTION
    assert f"opd.teacher.model.override_config.attn_implementation={CPU_VARLEN_ATTENTION} (was flash_attention_2)" \
        in printed
    cfg, _, _ = _apply(["trainer.device=cpu", "+actor_rollout_ref.model.override_config.attn_implementation=sdpa"])
    assert sel(cfg, "actor_rollout_ref.model.override_config.attn_implementation") == "sdpa"


def test_cfg_job_of_a_gpu_recipe_on_a_host_without_gpu_prints_the_gpu_config():
    """The recipe's trainer.device=cuda is explicit: `--cfg job` on a GPU-less login node prints the config the
    cluster will run (no CPU rewrite) and says this host has no accelerator; a real launch stops before Ray."""
    recipe = [f"--config-dir={REPO}", f"+recipes={RECIPE}"]  # its hub names: skipped by the preflight offline
    out = _main_opd("--cfg", "job", *recipe)
    assert out.returncode == 0, out.stderr[-3000:]
    cfg = yaml.safe_load(out.stdout)
    assert cfg["trainer"]["device"] == "cuda" and cfg["trainer"]["n_gpus_per_node"] == 8
    assert cfg["actor_rollout_ref"]["ref"]["fsdp_config"]["model_dtype"] == "bf16"
    assert cfg["actor_rollout_ref"]["rollout"]["dtype"] == "bfloat16"
    assert "opd_verl[cpu]" not in out.stderr
    assert "this host has no accelerator" in out.stderr
    launch = _main_opd(*recipe)
    assert launch.returncode == 2
    assert "opd_verl: error: trainer.device=cuda but this machine has no accelerator" in launch.stderr
    assert "Started a local Ray instance" not in launch.stdout + launch.stderr


def test_a_rollout_of_several_workers_runs_unbound_on_cpu(monkeypatch):
    """vLLM's CPU backend binds each TP worker to a NUMA node of its own and refuses to start with more workers than
    NUMA nodes ("Not enough allowed NUMA nodes to bind threads of 2 local CPUWorkers"): a TP 2 recipe on CPU."""
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    key = "ray_kwargs.ray_init.runtime_env.env_vars.VLLM_CPU_OMP_THREADS_BIND"
    cfg, _, printed = _apply(["trainer.device=cpu", "trainer.n_gpus_per_node=2",
                              "actor_rollout_ref.rollout.tensor_model_parallel_size=2"])
    assert sel(cfg, key) == "nobind" and "VLLM_CPU_OMP_THREADS_BIND=nobind (was None)" in printed
    cfg, _, _ = _apply(["trainer.device=cpu"])
    assert sel(cfg, key) is None
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # the user's own binding
    cfg, _, _ = _apply(["trainer.device=cpu", "trainer.n_gpus_per_node=2",
                        "actor_rollout_ref.rollout.tensor_model_parallel_size=2"])
    assert sel(cfg, key) is None
