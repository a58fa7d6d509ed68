"""A served teacher (opd.teacher.engine=vllm): checks before Ray.

The teacher runs in verl 0.9.1's own teacher pool (verl/experimental/teacher_loop: vLLM replicas on GPUs of their
own, each sample scored as soon as its rollout finishes); opd_verl reads its log-probs (opd_verl.verl_ext.
served_teacher). The server's settings are `opd.teacher.inference`, the keys of verl's
`distillation.teacher_models.<name>.inference` (a RolloutConfig), verl's defaults for the rest. Every check raises
OPDConfigError with one line naming the key and the fix.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from functools import cache
from importlib import resources

from opd_verl.checks.errors import OPDConfigError
from opd_verl.checks.modes import uses_distill_loss, uses_opd

INFERENCE = "opd.teacher.inference"
ALTERNATIVES = ("opd.teacher.engine=fsdp with opd.teacher_pool (the teacher in FSDP on its own GPUs) or colocated "
                "(opd.teacher_pool unset)")


@cache
def verl_inference_defaults() -> dict:
    """verl 0.9.1's defaults of a teacher's `inference` section (distillation/distillation.yaml), uninterpolated
    values only (those interpolated from the student's rollout are left out)."""
    from omegaconf import OmegaConf

    section = OmegaConf.load(resources.files("verl.trainer.config").joinpath("distillation/distillation.yaml"))
    inference = section.teacher_models.teacher_model.inference
    return {k: v for k, v in OmegaConf.to_container(inference, resolve=False).items()
            if not (isinstance(v, str) and v.startswith("${")) and k != "_target_"}


@cache
def inference_keys() -> frozenset[str]:
    """The keys verl's RolloutConfig takes (what `opd.teacher.inference` may set)."""
    from verl.workers.config import RolloutConfig

    return frozenset(f.name for f in dataclasses.fields(RolloutConfig))


def served_inference(opd: Mapping) -> dict:
    """The server's settings: verl's defaults, then opd.teacher.inference."""
    return {**verl_inference_defaults(), **((opd.get("teacher") or {}).get("inference") or {})}


def replica_gpus(inference: Mapping) -> int:
    """GPUs of one replica (verl's DistillationTeacherModelConfig.per_replica_world_size)."""
    return (int(inference.get("tensor_model_parallel_size", 1)) * int(inference.get("data_parallel_size", 1))
            * int(inference.get("pipeline_model_parallel_size", 1)))


def check_inference_keys(opd: Mapping) -> None:
    own = (opd.get("teacher") or {}).get("inference") or {}
    for key in own:
        if key not in inference_keys():
            raise OPDConfigError(f"{INFERENCE}.{key} is not a setting of verl's teacher server (distillation."
                                 f"teacher_models.<name>.inference, a RolloutConfig); drop it or fix its spelling")
    name = own.get("name", "vllm")
    if name != "vllm":
        raise OPDConfigError(f"{INFERENCE}.name={name}: opd.teacher.engine=vllm serves the teacher from vLLM; drop "
                             f"{INFERENCE}.name (SGLang teachers are not supported by opd_verl yet)")


def check_supports(config: Mapping) -> None:
    """What the server returns: the sampled token's log-prob (vLLM's prompt log-probs) and its top-k. The advantage
    path and the loss level's support=sampled read the former (ref_log_prob); loss-level top-k is not yet."""
    opd = config["opd"]
    if not uses_distill_loss(config) or opd["support"] == "sampled":
        return
    if opd["support"] == "full":
        raise OPDConfigError("opd.support=full with opd.teacher.engine=vllm: a served teacher returns log-probs of "
                             f"its top-k tokens, never the full vocabulary; use {ALTERNATIVES}")
    if opd["support"] == "topk":
        check_topk_fits_server(opd, served_inference(opd))
    raise OPDConfigError(
        f"opd.support={opd['support']} with opd.teacher.engine=vllm is not yet available (the server's top-k in the "
        f"loss); use opd.support=sampled or the advantage path (algorithm.adv_estimator=opd|opd_hybrid) with the "
        f"served teacher, or {ALTERNATIVES}")


def check_topk_fits_server(opd: Mapping, inference: Mapping) -> None:
    """vLLM returns at most max_logprobs log-probs per position (verl raises it to topk when unset)."""
    max_logprobs = ((inference.get("engine_kwargs") or {}).get("vllm") or {}).get("max_logprobs")
    if max_logprobs is not None and int(opd["topk"]) > int(max_logprobs):
        raise OPDConfigError(f"opd.topk={opd['topk']} exceeds the server's {INFERENCE}.engine_kwargs.vllm.max_logprobs="
                             f"{max_logprobs}; lower opd.topk, or raise max_logprobs (or drop it: verl sets it to "
                             "the top-k)")


def check_rollout_temperature(config: Mapping) -> None:
    """verl's teacher pool scores at temperature 1 (it forces it); the reference pass, which q_t replaces, is at the
    rollout temperature."""
    temperature = float(config["actor_rollout_ref"]["rollout"].get("temperature", 1.0))
    if temperature != 1.0:
        raise OPDConfigError(
            f"actor_rollout_ref.rollout.temperature={temperature} with opd.teacher.engine=vllm: verl's teacher server "
            "scores at temperature 1, so q_t would not be at the rollout temperature as in the reference pass; set "
            f"actor_rollout_ref.rollout.temperature=1.0, or use {ALTERNATIVES}")


def check_unread_teacher_options(opd: Mapping) -> None:
    """Teacher options a served teacher does not read (FSDP model options, views, several teachers)."""
    if opd.get("teachers"):
        raise OPDConfigError("opd.teachers with opd.teacher.engine=vllm: several served teachers are not yet "
                             "available; set one teacher (opd.teacher.path), or opd.teacher.engine=fsdp")
    teacher = opd["teacher"]
    if teacher.get("model"):
        raise OPDConfigError(f"opd.teacher.model is read by the FSDP engine only; with opd.teacher.engine=vllm set "
                             f"the server's options under {INFERENCE} (verl's teacher inference keys), or drop it")
    if teacher.get("prompt", "student") != "student" or teacher.get("cross_tokenizer"):
        raise OPDConfigError("opd.teacher.prompt / cross_tokenizer with opd.teacher.engine=vllm: the served teacher "
                             "scores the student's own prompt and response ids (its own view is not yet available); "
                             "drop them, or set opd.teacher.engine=fsdp")


def check_served_teacher(config: Mapping, pool: tuple[int, int] | None) -> None:
    """opd.teacher.engine=vllm on the composed config (plain containers), before Ray."""
    opd = config["opd"]
    if not uses_opd(config):
        raise OPDConfigError("opd.teacher.engine=vllm but no teacher runs (algorithm.adv_estimator is not opd|"
                             "opd_hybrid and the actor loss is not ppo_plus_distill); drop opd.teacher.engine")
    if pool is None:
        raise OPDConfigError("opd.teacher.engine=vllm needs GPUs of its own for the server: set "
                             "opd.teacher_pool.n_gpus_per_node and opd.teacher_pool.nnodes")
    check_inference_keys(opd)
    check_unread_teacher_options(opd)
    check_supports(config)
    check_rollout_temperature(config)


def check_fsdp_engine_reads_no_inference(opd: Mapping) -> None:
    if (opd.get("teacher") or {}).get("inference"):
        raise OPDConfigError(f"{INFERENCE} is read only with opd.teacher.engine=vllm; set it, or drop {INFERENCE} "
                             "(the FSDP teacher's options are opd.teacher.model)")


def check_server_fits(opd: Mapping, inference: Mapping, pool_gpus: int, prompt_length: int,
                      response_length: int) -> None:
    """The server's final settings (after any CPU defaults) against the pool and the sequence lengths, as verl's
    DistillationConfig would check them in the trainer."""
    per_replica = replica_gpus(inference)
    if pool_gpus % per_replica:
        raise OPDConfigError(
            f"the served teacher's replica needs {per_replica} GPUs ({INFERENCE}.tensor_model_parallel_size x "
            f"data_parallel_size x pipeline_model_parallel_size), which does not divide opd.teacher_pool's "
            f"{pool_gpus}; set {INFERENCE}.tensor_model_parallel_size to a divisor (verl's default is "
            f"{verl_inference_defaults()['tensor_model_parallel_size']})")
    max_model_len = inference.get("max_model_len")
    need = prompt_length + response_length + 1
    if max_model_len is not None and int(max_model_len) < need:
        raise OPDConfigError(
            f"{INFERENCE}.max_model_len={max_model_len} cannot hold a prompt, the whole response and one generated "
            f"token ({need} = data.max_prompt_length + data.max_response_length + 1); raise it or leave it unset")
