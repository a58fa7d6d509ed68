"""The teacher pool's loss-level support=full (opd_verl.verl_ext.pool_payload hidden fields, OPDWorker.
_hidden_processor / pool_teacher_pass, opd_verl.verl_ext.teacher_head): the teachers' final hidden states made by
the teacher engine's own pass, their output heads read from the checkpoints, give the colocated loss, gradient and
metrics; and each known head reproduces its model's logits from the final hidden state."""

from functools import partial

import pytest
import torch

from opd_verl.algorithms.output_head import head_ops
from opd_verl.verl_ext.pool_payload import assemble_hidden, hidden_rows
from opd_verl.verl_ext.teacher_head import load_teacher_head
from opd_verl.verl_ext.teacher_worker import _final_hidden
from test_actor_loss import LOSS_CASES, OPD, VOCAB, loss_case, opd_worker
from test_pool_payload import student_loss

F64 = torch.float64
REL = 1e-10  # everything here is float64, the hidden states too


def _hidden_payload(worker, batch, teachers):
    """The pool's support=full payload pass: the first teacher's engine with the pool's processor (which runs
    every teacher), assembled as the pool sends it."""
    engine = worker.teachers[0].engine
    inputs, output_args = engine.prepare_model_inputs(micro_batch=batch)
    with torch.no_grad():
        output = engine.module(**inputs, use_cache=False)
    return assemble_hidden(engine.prepare_model_outputs(output, output_args, batch, worker._hidden_processor()),
                           teachers)


ROUTE_CASE = (2, "route", 0.75, True)


@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd"])
@pytest.mark.parametrize("teachers,mode,temperature,remove_padding", LOSS_CASES + [ROUTE_CASE])
def test_pool_full_loss_equals_the_colocated_loss(tmp_path, divergence, teachers, mode, temperature,
                                                  remove_padding):
    opd = {**OPD, "support": "full", "divergence": divergence, "temperature": 1.3, "beta": 0.3, "chunk_size": 2,
           "lambda_rl": 0.0, "lambda_distill": 1.0}
    case = loss_case(teachers, "mean_prob" if mode == "route" else mode, temperature, remove_padding)
    batch, teacher_models, weights, config = case.batch, case.teacher_models, case.weights, case.config
    if mode == "route":  # samples 0 and 2 to teacher 0, sample 1 to teacher 1; ref_log_prob of each one's teacher
        from tensordict import NonTensorStack

        batch["data_source"] = NonTensorStack("a", "b", "a")
        routes = [{"data_source": "a"}, {"data_source": "b"}]
    else:
        routes = [{} for _ in range(teachers)]

    loss_and_grads = partial(student_loss, batch, opd, config)

    def worker():
        w = opd_worker(teacher_models, opd, mode, weights)
        w.teacher_entries = [{**e, **r} for e, r in zip(w.teacher_entries, routes)]
        return w

    colocated = worker()
    if mode == "route":  # the reference pass of the routed teachers (the alignment check compares with it)
        batch["ref_log_prob"] = _routed_ref_log_prob(colocated, batch)
    loss_c, grads_c, metrics_c = loss_and_grads(colocated.teacher_logits)

    pool = worker()  # the teachers' side
    payload = _hidden_payload(pool, batch, teachers)
    for key, value in payload.items():  # nested over prompt + response, as verl's reference output
        assert torch.equal(value.offsets(), batch["input_ids"].offsets()), key
        batch[key] = value
    hidden, _, _ = hidden_rows(batch, None, teachers)
    assert [h.shape[-1] for h in hidden] == [16] * teachers and hidden[0].dtype == F64
    actor = worker()  # the student's side: no teacher model, the heads read from the teachers' checkpoints
    del actor.teachers
    paths = []
    for i, m in enumerate(teacher_models):
        m.save_pretrained(tmp_path / f"t{i}")
        paths.append(str(tmp_path / f"t{i}"))
    actor.teacher_entries = [{**e, "path": p} for e, p in zip(actor.teacher_entries, paths)]
    loss_p, grads_p, metrics_p = loss_and_grads(actor.pool_teacher_pass)

    assert float(loss_p.detach()) == pytest.approx(float(loss_c.detach()), rel=REL, abs=REL)
    for g, g_ref in zip(grads_p, grads_c):
        assert (g - g_ref).abs().max() <= REL * max(1.0, float(g_ref.abs().max()))
    for name in ("opd/divergence_per_token", "opd/topk_mass", "opd/distill_loss",
                 "opd/teacher_alignment_seq_median_max"):
        assert metrics_p[name] == pytest.approx(metrics_c[name], rel=REL, abs=REL), name


