"""Pieces of the loss-level distillation (opd_verl.verl_ext.distill_actor_loss, opd_verl.verl_ext.teacher_worker)
against brute force.

The composition tests run verl 0.9.1's own FSDPEngineWithLMHead.prepare_model_inputs / prepare_model_outputs (the
code that scales the student's logits by the rollout temperature and calls our logits processor) on tiny real
transformers models, without FSDP or a process group (an engine object holding just the attributes those two
methods read).
"""

import math
from functools import partial
from types import SimpleNamespace

import pytest
import torch

from opd_verl.algorithms.divergences import full_divergence, topk_divergence
from opd_verl.algorithms.teachers import (
    label_log_probs,
    mean_logit_label_log_probs,
    mix_log_probs,
    mix_teacher_logits,
    mixture_label_log_probs,
    route_rows,
    teacher_mixture_at,
)
from opd_verl.verl_ext.distill_actor_loss import (
    DISTILL_KEY,
    TEACHER_LABEL_KEY,
    alignment_statistics,
    check_alignment,
    distill_token_values,
    opd_actor_loss,
    packed_logits,
    packed_rollout_temperature,
    response_rows,
    rollout_temperature,
    sampled_distill_loss_matrix,
    shared_vocab,
    student_at_loss_temperature,
    teacher_pass,
    verl_temperature,
)

OPD = {"divergence": "jsd", "beta": 0.5, "temperature": 1.0, "chunk_size": 3, "topk": 4, "support": "full"}
F64 = torch.float64


def nested(rows):
    return torch.nested.nested_tensor(rows, layout=torch.jagged)


# ----------------------------------------------------------------------------------------------------------
# packed layout and temperatures
# ----------------------------------------------------------------------------------------------------------
def test_packed_logits_right_padded_rows_are_raw():
    lengths = [3, 1, 2]
    ids = nested([torch.arange(n) for n in lengths])
    logits = torch.randn(3, 4, 5, dtype=F64)
    temperature = torch.tensor([1.0, 2.0, 0.5], dtype=F64)
    packed = packed_logits(logits, {"input_ids": ids}, {"temperature": temperature})
    assert torch.equal(packed, torch.cat([logits[i, :n] for i, n in enumerate(lengths)]))  # no temperature
    per_row = packed_rollout_temperature({"input_ids": ids}, {"temperature": temperature})
    assert torch.equal(per_row, torch.tensor([1.0, 1.0, 1.0, 2.0, 0.5, 0.5]))


def test_packed_logits_remove_padding_layout():
    logits = torch.randn(1, 6, 5)
    out = packed_logits(logits, {"input_ids": None}, {"temperature_rmpad": torch.full((6,), 0.7)})
    assert torch.equal(out, logits[0])
    assert packed_rollout_temperature({}, {"temperature_rmpad": torch.full((6,), 0.7)}) == pytest.approx(0.7)


def test_rollout_temperature_of_a_micro_batch():
    ids = nested([torch.arange(2), torch.arange(3)])
    assert rollout_temperature({"input_ids": ids, "temperature": 0.7}, 5) == pytest.approx(0.7)
    assert rollout_temperature({"input_ids": ids}, 5) == 1.0
    per_row = rollout_temperature({"input_ids": ids, "temperature": torch.tensor([0.5, 2.0])}, 7)
    assert torch.equal(per_row, torch.tensor([0.5, 0.5, 2.0, 2.0, 2.0, 1.0, 1.0]))  # engine pad rows: 1


def verl_scaled(logits, temperature):
    """verl 0.9.1's division of packed logits by the rollout temperature (float32 per row, as prepare_model_inputs
    makes it), its own function."""
    from verl.workers.engine.fsdp.transformer_impl import _scale_logits_by_temperature

    t = torch.as_tensor(temperature, dtype=torch.float32).expand(logits.shape[0])
    return _scale_logits_by_temperature(logits, t.unsqueeze(-1), is_unit_temperature=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, F64])
def test_verl_temperature_is_the_value_verl_divides_by(dtype):
    z = (torch.randn(4, 9, generator=torch.Generator().manual_seed(0), dtype=F64) * 5).to(dtype)
    for t in (0.7, 0.9, 1.3):
        assert torch.equal(verl_scaled(z, t), z / torch.tensor(verl_temperature(t, dtype), dtype=dtype))
    per_row = torch.tensor([0.7, 0.9, 1.0, 1.3])
    assert torch.equal(verl_scaled(z, per_row), z / verl_temperature(per_row, dtype).to(dtype).unsqueeze(-1))
    assert verl_temperature(0.7, torch.bfloat16) == 0.69921875 and verl_temperature(1.0, torch.bfloat16) == 1.0


def bf16_logits_verl_divides_exactly(temperature, rows=6, vocab=11, seed=0):
    """bf16 logits z with z / bf16(T) exact in bf16: y = ±2^k and z = y·bf16(T) (bf16(0.7) = 179/256 and
    bf16(0.9) = 115/128 have at most 8 significant bits, so z is a bf16 number), so that verl's division rounds
    nothing and the distribution at τ can be compared with softmax(z / τ) to float precision."""
    g = torch.Generator().manual_seed(seed)
    sign = torch.randint(0, 2, (rows, vocab), generator=g) * 2 - 1
    y = (sign * 2.0 ** torch.randint(-2, 4, (rows, vocab), generator=g)).to(F64)
    t = torch.as_tensor(temperature, dtype=torch.float32).expand(rows).to(torch.bfloat16).to(F64)
    z = (y * t.unsqueeze(-1)).to(torch.bfloat16)
    assert torch.equal(z.double(), y * t.unsqueeze(-1))  # exact in bf16
    return z, y


@pytest.mark.parametrize("tau", [1.0, 1.3])
@pytest.mark.parametrize("per_row", [False, True])
def test_the_student_at_tau_undoes_the_bf16_temperature_verl_divided_by(tau, per_row):
    """bf16 student logits at rollout temperature 0.7: verl divides by bf16(0.7) = 0.69921875; the student's
    distribution at τ is softmax(z / τ) of the original logits to float precision. Undoing the exact 0.7 (the code
    before) leaves it at τ·0.69921875/0.7 (0.11% off)."""
    t = torch.tensor([0.7, 0.9, 1.0, 0.7, 0.9, 0.7]) if per_row else 0.7
    z, y = bf16_logits_verl_divides_exactly(t)
    divided = verl_scaled(z, t)
    assert torch.equal(divided.double(), y)  # what the loss receives
    logits, divisor = student_at_loss_temperature(divided, t, tau)
    expected = torch.log_softmax(z.double() / tau, -1)
    assert (torch.log_softmax(logits.double() / divisor, -1) - expected).abs().max() < 1e-5
    exact_t = torch.as_tensor(t, dtype=F64).expand(6).unsqueeze(-1)
    assert (torch.log_softmax(divided.double() * exact_t / tau, -1) - expected).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["one", "mean_prob", "mean_logit", "route"])
