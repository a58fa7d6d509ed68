"""A served teacher (opd.teacher.engine=vllm) through verl 0.9.1's own teacher pool.

Reused from verl: `distillation.enabled` builds the teacher servers (experimental/teacher_loop MultiTeacherModelManager:
vLLM replicas on the `teacher_pool` resource pool, a load balancer) and the agent loop scores each sample with
them as soon as its rollout finishes (AgentLoopWorker._compute_teacher_logprobs, overlapping the other rollouts).
verl's estimator losses ask the server for `prompt_logprobs=0` at temperature 1 (_get_teacher_sampling_params): the
log-prob of each actual next token, which for a response token is the teacher's q_t; they land per sample in the
batch as `teacher_logprobs` / `teacher_ids` ([prompt + response, 1], entry i for token i + 1, the last a dummy:
vllm_rollout.utils.extract_prompt_logprobs).

Ours: the `distillation:` section written from opd.* (`distillation_settings`), q_t read from `teacher_logprobs`
into the reference pass's place, `ref_log_prob` (`served_ref_log_prob`, called by the OPD trainer), and an actor
worker that does not take verl's distillation loss (`served_worker_class`): opd_verl's estimators and losses
apply unchanged.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from opd_verl.checks.errors import OPDConfigError

TEACHER = "distillation.teacher_models.teacher_model"


def is_served(opd: Mapping) -> bool:
    return (opd.get("teacher") or {}).get("engine", "fsdp") == "vllm"


def distillation_settings(opd: Mapping) -> dict:
    """verl's `distillation:` keys (dotted) for one served teacher: its pool, model and server settings. verl's
    distillation_loss stays at its default (k3, a sampled-token estimator: the server returns prompt log-probs of
    the actual tokens only); its losses are not used (served_worker_class)."""
    pool = opd["teacher_pool"]
    settings = {
        "distillation.enabled": True,
        "distillation.n_gpus_per_node": int(pool["n_gpus_per_node"]),
        "distillation.nnodes": int(pool["nnodes"]),
        f"{TEACHER}.model_path": opd["teacher"]["path"],
        f"{TEACHER}.inference.name": "vllm",
    }
    for key, value in (opd["teacher"].get("inference") or {}).items():
        settings[f"{TEACHER}.inference.{key}"] = value
    return settings


def check_distillation_untouched(explicit: Iterable[str]) -> None:
    """With a served teacher the `distillation:` section is opd_verl's (written from opd.*)."""
    for key in explicit:
        if key == "distillation" or key.startswith("distillation."):
            raise OPDConfigError(f"{key} is set together with opd.teacher.engine=vllm, which writes verl's "
                                 "distillation section from opd.teacher / opd.teacher_pool; set the server's options "
                                 "as opd.teacher.inference.<key> and drop the distillation.* override")


def apply_served_teacher(config: DictConfig, explicit: Iterable[str], out=None) -> None:
    """Write verl's `distillation:` section for the served teacher (one line each to stderr), then check the
    server's final settings against the pool and the sequence lengths."""
    from opd_verl.checks.served_teacher import check_server_fits, served_inference
    from opd_verl.checks.teacher_pool import pool_gpus

    opd = OmegaConf.to_container(config.opd, resolve=True)
    if not is_served(opd):
        return
    check_distillation_untouched(explicit)
    check_server_fits(opd, served_inference(opd), pool_gpus({"opd": opd}),
                      int(config.data.max_prompt_length), int(config.data.max_response_length))
    out = out if out is not None else sys.stderr
    with open_dict(config):
        for key, value in distillation_settings(opd).items():
            OmegaConf.update(config, key, value, merge=False, force_add=True)
            print(f"opd_verl[served teacher]: {key}={value}", file=out, flush=True)


def sampled_token_log_probs(teacher_logprobs: torch.Tensor, teacher_ids: torch.Tensor,
                            input_ids: torch.Tensor) -> torch.Tensor:
    """One sample's served log-probs of its actual next tokens [L] (entry i: token i + 1; the last entry, verl's
    dummy, is 0) from verl's [L, 1] `teacher_logprobs`; raises if the server scored other ids than the sample's."""
    if teacher_logprobs.dim() != 2 or teacher_logprobs.shape[1] != 1 or teacher_logprobs.shape[0] != input_ids.shape[0]:
        raise RuntimeError(f"opd_verl: the served teacher returned log-probs of shape {tuple(teacher_logprobs.shape)} "
                           f"for a sequence of {input_ids.shape[0]} tokens; expected [{input_ids.shape[0]}, 1] (verl's "
                           "sampled-token prompt log-probs)")
    if not torch.equal(teacher_ids[:-1, 0].to(input_ids.dtype), input_ids[1:]):
        raise RuntimeError("opd_verl: the served teacher scored other token ids than the sample's own")
    return teacher_logprobs[:, 0].float()


def served_ref_log_prob(teacher_logprobs, teacher_ids, input_ids, response_mask) -> torch.Tensor:
    """q_t of every response token as a nested [batch, response] tensor (the layout of verl's ref_log_prob), from the
    batch's nested per-sample `teacher_logprobs` / `teacher_ids` / `input_ids` and `response_mask`."""
    rows = []
    for lp, ids, seq, mask in zip(teacher_logprobs.unbind(), teacher_ids.unbind(), input_ids.unbind(),
                                  response_mask.unbind(), strict=True):
        per_token = sampled_token_log_probs(lp, ids, seq)
        n = mask.shape[0]
        rows.append(per_token[seq.shape[0] - n - 1: seq.shape[0] - 1])
    return torch.nested.as_nested_tensor(rows, layout=torch.jagged)


def served_worker_class(base: type) -> type:
    """`base` (the OPD worker) without verl's distillation loss: verl hands the actor the `distillation:` section,
    and its worker then takes verl's distillation_ppo_loss; with a served teacher the losses are opd_verl's."""

    def __init__(self, config, role: str, distillation_config=None, **kwargs):
        base.__init__(self, config, role, distillation_config=None, **kwargs)

    return type(base.__name__, (base,), {"__init__": __init__})
