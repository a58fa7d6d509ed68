"""The teacher's own view in the reference pass (opd_verl.verl_ext.teacher_batch, OPDWorker.compute_ref_log_prob):
the teacher's batch from real tiny tokenizers and a real verl batch (TransferQueue's TensorDict of one record per
sample, as verl's AgentLoopWorkerTQ stores it) against a construction by hand; the student view is today's call,
bit for bit; the cross-tokenizer path with the student's own tokenizer equals the direct path through the worker.

The teacher's forward is verl's own code: FSDPEngineWithLMHead.prepare_model_inputs / prepare_model_outputs on a
tiny Qwen2 (verl's micro-batching and FSDP left out)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from tiny_tokenizers import CHAT_TEMPLATE_B, byte_level_bpe

from opd_verl.demo.tiny_models import build_qwen2, build_tokenizer

SAMPLES = [
    {"prompt": [{"role": "user", "content": "What is 2 + 3? Answer after ####."}],
     "reward_model": {"style": "rule", "ground_truth": "5"}, "extra_info": {"split": "train", "index": 0}},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 12 * 3?"}],
     "reward_model": {"style": "rule", "ground_truth": "36"}, "extra_info": {"split": "train", "index": 1}},
    {"prompt": [{"role": "user", "content": "What is 7 - 9?"}],
     "reward_model": {"style": "rule", "ground_truth": "-2"}, "extra_info": {"split": "train", "index": 2}},
]
RESPONSES = ["5 #### 5", "3 times 12 is 36 #### 36", "-2"]
TEMPLATE = "{prompt}\n(The reference answer is {reward_model[ground_truth]}.)"


@pytest.fixture(scope="module")
def student_tok():
    return build_tokenizer(all_bytes=True)


@pytest.fixture(scope="module")
def own_template_tok(student_tok):
    """The student's vocabulary with another chat template: a teacher of the same tokenizer family."""
    tok = copy.deepcopy(student_tok)
    tok.chat_template = CHAT_TEMPLATE_B
    return tok


@pytest.fixture(scope="module")
def other_tok():
    return byte_level_bpe(300, name="tiny-bpe-teacher", chat_template=CHAT_TEMPLATE_B)


def verl_batch(student_tok, eos=(True, True, False), seed=0, remove_padding=True):
    """A reference-pass batch as verl 0.9.1 hands it to compute_ref_log_prob: one TransferQueue record per
    sample (the dataset's columns, raw_prompt, the agent loop's tensors) made a TensorDict by verl's
    list_of_dict_to_tensordict, the student's old_log_probs beside them, the batch-level settings."""
    from verl.utils import tensordict_utils as tu

    g = torch.Generator().manual_seed(seed)
    records = []
    for i, (sample, text) in enumerate(zip(SAMPLES, RESPONSES)):
        prompt = student_tok.apply_chat_template(sample["prompt"], add_generation_prompt=True, tokenize=False)
        prompt_ids = student_tok.encode(prompt, add_special_tokens=False)
        response = student_tok.encode(text, add_special_tokens=False) + ([student_tok.eos_token_id] if eos[i] else [])
        ids = torch.tensor(prompt_ids + response)
        records.append({
            "data_source": "arith", "raw_prompt": sample["prompt"], "prompt": sample["prompt"],
            "reward_model": sample["reward_model"], "extra_info": sample["extra_info"], "uid": f"u{i}",
            "prompts": torch.tensor(prompt_ids), "responses": torch.tensor(response), "input_ids": ids,
            "position_ids": torch.arange(len(ids)), "response_mask": torch.ones(len(response), dtype=torch.long),
            "attention_mask": torch.ones(len(ids), dtype=torch.long),
            "old_log_probs": -torch.rand(len(response), generator=g) * 3,
        })
    data = tu.list_of_dict_to_tensordict(records)
    tu.assign_non_tensor(data, temperature=1.0, calculate_entropy=False, compute_loss=False,
                         use_remove_padding=remove_padding,
                         pad_token_id=student_tok.pad_token_id)
    return data


def _view(prompt, tok, cross=False, wrap_chat=True):
    from opd_verl.verl_ext.teacher_batch import TeacherView

    return TeacherView(prompt, wrap_chat, cross, tok)