def test_teacher_label_log_prob_at_T_is_verls_reference_pass_for_bf16_logits(mode):
    """The teachers' sampled-token log-prob at T (teacher_pass, for the alignment check) divides each teacher's
    bf16 logits by bf16(T), as verl's reference pass: equal to log_softmax(verl's divided logits) to float
    precision, per mixture; the exact T (the code before) is off by more than 1e-3."""
    k = 1 if mode == "one" else 2
    raw, verl_ref = zip(*[bf16_logits_verl_divides_exactly(0.7, seed=s) for s in range(k)])
    assert all(torch.equal(verl_scaled(z, 0.7).double(), y) for z, y in zip(raw, verl_ref))
    labels = torch.randint(0, 11, (6,), generator=torch.Generator().manual_seed(9))
    weights, lengths, sample_teacher = [3.0, 1.0][:k], torch.tensor([2, 4]), torch.tensor([1, 0])
    route = sample_teacher if mode == "route" else None
    ours = teacher_pass(list(raw), labels, 0.7, 1.3, weights, "mean_prob" if mode == "one" else mode, route,
                        lengths, chunk_size=4).label_log_prob

    def expected(logits_at_t):  # the mixture of verl's per-teacher reference log-probs, float64
        if mode == "mean_logit":
            return label_log_probs(0.75 * logits_at_t[0] + 0.25 * logits_at_t[1], labels, dtype=F64)
        per_teacher = [label_log_probs(y, labels, dtype=F64) for y in logits_at_t]
        if mode == "route":
            return route_rows(per_teacher, sample_teacher, lengths)
        return per_teacher[0] if k == 1 else mix_log_probs(per_teacher, weights)

    assert (ours.double() - expected(verl_ref)).abs().max() < 1e-5
    assert (expected([z.double() / 0.7 for z in raw]) - expected(verl_ref)).abs().max() > 1e-3


def test_shared_vocab_drops_padded_rows_of_the_larger_model():
    zs, zt = torch.randn(2, 7), torch.randn(2, 5)
    s, t = shared_vocab(zs, zt)
    assert torch.equal(s, zs[:, :5]) and torch.equal(t, zt)
    t2, s2 = shared_vocab(zt, zs)
    assert torch.equal(t2, zt) and torch.equal(s2, zs[:, :5])


@pytest.mark.parametrize("support", ["full", "topk"])
def test_distill_token_values_full_and_topk(support):
    g = torch.Generator().manual_seed(0)
    zs = torch.randn(5, 6, generator=g, dtype=F64)
    zt = torch.randn(5, 6, generator=g, dtype=F64)
    opd = {**OPD, "support": support, "divergence": "reverse_kl", "topk": 6}
    values, mass = distill_token_values(zs, zt, opd)
    ps, pt = torch.softmax(zs, -1), torch.softmax(zt, -1)
    for i in range(5):
        kl = sum(float(ps[i, v]) * (math.log(float(ps[i, v])) - math.log(float(pt[i, v]))) for v in range(6))
        assert abs(float(values[i]) - kl) < 1e-6  # topk with k = V equals the full divergence
        assert abs(float(mass[i]) - 1.0) < 1e-6


def test_topk_mass_is_the_teachers_topk_probability():
    zt = torch.tensor([[3.0, 1.0, 0.0, -1.0]], dtype=F64)
    _, mass = distill_token_values(torch.zeros(1, 4, dtype=F64), zt, {**OPD, "support": "topk", "topk": 2})
    p = torch.softmax(zt, -1)
    assert abs(float(mass[0]) - float(p[0, 0] + p[0, 1])) < 1e-6


@pytest.mark.parametrize("rows", [None, [5, 0, 3, 3, 6]])
def test_topk_student_mass_and_overlap_brute_force(rows):
    """support=topk: the student's mass on the teacher's top-k and the top-k overlap (distill_token_values'
    student_stats, from chunked_topk_divergence's chunks), row by row in float64 by definition: chunks smaller
    than the rows, a loss temperature, a float32 student, teacher rows taken from rows of a larger student tensor."""
    g = torch.Generator().manual_seed(3)
    v, k, tau = 11, 4, 0.7
    zs = (torch.randn(7, v, generator=g, dtype=F64) * 2).float().requires_grad_(True)
    n = 7 if rows is None else len(rows)
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
    ids[0] = zs[0 if rows is None else rows[0]].detach().topk(k).indices.flip(0)  # full overlap, another order
    logp = torch.log_softmax(torch.randn(n, v, generator=g, dtype=F64), -1).gather(-1, ids)
    opd = {**OPD, "support": "topk", "divergence": "reverse_kl", "topk": k, "temperature": tau, "chunk_size": 2}
    student_rows = None if rows is None else torch.tensor(rows)
    stats = {}
    values, _ = distill_token_values(zs, (ids, logp), opd, student_rows=student_rows, student_stats=stats)
    without, _ = distill_token_values(zs, (ids, logp), opd, student_rows=student_rows)
    assert torch.equal(values, without)  # the statistics change nothing else
    mass, overlap = stats["mass"], stats["overlap"]
    assert mass.shape == overlap.shape == (n,) and not mass.requires_grad
    for j in range(n):
        z = zs[j if rows is None else rows[j]].double().tolist()
        p = [math.exp(x / tau) for x in z]
        p = [x / sum(p) for x in p]
        own = sorted(range(v), key=lambda i: -z[i])[:k]
        assert float(mass[j]) == pytest.approx(sum(p[i] for i in ids[j].tolist()), abs=1e-6)
        assert float(overlap[j]) == len(set(own) & set(ids[j].tolist())) / k
    assert float(overlap[0]) == 1.0 and float(overlap.min()) < 1.0
    full = {}
    distill_token_values(zs, torch.randn(7, v, generator=g), {**opd, "support": "full"}, student_stats=full)
    assert full == {}  # full support: no top-k, no statistics


