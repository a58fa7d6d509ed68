"""The actor loss of the loss-level hybrid L = lambda_rl * L_pg + lambda_distill * L_distill
(verl extension point: ActorRolloutRefWorker.set_loss_fn, verl 0.9.1).

verl's FSDP engine calls an actor loss twice per micro-batch when the micro-batch carries
`distillation_use_topk=True`: first as a logits processor with the student's packed logits [1, nnz, V]
(returning per-token tensors that become model outputs), then as the loss with the model outputs. The teacher's
logits are recomputed here, in the same process, per micro-batch: no T x V tensor crosses processes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from verl.trainer.ppo.core_algos import agg_loss
from verl.utils.metric import AggregationType, Metric
from verl.workers.utils.losses import ppo_loss
from verl.utils.torch_functional import masked_mean
from verl.workers.utils.padding import no_padding_2_padding

from opd_verl.algorithms.advantages import distill_loss_mix
from opd_verl.algorithms.divergences import chunked_full_divergence, sampled_reverse_kl, topk_divergence

DISTILL_KEY = "opd_divergence"
TOPK_MASS_KEY = "opd_topk_mass"


def packed_logits(logits: torch.Tensor, micro_batch, output_args: Mapping) -> torch.Tensor:
    """A model's logits in the engine's packed layout [nnz, V], temperature-scaled as verl scales the student's.

    Mirrors FSDPEngineWithLMHead.prepare_model_outputs (verl 0.9.1): with remove-padding the logits are already
    packed [1, nnz, V]; without it they are [bsz, max_len, V], right-padded, and each row's first len tokens count.
    """
    if "temperature_rmpad" in output_args:  # remove-padding layout
        return logits.squeeze(0) / output_args["temperature_rmpad"].clamp(min=1e-8).unsqueeze(-1).to(logits.dtype)
    temperature = output_args["temperature"]  # [bsz]
    logits = logits / temperature.clamp(min=1e-8).to(logits.dtype).view(-1, 1, 1)
    lengths = micro_batch["input_ids"].offsets().diff().tolist()
    return torch.cat([logits[i, :n] for i, n in enumerate(lengths)])


ALIGNMENT_TOLERANCE = 1e-3


def check_alignment(teacher_logits: torch.Tensor, labels: torch.Tensor, micro_batch) -> float:
    """The teacher's packed logits must reproduce, at the sampled tokens, the log-probs of verl's reference pass.

    Catches off-by-one shifts and padding mix-ups between the two code paths; raises on a mismatch.
    """
    if "ref_log_prob" not in micro_batch:
        return 0.0
    nnz = int(micro_batch["input_ids"].offsets()[-1])  # drops sequence-parallel padding at the end, if any
    logits, labels = teacher_logits[:nnz].float(), labels.reshape(-1)[:nnz].long()
    label_logp = logits.gather(-1, labels.view(-1, 1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    ours = no_padding_2_padding(label_logp, micro_batch)
    padded = micro_batch.select("ref_log_prob", "response_mask").to_padded_tensor()
    mask = padded["response_mask"].bool()
    diff = (ours - padded["ref_log_prob"].to(ours.dtype)).abs()[mask]
    worst = float(diff.max()) if diff.numel() else 0.0
    if worst > ALIGNMENT_TOLERANCE:
        raise RuntimeError(
            f"opd_verl: teacher logits in the actor loss disagree with the reference pass by {worst:.3g} nats at the "
            "sampled tokens (token alignment or padding mismatch); please report this with your verl version"
        )
    return worst


def shared_vocab(student_logits: torch.Tensor, teacher_logits: torch.Tensor):
    """Both logit sets over the ids they share: padded embedding rows (e.g. 151936 vs 152064) beyond the smaller
    vocabulary are dropped (never sampled; preflight has checked that shared ids are the same tokens)."""
    vocab = min(student_logits.shape[-1], teacher_logits.shape[-1])
    return student_logits[..., :vocab], teacher_logits[..., :vocab]


def distill_token_values(student_logits: torch.Tensor, teacher_logits: torch.Tensor, opd: Mapping):
    """Per-token divergence over opd.support (topk or full) and the teacher's top-k mass (1 for full)."""
    divergence, beta, tau = opd["divergence"], float(opd["beta"]), float(opd["temperature"])
    if opd["support"] == "full":
        values = chunked_full_divergence(student_logits, teacher_logits, divergence, beta, tau, int(opd["chunk_size"]))
        return values, torch.ones_like(values.detach())
    teacher_logp = torch.log_softmax(teacher_logits.float() / tau, dim=-1)
    k = min(int(opd["topk"]), teacher_logp.shape[-1])
    topk_logp, topk_ids = teacher_logp.topk(k, dim=-1)
    values = topk_divergence(student_logits, topk_ids, topk_logp, divergence, beta, tau)
    return values, topk_logp.exp().sum(-1)


