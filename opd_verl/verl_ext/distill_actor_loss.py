"""The actor loss of the loss-level hybrid L = lambda_rl * L_pg + lambda_distill * L_distill
(verl extension point: ActorRolloutRefWorker.set_loss_fn, verl 0.9.1).

verl's FSDP engine calls an actor loss twice per micro-batch when the micro-batch carries
`distillation_use_topk=True`: first as a logits processor with the student's packed logits [1, nnz, V]
(returning per-token tensors that become model outputs), then as the loss with the model outputs. The teacher's
logits are recomputed here, in the same process, per micro-batch: no T x V tensor crosses processes.

Temperatures. verl hands the loss the student's logits divided by the rollout temperature T (FSDPEngineWithLMHead.
prepare_model_outputs, `temperature_rmpad` / `temperature`). The divergence is on logits / opd.temperature (τ)
whatever T is: the student's are taken at τ/T (that is z/T divided by τ/T), the teacher's raw logits at τ.
The reference pass (verl's ref_log_prob, like old_log_prob) and so the advantage path are at T. "T" is the value
verl divides by, T cast to the logits' dtype (`verl_temperature`: bf16(0.7) = 0.69921875, 0.11% off).

Alignment. Each micro-batch, the teachers' log-prob of the sampled token at T from this pass is compared with
verl's reference pass (ref_log_prob): the worst per-sequence median |Δ| must stay within a tolerance scaled to
the logits' resolution (dtype eps x max |logit|), which passes bf16 batching noise and catches shifts and
padding mix-ups (O(1) nats on most tokens). The statistics are logged as opd/teacher_alignment_*.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from verl.trainer.ppo.core_algos import agg_loss
from verl.utils.metric import AggregationType, Metric
from verl.workers.utils.losses import ppo_loss
from verl.utils.torch_functional import masked_mean
from verl.workers.utils.padding import no_padding_2_padding

from opd_verl.algorithms.advantages import distill_loss_mix
from opd_verl.algorithms.divergences import (
    chunked_full_divergence,
    chunked_teacher_topk,
    chunked_topk_divergence,
    sampled_kl_surrogate,
)
from opd_verl.algorithms.teachers import mixture_label_log_probs, route_rows, teacher_mixture_at

DISTILL_KEY = "opd_divergence"
TOPK_MASS_KEY = "opd_topk_mass"
STUDENT_MASS_KEY = "opd_student_topk_mass"  # support=topk: the student's probability on the teacher's top-k ids
OVERLAP_KEY = "opd_topk_overlap"  # support=topk: share of the teacher's top-k ids in the student's own top-k
TEACHER_LABEL_KEY = "opd_teacher_label_logp"  # the teachers' log-prob of the sampled token at T, this pass
TEACHER_RESOLUTION_KEY = "opd_teacher_logit_resolution"  # eps(compute dtype) * max |logit / T|, per token


def packed_logits(logits: torch.Tensor, micro_batch, output_args: Mapping) -> torch.Tensor:
    """A model's raw logits (no temperature) in the engine's packed layout [nnz, V].

    Mirrors FSDPEngineWithLMHead.prepare_model_outputs (verl 0.9.1): with remove-padding the logits are already
    packed [1, nnz, V]; without it they are [bsz, max_len, V], right-padded, and each row's first len tokens count.
    """
    if "temperature_rmpad" in output_args:  # remove-padding layout
        return logits.squeeze(0)
    lengths = micro_batch["input_ids"].offsets().diff().tolist()
    return torch.cat([logits[i, :n] for i, n in enumerate(lengths)])


def _uniform(temperature: torch.Tensor) -> float | torch.Tensor:
    """A number when every row has the same temperature (the usual case: one rollout temperature)."""
    if temperature.numel() == 0:
        return 1.0
    first = float(temperature.reshape(-1)[0])
    return first if bool((temperature == first).all()) else temperature


def packed_rollout_temperature(micro_batch, output_args: Mapping) -> float | torch.Tensor:
    """The rollout temperature T verl divided these packed rows by: a number, or per row [nnz(+pad)]."""
    if "temperature_rmpad" in output_args:
        return _uniform(output_args["temperature_rmpad"].reshape(-1).float().clamp(min=1e-8))
    temperature = output_args["temperature"].float().clamp(min=1e-8)
    lengths = micro_batch["input_ids"].offsets().diff()
    return _uniform(torch.repeat_interleave(temperature.to(lengths.device), lengths))


def rollout_temperature(micro_batch, rows: int) -> float | torch.Tensor:
    """T of the micro-batch (verl puts the rollout temperature in each micro-batch as `temperature`: a number or
    one per sample), per packed row [rows] when it varies (rows past the sequences, engine padding, get 1)."""
    try:
        temperature = micro_batch["temperature"]
    except KeyError:
        return 1.0
    if not isinstance(temperature, torch.Tensor):
        return max(float(temperature), 1e-8)
    if temperature.numel() == 1:
        return max(float(temperature), 1e-8)
    lengths = micro_batch["input_ids"].offsets().diff()
    per_row = torch.repeat_interleave(temperature.float().clamp(min=1e-8).to(lengths.device), lengths)
    if rows > per_row.numel():
        per_row = torch.cat([per_row, per_row.new_ones(rows - per_row.numel())])
    return _uniform(per_row)


def response_rows(micro_batch) -> torch.Tensor | None:
    """The packed rows the loss keeps (long [n], ascending): row j predicts token j + 1 (as no_padding_2_padding
    slices the responses), kept where the response_mask is 1. None without a nested response_mask (every row)."""
    try:
        mask = micro_batch["response_mask"]
    except KeyError:
        return None
    if not getattr(mask, "is_nested", False):
        return None
    offsets, lengths = mask.offsets(), mask.offsets().diff()
    first = micro_batch["input_ids"].offsets()[1:].to(lengths.device) - lengths - 1  # predicts response token 0
    shift = torch.repeat_interleave(first - offsets[:-1], lengths)  # response token index → its packed row
    packed = torch.arange(int(offsets[-1]), device=lengths.device) + shift
    return packed[mask.values().to(lengths.device).bool()]


def scatter_rows(values: torch.Tensor, rows: torch.Tensor | None, n: int) -> torch.Tensor:
    """Per-row values [len(rows), ...] of the selected ``rows`` back in the packed layout [n, ...] (0 elsewhere;
    differentiable)."""
    if rows is None:
        return values
    return values.new_zeros((n, *values.shape[1:])).index_copy(0, rows.to(values.device), values)


def verl_temperature(temperature: float | torch.Tensor, dtype: torch.dtype) -> float | torch.Tensor:
    """The rollout temperature T as verl divides logits of ``dtype`` by it (verl 0.9.1: FSDPEngineWithLMHead.
    prepare_model_inputs makes it float32; `_scale_logits_by_temperature` in verl/workers/engine/fsdp/
    transformer_impl.py divides `logits / temperature.clamp(min=1e-8).to(logits.dtype)`): bf16 logits are divided
    by bf16(T), 0.7 -> 0.69921875. A number stays a number; per row, in at least float32."""
    t = torch.as_tensor(temperature).to(torch.float32).clamp(min=1e-8).to(dtype)
    if isinstance(temperature, torch.Tensor):
        return t.to(torch.promote_types(dtype, torch.float32))
    return float(t)


def student_at_loss_temperature(student_logits: torch.Tensor, rollout_t: float | torch.Tensor, tau: float):
    """(logits, divisor) with softmax(logits / divisor) = softmax(z / τ), given verl's z / T: the rollout
    temperature is undone, not compounded, with the T verl divided by (`verl_temperature` in the logits' dtype,
    which the division keeps). One T: divisor τ / T (no copy); per-row T: logits rescaled, divisor 1."""
    rollout_t = verl_temperature(rollout_t, student_logits.dtype)
    if isinstance(rollout_t, torch.Tensor):
        dtype = torch.promote_types(student_logits.dtype, torch.float32)
        scale = (rollout_t.to(device=student_logits.device, dtype=dtype) / tau).unsqueeze(-1)
        return student_logits.to(dtype) * scale, 1.0
    return student_logits, tau / rollout_t


@dataclass
class TeacherPass:
    """The teachers' part of one micro-batch of the loss-level pass (OPDWorker.teacher_logits).

    logits [nnz, V]: softmax(logits / temperature) is the teacher (mixture) at the loss temperature τ.
    label_log_prob [nnz]: the mixture's log-prob of the sampled token at the rollout temperature T (what verl's
    reference pass computes: each teacher's logits divided by `verl_temperature`), for the alignment check;
    resolution [nnz]: eps(compute dtype) * max |logit / T|.
    topk: (ids, log-probs) [nnz, k] of the teacher at τ instead of its logits (from a teacher pool: logits None),
    over the first ``vocab`` ids (the vocabulary student and teachers share, as `shared_vocab`).
    """

    logits: torch.Tensor | None
    temperature: float
    label_log_prob: torch.Tensor | None = None
    resolution: torch.Tensor | None = None
    topk: tuple[torch.Tensor, torch.Tensor] | None = None
    vocab: int | None = None


def _row_absmax(logits: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    out = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    for a in range(0, logits.shape[0], chunk_size):
        out[a:a + chunk_size] = logits[a:a + chunk_size].float().abs().amax(-1)
    return out


def coarsest_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The floating dtype with the largest eps (bf16 > fp16 > fp32 > fp64)."""
    return max((d for d in dtypes if d is not None and d.is_floating_point), key=lambda d: torch.finfo(d).eps)