def test_sampled_k1_loss_has_the_score_function_gradient():
    s = torch.tensor([-0.5, -1.5, -2.0], dtype=F64, requires_grad=True)
    q = torch.tensor([-1.0, -0.5, -3.0], dtype=F64)
    loss_mat = sampled_distill_loss_matrix(s, q, "k1")
    assert torch.allclose(loss_mat.detach(), s.detach() - q)  # value: the k1 estimate
    (grad,) = torch.autograd.grad(loss_mat.sum(), s)
    assert torch.allclose(grad, s.detach() - q)  # gradient: (s - q) * d s


def test_sampled_k1_baseline_loss_subtracts_the_other_sequences_mean():
    s = torch.tensor([[-0.5, -1.5], [-2.0, -1.0]], dtype=F64, requires_grad=True)
    q = torch.tensor([[-1.0, -0.5], [-3.0, -9.0]], dtype=F64)
    mask = torch.tensor([[1, 1], [1, 0]])
    loss_mat = sampled_distill_loss_matrix(s, q, "k1_baseline", mask)
    k1 = s.detach() - q
    assert torch.allclose(loss_mat.detach(), k1)  # value: the k1 estimate (the reported KL)
    (grad,) = torch.autograd.grad((loss_mat * mask).sum(), s)
    baseline = torch.tensor([[float(k1[1, 0])] * 2, [float(k1[0].mean())] * 2], dtype=F64)
    assert torch.allclose(grad, (k1 - baseline) * mask)


# ----------------------------------------------------------------------------------------------------------
# verl's engine pieces on tiny real models
# ----------------------------------------------------------------------------------------------------------
VOCAB = 13


def tiny_model(seed, dtype=F64, vocab=VOCAB, hidden=16, layers=1, logit_scale=1.0, attn="eager"):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=hidden // 2, attn_implementation=attn)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(logit_scale)
    return model.to(dtype).eval()


def bare_engine(module, autocast_dtype=torch.float32):
    """verl's FSDPEngineWithLMHead holding only what prepare_model_inputs / prepare_model_outputs read."""
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    engine = object.__new__(FSDPEngineWithLMHead)
    engine.module = module
    engine.use_ulysses_sp = False
    engine.ulysses_sequence_parallel_size = 1
    engine.pad_to_length = False
    engine._autocast_dtype = autocast_dtype
    engine.engine_config = SimpleNamespace(entropy_checkpointing=False, entropy_from_logits_with_chunking=False,
                                           use_fused_kernels=False)
    return engine


def micro_batch(prompt_lens, response_lens, temperature, remove_padding, seed=0, vocab=VOCAB, masks=None):
    """A verl micro-batch in the no-padding layout; ``temperature``: a number (non-tensor) or one per sample;
    ``masks``: the response masks (default all ones)."""
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu

    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, vocab, (p + r,), generator=g) for p, r in zip(prompt_lens, response_lens)]
    masks = masks or [torch.ones(r) for r in response_lens]
    batch = TensorDict(
        {
            "input_ids": nested(ids),
            "position_ids": nested([torch.arange(len(x)) for x in ids]),
            "prompts": nested([x[:p] for x, p in zip(ids, prompt_lens)]),
            "responses": nested([x[p:] for x, p in zip(ids, prompt_lens)]),
            "response_mask": nested([m.float() for m in masks]),
        },
        batch_size=[len(ids)],
    )
    if isinstance(temperature, torch.Tensor):
        batch["temperature"] = temperature
    else:
        tu.assign_non_tensor(batch, temperature=temperature)
    tu.assign_non_tensor(batch, use_remove_padding=remove_padding, distillation_use_topk=True,
                         calculate_entropy=False, pad_token_id=0)
    return batch


def raw_forward(engine, batch):
    """The model's raw packed logits [nnz, V] (no temperature) and verl's packed labels."""
    inputs, output_args = engine.prepare_model_inputs(micro_batch=batch)
    with torch.no_grad():
        logits = engine.module(**inputs, use_cache=False).logits
    return packed_logits(logits, batch, output_args), output_args["input_ids_rmpad_rolled"].reshape(-1)


def opd_worker(teacher_models, opd, mode="mean_prob", weights=None):
    from opd_verl.verl_ext.teacher_worker import OPDWorker

    worker = object.__new__(OPDWorker)
    worker.teachers = [SimpleNamespace(engine=bare_engine(m)) for m in teacher_models]
    worker.teacher_entries = [{"weight": w} for w in (weights or [1.0] * len(teacher_models))]
    worker.opd_options = {**opd, "multi_teacher_mode": mode}
    return worker


def student_model_outputs(student, batch, opd, worker):
    """verl's student pass of the loss-level mode: prepare_model_inputs, the model, prepare_model_outputs with
    our actor loss as the logits processor (it gets the student's logits divided by the rollout temperature)."""
    engine = bare_engine(student)
    inputs, output_args = engine.prepare_model_inputs(micro_batch=batch)
    output = engine.module(**inputs, use_cache=False)
    processor = partial(opd_actor_loss, config=None, opd=opd, teacher_logits_fn=worker.teacher_logits)
    return engine.prepare_model_outputs(output, output_args, batch, processor)


def reference_teacher_logp(raw_teachers, weights, mode, tau):
    """log πt at τ in float64 from the teachers' raw logits, by definition of each mixture."""
    w = torch.tensor(weights, dtype=F64)
    w = w / w.sum()
    if len(raw_teachers) == 1:
        return torch.log_softmax(raw_teachers[0].double() / tau, -1)
    if mode == "mean_logit":
        return torch.log_softmax(sum(wk * z.double() for wk, z in zip(w, raw_teachers)) / tau, -1)
    return torch.log(sum(wk * torch.softmax(z.double() / tau, -1) for wk, z in zip(w, raw_teachers)))


