"""Checks of verl's own keys that verl 0.9.1 makes only after Ray has started and the models have loaded (or never):
missing mandatory values, the batch arithmetic of the FSDP workers, and the replay buffer's poll interval. Each
problem is one line naming the keys and the fix."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from opd_verl.checks.errors import OPDConfigError
from opd_verl.checks.modes import DISTILL_LOSS_MODES

POLL_INTERVAL_KEY = "trainer.v1.sampler.sampler_kwargs.poll_interval"
ACTOR = "actor_rollout_ref.actor"
ROLLOUT = "actor_rollout_ref.rollout"


def _in_disabled_section(config: DictConfig, key: str) -> bool:
    """True when a section above `key` has `enable: false` (e.g. reward.reward_model when no reward model runs)."""
    parts = key.split(".")
    for i in range(1, len(parts)):
        if _sel(config, ".".join(parts[:i] + ["enable"])) is False:
            return True
    return False


def missing_mandatory_values(config: DictConfig) -> list[str]:
    """Keys still at `???` (verl's mandatory values, e.g. actor_rollout_ref.rollout.name) in the sections the run
    uses."""
    return sorted(k for k in OmegaConf.missing_keys(config) if not _in_disabled_section(config, k))


def check_missing_values(config: DictConfig) -> None:
    missing = missing_mandatory_values(config)
    if missing:
        lines = [f"{key} is not set (verl's config has no default for it); set {key}=<value>" for key in missing]
        raise OPDConfigError("\n".join(lines))


def _sel(config, key, default=None):
    return OmegaConf.select(config, key, default=default)


REF = "actor_rollout_ref.ref"
# verl 0.9.1's attention when override_config names none (verl/workers/config/model.py, HFModelConfig)
VERL_DEFAULT_ATTENTION = "flash_attention_2"
# The attention implementations verl's Ulysses patch reaches (it replaces transformers' flash-attention forward):
# flash-attn's, and opd_verl's pure-torch variable-length kernel for CPU runs (opd_verl.cpu.varlen_attention registers
# it under this name).
ULYSSES_ATTENTION_PREFIX = "flash"
CPU_VARLEN_ATTENTION = "opd_cpu_varlen"


def _role_ulysses_size(config, role: str) -> int:
    """A role's Ulysses sequence-parallel size (fsdp_config's, or the deprecated role-level key)."""
    sizes = [_sel(config, f"{role}.fsdp_config.ulysses_sequence_parallel_size"),
             _sel(config, f"{role}.ulysses_sequence_parallel_size")]
    return max(int(v or 1) for v in sizes)


def ulysses_size(config) -> int:
    """The actor's Ulysses sequence-parallel size."""
    return _role_ulysses_size(config, ACTOR)


def ulysses_sizes(config) -> dict[str, int]:
    """Ulysses sequence-parallel sizes: the actor's, and the teacher's (verl's reference role, whose size defaults to
    the actor's)."""
    return {"actor": ulysses_size(config), "teacher": _role_ulysses_size(config, REF)}


STUDENT_ATTENTION = "actor_rollout_ref.model.override_config.attn_implementation"


def _student_attention(config) -> str:
    return _sel(config, STUDENT_ATTENTION) or VERL_DEFAULT_ATTENTION


def _teacher_attentions(config) -> dict[str, str]:
    """{the key that sets it: attention} of each teacher: its own model.override_config.attn_implementation, else the
    student's (opd_verl.verl_ext.teacher_worker.teacher_model_config), else verl's default."""
    student = _student_attention(config)
    entries = [("opd.teacher", _sel(config, "opd.teacher"))] if not _sel(config, "opd.teachers") else [
        (f"opd.teachers.{i}", t) for i, t in enumerate(_sel(config, "opd.teachers"))]
    out = {}
    for key, entry in entries:
        own = OmegaConf.select(entry, "model.override_config.attn_implementation", default=None) if entry else None
        out[f"{key}.model.override_config.attn_implementation" if own else STUDENT_ATTENTION] = own or student
    return out


def _reaches_ulysses(attention: str) -> bool:
    return str(attention).startswith(ULYSSES_ATTENTION_PREFIX) or attention == CPU_VARLEN_ATTENTION