def _routed_ref_log_prob(worker, batch):
    """verl's reference pass under route: each sample's own teacher's log-prob of its sampled tokens at T."""
    from opd_verl.algorithms.teachers import label_log_probs, route_rows
    from opd_verl.verl_ext.distill_actor_loss import packed_logits
    from verl.workers.utils.padding import no_padding_2_padding

    per_teacher, labels = [], None
    for t in worker.teachers:
        inputs, output_args = t.engine.prepare_model_inputs(micro_batch=batch)
        with torch.no_grad():
            z = packed_logits(t.engine.module(**inputs, use_cache=False).logits, batch, output_args)
        labels = output_args["input_ids_rmpad_rolled"]
        per_teacher.append(label_log_probs(z, labels, 0.75, F64))
    lengths = batch["input_ids"].offsets().diff()
    routed = route_rows(per_teacher, worker._sample_teachers(batch), lengths)
    padded = no_padding_2_padding(routed, batch)
    responses = batch["response_mask"].offsets().diff().tolist()
    return torch.nested.as_nested_tensor([padded[i, :n] for i, n in enumerate(responses)], layout=torch.jagged)


def _tiny(model_type, **extra):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model(model_type, vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                            head_dim=8, **extra)
    return transformers.AutoModelForCausalLM.from_config(cfg).to(F64).eval()


@pytest.mark.parametrize("model_type,extra", [
    ("qwen2", {"tie_word_embeddings": True}),
    ("gemma2", {"final_logit_softcapping": 0.5}),
    ("cohere", {"logit_scale": 0.37}),
    ("granite", {"logits_scaling": 3.0}),
])
def test_the_head_read_from_the_checkpoint_gives_the_models_logits(tmp_path, model_type, extra):
    model = _tiny(model_type, **extra)
    model.save_pretrained(tmp_path)
    ids = torch.randint(0, VOCAB, (2, 5))
    captured = []
    with torch.no_grad(), _final_hidden(model, captured):
        logits = model(input_ids=ids).logits
    head = load_teacher_head(str(tmp_path))
    ours = head.logits(captured[0])
    assert (ours - logits).abs().max() <= 1e-12 * max(1.0, float(logits.abs().max()))
    plain = torch.nn.functional.linear(captured[0], head.weight)  # the scaling / capping is not a no-op here
    assert model_type == "qwen2" or (plain - logits).abs().max() > 1e-3


def test_an_unknown_architecture_is_refused_by_name():
    with pytest.raises(ValueError, match="model_type 'mamba'"):
        head_ops({"model_type": "mamba"})


def test_the_head_computes_in_the_hidden_states_dtype_under_the_callers_autocast(tmp_path):
    """The student's loss runs under the actor's autocast; the teacher's head keeps the teacher's precision (the
    dtype the pool sent its hidden states in)."""
    model = _tiny("qwen2").float()
    model.save_pretrained(tmp_path)
    head = load_teacher_head(str(tmp_path))
    hidden = torch.randn(4, 16)
    plain = head.logits(hidden)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        under = head.logits(hidden)
    assert under.dtype == torch.float32 and torch.equal(under, plain)


def test_the_final_hidden_state_is_captured_in_the_autocast_dtype(tmp_path):
    """Under the teacher engine's autocast (bf16 on GPU) lm_head computes in bf16: the pool sends the hidden state
    in bf16 (2H bytes a token) and the head rebuilds the model's bf16 logits from it."""
    model = _tiny("qwen2").float()
    model.save_pretrained(tmp_path)
    ids = torch.randint(0, VOCAB, (2, 5))
    captured = []
    with torch.no_grad(), torch.autocast(device_type="cpu", dtype=torch.bfloat16), _final_hidden(model, captured):
        logits = model(input_ids=ids).logits
    assert captured[0].dtype == torch.bfloat16 and logits.dtype == torch.bfloat16
    ours = load_teacher_head(str(tmp_path)).logits(captured[0])
    assert ours.dtype == torch.bfloat16
    assert (ours.float() - logits.float()).abs().max() <= torch.finfo(torch.bfloat16).eps * float(logits.abs().max())