@pytest.mark.parametrize("remove_padding", [True, False])
@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("teachers,mode", [(1, "mean_prob"), (2, "mean_prob"), (2, "mean_logit")])
@pytest.mark.parametrize("support,divergence", [("full", "jsd"), ("full", "reverse_kl"), ("topk", "forward_kl")])
def test_loss_temperature_is_not_compounded_with_the_rollout_temperature(remove_padding, tau, teachers, mode,
                                                                        support, divergence):
    """Rollout temperature 0.7: verl divides the student's logits by it before our loss sees them, and the
    teachers' logits are packed the same way. The per-token divergence must be the one of raw logits / τ."""
    opd = {**OPD, "support": support, "divergence": divergence, "temperature": tau, "topk": VOCAB, "beta": 0.3}
    batch = micro_batch([3, 2, 4], [2, 5, 1], temperature=0.7, remove_padding=remove_padding)
    student = tiny_model(0, logit_scale=3.0)
    teacher_models = [tiny_model(1 + k, logit_scale=3.0) for k in range(teachers)]
    weights = [3.0, 1.0][:teachers]
    model_output = student_model_outputs(student, batch, opd, opd_worker(teacher_models, opd, mode, weights))
    ours = model_output[DISTILL_KEY].values().double()

    zs, _ = raw_forward(bare_engine(student), batch)
    zt = [raw_forward(bare_engine(m), batch)[0] for m in teacher_models]
    lt = reference_teacher_logp(zt, weights, mode, tau)
    beta = opd["beta"] if divergence == "jsd" else 0.5
    expected = full_divergence(zs.double() / tau, lt, divergence, beta, 1.0)  # topk with k = V is the full one
    assert ours.shape == expected.shape
    rows = response_rows(batch)  # computed there only (the prompt rows are 0, masked by the loss)
    assert rows.numel() == 8 and (ours[rows] - expected[rows]).abs().max() < 1e-6, (ours, expected)
    compounded = full_divergence(zs.double() / (0.7 * tau), lt, divergence, beta, 1.0)
    assert (compounded - expected)[rows].abs().max() > 1e-3  # the test can tell the two apart


# ----------------------------------------------------------------------------------------------------------
# the loss-level pass computes on the response rows only
# ----------------------------------------------------------------------------------------------------------
PROMPTS, RESPONSES = [3, 2, 4], [2, 5, 3]
MASKS = [torch.tensor([1, 1]), torch.tensor([1, 0, 1, 1, 0]), torch.tensor([0, 1, 1])]


def expected_rows(prompt_lens, masks):
    """Brute force: the packed row before each response token whose mask is 1 (row j predicts token j + 1)."""
    rows, start = [], 0
    for p, m in zip(prompt_lens, masks):
        rows += [start + p - 1 + j for j in range(len(m)) if m[j]]
        start += p + len(m)
    return torch.tensor(rows)


def test_response_rows_brute_force():
    batch = micro_batch(PROMPTS, RESPONSES, 1.0, True, masks=MASKS)
    assert torch.equal(response_rows(batch), expected_rows(PROMPTS, MASKS))
    assert response_rows({"input_ids": batch["input_ids"]}) is None  # no mask: every row


LOSS_CASES = [  # (teachers, mode, temperature, remove_padding); T exact in float32, verl's dtype for it
    (1, "mean_prob", 0.75, True),
    (2, "mean_prob", torch.tensor([0.75, 1.0, 0.5]), False),  # per-sample rollout temperatures
    (2, "mean_logit", 0.75, True),
]


def loss_case(teachers, mode, temperature, remove_padding) -> SimpleNamespace:
    """A loss-level micro-batch (prompt rows, masked response tokens) with tiny teachers (weights 3:1), verl's
    reference pass at T (ref_log_prob, float64) and the loss call's batch settings."""
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import no_padding_2_padding

    batch = micro_batch(PROMPTS, RESPONSES, temperature, remove_padding, seed=7, masks=MASKS)
    teacher_models = [tiny_model(1 + i, logit_scale=3.0) for i in range(teachers)]
    weights = [3.0, 1.0][:teachers]
    zt = [raw_forward(bare_engine(m), batch)[0] for m in teacher_models]
    labels = raw_forward(bare_engine(teacher_models[0]), batch)[1]
    per_row_t = temperature if not isinstance(temperature, torch.Tensor) else torch.repeat_interleave(
        temperature.double(), batch["input_ids"].offsets().diff())
    # verl's reference pass (at T), in the padded response layout
    ref_logp = no_padding_2_padding(mixture_label_log_probs(zt, weights, mode, labels, per_row_t, dtype=F64), batch)
    batch["ref_log_prob"] = nested([ref_logp[i, :n] for i, n in enumerate(RESPONSES)])
    mask = _padded([m.double() for m in MASKS], max(RESPONSES))
    tu.assign_non_tensor(batch, dp_size=1, batch_num_tokens=int(mask.sum()), global_batch_size=3)
    config = SimpleNamespace(global_batch_info={}, loss_agg_mode="token-mean", loss_scale_factor=None)
    return SimpleNamespace(batch=batch, teacher_models=teacher_models, weights=weights, zt=zt, ref_logp=ref_logp,
                           per_row_t=per_row_t, mask=mask, config=config)