def teacher_at_tau(
    raw_logits: list[torch.Tensor], tau: float, weights: list[float], mode: str,
    sample_teacher: torch.Tensor | None = None, lengths: torch.Tensor | None = None, chunk_size: int = 1024,
    rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float]:
    """The teachers' raw logits (of ``rows``, when given) → (logits, divisor): softmax(logits / divisor) is the
    loss-level teacher at τ (each sample's own teacher under route, else the mixture of ``mode``)."""
    if sample_teacher is not None:
        return route_rows(raw_logits, sample_teacher, lengths, rows), float(tau)
    return teacher_mixture_at(raw_logits, weights, mode, tau, chunk_size)


def teacher_pass(
    raw_logits: list[torch.Tensor],
    labels: torch.Tensor,
    rollout_t: float | torch.Tensor,
    tau: float,
    weights: list[float],
    mode: str,
    sample_teacher: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
    chunk_size: int = 1024,
    rows: torch.Tensor | None = None,
) -> TeacherPass:
    """The teachers' raw packed logits (one tensor per teacher) → the loss-level teacher at τ and the
    alignment inputs at T. ``compute_dtype``: the teachers' forward precision (coarsest with the logits' dtype).
    ``rows`` (long [n]): only these packed rows (`response_rows`); every output then has n rows."""
    if rows is not None:  # select first: the mixtures cost O(n·V) and the caller's [nnz, V] logits can go
        raw_logits = [z.index_select(0, rows.to(z.device)) for z in raw_logits]
        labels = labels.reshape(-1).index_select(0, rows.to(labels.device))
        if isinstance(rollout_t, torch.Tensor):
            rollout_t = rollout_t.index_select(0, rows.to(rollout_t.device))
    logits, divisor = teacher_at_tau(raw_logits, tau, weights, mode, sample_teacher, lengths, chunk_size, rows)
    divisors = [verl_temperature(rollout_t, z.dtype) for z in raw_logits]  # T as verl's reference pass divides
    label_logp = mixture_label_log_probs(raw_logits, weights, mode, labels, divisors, sample_teacher, lengths,
                                         chunk_size=chunk_size, rows=rows)
    absmax = torch.stack([_row_absmax(z, chunk_size) for z in raw_logits]).amax(0)
    t = rollout_t.to(absmax.device) if isinstance(rollout_t, torch.Tensor) else rollout_t
    eps = torch.finfo(coarsest_dtype(compute_dtype, *[z.dtype for z in raw_logits])).eps
    return TeacherPass(logits, divisor, label_logp, eps * absmax / t)


