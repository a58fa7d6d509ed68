"""The teacher pool's loss-level top-k payload (opd_verl.verl_ext.pool_payload, OPDWorker._topk_processor /
pool_teacher_pass): produced by the teacher's own engine pass (verl's prepare_model_outputs with our processor),
carried as nested fields, consumed by the student's loss: the same loss, gradient and metrics as the colocated
loss-level pass on the same micro-batch."""

from functools import partial

import pytest
import torch

from opd_verl.verl_ext.distill_actor_loss import opd_actor_loss
from opd_verl.verl_ext.pool_payload import IDS_KEY, LABEL_KEY, LOGP_KEY, RESOLUTION_KEY, assemble, payload_rows
from test_actor_loss import LOSS_CASES, OPD, VOCAB, bare_engine, loss_case, opd_worker, tiny_model

FP32 = 1e-6  # the payload's log-probs are fp32; everything else here is float64


def _student_pass(student, batch, opd, teacher_fn):
    """verl's student pass of the loss-level mode with our actor loss as its logits processor."""
    engine = bare_engine(student)
    inputs, output_args = engine.prepare_model_inputs(micro_batch=batch)
    output = engine.module(**inputs, use_cache=False)
    processor = partial(opd_actor_loss, config=None, opd=opd, teacher_logits_fn=teacher_fn)
    return engine.prepare_model_outputs(output, output_args, batch, processor)


def student_loss(batch, opd, config, teacher_fn):
    """The student's loss-level loss on ``batch`` with ``teacher_fn`` as its teacher pass: (loss, gradient w.r.t.
    the student's parameters, the aggregated metrics)."""
    student = tiny_model(0, logit_scale=3.0)
    model_output = _student_pass(student, batch, opd, teacher_fn)
    loss, metrics = opd_actor_loss(config, opd, None, model_output=model_output, data=batch)
    return loss, torch.autograd.grad(loss, list(student.parameters())), {n: float(m.aggregate()) for n, m in
                                                                         metrics.items()}


def _pool_payload(worker, batch, k):
    """The pool's payload pass: the first teacher's engine (verl's prepare_model_inputs / model /
    prepare_model_outputs) with the pool's processor, its per-token outputs assembled as the pool sends them."""
    engine = worker.teachers[0].engine
    inputs, output_args = engine.prepare_model_inputs(micro_batch=batch)
    with torch.no_grad():
        output = engine.module(**inputs, use_cache=False)
    model_output = engine.prepare_model_outputs(output, output_args, batch, worker._topk_processor())
    return assemble(model_output, k)


@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd"])
@pytest.mark.parametrize("teachers,mode,temperature,remove_padding", LOSS_CASES)
def test_pool_topk_loss_equals_the_colocated_loss(divergence, teachers, mode, temperature, remove_padding):
    tau, k = 1.3, 4
    opd = {**OPD, "support": "topk", "divergence": divergence, "temperature": tau, "topk": k, "beta": 0.3,
           "chunk_size": 2, "lambda_rl": 0.0, "lambda_distill": 1.0}
    case = loss_case(teachers, mode, temperature, remove_padding)
    batch, teacher_models, weights, config = case.batch, case.teacher_models, case.weights, case.config

    loss_and_grads = partial(student_loss, batch, opd, config)
    colocated = opd_worker(teacher_models, opd, mode, weights)
    loss_c, grads_c, metrics_c = loss_and_grads(colocated.teacher_logits)

    pool = opd_worker(teacher_models, opd, mode, weights)
    pool._opd_shared_vocab = VOCAB  # the configs' vocab_size (no model directory here)
    payload = _pool_payload(pool, batch, k)
    assert payload[IDS_KEY].dtype == torch.int32 and payload[IDS_KEY].values().shape[-1] == k
    assert payload[LOGP_KEY].values().dtype == torch.float32  # sent in fp32: ~1e-7 relative off this float64 run
    for key, value in payload.items():  # nested over prompt + response, as verl's reference output
        assert torch.equal(value.offsets(), batch["input_ids"].offsets()), key
        batch[key] = value
    ids, logp, label, resolution = payload_rows(batch, None)
    assert ids.shape == (int(batch["input_ids"].offsets()[-1]), k)
    loss_p, grads_p, metrics_p = loss_and_grads(pool.pool_teacher_pass)

    assert float(loss_p.detach()) == pytest.approx(float(loss_c.detach()), rel=FP32, abs=FP32)
    for g, g_ref in zip(grads_p, grads_c):
        assert (g - g_ref).abs().max() <= FP32 * max(1.0, float(g_ref.abs().max()))
    for name in ("opd/divergence_per_token", "opd/topk_mass", "opd/student_topk_mass", "opd/topk_overlap",
                 "opd/teacher_alignment_seq_median_max"):
        assert metrics_p[name] == pytest.approx(metrics_c[name], rel=FP32, abs=FP32), name
    for key in (LABEL_KEY, RESOLUTION_KEY):
        assert key in payload


def test_payload_rows_selects_the_rows():
    offsets = torch.tensor([0, 3, 5])
    ids = torch.arange(10, dtype=torch.int32).view(5, 2)
    logp = -torch.arange(10, dtype=torch.float32).view(5, 2)
    flat = torch.arange(5, dtype=torch.float32)
    batch = {IDS_KEY: torch.nested.nested_tensor_from_jagged(ids, offsets),
             LOGP_KEY: torch.nested.nested_tensor_from_jagged(logp, offsets),
             LABEL_KEY: torch.nested.nested_tensor_from_jagged(flat, offsets),
             RESOLUTION_KEY: torch.nested.nested_tensor_from_jagged(flat * 2, offsets)}
    rows = torch.tensor([1, 4])
    got_ids, got_logp, got_label, got_res = payload_rows(batch, rows)
    assert got_ids.dtype == torch.long and got_ids.tolist() == [[2, 3], [8, 9]]
    assert got_logp.tolist() == [[-2.0, -3.0], [-8.0, -9.0]]
    assert got_label.tolist() == [1.0, 4.0] and got_res.tolist() == [2.0, 8.0]