@pytest.mark.parametrize("support,divergence", [("full", "jsd"), ("topk", "reverse_kl"), ("topk", "jsd")])
@pytest.mark.parametrize("teachers,mode,temperature,remove_padding", LOSS_CASES)
def test_loss_on_response_rows_equals_the_masked_loss_over_all_rows(support, divergence, teachers, mode,
                                                                   temperature, remove_padding):
    """The trainer's loss (verl's engine calls our processor, then the loss call) on a micro-batch with prompt rows
    and masked response tokens: loss value, gradient w.r.t. the student's weights and the opd/* metrics equal the
    computation the loss did before (divergence on every packed row, float64 reference functions, then masked)."""
    from verl.trainer.ppo.core_algos import agg_loss
    from verl.utils.torch_functional import masked_mean
    from verl.workers.utils.padding import no_padding_2_padding

    tau, k = 1.3, 4
    opd = {**OPD, "support": support, "divergence": divergence, "temperature": tau, "topk": k, "beta": 0.3,
           "chunk_size": 2, "lambda_rl": 0.0, "lambda_distill": 1.0}
    case = loss_case(teachers, mode, temperature, remove_padding)
    batch, teacher_models, weights, zt, mask, config = (case.batch, case.teacher_models, case.weights, case.zt,
                                                        case.mask, case.config)
    ref_logp, per_row_t, n_rows = case.ref_logp, case.per_row_t, zt[0].shape[0]

    # ours: the engine's student pass with our processor, then the loss call
    student = tiny_model(0, logit_scale=3.0)
    worker = opd_worker(teacher_models, opd, mode, weights)
    model_output = student_model_outputs(student, batch, opd, worker)
    loss, metrics = opd_actor_loss(config, opd, None, model_output=model_output, data=batch)
    grads = torch.autograd.grad(loss, list(student.parameters()))

    # before: every packed row through the float64 reference functions, then masked by the loss
    student_ref = tiny_model(0, logit_scale=3.0)
    inputs, output_args = bare_engine(student_ref).prepare_model_inputs(micro_batch=batch)
    zs = packed_logits(student_ref(**inputs, use_cache=False).logits, batch, output_args)
    lt = reference_teacher_logp(zt, weights, mode, tau)
    if support == "full":
        values, mass = full_divergence(zs / tau, lt, divergence, 0.3, 1.0), torch.ones(n_rows, dtype=F64)
    else:
        lt_k, ids = lt.topk(k, dim=-1)
        values, mass = topk_divergence(zs / tau, ids, lt_k, divergence, 0.3, 1.0), lt_k.exp().sum(-1)
    loss_mat = no_padding_2_padding(values, batch)
    ref_loss = agg_loss(loss_mat=loss_mat, loss_mask=mask, loss_agg_mode="token-mean", dp_size=1,
                        batch_num_tokens=int(mask.sum()))
    ref_grads = torch.autograd.grad(ref_loss, list(student_ref.parameters()))

    assert abs(float(loss) - float(ref_loss)) <= 1e-10 * max(1.0, abs(float(ref_loss)))
    for g, g_ref in zip(grads, ref_grads):
        assert (g - g_ref).abs().max() <= 1e-10 * max(1.0, float(g_ref.abs().max()))
    value = {name: float(m.aggregate()) for name, m in metrics.items()}
    bool_mask = mask.bool()  # as the loss call passes it
    assert value["opd/divergence_per_token"] == pytest.approx(float(masked_mean(loss_mat.detach(), bool_mask)),
                                                              rel=1e-10)
    assert value["opd/topk_mass"] == pytest.approx(float(masked_mean(no_padding_2_padding(mass, batch), bool_mask)),
                                                   rel=1e-10)
    assert value["opd/distill_loss"] == pytest.approx(float(ref_loss), rel=1e-10)
    if support == "topk":  # the student against the teacher's top-k, by brute force over the response tokens
        ps, own = torch.softmax(zs.detach() / tau, -1), zs.detach().topk(k, dim=-1).indices
        rows = expected_rows(PROMPTS, MASKS).tolist()
        ref_mass = sum(float(ps[r, ids[r]].sum()) for r in rows) / len(rows)
        ref_overlap = sum(len(set(ids[r].tolist()) & set(own[r].tolist())) / k for r in rows) / len(rows)
        assert value["opd/student_topk_mass"] == pytest.approx(ref_mass, rel=1e-10)
        assert value["opd/topk_overlap"] == pytest.approx(ref_overlap, rel=1e-10)
    else:
        assert "opd/student_topk_mass" not in value and "opd/topk_overlap" not in value
    assert value["opd/teacher_alignment_seq_median_max"] < 1e-5
    resolution = torch.finfo(torch.float64).eps * torch.stack([z.abs().amax(-1) for z in zt]).amax(0) / per_row_t
    stats = alignment_statistics(ref_logp, ref_logp, mask, no_padding_2_padding(resolution, batch))
    assert value["opd/teacher_alignment_tolerance"] == pytest.approx(stats["tolerance"])


@pytest.mark.parametrize("support", ["full", "topk"])
def test_lambda_rl_0_runs_without_the_students_sampled_token_log_probs(support):
    """opd.lambda_rl = 0: update_actor's flags make verl's engine (prepare_model_outputs, distillation_only) skip
    the student's sampled-token log-probs; the loss call then runs without model_output["log_probs"] and gives
    the same loss and gradient as with them."""
    from verl.utils import tensordict_utils as tu

    from opd_verl.verl_ext.teacher_worker import update_actor_flags

    opd = {**OPD, "support": support, "divergence": "jsd", "topk": 4, "lambda_rl": 0.0, "lambda_distill": 1.0}
    results = []
    for flags in ({}, update_actor_flags(opd)):
        batch = micro_batch(PROMPTS, RESPONSES, 0.7, True, seed=7, masks=MASKS)
        tu.assign_non_tensor(batch, dp_size=1, batch_num_tokens=7, global_batch_size=3, **flags)
        config = SimpleNamespace(global_batch_info={}, loss_agg_mode="token-mean", loss_scale_factor=None)
        student = tiny_model(0, logit_scale=3.0)
        model_output = student_model_outputs(student, batch, opd, opd_worker([tiny_model(1, logit_scale=3.0)], opd))
        assert ("log_probs" in model_output) == (not flags.get("distillation_only"))
        loss, _ = opd_actor_loss(config, opd, None, model_output=model_output, data=batch)
        results.append((loss.detach(), torch.autograd.grad(loss, list(student.parameters()))))
    assert "log_probs" not in model_output  # the flag was set
    (loss, grads), (loss_skip, grads_skip) = results
    assert torch.equal(loss, loss_skip) and all(torch.equal(a, b) for a, b in zip(grads, grads_skip))


@pytest.mark.parametrize("mode", ["mean_prob", "mean_logit", "route"])
@pytest.mark.parametrize("per_row_t", [False, True])
def test_teacher_pass_on_rows_is_the_full_pass_at_those_rows(mode, per_row_t):
    """teacher_pass(rows=...) (the teachers' logits at τ, the sampled-token log-probs at T, the resolution) equals
    the pass over every packed row taken at those rows, for every multi-teacher mode and per-row T."""
    g = torch.Generator().manual_seed(8)
    lengths, sample_teacher = torch.tensor([4, 6, 3]), torch.tensor([1, 0, 1])
    raw = [torch.randn(13, 7, generator=g, dtype=F64) * 3 for _ in range(2)]
    labels = torch.randint(0, 7, (13,), generator=g)
    t = torch.rand(13, generator=g, dtype=F64) + 0.5 if per_row_t else 0.7
    route = sample_teacher if mode == "route" else None
    kw = dict(sample_teacher=route, lengths=lengths, compute_dtype=F64, chunk_size=4)
    rows = torch.tensor([1, 2, 3, 6, 7, 11])
    full = teacher_pass(raw, labels, t, 1.3, [3.0, 1.0], mode, **kw)
    ours = teacher_pass(raw, labels, t, 1.3, [3.0, 1.0], mode, rows=rows, **kw)
    assert ours.temperature == full.temperature
    for name in ("logits", "label_log_prob", "resolution"):
        a, b = getattr(ours, name), getattr(full, name)[rows]
        assert a.shape == b.shape and (a.double() - b.double()).abs().max() < 1e-12, name