ALIGNMENT_FLOOR = 1e-3  # nats: the tolerance in float32 (batching noise there is ~1e-6)
ALIGNMENT_ULPS = 4.0  # the tolerance in units of the logits' resolution eps(dtype) * max |logit|


def alignment_statistics(ours: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor, resolution: torch.Tensor) -> dict:
    """|Δ| = |ours − ref| over the response tokens (padded [bsz, T] tensors): the statistic checked is the worst
    per-sequence median |Δ|, against max(ALIGNMENT_FLOOR, ALIGNMENT_ULPS * max resolution). A one-position shift
    or a padding mix-up moves most tokens of a sequence by O(1) nats; bf16 batching noise moves few by ~1 ulp."""
    mask = mask.bool()
    diff = (ours.double() - ref.to(ours.device).double()).abs()
    rows = mask.any(-1)
    if not bool(rows.any()):
        zero = 0.0
        return {"seq_median_max": zero, "median_abs": zero, "max_abs": zero, "tolerance": ALIGNMENT_FLOOR}
    nan = torch.full_like(diff, float("nan"))
    per_seq = torch.where(mask, diff, nan)[rows].nanmedian(-1).values
    tokens = diff[mask]
    res = float(resolution.to(ours.device).double()[mask].max())
    return {
        "seq_median_max": float(per_seq.max()),
        "median_abs": float(tokens.median()),
        "max_abs": float(tokens.max()),
        "tolerance": max(ALIGNMENT_FLOOR, ALIGNMENT_ULPS * res),
    }