def sampled_distill_loss_matrix(log_prob: torch.Tensor, teacher_log_prob: torch.Tensor, estimator: str):
    """Per-token reverse KL from the sampled tokens, with a gradient that is right on the student's own samples.

    k1: the value s - q with the score-function gradient (s - q) * grad s, which is grad KL(student||teacher) in
    expectation (the plain gradient of s - q has expectation 0). k3: its value with the pathwise gradient, as
    verl's low-variance KL loss.
    """
    values = sampled_reverse_kl(log_prob, teacher_log_prob, estimator)
    if estimator == "k1":
        return values.detach() * (1.0 + log_prob - log_prob.detach())
    return values


def opd_actor_loss(
    config,
    opd: Mapping,
    teacher_logits_fn: Callable,
    model_output: dict | None = None,
    data=None,
    dp_group=None,
    student_logits: torch.Tensor | None = None,
    **kwargs,
):
    """Logits-processor call (student_logits given): per-token divergences. Loss call: the weighted sum."""
    if student_logits is not None:
        student, teacher = shared_vocab(student_logits.squeeze(0), teacher_logits_fn(data).to(student_logits.device))
        values, mass = distill_token_values(student, teacher, opd)
        return {DISTILL_KEY: values.unsqueeze(0), TOPK_MASS_KEY: mass.unsqueeze(0)}

    lambda_rl, lambda_distill = float(opd["lambda_rl"]), float(opd["lambda_distill"])
    if lambda_rl > 0:
        pg_loss, metrics = ppo_loss(config, model_output, data, dp_group)
    else:
        pg_loss, metrics = torch.zeros(()), {}
        config.global_batch_info.update(
            dp_size=data["dp_size"],
            batch_num_tokens=data["batch_num_tokens"],
            global_batch_size=data["global_batch_size"],
            loss_scale_factor=config.loss_scale_factor,
        )
    padded = data.select(*[k for k in ("response_mask", "ref_log_prob") if k in data]).to_padded_tensor()
    mask = padded["response_mask"].to(bool)
    if opd["support"] == "sampled":
        log_prob = no_padding_2_padding(model_output["log_probs"], data)
        loss_mat = sampled_distill_loss_matrix(log_prob, padded["ref_log_prob"], opd["kl_estimator"])
        mass = torch.ones_like(log_prob.detach())
    else:
        loss_mat = no_padding_2_padding(model_output[DISTILL_KEY], data)
        mass = no_padding_2_padding(model_output[TOPK_MASS_KEY], data)
    distill = agg_loss(loss_mat=loss_mat, loss_mask=mask, loss_agg_mode=config.loss_agg_mode, **config.global_batch_info)
    metrics["opd/distill_loss"] = Metric(value=distill.detach(), aggregation=AggregationType.SUM)
    metrics["opd/divergence_per_token"] = Metric(
        value=masked_mean(loss_mat.detach(), mask).item(), aggregation=AggregationType.MEAN
    )
    metrics["opd/topk_mass"] = Metric(value=masked_mean(mass, mask).item(), aggregation=AggregationType.MEAN)
    return distill_loss_mix(pg_loss, distill, lambda_rl, lambda_distill), metrics
