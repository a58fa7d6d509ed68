"""Pieces of the loss-level distillation (opd_verl.verl_ext.distill_actor_loss, opd_verl.verl_ext.teacher_worker) against brute force."""

import math

import pytest
import torch

from opd_verl.verl_ext.distill_actor_loss import distill_token_values, packed_logits, shared_vocab, sampled_distill_loss_matrix
from opd_verl.algorithms.teachers import mix_log_probs, mix_teacher_logits, route_rows

OPD = {"divergence": "jsd", "beta": 0.5, "temperature": 1.0, "chunk_size": 3, "topk": 4, "support": "full"}


def test_packed_logits_right_padded_rows_and_temperature():
    lengths = [3, 1, 2]
    ids = torch.nested.nested_tensor([torch.arange(n) for n in lengths], layout=torch.jagged)
    logits = torch.randn(3, 4, 5, dtype=torch.float64)
    temperature = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    packed = packed_logits(logits, {"input_ids": ids}, {"temperature": temperature})
    expected = torch.cat([logits[i, :n] / temperature[i] for i, n in enumerate(lengths)])
    assert torch.equal(packed, expected)


def test_packed_logits_remove_padding_layout():
    logits = torch.randn(1, 6, 5)
    temps = torch.full((6,), 2.0)
    out = packed_logits(logits, {"input_ids": None}, {"temperature_rmpad": temps})
    assert torch.allclose(out, logits[0] / 2.0)


def test_shared_vocab_drops_padded_rows_of_the_larger_model():
    zs, zt = torch.randn(2, 7), torch.randn(2, 5)
    s, t = shared_vocab(zs, zt)
    assert torch.equal(s, zs[:, :5]) and torch.equal(t, zt)
    t2, s2 = shared_vocab(zt, zs)
    assert torch.equal(t2, zt) and torch.equal(s2, zs[:, :5])


@pytest.mark.parametrize("support", ["full", "topk"])
def test_distill_token_values_full_and_topk(support):
    g = torch.Generator().manual_seed(0)
    zs = torch.randn(5, 6, generator=g, dtype=torch.float64)
    zt = torch.randn(5, 6, generator=g, dtype=torch.float64)
    opd = {**OPD, "support": support, "divergence": "reverse_kl", "topk": 6}
    values, mass = distill_token_values(zs, zt, opd)
    ps, pt = torch.softmax(zs, -1), torch.softmax(zt, -1)
    for i in range(5):
        kl = sum(float(ps[i, v]) * (math.log(float(ps[i, v])) - math.log(float(pt[i, v]))) for v in range(6))
        assert abs(float(values[i]) - kl) < 1e-6  # topk with k = V equals the full divergence
        assert abs(float(mass[i]) - 1.0) < 1e-6


def test_topk_mass_is_the_teachers_topk_probability():
    zt = torch.tensor([[3.0, 1.0, 0.0, -1.0]], dtype=torch.float64)
    _, mass = distill_token_values(torch.zeros(1, 4, dtype=torch.float64), zt, {**OPD, "support": "topk", "topk": 2})
    p = torch.softmax(zt, -1)
    assert abs(float(mass[0]) - float(p[0, 0] + p[0, 1])) < 1e-6


def test_sampled_k1_loss_has_the_score_function_gradient():
    s = torch.tensor([-0.5, -1.5, -2.0], dtype=torch.float64, requires_grad=True)
    q = torch.tensor([-1.0, -0.5, -3.0], dtype=torch.float64)
    loss_mat = sampled_distill_loss_matrix(s, q, "k1")
    assert torch.allclose(loss_mat.detach(), s.detach() - q)  # value: the k1 estimate
    (grad,) = torch.autograd.grad(loss_mat.sum(), s)
    assert torch.allclose(grad, s.detach() - q)  # gradient: (s - q) * d s


def test_multi_teacher_mean_prob_of_sampled_token():
    a, b = torch.log(torch.tensor([0.2, 0.5])), torch.log(torch.tensor([0.6, 0.1]))
    out = mix_log_probs([a, b], [1.0, 3.0])
    expected = torch.log(0.25 * torch.tensor([0.2, 0.5]) + 0.75 * torch.tensor([0.6, 0.1]))
    assert torch.allclose(out, expected, atol=1e-6)


def test_multi_teacher_logit_combinations():
    a, b = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    mean_logit = mix_teacher_logits([a, b], [1.0, 1.0], "mean_logit")
    assert torch.allclose(mean_logit, (0.5 * a + 0.5 * b).float(), atol=1e-6)
    mean_prob = mix_teacher_logits([a, b], [1.0, 1.0], "mean_prob")
    expected = 0.5 * torch.softmax(a, -1) + 0.5 * torch.softmax(b, -1)
    assert torch.allclose(torch.softmax(mean_prob.double(), -1), expected, atol=1e-6)


def _micro_batch(prompt_lens, response_lens, teacher_logits, labels):
    """A micro-batch in verl's no-padding layout whose ref_log_prob comes from `teacher_logits` at `labels`."""
    from tensordict import TensorDict

    nested = lambda rows: torch.nested.nested_tensor(rows, layout=torch.jagged)  # noqa: E731
    logp = torch.log_softmax(teacher_logits, -1).gather(-1, labels.view(-1, 1)).squeeze(-1)
    refs, start = [], 0
    for p, r in zip(prompt_lens, response_lens):
        # the log-prob of response token j is predicted at position p - 1 + j
        refs.append(logp[start + p - 1 : start + p - 1 + r])
        start += p + r
    ids = [torch.arange(p + r) for p, r in zip(prompt_lens, response_lens)]
    return TensorDict(
        {
            "prompts": nested([torch.zeros(p, dtype=torch.long) for p in prompt_lens]),
            "responses": nested([torch.zeros(r, dtype=torch.long) for r in response_lens]),
            "input_ids": nested(ids),
            "ref_log_prob": nested(refs),
            "response_mask": nested([torch.ones(r) for r in response_lens]),
        },
        batch_size=[len(prompt_lens)],
    )


def test_alignment_check_passes_aligned_and_catches_a_shift():
    from opd_verl.verl_ext.distill_actor_loss import check_alignment

    prompt_lens, response_lens = [2, 3], [3, 1]
    nnz = sum(prompt_lens) + sum(response_lens)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(nnz, 7, generator=g) * 3
    labels = torch.randint(0, 7, (nnz,), generator=g)
    batch = _micro_batch(prompt_lens, response_lens, logits, labels)
    assert check_alignment(logits, labels, batch) < 1e-5
    with pytest.raises(RuntimeError, match="disagree with the reference pass"):
        check_alignment(torch.roll(logits, 1, dims=0), labels, batch)


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