def _expected_prompt(tok, sample, mode):
    """The teacher's prompt ids, by hand (the chat template applied to the messages the option describes)."""
    user = "\n\n".join(m["content"] for m in sample["prompt"] if m["role"] == "user")
    if mode == "chat_template":
        messages = sample["prompt"]
    elif mode == "template":
        messages = [{"role": "user", "content": f"{user}\n(The reference answer is "
                                                f"{sample['reward_model']['ground_truth']}.)"}]
    else:  # raw: the template's text itself
        return tok.encode(f"{user}\n(The reference answer is {sample['reward_model']['ground_truth']}.)")
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tok.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("mode,prompt,wrap_chat", [
    ("chat_template", "chat_template", True), ("template", TEMPLATE, True), ("raw", TEMPLATE, False),
])
def test_teacher_batch_of_a_same_tokenizer_view_is_built_by_hand(student_tok, own_template_tok, mode, prompt,
                                                                  wrap_chat):
    from tensordict import NonTensorData

    from opd_verl.verl_ext.teacher_batch import teacher_inputs, teacher_tensordict

    data = verl_batch(student_tok)
    view = _view(prompt, own_template_tok, wrap_chat=wrap_chat)
    inputs = teacher_inputs(view, data)
    batch = teacher_tensordict(data, inputs.prompts, inputs.responses, inputs.response_masks)
    assert batch.batch_size == data.batch_size
    for i, sample in enumerate(SAMPLES):
        expected_prompt = _expected_prompt(own_template_tok, sample, mode)
        response = data["responses"][i].tolist()
        assert batch["prompts"][i].tolist() == expected_prompt
        assert batch["responses"][i].tolist() == response  # the student's ids: same vocabulary
        assert batch["input_ids"][i].tolist() == expected_prompt + response
        assert batch["position_ids"][i].tolist() == list(range(len(expected_prompt) + len(response)))
        assert batch["response_mask"][i].tolist() == data["response_mask"][i].tolist()
        assert batch["loss_mask"][i].tolist() == data["response_mask"][i].tolist()
        assert batch["prompts"][i].tolist() != data["prompts"][i].tolist()  # the view differs from the student's
    for key in ("temperature", "calculate_entropy", "compute_loss", "use_remove_padding", "pad_token_id"):
        assert isinstance(batch.get(key), NonTensorData) and batch.get(key).data == data.get(key).data
    assert batch["input_ids"].is_nested and batch["input_ids"].offsets().diff().tolist() == [
        len(_expected_prompt(own_template_tok, s, mode)) + len(data["responses"][i]) for i, s in enumerate(SAMPLES)]


def test_teacher_batch_with_another_tokenizer_re_encodes_the_response(student_tok, other_tok):
    from opd_verl.verl_ext.teacher_batch import teacher_inputs, teacher_tensordict

    data = verl_batch(student_tok, eos=(True, True, False))
    inputs = teacher_inputs(_view("chat_template", other_tok, cross=True), data, student_tok)
    batch = teacher_tensordict(data, inputs.prompts, inputs.responses, inputs.response_masks)
    for i, (sample, text) in enumerate(zip(SAMPLES, RESPONSES)):
        rendered = other_tok.apply_chat_template(sample["prompt"], add_generation_prompt=True, tokenize=False)
        prompt = other_tok.encode(rendered, add_special_tokens=False)
        ended = data["responses"][i][-1].item() == student_tok.eos_token_id
        response = other_tok(text, add_special_tokens=False)["input_ids"] + ([other_tok.eos_token_id] if ended else [])
        assert batch["prompts"][i].tolist() == prompt
        assert batch["responses"][i].tolist() == response
        assert batch["input_ids"][i].tolist() == prompt + response
        assert batch["response_mask"][i].tolist() == [1.0] * len(response)
        assert other_tok.decode(batch["responses"][i].tolist(), skip_special_tokens=True) == text
    assert [len(r) for r in inputs.responses] != [len(r) for r in data["responses"].unbind()]  # other tokens


def test_response_log_probs_and_student_layout_are_verls_response_positions():
    from verl.workers.utils.padding import response_from_nested

    from opd_verl.verl_ext.teacher_batch import response_log_probs, student_layout

    lengths, responses = [5, 3, 7], [2, 1, 4]
    full = torch.nested.as_nested_tensor([torch.randn(n) for n in lengths], layout=torch.jagged)
    mask = torch.nested.as_nested_tensor([torch.ones(r) for r in responses], layout=torch.jagged)
    ours = response_log_probs(full, responses)
    for a, b in zip(ours, response_from_nested(full, mask).unbind()):
        assert torch.equal(a, b)
    ids = torch.nested.as_nested_tensor([torch.zeros(n, dtype=torch.long) for n in lengths], layout=torch.jagged)
    placed = student_layout(ours, ids)
    assert placed.offsets().tolist() == ids.offsets().tolist()
    for a, b in zip(response_from_nested(placed, mask).unbind(), ours):
        assert torch.equal(a, b)