@pytest.mark.parametrize("support", ["full", "topk"])
def test_divergence_and_teacher_see_the_response_rows_only(support, monkeypatch):
    """The chunked divergence gets the response rows only (student_rows, and the teacher's logits / top-k with
    one row per response token), and so does the teachers' pass; the other rows' outputs are 0. Under topk the
    teachers' [n, V] logits are freed before the student's pass (the top-k is all it needs)."""
    import weakref

    from opd_verl.verl_ext import distill_actor_loss as dal

    seen, teacher_refs = {}, []

    def spy(name, fn):
        def wrapper(student_logits, teacher, *args, **kwargs):
            rows = kwargs.get("student_rows", args[-1] if len(args) >= 6 else None)
            seen[name] = (student_logits.shape[0], teacher.shape[0], rows, teacher_refs[0]() is not None)
            return fn(student_logits, teacher, *args, **kwargs)
        return wrapper

    monkeypatch.setattr(dal, "chunked_full_divergence", spy("full", dal.chunked_full_divergence))
    monkeypatch.setattr(dal, "chunked_topk_divergence", spy("topk", dal.chunked_topk_divergence))
    passes = []  # OPDWorker.teacher_logits imports teacher_pass from distill_actor_loss when called
    monkeypatch.setattr(dal, "teacher_pass", lambda *a, **kw: passes.append(kw["rows"]) or teacher_pass(*a, **kw))
    opd = {**OPD, "support": support, "divergence": "jsd", "topk": 3, "lambda_rl": 0.0, "lambda_distill": 1.0}
    batch = micro_batch(PROMPTS, RESPONSES, 0.7, True, masks=MASKS)
    worker = opd_worker([tiny_model(1)], opd)
    teacher_logits = worker.teacher_logits

    def tracked(data, rows):
        out = teacher_logits(data, rows)
        teacher_refs.append(weakref.ref(out.logits))
        return out

    worker.teacher_logits = tracked
    out = student_model_outputs(tiny_model(0), batch, opd, worker)
    rows = expected_rows(PROMPTS, MASKS)
    nnz = sum(PROMPTS) + sum(RESPONSES)
    assert set(seen) == {support}
    n_student, n_teacher, student_rows, teacher_alive = seen[support]
    assert n_student == nnz and n_teacher == rows.numel() == 7 and torch.equal(student_rows, rows)
    assert teacher_alive == (support == "full")
    assert len(passes) == 1 and torch.equal(passes[0], rows)
    values = out[DISTILL_KEY].values()
    others = torch.ones(nnz, dtype=torch.bool)
    others[rows] = False
    assert (values[others] == 0).all() and (values[rows] > 0).all()


# ----------------------------------------------------------------------------------------------------------
# multi-teacher mixtures: one mixture for the reference pass and the loss
# ----------------------------------------------------------------------------------------------------------
def test_multi_teacher_mean_prob_of_sampled_token():
    a, b = torch.log(torch.tensor([0.2, 0.5])), torch.log(torch.tensor([0.6, 0.1]))
    out = mix_log_probs([a, b], [1.0, 3.0])
    expected = torch.log(0.25 * torch.tensor([0.2, 0.5]) + 0.75 * torch.tensor([0.6, 0.1]))
    assert torch.allclose(out, expected, atol=1e-6)


def test_multi_teacher_logit_combinations():
    a, b = torch.randn(3, 5, dtype=F64), torch.randn(3, 5, dtype=F64)
    mean_logit = mix_teacher_logits([a, b], [1.0, 1.0], "mean_logit")
    assert torch.allclose(mean_logit.double(), 0.5 * a + 0.5 * b, atol=1e-6)
    mean_prob = mix_teacher_logits([a, b], [1.0, 1.0], "mean_prob")
    expected = 0.5 * torch.softmax(a, -1) + 0.5 * torch.softmax(b, -1)
    assert torch.allclose(torch.softmax(mean_prob.double(), -1), expected, atol=1e-6)


def test_mean_logit_label_log_probs_float64_brute_force():
    g = torch.Generator().manual_seed(3)
    logits = [torch.randn(7, 6, generator=g, dtype=F64) * 3 for _ in range(3)]
    weights = [1.0, 2.0, 5.0]
    labels = torch.randint(0, 6, (7,), generator=g)
    temperature = 0.7
    out = mean_logit_label_log_probs(logits, weights, labels, temperature, dtype=F64, chunk_size=3)
    for i in range(7):
        mixed = [sum(w / 8.0 * float(z[i, v]) for w, z in zip(weights, logits)) / temperature for v in range(6)]
        log_z = math.log(sum(math.exp(m) for m in mixed))
        assert abs(float(out[i]) - (mixed[int(labels[i])] - log_z)) < 1e-12
    # logits that come divided already (verl's first teacher): one divisor per teacher
    pre = [logits[0] / temperature, logits[1], logits[2]]
    again = mean_logit_label_log_probs(pre, weights, labels, [1.0, temperature, temperature], dtype=F64)
    assert (again - out).abs().max() < 1e-12
    # and it is not the mean of the probabilities (what the reference pass used before)
    mean_prob = mixture_label_log_probs(logits, weights, "mean_prob", labels, temperature, dtype=F64)
    assert (mean_prob - out).abs().max() > 1e-2


