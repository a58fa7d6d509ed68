"""The teacher's own view in the reference pass (issue 14): its batch in verl's layout, and its log-probs back in the
student's.

verl 0.9.1 hands `compute_ref_log_prob` the batch as stored in TransferQueue: a TensorDict whose token fields are
jagged nested tensors over the samples (``input_ids`` = prompt + response, no padding; ``position_ids``;
``prompts``; ``responses``; ``response_mask``; ``old_log_probs`` over the response, written by the student's pass
just before) and whose dataset columns are per-sample non-tensor stacks (``raw_prompt``: the chat messages;
``extra_info``, ``reward_model``, ``data_source``, ...), plus batch-level non-tensor data (``temperature``, ...).
The reference output is ``log_probs`` nested over ``input_ids``: position j holds the log-prob of token j + 1, so a
sample's response log-probs are at [L - R - 1, L - 1) (verl's `response_from_nested`).

For a teacher with a view:

1. `sample_fields`: each sample's fields (``prompt`` = ``raw_prompt``) for `teacher_view.build_teacher_prompt`;
2. `teacher_inputs`: the teacher's prompt ids, its response ids (the student's, or with ``cross_tokenizer`` the
   student's response re-encoded, `token_alignment.teacher_response_ids`) and response mask;
3. `teacher_tensordict`: the teacher's batch in the same layout, the batch-level settings copied;
4. the teacher's ``infer_batch``; `response_log_probs` takes its response log-probs;
5. `student_view`: per student response token, the teacher log-prob the advantage path reads (same tokenizer: the
   teacher's own; cross tokenizer: `span_terms`'s teacher_view, s + the span term), `student_layout` puts them
   where verl's reference output has them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from tensordict import NonTensorData, NonTensorStack, TensorDict

from opd_verl.algorithms.teacher_view import build_teacher_prompt
from opd_verl.algorithms.token_alignment import (
    AlignmentStats,
    batch_token_bytes,
    span_terms,
    teacher_response_ids,
)
from opd_verl.checks.teachers import view_mode

#: the per-sample tensor field a cross-tokenizer teacher's alignment counts travel in (one per teacher index):
#: [B, len(AlignmentStats._fields)], the rank's totals in row 0 and zeros elsewhere, so that the sum over any
#: batch's rows is the batch's counts, whatever the ranks and the order
ALIGNMENT_FIELD = "opd_alignment_counts_{index}"


class TeacherView(NamedTuple):
    """One teacher's view: its prompt option, wrap_chat, cross_tokenizer and its tokenizer."""

    prompt: Any
    wrap_chat: bool
    cross_tokenizer: bool
    tokenizer: Any

    @property
    def mode(self) -> str:
        return view_mode(self.prompt)

    @property
    def template(self):
        return self.prompt if self.mode == "template" else None


def special_map(student_tok, teacher_tok) -> dict[int, int]:
    """The student's special tokens matched with the teacher's: its eos with the teacher's eos (the others are
    masked by the alignment)."""
    s, t = getattr(student_tok, "eos_token_id", None), getattr(teacher_tok, "eos_token_id", None)
    return {int(s): int(t)} if s is not None and t is not None else {}