class EngineTeacher:
    """A teacher whose infer_batch is verl's own log-prob code (FSDPEngineWithLMHead.prepare_model_inputs, the
    model, prepare_model_outputs) on one micro-batch; records the batches it was given."""

    def __init__(self, model):
        from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

        engine = object.__new__(FSDPEngineWithLMHead)
        engine.module = model
        engine.use_ulysses_sp = False
        engine.ulysses_sequence_parallel_size = 1
        engine.pad_to_length = False
        engine._autocast_dtype = torch.float32
        engine.engine_config = SimpleNamespace(entropy_checkpointing=False, entropy_from_logits_with_chunking=False,
                                               use_fused_kernels=False)
        self.engine, self.seen = engine, []

    def infer_batch(self, data):
        from tensordict import NonTensorData, TensorDict

        self.seen.append(data)
        inputs, output_args = self.engine.prepare_model_inputs(micro_batch=data)
        with torch.no_grad():
            output = self.engine.module(**inputs, use_cache=False)
            model_output = self.engine.prepare_model_outputs(output, output_args, data, None)
        out = TensorDict({"log_probs": model_output["log_probs"]}, batch_size=data.batch_size)
        out.set("metrics", NonTensorData({"loss": 0.0}))
        return out


def opd_worker(teachers, views, student_tok=None, mode="mean_prob"):
    from opd_verl.verl_ext.teacher_worker import OPDWorker

    worker = object.__new__(OPDWorker)
    worker.profiler, worker.enable_routing_replay = None, False
    worker.teachers = teachers
    for teacher, view in zip(teachers, views):
        teacher.opd_view = view
    worker.ref = teachers[0]
    worker.teacher_entries = [{"weight": 1.0, "data_source": "*"} for _ in teachers]
    worker.opd_options = {"multi_teacher_mode": mode}
    worker._opd_student_tokenizer = student_tok
    return worker


@pytest.fixture(scope="module")
def models(student_tok, other_tok):
    return {"same": build_qwen2(student_tok, hidden_size=64, num_layers=1, seed=3),
            "other": build_qwen2(other_tok, hidden_size=64, num_layers=1, seed=4)}


def test_the_student_view_is_todays_call_bit_for_bit(student_tok, models):
    """prompt=student (the default): the worker hands verl's batch itself to the teacher's infer_batch and returns
    its output as it is; no teacher_batch code runs."""
    from opd_verl.checks.teachers import VIEW_DEFAULTS
    from opd_verl.verl_ext.teacher_worker import OPDWorker

    assert OPDWorker._teacher_view(None, {"path": "t", **VIEW_DEFAULTS}, student_tok) is None
    direct = EngineTeacher(models["same"]).infer_batch(verl_batch(student_tok))
    teacher = EngineTeacher(models["same"])
    data = verl_batch(student_tok)
    output = OPDWorker.compute_ref_log_prob(opd_worker([teacher], [None]), data)
    assert teacher.seen == [data] and teacher.seen[0] is data
    assert set(output.keys()) == set(direct.keys())
    assert torch.equal(output["log_probs"].values(), direct["log_probs"].values())
    assert torch.equal(output["log_probs"].offsets(), direct["log_probs"].offsets())


def _response_values(log_probs, data):
    from verl.workers.utils.padding import response_from_nested

    return response_from_nested(log_probs, data["response_mask"]).values()