@pytest.mark.parametrize("mode", ["mean_prob", "mean_logit", "route"])
def test_reference_and_loss_use_one_mixture(mode):
    """The sampled token's log-prob the reference pass returns (mixture_label_log_probs at T) is the log-prob
    of the loss-level teacher (teacher_mixture_at) at the same temperature, for every multi-teacher mode."""
    g = torch.Generator().manual_seed(4)
    logits = [torch.randn(6, 5, generator=g, dtype=F64) * 3 for _ in range(2)]
    weights, labels, t = [3.0, 1.0], torch.randint(0, 5, (6,), generator=g), 0.7
    lengths, sample_teacher = torch.tensor([2, 4]), torch.tensor([1, 0])
    route = mode == "route"
    ref = mixture_label_log_probs(logits, weights, mode, labels, t, sample_teacher if route else None, lengths,
                                  dtype=F64)
    if route:
        mixed, divisor = route_rows(logits, sample_teacher, lengths), t
    else:
        mixed, divisor = teacher_mixture_at(logits, weights, mode, t)
    loss_teacher = torch.log_softmax(mixed.double() / divisor, -1).gather(-1, labels.view(-1, 1)).squeeze(-1)
    assert (ref - loss_teacher).abs().max() < 1e-12
    assert torch.allclose(label_log_probs(logits[0], labels, t, dtype=F64),
                          torch.log_softmax(logits[0] / t, -1).gather(-1, labels.view(-1, 1)).squeeze(-1))


@pytest.mark.parametrize("remove_padding", [True, False])
def test_mean_logit_reference_processor_returns_the_mean_logit_teacher(remove_padding):
    """OPDWorker's reference pass under mean_logit: verl's engine hands the first teacher's logits (divided by
    T = 0.7) to our processor, which runs the other teachers: log_softmax(Σ w z / T) at the sampled token."""
    from opd_verl.verl_ext.teacher_worker import MEAN_LOGIT_REF_KEY

    batch = micro_batch([3, 2], [4, 3], temperature=0.7, remove_padding=remove_padding, seed=2)
    models = [tiny_model(5, logit_scale=3.0), tiny_model(6, logit_scale=3.0)]
    worker = opd_worker(models, {**OPD, "chunk_size": 2}, "mean_logit", [3.0, 1.0])
    first = worker.teachers[0].engine
    inputs, output_args = first.prepare_model_inputs(micro_batch=batch)
    with torch.no_grad():
        output = first.module(**inputs, use_cache=False)
        model_output = first.prepare_model_outputs(output, output_args, batch, worker._mean_logit_processor())
    ours = model_output[MEAN_LOGIT_REF_KEY].values()
    raw = [raw_forward(bare_engine(m), batch) for m in models]
    labels = raw[0][1]
    mixed = (0.75 * raw[0][0].double() + 0.25 * raw[1][0].double()) / 0.7
    expected = torch.log_softmax(mixed, -1).gather(-1, labels.view(-1, 1)).squeeze(-1)
    assert (ours.double() - expected).abs().max() < 1e-6


def test_mean_logit_processor_divides_the_others_by_the_bf16_temperature_verl_divided_the_first_by():
    """The mean_logit reference pass with bf16 teachers at T = 0.7: verl hands our processor the first teacher's
    logits divided by bf16(0.7); the other teachers are divided by the same value, so the pass returns
    log_softmax(Σ w z / bf16(T)) at the sampled token, as the loss-level pass's alignment input (teacher_pass)."""
    from opd_verl.verl_ext.teacher_worker import MEAN_LOGIT_REF_KEY

    (z0, y0), (z1, y1) = [bf16_logits_verl_divides_exactly(0.7, seed=s) for s in (0, 1)]
    labels = torch.randint(0, 11, (6,), generator=torch.Generator().manual_seed(9))
    worker = opd_worker([], {**OPD, "chunk_size": 4}, "mean_logit", [3.0, 1.0])
    worker.teachers = [SimpleNamespace(), SimpleNamespace()]
    output_args = {"temperature_rmpad": torch.full((6,), 0.7), "input_ids_rmpad_rolled": labels}
    worker._teacher_forward = lambda teacher, data: (z1, output_args)  # the second teacher's raw bf16 logits
    processor = worker._mean_logit_processor()
    ours = processor(student_logits=verl_scaled(z0, 0.7).unsqueeze(0), data=None)[MEAN_LOGIT_REF_KEY][0]
    expected = label_log_probs(0.75 * y0 + 0.25 * y1, labels, dtype=F64)
    assert (ours.double() - expected).abs().max() < 1e-5
    loss_pass = teacher_pass([z0, z1], labels, 0.7, 1.3, [3.0, 1.0], "mean_logit", chunk_size=4).label_log_prob
    assert (ours - loss_pass).abs().max() < 1e-5
    exact_t = label_log_probs(0.75 * y0 + 0.25 * z1.double() / 0.7, labels, dtype=F64)  # the others at the exact T
    assert (exact_t - expected).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------------------
# alignment check
# ----------------------------------------------------------------------------------------------------------
def _padded(rows, width):
    return torch.stack([torch.nn.functional.pad(r, (0, width - len(r))) for r in rows])


def test_alignment_statistics_pass_aligned_and_catch_a_shift_and_a_swap():
    g = torch.Generator().manual_seed(0)
    lengths = [5, 3, 6]
    rows = [-torch.rand(n, generator=g, dtype=F64) * 5 for n in lengths]
    ref, mask = _padded(rows, 6), _padded([torch.ones(n) for n in lengths], 6)
    res = torch.full_like(ref, 1e-6)
    stats = check_alignment(ref + 1e-7, ref, mask, res)
    assert stats["seq_median_max"] < 1e-6 and stats["tolerance"] == pytest.approx(1e-3)
    shifted = _padded([torch.roll(r, 1) for r in rows], 6)
    with pytest.raises(RuntimeError, match="disagree with the reference pass"):
        check_alignment(shifted, ref, mask, res)
    swapped = _padded([rows[0], rows[2][:3], rows[1].repeat(2)], 6)  # sequences 2 and 3 mixed up
    with pytest.raises(RuntimeError, match="disagree with the reference pass"):
        check_alignment(swapped, ref, mask, res)
    # a few outliers (one token of each sequence) do not move the per-sequence median
    noisy = ref.clone()
    noisy[:, 0] += 0.5
    assert check_alignment(noisy, ref, mask, res)["max_abs"] == pytest.approx(0.5)


def _bf16_label_logp(model, sequences, prompt_len, batched):
    """Teacher log-probs of each sequence's response tokens, in bf16, either one sequence at a time or as one
    right-padded batch of all sequences (another batching: the reference pass vs the loss pass)."""
    out = []
    with torch.no_grad():
        if batched:
            width = max(len(s) for s in sequences)
            ids = _padded([s for s in sequences], width).long()
            attn = _padded([torch.ones(len(s), dtype=torch.long) for s in sequences], width)
            logits = model(input_ids=ids, attention_mask=attn).logits
            rows = [logits[i, : len(s)] for i, s in enumerate(sequences)]
        else:
            rows = [model(input_ids=s.view(1, -1).long()).logits[0] for s in sequences]
    absmax = []
    for s, z in zip(sequences, rows):
        pos = torch.arange(prompt_len - 1, len(s) - 1)
        out.append(label_log_probs(z[pos], s[pos + 1]))
        absmax.append(z[pos].float().abs().amax(-1))
    return out, absmax