def check_sequence_parallel_attention(config: DictConfig) -> None:
    """Ulysses SP > 1 with an attention that verl's Ulysses patch does not reach (sdpa, eager: it replaces the
    flash-attention forward only) computes each rank's attention over its own slice of the sequence: silently
    wrong log-probs. The student's (actor) and each teacher's (reference role) are checked."""
    sizes = ulysses_sizes(config)
    checks = []
    if sizes["actor"] > 1:
        checks.append((f"{ACTOR}.fsdp_config.ulysses_sequence_parallel_size", sizes["actor"], STUDENT_ATTENTION,
                       _student_attention(config)))
    if sizes["teacher"] > 1 and (_sel(config, "opd.teacher.path") or _sel(config, "opd.teachers")):
        checks += [(f"{REF}.ulysses_sequence_parallel_size", sizes["teacher"], key, attention)
                   for key, attention in _teacher_attentions(config).items()]
    for sp_key, size, attn_key, attention in checks:
        if not _reaches_ulysses(attention):
            raise OPDConfigError(
                f"{sp_key}={size} with {attn_key}={attention}: verl's Ulysses sequence parallel patches the "
                "flash-attention path only, so each rank would attend over its own slice of the sequence (wrong "
                f"log-probs); use flash_attention_2 (GPUs), {CPU_VARLEN_ATTENTION} (CPU), or set the size to 1")


def rollout_workers(config) -> int:
    """GPUs of one rollout replica: tensor x data x pipeline parallel sizes."""
    workers = 1
    for key in ("tensor_model_parallel_size", "data_parallel_size", "pipeline_model_parallel_size"):
        workers *= int(_sel(config, f"{ROLLOUT}.{key}", 1) or 1)
    return workers


def check_batch_arithmetic(config: DictConfig) -> None:
    """What verl's FSDP actor and rollout workers assert once the models are loaded (verl 0.9.1
    engine_workers.py: TrainingWorker.train_mini_batch, ActorRolloutRefWorker.init_model)."""
    if _sel(config, f"{ACTOR}.strategy") not in ("fsdp", "fsdp2"):
        return  # megatron's arithmetic is verl's own validate_config
    world = int(_sel(config, "trainer.n_gpus_per_node")) * int(_sel(config, "trainer.nnodes"))
    sp = ulysses_size(config)
    if world % sp:
        raise OPDConfigError(
            f"{ACTOR}.fsdp_config.ulysses_sequence_parallel_size={sp} does not divide the {world} GPUs "
            "(trainer.n_gpus_per_node x trainer.nnodes); choose a divisor")
    if sp > 1 and not _sel(config, "actor_rollout_ref.model.use_remove_padding"):
        raise OPDConfigError(
            f"{ACTOR}.fsdp_config.ulysses_sequence_parallel_size={sp} needs actor_rollout_ref.model.use_remove_padding="
            "True (verl asserts it once the models load); set it to True")
    dp = world // sp
    n = int(_sel(config, f"{ROLLOUT}.n"))
    train, mini = int(_sel(config, "data.train_batch_size")), int(_sel(config, f"{ACTOR}.ppo_mini_batch_size"))
    if (train * n) % dp:
        raise OPDConfigError(
            f"data.train_batch_size x {ROLLOUT}.n = {train} x {n} is not divisible by the {dp} data-parallel ranks "
            f"(GPUs / {ACTOR}.ulysses_sequence_parallel_size); change data.train_batch_size")
    if (mini * n) % dp:
        raise OPDConfigError(
            f"{ACTOR}.ppo_mini_batch_size x {ROLLOUT}.n = {mini} x {n} is not divisible by the {dp} data-parallel "
            f"ranks; change {ACTOR}.ppo_mini_batch_size")
    if not _sel(config, f"{ACTOR}.use_dynamic_bsz"):
        if _sel(config, f"{ROLLOUT}.log_prob_use_dynamic_bsz"):
            raise OPDConfigError(
                f"{ACTOR}.use_dynamic_bsz=False but {ROLLOUT}.log_prob_use_dynamic_bsz=True; verl needs both the same")
        micro = _sel(config, f"{ACTOR}.ppo_micro_batch_size_per_gpu")
        per_gpu = mini * n // dp
        if micro is not None and per_gpu % int(micro):
            raise OPDConfigError(
                f"the per-GPU mini-batch ({ACTOR}.ppo_mini_batch_size x {ROLLOUT}.n / {dp} ranks = {per_gpu}) is not "
                f"divisible by {ACTOR}.ppo_micro_batch_size_per_gpu={micro}; pick a divisor of {per_gpu}")
    elif not _sel(config, f"{ROLLOUT}.log_prob_use_dynamic_bsz"):
        raise OPDConfigError(
            f"{ACTOR}.use_dynamic_bsz=True but {ROLLOUT}.log_prob_use_dynamic_bsz=False; verl needs both the same")
    infer = rollout_workers(config)
    if world % infer:
        raise OPDConfigError(
            f"the rollout's {ROLLOUT}.tensor_model_parallel_size x data_parallel_size x pipeline_model_parallel_size "
            f"= {infer} does not divide the {world} GPUs; choose sizes whose product divides {world}")