@pytest.mark.parametrize("remove_padding", [True, False])
def test_a_view_scores_the_students_response_after_the_teachers_prompt(student_tok, own_template_tok, models,
                                                                       remove_padding):
    """prompt=<template> through the worker: the teacher's log-probs of the student's response tokens after its own
    prompt, in the student's layout, equal a float64 forward of the prompt built by hand (verl's packed and padded
    forwards: actor_rollout_ref.model.use_remove_padding, false on CPU)."""
    from opd_verl.verl_ext.teacher_worker import OPDWorker

    data = verl_batch(student_tok, remove_padding=remove_padding)
    teacher = EngineTeacher(models["same"])
    output = OPDWorker.compute_ref_log_prob(opd_worker([teacher], [_view(TEMPLATE, own_template_tok)]), data)
    assert output["log_probs"].offsets().tolist() == data["input_ids"].offsets().tolist()
    got = _response_values(output["log_probs"], data)
    model64 = copy.deepcopy(models["same"]).double()
    expected = []
    for i, sample in enumerate(SAMPLES):
        prompt = torch.tensor(_expected_prompt(own_template_tok, sample, "template"))
        response = data["responses"][i]
        with torch.no_grad():
            logp = torch.log_softmax(model64(torch.cat([prompt, response])[None]).logits[0], -1)
        expected.append(logp[torch.arange(len(prompt) - 1, len(prompt) + len(response) - 1), response])
    expected = torch.cat(expected)
    assert torch.allclose(got.double(), expected, atol=1e-5), (got.double() - expected).abs().max()
    student_view = _response_values(EngineTeacher(models["same"]).infer_batch(verl_batch(student_tok))["log_probs"],
                                    data)
    assert (student_view - got).abs().max() > 1e-3  # the teacher's own prompt changes its log-probs


def test_the_cross_tokenizer_path_with_the_same_tokenizer_is_the_direct_path(student_tok, own_template_tok, models):
    """cross_tokenizer=true with the student's own tokenizer: every span is one token and the worker's teacher
    log-probs equal the direct path's (cross_tokenizer=false, same prompt) within 1e-6; the counts say all bytes are
    aligned, one token per span."""
    from opd_verl.verl_ext.teacher_batch import ALIGNMENT_FIELD, alignment_metrics
    from opd_verl.verl_ext.teacher_worker import OPDWorker

    outputs = {}
    for cross in (False, True):
        data = verl_batch(student_tok)
        worker = opd_worker([EngineTeacher(models["same"])], [_view("chat_template", own_template_tok, cross=cross)],
                            student_tok=own_template_tok)
        outputs[cross] = (OPDWorker.compute_ref_log_prob(worker, data), data)
    direct, cross = (_response_values(outputs[c][0]["log_probs"], outputs[c][1]) for c in (False, True))
    assert direct.numel() == sum(len(r) for r in outputs[True][1]["responses"].unbind())
    assert (direct - cross).abs().max() <= 1e-6, (direct - cross).abs().max()
    counts = outputs[True][0][ALIGNMENT_FIELD.format(index=0)]
    metrics = alignment_metrics(counts)
    # as TransferQueue hands the field back to the trainer: one (nested) row per sample
    assert alignment_metrics(torch.nested.as_nested_tensor(list(counts), layout=torch.jagged)) == metrics
    assert metrics["aligned_byte_frac"] == 1.0 and metrics["student_tokens_per_span"] == 1.0
    assert metrics["teacher_tokens_per_span"] == 1.0 and metrics["mismatched_samples"] == 0.0
    assert ALIGNMENT_FIELD.format(index=0) not in outputs[False][0].keys()