def check_alignment(ours: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor, resolution: torch.Tensor) -> dict:
    """`alignment_statistics`, raising when the statistic exceeds its tolerance (token alignment or padding of
    the loss pass differs from verl's reference pass)."""
    stats = alignment_statistics(ours, ref, mask, resolution)
    if stats["seq_median_max"] > stats["tolerance"]:
        raise RuntimeError(
            "opd_verl: teacher logits in the actor loss disagree with the reference pass: the median |Δ log p| of "
            f"a sequence's sampled tokens is {stats['seq_median_max']:.3g} nats (tolerance {stats['tolerance']:.3g}, "
            f"max over tokens {stats['max_abs']:.3g}): token alignment or padding mismatch between the two passes; "
            "please report this with your verl version"
        )
    return stats


def shared_vocab(student_logits: torch.Tensor, teacher_logits: torch.Tensor):
    """Both logit sets over the ids they share: padded embedding rows (e.g. 151936 vs 152064) beyond the smaller
    vocabulary are dropped (never sampled; preflight has checked that shared ids are the same tokens)."""
    vocab = min(student_logits.shape[-1], teacher_logits.shape[-1])
    return student_logits[..., :vocab], teacher_logits[..., :vocab]


def teacher_topk(teacher_logits: torch.Tensor, opd: Mapping, teacher_temperature: float | None = None):
    """The teacher's top-k for support=topk: (ids, log-probs) [n, opd.topk] of softmax(teacher_logits / divisor)
    (default opd.temperature), opd.chunk_size rows at a time."""
    tt = float(opd["temperature"]) if teacher_temperature is None else float(teacher_temperature)
    return chunked_teacher_topk(teacher_logits, int(opd["topk"]), tt, int(opd.get("chunk_size", 1024)))


def distill_token_values(
    student_logits: torch.Tensor,
    teacher: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    opd: Mapping,
    student_temperature: float | None = None,
    teacher_temperature: float | None = None,
    student_rows: torch.Tensor | None = None,
    student_stats: dict | None = None,
):
    """Per-token divergence over opd.support (topk or full) and the teacher's top-k mass (1 for full), both
    chunked (opd.chunk_size rows at a time: O(chunk·V) temporaries beyond the [N, V] gradient). ``student_stats``
    (a dict; topk only): filled with the student's mass on the teacher's top-k (``mass``) and the top-k overlap
    (``overlap``), per token (`chunked_topk_divergence`).

    The distributions are softmax(student_logits / student_temperature) and softmax(teacher / teacher_temperature);
    both divisors default to opd.temperature (inputs that are raw logits). ``teacher``: the teacher's logits
    [n, V], or for topk its (ids, log-probs) from `teacher_topk` (so that the caller can free the logits first).
    ``student_rows`` (long [n]): only these rows of student_logits [N, V], one per teacher row; values [n], gradient
    0 on the other rows."""
    divergence, beta, tau = opd["divergence"], float(opd["beta"]), float(opd["temperature"])
    ts = tau if student_temperature is None else float(student_temperature)
    chunk = int(opd.get("chunk_size", 1024))
    if opd["support"] == "full":
        tt = tau if teacher_temperature is None else float(teacher_temperature)
        values = chunked_full_divergence(student_logits, teacher, divergence, beta, ts, chunk, teacher_temperature=tt,
                                         student_rows=student_rows)
        return values, torch.ones_like(values.detach())
    ids, logp = teacher if isinstance(teacher, tuple) else teacher_topk(teacher, opd, teacher_temperature)
    values = chunked_topk_divergence(student_logits, ids, logp, divergence, beta, ts, chunk, student_rows,
                                     student_stats=student_stats)
    return values, logp.exp().sum(-1)


def sampled_distill_loss_matrix(log_prob: torch.Tensor, teacher_log_prob: torch.Tensor, estimator: str,
                                mask: torch.Tensor | None = None):
    """Per-token loss of support=sampled ([bsz, T]; value: the estimate of KL(student||teacher)); its gradient is
    the estimator's (opd_verl.algorithms.divergences.sampled_kl_surrogate): k1 and k1_baseline are reverse KL in
    expectation, k3 (pathwise, as verl's low-variance KL loss) is FORWARD KL in expectation."""
    return sampled_kl_surrogate(log_prob, teacher_log_prob, estimator, mask)


