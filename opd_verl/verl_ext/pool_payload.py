"""What the teacher pool sends the student's pool for the loss-level support=topk|full (opd.teacher_pool), per token
the sampled token's log-prob at the rollout temperature and its resolution for the alignment check, and
- topk: the teachers' top-k ids (int32) and log-probs (fp32) at the loss temperature. The tail mass (1 - sum of
  the top-k probabilities) is not sent: the divergence computes it from the log-probs, as colocated;
- full: each teacher's final hidden state (the input of its lm_head, in its compute dtype); the student's process
  applies the teacher's output head (opd_verl.verl_ext.teacher_head) and the full-vocabulary divergence.

The payload rides verl's reference pass: the pool's `compute_ref_log_prob` returns it beside `log_probs`, nested over
each sample's prompt + response like them (verl's own top-k distillation fields, `teacher_topk_*`, have the same
layout); TransferQueue stores it and hands it to the actor's micro-batches, split as the student's packed rows.

verl's engine hands a logits processor's outputs back only as 1-D per-token tensors (FSDPEngineWithLMHead.
prepare_model_outputs), so the pool's pass returns each of the k (or H) columns as its own key (`column_outputs`,
`hidden_outputs`) and `assemble` / `assemble_hidden` stack them into one [L_i, k] (or [L_i, H]) field per sample.
"""

from __future__ import annotations

import torch

IDS_KEY = "opd_pool_topk_ids"
LOGP_KEY = "opd_pool_topk_logp"
LABEL_KEY = "opd_pool_label_logp"
RESOLUTION_KEY = "opd_pool_logit_resolution"
PAYLOAD_KEYS = (IDS_KEY, LOGP_KEY, LABEL_KEY, RESOLUTION_KEY)
HIDDEN_KEY = "opd_pool_hidden{index}"  # teacher ``index``'s final hidden state


def _column(key: str, j: int) -> str:
    return f"{key}_{j}"


def _columns(key: str, matrix: torch.Tensor) -> dict:
    return {_column(key, j): matrix[:, j] for j in range(matrix.shape[-1])}


def _width(output, key: str) -> int:
    """How many columns of ``key`` an output holds."""
    return sum(1 for name in output.keys() if name.startswith(f"{key}_") and name[len(key) + 1:].isdigit())


def _stacked(output, key: str, width: int, dtype=None) -> torch.Tensor:
    """The columns of ``key`` (each nested over the samples) as one [nnz, width] tensor."""
    stacked = torch.stack([output[_column(key, j)].values() for j in range(width)], -1)
    return stacked if dtype is None else stacked.to(dtype)


def column_outputs(ids: torch.Tensor, logp: torch.Tensor, label: torch.Tensor, resolution: torch.Tensor) -> dict:
    """Per packed row [nnz]: the top-k ids [nnz, k] and log-probs [nnz, k] one column per key, the label log-prob
    and resolution; each [1, nnz] as verl's logits-processor hook wants them."""
    out = {LABEL_KEY: label, RESOLUTION_KEY: resolution, **_columns(IDS_KEY, ids), **_columns(LOGP_KEY, logp)}
    return {key: value.unsqueeze(0) for key, value in out.items()}


def hidden_outputs(hidden: list[torch.Tensor], label: torch.Tensor, resolution: torch.Tensor) -> dict:
    """Per packed row [nnz]: each teacher's final hidden state [nnz, H] one column per key, the label log-prob and
    resolution; each [1, nnz]."""
    out = {LABEL_KEY: label, RESOLUTION_KEY: resolution}
    for index, h in enumerate(hidden):
        out.update(_columns(HIDDEN_KEY.format(index=index), h))
    return {key: value.unsqueeze(0) for key, value in out.items()}


def assemble(output, k: int) -> dict:
    """verl's infer_batch output (each column nested over prompt + response) -> the payload fields: ids [L_i, k]
    int32, log-probs [L_i, k] fp32, label and resolution [L_i] fp32, nested over the same samples."""
    offsets = output[_column(IDS_KEY, 0)].offsets()
    nested = torch.nested.nested_tensor_from_jagged
    return {
        IDS_KEY: nested(_stacked(output, IDS_KEY, k, torch.int32), offsets),
        LOGP_KEY: nested(_stacked(output, LOGP_KEY, k, torch.float32), offsets),
        LABEL_KEY: nested(output[LABEL_KEY].values().float(), offsets),
        RESOLUTION_KEY: nested(output[RESOLUTION_KEY].values().float(), offsets),
    }


def assemble_hidden(output, teachers: int) -> dict:
    """verl's infer_batch output -> the support=full payload fields: each teacher's hidden states [L_i, H] (their
    dtype), label and resolution [L_i] fp32, nested over the samples."""
    offsets = output[LABEL_KEY].offsets()
    nested = torch.nested.nested_tensor_from_jagged
    fields = {LABEL_KEY: nested(output[LABEL_KEY].values().float(), offsets),
              RESOLUTION_KEY: nested(output[RESOLUTION_KEY].values().float(), offsets)}
    for index in range(teachers):
        key = HIDDEN_KEY.format(index=index)
        fields[key] = nested(_stacked(output, key, _width(output, key)), offsets)
    return fields


def hidden_rows(micro_batch, rows: torch.Tensor | None, teachers: int):
    """The support=full payload of a micro-batch's packed rows (all, or ``rows``): ([hidden [n, H] per teacher],
    label [n], resolution [n])."""
    keys = [HIDDEN_KEY.format(index=i) for i in range(teachers)] + [LABEL_KEY, RESOLUTION_KEY]
    values = [micro_batch[key].values() for key in keys]
    if rows is not None:
        values = [v.index_select(0, rows.to(v.device)) for v in values]
    return values[:teachers], values[teachers], values[teachers + 1]


def payload_rows(micro_batch, rows: torch.Tensor | None):
    """The payload of a student micro-batch's packed rows (all, or ``rows``): (ids long [n, k], log-probs [n, k],
    label [n], resolution [n])."""
    values = [micro_batch[key].values() for key in PAYLOAD_KEYS]
    if rows is not None:
        values = [v.index_select(0, rows.to(v.device)) for v in values]
    ids, logp, label, resolution = values
    return ids.long(), logp, label, resolution