def test_cross_tokenizer_span_terms_through_the_worker(student_tok, other_tok, models):
    """A teacher of another tokenizer through the worker: q − s on each span's last student token is the span's
    float64 teacher log-prob (its own tokens after its own prompt) minus the student's summed old_log_probs; 0 on
    the span's other tokens."""
    from opd_verl.algorithms.token_alignment import align_spans, token_byte_spans
    from opd_verl.verl_ext.teacher_worker import OPDWorker

    data = verl_batch(student_tok)
    worker = opd_worker([EngineTeacher(models["other"])], [_view("chat_template", other_tok, cross=True)],
                        student_tok=student_tok)
    q = _response_values(OPDWorker.compute_ref_log_prob(worker, data)["log_probs"], data).double()
    s_all = data["old_log_probs"].values().double()
    model64 = copy.deepcopy(models["other"]).double()
    start, multi_token_spans = 0, 0
    for i, (sample, text) in enumerate(zip(SAMPLES, RESPONSES)):
        s_ids = data["responses"][i].tolist()
        ended = s_ids[-1] == student_tok.eos_token_id
        t_ids = other_tok(text, add_special_tokens=False)["input_ids"] + ([other_tok.eos_token_id] if ended else [])
        prompt = other_tok.encode(other_tok.apply_chat_template(sample["prompt"], add_generation_prompt=True,
                                                                tokenize=False), add_special_tokens=False)
        with torch.no_grad():
            logp = torch.log_softmax(model64(torch.tensor(prompt + t_ids)[None]).logits[0], -1)
        q_t = logp[torch.arange(len(prompt) - 1, len(prompt) + len(t_ids) - 1), torch.tensor(t_ids)]
        s = s_all[start:start + len(s_ids)]
        terms = q[start:start + len(s_ids)] - s
        s_bytes, t_bytes = token_byte_spans(student_tok, s_ids).pieces, token_byte_spans(other_tok, t_ids).pieces
        if ended:  # the eos pair is a span of its own
            spans = align_spans(s_bytes[:-1], t_bytes[:-1]) + [(range(len(s_ids) - 1, len(s_ids)),
                                                                range(len(t_ids) - 1, len(t_ids)))]
        else:
            spans = align_spans(s_bytes, t_bytes)
        expected = torch.zeros(len(s_ids), dtype=torch.float64)
        for s_span, t_span in spans:
            expected[s_span[-1]] = q_t[list(t_span)].sum() - s[list(s_span)].sum()
            multi_token_spans += len(s_span) > 1 or len(t_span) > 1
        assert torch.allclose(terms, expected, atol=1e-5), (i, (terms - expected).abs().max())
        start += len(s_ids)
    assert multi_token_spans > 0  # the two tokenizations differ


@pytest.mark.parametrize("mode", ["route", "mean_prob"])
def test_each_teacher_has_its_own_view(student_tok, own_template_tok, models, mode):
    """Two teachers, the first with its own chat template, the second with the student's view: routed, each
    sample's log-probs are its own teacher's (the view's, or the direct call's); mixed, the mean of the two
    probabilities of each token."""
    from verl.utils import tensordict_utils as tu

    from opd_verl.verl_ext.teacher_worker import OPDWorker

    def batch():
        data = verl_batch(student_tok)
        tu.assign_non_tensor(data, data_source=["a", "b", "a"])
        return data

    view = _view("chat_template", own_template_tok)
    alone = {name: _response_values(OPDWorker.compute_ref_log_prob(opd_worker([EngineTeacher(models["same"])], [v]),
                                                                   batch())["log_probs"], batch())
             for name, v in (("view", view), ("direct", None))}
    worker = opd_worker([EngineTeacher(models["same"]), EngineTeacher(models["same"])], [view, None], mode=mode)
    worker.teacher_entries = [{"weight": 1.0, "data_source": "a"}, {"weight": 1.0, "data_source": "b"}]
    data = batch()
    both = _response_values(OPDWorker.compute_ref_log_prob(worker, data)["log_probs"], data)
    lengths = [len(r) for r in data["responses"].unbind()]
    if mode == "route":
        expected = torch.cat([alone["view" if source == "a" else "direct"][sum(lengths[:i]):sum(lengths[:i + 1])]
                              for i, source in enumerate(["a", "b", "a"])])
    else:
        expected = torch.logaddexp(alone["view"], alone["direct"]) - torch.log(torch.tensor(2.0))
    assert torch.allclose(both, expected, atol=1e-6)
    assert (alone["view"] - alone["direct"]).abs().max() > 1e-3


def test_routed_cross_tokenizer_teachers_return_each_ones_alignment_counts(student_tok, own_template_tok, models):
    from verl.utils import tensordict_utils as tu

    from opd_verl.verl_ext.teacher_batch import ALIGNMENT_FIELD, alignment_metrics
    from opd_verl.verl_ext.teacher_worker import OPDWorker

    data = verl_batch(student_tok)
    tu.assign_non_tensor(data, data_source=["a", "b", "a"])
    views = [_view("chat_template", own_template_tok, cross=True), None, _view(TEMPLATE, own_template_tok, cross=True)]
    worker = opd_worker([EngineTeacher(models["same"]) for _ in views], views, student_tok=student_tok, mode="route")
    worker.teacher_entries = [{"weight": 1.0, "data_source": s} for s in ("a", "b", "c")]
    output = OPDWorker.compute_ref_log_prob(worker, data)
    assert ALIGNMENT_FIELD.format(index=1) not in output.keys()
    for i in (0, 2):
        assert alignment_metrics(output[ALIGNMENT_FIELD.format(index=i)])["aligned_byte_frac"] == 1.0