def _alignment_metrics(model_output, data, padded, mask) -> dict:
    """opd/teacher_alignment_* of this micro-batch (raises on a misalignment); {} without a reference pass."""
    if TEACHER_LABEL_KEY not in model_output or "ref_log_prob" not in padded:
        return {}
    ours = no_padding_2_padding(model_output[TEACHER_LABEL_KEY], data)
    resolution = no_padding_2_padding(model_output[TEACHER_RESOLUTION_KEY], data)
    stats = check_alignment(ours, padded["ref_log_prob"], mask, resolution)
    aggregation = {"seq_median_max": AggregationType.MAX, "median_abs": AggregationType.MEAN,
                   "max_abs": AggregationType.MAX, "tolerance": AggregationType.MIN}
    return {f"opd/teacher_alignment_{k}": Metric(value=v, aggregation=aggregation[k]) for k, v in stats.items()}


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
    """Logits-processor call (student_logits given): per-token divergences, computed on the response rows only
    (`response_rows`; 0 on the others, which the loss masks). Loss call: the weighted sum."""
    if student_logits is not None:
        zs = student_logits.squeeze(0)
        nnz, tau = zs.shape[0], float(opd["temperature"])
        rows = response_rows(data)
        rows = rows if rows is None else rows.to(zs.device)
        rollout_t, student_rows = rollout_temperature(data, nnz), rows
        if rows is not None and isinstance(rollout_t, torch.Tensor):  # per-row T: rescale the response rows only
            zs, rollout_t, student_rows = zs.index_select(0, rows), rollout_t.to(rows.device)[rows], None
        zs, student_divisor = student_at_loss_temperature(zs, rollout_t, tau)
        teacher: TeacherPass = teacher_logits_fn(data, rows)
        outputs = {}
        if teacher.label_log_prob is not None:
            outputs[TEACHER_LABEL_KEY] = teacher.label_log_prob.to(zs.device)
            outputs[TEACHER_RESOLUTION_KEY] = teacher.resolution.to(zs.device)
        tt = teacher.temperature
        if teacher.topk is not None:  # a teacher pool's top-k over the shared vocabulary
            student, teacher_z = zs[..., :teacher.vocab], tuple(t.to(zs.device) for t in teacher.topk)
        else:
            student, teacher_z = shared_vocab(zs, teacher.logits.to(zs.device))
        del teacher  # teacher_z is the one reference left to the teachers' [n, V] logits
        if opd["support"] == "topk" and not isinstance(teacher_z, tuple):  # the logits go before the student's pass
            teacher_z = teacher_topk(teacher_z, opd, tt)
        stats = {}
        values, mass = distill_token_values(student, teacher_z, opd, student_divisor, tt, student_rows, stats)
        outputs.update({DISTILL_KEY: values, TOPK_MASS_KEY: mass})
        if stats:  # support=topk
            outputs.update({STUDENT_MASS_KEY: stats["mass"], OVERLAP_KEY: stats["overlap"]})
        return {k: scatter_rows(v, rows, nnz).unsqueeze(0) for k, v in outputs.items()}

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
        loss_mat = sampled_distill_loss_matrix(log_prob, padded["ref_log_prob"], opd["kl_estimator"], mask)
        mass = torch.ones_like(log_prob.detach())
    else:
        loss_mat = no_padding_2_padding(model_output[DISTILL_KEY], data)
        mass = no_padding_2_padding(model_output[TOPK_MASS_KEY], data)
        metrics.update(_alignment_metrics(model_output, data, padded, mask))
    distill = agg_loss(loss_mat=loss_mat, loss_mask=mask, loss_agg_mode=config.loss_agg_mode, **config.global_batch_info)
    metrics["opd/distill_loss"] = Metric(value=distill.detach(), aggregation=AggregationType.SUM)
    metrics["opd/divergence_per_token"] = Metric(
        value=masked_mean(loss_mat.detach(), mask).item(), aggregation=AggregationType.MEAN
    )
    metrics["opd/topk_mass"] = Metric(value=masked_mean(mass, mask).item(), aggregation=AggregationType.MEAN)
    for key, name in ((STUDENT_MASS_KEY, "opd/student_topk_mass"), (OVERLAP_KEY, "opd/topk_overlap")):
        if key in model_output:  # support=topk
            value = masked_mean(no_padding_2_padding(model_output[key], data), mask).item()
            metrics[name] = Metric(value=value, aggregation=AggregationType.MEAN)
    return distill_loss_mix(pg_loss, distill, lambda_rl, lambda_distill), metrics