def replay_poll_interval(config) -> float | None:
    """trainer.v1.sampler.sampler_kwargs.poll_interval (seconds), or None when unset.

    verl 0.9.1's built-in ReplayBuffer polls for finished rollouts every `poll_interval` s (default 2.0) but
    PPOTrainer._build_replay_buffer never passes it; sampler_kwargs is verl's own free-form mapping, which the
    built-in buffer does not read. A step waits for the next poll after its last rollout: up to 2 s a step.
    """
    kwargs = _sel(config, "trainer.v1.sampler.sampler_kwargs") or {}
    value = kwargs.get("poll_interval")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise OPDConfigError(f"{POLL_INTERVAL_KEY}={value!r} must be a number of seconds > 0 (verl's default: 2.0)")
    return float(value)


def check_loss_level_support(config: DictConfig) -> None:
    """What the loss-level mode over distributions (opd.support=topk|full) cannot do with verl 0.9.1, and what
    lambda_rl=0 leaves out."""
    loss_mode = _sel(config, f"{ACTOR}.policy_loss.loss_mode")
    if loss_mode not in DISTILL_LOSS_MODES:
        return
    support = _sel(config, "opd.support")
    if support in ("topk", "full"):
        sizes = ulysses_sizes(config)
        for role, key in (("actor", f"{ACTOR}.fsdp_config.ulysses_sequence_parallel_size"),
                          ("teacher", f"{REF}.ulysses_sequence_parallel_size")):
            if sizes[role] > 1:
                raise OPDConfigError(
                    f"opd.support={support} with Ulysses sequence parallel ({key}={sizes[role]}) is not supported: "
                    "each rank would hold a slice of the sequence's logits while the loss indexes the whole packed "
                    "sequence; set the size to 1, or opd.support=sampled")
        if _sel(config, f"{ACTOR}.use_fused_kernels") or _sel(config, "actor_rollout_ref.model.use_fused_kernels"):
            raise OPDConfigError(
                f"opd.support={support} needs the student's logits, which use_fused_kernels=True never materialises; "
                "set actor_rollout_ref.model.use_fused_kernels=False, or opd.support=sampled")
    if float(_sel(config, "opd.lambda_rl")) == 0:
        dropped = []
        if float(_sel(config, f"{ACTOR}.entropy_coeff") or 0) != 0:
            dropped.append(f"{ACTOR}.entropy_coeff={_sel(config, f'{ACTOR}.entropy_coeff')}")
        if _sel(config, f"{ACTOR}.use_kl_loss"):
            dropped.append(f"{ACTOR}.use_kl_loss=True")
        if dropped:
            raise OPDConfigError(
                f"opd.lambda_rl=0 skips verl's PPO loss, and with it {' and '.join(dropped)}; set opd.lambda_rl > 0 "
                "to keep them, or turn them off")


def check_verl_config(config: DictConfig) -> None:
    check_missing_values(config)
    check_loss_level_support(config)
    check_sequence_parallel_attention(config)
    check_batch_arithmetic(config)
    replay_poll_interval(config)