def _nested(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.nested.as_nested_tensor(list(rows), layout=torch.jagged)


def _rows(tensor: torch.Tensor) -> list[torch.Tensor]:
    return list(tensor.unbind()) if tensor.is_nested else list(tensor)


def sample_fields(data: TensorDict) -> list[dict]:
    """Each sample's fields: the per-sample non-tensor columns (verl's dataset row), with ``prompt`` = its
    ``raw_prompt`` (the chat messages verl's dataset built), and the batch-level non-tensor values under them."""
    size = data.batch_size[0]
    shared, per_sample = {}, {}
    for key in data.keys():
        value = data.get(key)
        if isinstance(value, NonTensorStack):
            per_sample[key] = value.tolist()
        elif isinstance(value, NonTensorData):
            shared[key] = value.data
    samples = []
    for i in range(size):
        sample = {**shared, **{k: v[i] for k, v in per_sample.items()}}
        if sample.get("raw_prompt") is not None:
            sample["prompt"] = list(sample["raw_prompt"])
        samples.append(sample)
    return samples


class TeacherInputs(NamedTuple):
    prompts: list[list[int]]
    responses: list[list[int]]
    response_masks: list[torch.Tensor]
    student_bytes: list | None  # the student's response TokenBytes (cross tokenizer)
    teacher_bytes: list | None


def teacher_inputs(view: TeacherView, data: TensorDict, student_tok=None) -> TeacherInputs:
    """The teacher's prompt ids, response ids and response mask of each sample of ``data``."""
    if "multi_modal_inputs" in data.keys() and any(x for x in (data.get("multi_modal_inputs").tolist()
                                                               if isinstance(data.get("multi_modal_inputs"),
                                                                             NonTensorStack) else [])):
        raise RuntimeError("opd_verl: a teacher's own view (opd.teacher.prompt/cross_tokenizer) is text only; this "
                           "batch has multi-modal inputs")
    samples = sample_fields(data)
    student_prompts = [p.tolist() for p in _rows(data["prompts"])]
    student_responses = [r.tolist() for r in _rows(data["responses"])]
    prompts = [
        list(build_teacher_prompt(view.mode, sample, ids, view.tokenizer, view.template, view.wrap_chat))
        for sample, ids in zip(samples, student_prompts)
    ]
    if not view.cross_tokenizer:
        masks = [m.to(torch.float32) for m in _rows(data["response_mask"])]
        return TeacherInputs(prompts, student_responses, masks, None, None)
    student_bytes = batch_token_bytes(student_tok, student_responses, verify=False)
    responses = teacher_response_ids(student_bytes, view.tokenizer, special_map(student_tok, view.tokenizer))
    teacher_bytes = batch_token_bytes(view.tokenizer, responses, verify=False)
    masks = [torch.ones(len(r), dtype=torch.float32) for r in responses]
    return TeacherInputs(prompts, responses, masks, student_bytes, teacher_bytes)


def teacher_tensordict(data: TensorDict, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                       response_masks: Sequence[torch.Tensor]) -> TensorDict:
    """The teacher's batch in verl's nested layout: input_ids = its prompt + response, position_ids 0..L-1,
    prompts, responses, response_mask (= loss_mask), attention_mask; ``data``'s batch-level non-tensor settings
    (temperature, calculate_entropy, compute_loss, ...) and per-sample columns copied; a per-sample temperature
    tensor too; global_token_num (verl's MFU count) becomes the teacher's lengths."""
    p = [torch.as_tensor(list(x), dtype=torch.long) for x in prompts]
    r = [torch.as_tensor(list(x), dtype=torch.long) for x in responses]
    seqs = [torch.cat([a, b]) for a, b in zip(p, r)]
    masks = [torch.as_tensor(m, dtype=torch.float32) for m in response_masks]
    fields = {
        "input_ids": _nested(seqs),
        "position_ids": _nested([torch.arange(len(x)) for x in seqs]),
        "prompts": _nested(p),
        "responses": _nested(r),
        "response_mask": _nested(masks),
        "loss_mask": _nested(masks),
        "attention_mask": _nested([torch.ones(len(x), dtype=torch.long) for x in seqs]),
    }
    out = TensorDict(fields, batch_size=[len(seqs)])
    for key in data.keys():
        value = data.get(key)
        if isinstance(value, (NonTensorData, NonTensorStack)) and key not in fields:
            out.set(key, value)
    if "temperature" in data.keys() and isinstance(data.get("temperature"), torch.Tensor):
        out["temperature"] = data["temperature"]
    if "global_token_num" in data.keys():
        out.set("global_token_num", NonTensorData([len(x) for x in seqs]))
    return out


def response_log_probs(log_probs: torch.Tensor, response_lengths: Sequence[int]) -> list[torch.Tensor]:
    """Each sample's response log-probs from verl's reference output (nested over prompt + response): positions
    [L - R - 1, L - 1)."""
    values, offsets = log_probs.values(), log_probs.offsets()
    return [values[int(end) - int(n) - 1:int(end) - 1] for n, end in zip(response_lengths, offsets[1:])]


def student_layout(per_response: Sequence[torch.Tensor], input_ids: torch.Tensor) -> torch.Tensor:
    """Response log-probs placed where verl's reference output has them for the student's ``input_ids`` (nested):
    [L - R - 1, L - 1) of each sample, 0 at the prompt positions and the last one (never read)."""
    lengths = input_ids.offsets().diff().tolist() if input_ids.is_nested else [input_ids.shape[-1]] * len(input_ids)
    dtype = per_response[0].dtype if per_response else torch.float32
    rows = []
    for values, length in zip(per_response, lengths):
        row = torch.zeros(length, dtype=dtype)
        n = values.numel()
        row[length - n - 1:length - 1] = values
        rows.append(row)
    return _nested(rows)


class ViewOutput(NamedTuple):
    log_probs: torch.Tensor  # nested over the student's input_ids (verl's reference layout)
    stats: AlignmentStats | None


def student_view(view: TeacherView, inputs: TeacherInputs, teacher_log_probs: torch.Tensor, data: TensorDict,
                 student_tok=None) -> ViewOutput:
    """The teacher's log-probs for the student's response tokens, in verl's reference layout over the student's
    input_ids. Same tokenizer: the teacher's own log-probs of the student's tokens. Cross tokenizer: `span_terms`
    with s = the student's old_log_probs, strict=False (a response whose text the teacher's tokenizer does not
    reproduce is aligned up to the first difference; counted in mismatched_samples): s_t + term_t, so that the
    advantage path's q_t − s_t is each span's term on its last student token and 0 on the others."""
    teacher_resp = response_log_probs(teacher_log_probs, [len(r) for r in inputs.responses])
    if not view.cross_tokenizer:
        return ViewOutput(student_layout(teacher_resp, data["input_ids"]), None)
    if "old_log_probs" not in data.keys():
        raise RuntimeError("opd_verl: cross_tokenizer=true needs the student's old_log_probs in the reference pass's "
                           "batch (verl computes them just before); they are missing")
    s = _rows(data["old_log_probs"])
    terms = span_terms(inputs.student_bytes, inputs.teacher_bytes, s, teacher_resp,
                       special_map=special_map(student_tok, view.tokenizer), assign="last", strict=False)
    counts = terms.offsets.diff().tolist()
    per_response = list(torch.split(terms.teacher_view.to(s[0].dtype if s else torch.float32), counts))
    return ViewOutput(student_layout(per_response, data["input_ids"]), terms.stats)


def alignment_counts(stats: AlignmentStats, batch_size: int) -> torch.Tensor:
    """``stats`` as a [B, K] tensor with the counts in row 0 (see ALIGNMENT_FIELD)."""
    out = torch.zeros(batch_size, len(AlignmentStats._fields), dtype=torch.float64)
    if batch_size:
        out[0] = torch.tensor([float(v) for v in stats], dtype=torch.float64)
    return out


def alignment_metrics(counts: torch.Tensor) -> dict[str, float]:
    """The alignment metrics of a batch from its ALIGNMENT_FIELD rows (summed; TransferQueue returns them as a
    nested tensor, one row per sample)."""
    if counts.is_nested:
        counts = torch.stack(list(counts.unbind()))
    total = counts.to(torch.float64).sum(0).round().long().tolist()
    return AlignmentStats(*total).metrics()


def infer_with_view(teacher, view: TeacherView, data: TensorDict, student_tok=None,
                    index: int = 0) -> TensorDict | None:
    """One teacher's reference pass with its view: its own batch through its ``infer_batch``, the output's
    log_probs in the student's layout (other per-token outputs of the teacher's layout are dropped), and for a
    cross-tokenizer teacher its alignment counts under ALIGNMENT_FIELD."""
    inputs = teacher_inputs(view, data, student_tok)
    batch = teacher_tensordict(data, inputs.prompts, inputs.responses, inputs.response_masks)
    output = teacher.infer_batch(data=batch)
    if output is None:
        return None
    result = student_view(view, inputs, output["log_probs"], data, student_tok)
    for key in list(output.keys()):
        if isinstance(output.get(key), torch.Tensor):
            del output[key]
    output.batch_size = data.batch_size
    output["log_probs"] = result.log_probs
    if result.stats is not None:
        output[ALIGNMENT_FIELD.format(index=index)] = alignment_counts(result.stats, data.batch_size[0])
    return output
