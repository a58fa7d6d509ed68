"""What the teacher pool sends the student's pool for the loss-level support=topk (opd.teacher_pool): per token the
teachers' top-k ids (int32) and log-probs (fp32) at the loss temperature, plus the sampled token's log-prob at the
rollout temperature and its resolution for the alignment check. The tail mass (1 - sum of the top-k
probabilities) is not sent: the divergence computes it from the log-probs, as colocated.

The payload rides verl's reference pass: the pool's `compute_ref_log_prob` returns it beside `log_probs`, nested over
each sample's prompt + response like them (verl's own top-k distillation fields, `teacher_topk_*`, have the same
layout); TransferQueue stores it and hands it to the actor's micro-batches, split as the student's packed rows.

verl's engine hands a logits processor's outputs back only as 1-D per-token tensors (FSDPEngineWithLMHead.
prepare_model_outputs), so the pool's pass returns each of the k columns as its own key (`column_outputs`) and
`assemble` stacks them into one [L_i, k] field per sample.
"""

from __future__ import annotations

import torch

IDS_KEY = "opd_pool_topk_ids"
LOGP_KEY = "opd_pool_topk_logp"
LABEL_KEY = "opd_pool_label_logp"
RESOLUTION_KEY = "opd_pool_logit_resolution"
PAYLOAD_KEYS = (IDS_KEY, LOGP_KEY, LABEL_KEY, RESOLUTION_KEY)


def _column(key: str, j: int) -> str:
    return f"{key}_{j}"


def column_outputs(ids: torch.Tensor, logp: torch.Tensor, label: torch.Tensor, resolution: torch.Tensor) -> dict:
    """Per packed row [nnz]: the top-k ids [nnz, k] and log-probs [nnz, k] one column per key, the label log-prob
    and resolution; each [1, nnz] as verl's logits-processor hook wants them."""
    out = {LABEL_KEY: label, RESOLUTION_KEY: resolution}
    for j in range(ids.shape[-1]):
        out[_column(IDS_KEY, j)] = ids[:, j]
        out[_column(LOGP_KEY, j)] = logp[:, j]
    return {key: value.unsqueeze(0) for key, value in out.items()}


def assemble(output, k: int) -> dict:
    """verl's infer_batch output (each column nested over prompt + response) -> the payload fields: ids [L_i, k]
    int32, log-probs [L_i, k] fp32, label and resolution [L_i] fp32, nested over the same samples."""
    first = output[_column(IDS_KEY, 0)]
    offsets = first.offsets()

    def stacked(key, dtype):
        return torch.stack([output[_column(key, j)].values() for j in range(k)], -1).to(dtype)

    nested = torch.nested.nested_tensor_from_jagged
    return {
        IDS_KEY: nested(stacked(IDS_KEY, torch.int32), offsets),
        LOGP_KEY: nested(stacked(LOGP_KEY, torch.float32), offsets),
        LABEL_KEY: nested(output[LABEL_KEY].values().float(), offsets),
        RESOLUTION_KEY: nested(output[RESOLUTION_KEY].values().float(), offsets),
    }


def payload_rows(micro_batch, rows: torch.Tensor | None):
    """The payload of a student micro-batch's packed rows (all, or ``rows``): (ids long [n, k], log-probs [n, k],
    label [n], resolution [n])."""
    values = [micro_batch[key].values() for key in PAYLOAD_KEYS]
    if rows is not None:
        values = [v.index_select(0, rows.to(v.device)) for v in values]
    ids, logp, label, resolution = values
    return ids.long(), logp, label, resolution