def test_alignment_check_passes_bf16_batching_noise_and_catches_a_shift():
    """A tiny real transformers model in bf16, batch of 1 vs a batch of 8 padded sequences: the log-probs differ
    (bf16 is not batch-invariant; the old max-|Δ| ≤ 1e-3 check raised on this), the new statistic passes; the
    same logits one position off must raise."""
    # sdpa (verl's attention on CPU): its masked (padded batch) and unmasked kernels round differently in bf16
    model = tiny_model(0, dtype=torch.bfloat16, vocab=64, hidden=64, layers=2, logit_scale=8.0, attn="sdpa")
    g = torch.Generator().manual_seed(1)
    prompt_len = 4
    sequences = [torch.randint(0, 64, (prompt_len + n,), generator=g) for n in (12, 3, 9, 16, 1, 7, 14, 5)]
    ref_rows, _ = _bf16_label_logp(model, sequences, prompt_len, batched=False)
    our_rows, absmax = _bf16_label_logp(model, sequences, prompt_len, batched=True)
    width = max(len(r) for r in ref_rows)
    ref, ours = _padded(ref_rows, width), _padded(our_rows, width)
    mask = _padded([torch.ones(len(r)) for r in ref_rows], width)
    resolution = torch.finfo(torch.bfloat16).eps * _padded(absmax, width)
    stats = check_alignment(ours, ref, mask, resolution)
    assert stats["max_abs"] > 1e-3, stats  # real bf16 batching noise, beyond the old tolerance
    assert stats["seq_median_max"] <= stats["tolerance"]
    assert all(math.isfinite(v) for v in stats.values())
    shifted = _padded([torch.roll(r, 1) for r in our_rows], width)
    with pytest.raises(RuntimeError, match="disagree with the reference pass"):
        check_alignment(shifted, ref, mask, resolution)
    with pytest.raises(RuntimeError, match="disagree with the reference pass"):  # samples mixed up
        check_alignment(torch.roll(ours, 1, dims=0), ref, mask, resolution)


def test_alignment_is_checked_and_logged_by_the_loss():
    """The whole micro-batch path: the processor call returns the teacher's sampled-token log-probs at T, the loss
    call compares them with ref_log_prob (verl's reference pass) and logs opd/teacher_alignment_*; a reference
    one token off raises."""
    from verl.utils import tensordict_utils as tu

    opd = {**OPD, "temperature": 2.0, "lambda_rl": 0.0, "lambda_distill": 1.0}
    batch = micro_batch([3, 2, 4], [2, 5, 1], temperature=0.7, remove_padding=True, seed=5)
    teacher = tiny_model(1, logit_scale=3.0)
    model_output = student_model_outputs(tiny_model(0), batch, opd, opd_worker([teacher], opd))
    # verl's reference pass at T = 0.7, in the padded response layout
    zt, labels = raw_forward(bare_engine(teacher), batch)
    logp = label_log_probs(zt, labels, 0.7, dtype=F64)
    from verl.workers.utils.padding import no_padding_2_padding

    ref = no_padding_2_padding(logp, batch)
    lengths = batch["responses"].offsets().diff().tolist()
    batch["ref_log_prob"] = nested([ref[i, :n].float() for i, n in enumerate(lengths)])
    assert (no_padding_2_padding(model_output[TEACHER_LABEL_KEY], batch) - ref).abs().max() < 1e-5
    tu.assign_non_tensor(batch, dp_size=1, batch_num_tokens=sum(lengths), global_batch_size=3)
    config = SimpleNamespace(global_batch_info={}, loss_agg_mode="token-mean", loss_scale_factor=None)
    _, metrics = opd_actor_loss(config, opd, None, model_output=model_output, data=batch)
    values = {k: m.aggregate() for k, m in metrics.items() if k.startswith("opd/teacher_alignment_")}
    assert set(values) == {f"opd/teacher_alignment_{k}" for k in ("seq_median_max", "median_abs", "max_abs",
                                                                   "tolerance")}
    assert values["opd/teacher_alignment_seq_median_max"] < 1e-5
    batch["ref_log_prob"] = nested([torch.roll(ref[i, :n].float(), 1) for i, n in enumerate(lengths)])
    with pytest.raises(RuntimeError, match="disagree with the reference pass"):
        opd_actor_loss(config, opd, None, model_output=model_output, data=batch)


def test_alignment_statistics_tolerance_scales_with_dtype_resolution():
    ref = torch.zeros(1, 4, dtype=F64)
    mask = torch.ones(1, 4)
    bf16 = torch.full_like(ref, torch.finfo(torch.bfloat16).eps * 20.0)  # logits of ~20 in bf16
    assert alignment_statistics(ref, ref, mask, bf16)["tolerance"] == pytest.approx(4 * 0.0078125 * 20)
    fp32 = torch.full_like(ref, torch.finfo(torch.float32).eps * 20.0)
    assert alignment_statistics(ref, ref, mask, fp32)["tolerance"] == pytest.approx(1e-3)


def test_route_rows_takes_each_samples_rows_from_its_own_teacher():
    torch.manual_seed(0)
    lengths = torch.tensor([3, 1, 4])
    teachers = [torch.randn(9, 5) for _ in range(3)]  # 8 packed rows + 1 row of sequence-parallel padding
    out = route_rows(teachers, torch.tensor([2, 0, 1]), lengths)
    # brute force: sample by sample
    expected, start = [], 0
    for sample, (n, k) in enumerate(zip(lengths.tolist(), [2, 0, 1])):
        expected.append(teachers[k][start:start + n])
        start += n
    expected.append(teachers[1][8:])  # padding follows the last sample
    assert torch.equal(out, torch.cat(expected))
    # 1-D rows (log-probs of the sampled tokens) work the same way
    flat = [t[:, 0].contiguous() for t in teachers]
    assert torch.equal(route_rows(flat, torch.tensor([2, 0, 1]), lengths), torch.cat(expected)[:, 0])
