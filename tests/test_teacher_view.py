"""The teacher's own prompt (opd_verl.algorithms.teacher_view) and the cross-tokenizer round-trip preflight, with
the repo's tiny Qwen-style tokenizer and tokenizers trained here."""

from __future__ import annotations

import numpy as np
import pytest
from tiny_tokenizers import CHAT_TEMPLATE_B, byte_level_bpe, sentencepiece_unigram

from opd_verl.algorithms.teacher_view import (
    build_teacher_prompt,
    render_template,
    round_trip_check,
    teacher_prompt_text,
    user_text,
)
from opd_verl.demo.tiny_models import build_tokenizer

SAMPLE = {
    "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+3?"}],
    "extra_info": {"answer": "5", "index": 7, "steps": ["2+3", "=5"]},
    "reward_model": {"ground_truth": "5", "style": "rule"},
    "data_source": "arith",
}


@pytest.fixture(scope="module")
def qwen():
    return build_tokenizer(all_bytes=True)


@pytest.fixture(scope="module")
def other():
    return byte_level_bpe(300, name="tiny-bpe-chat-b", chat_template=CHAT_TEMPLATE_B)


def test_student_mode_is_the_students_ids_unchanged(qwen):
    ids = [5, 6, 7]
    assert build_teacher_prompt("student", SAMPLE, ids, qwen) is ids
    assert build_teacher_prompt("student", {}, ids, None) is ids  # nothing else is read
    assert teacher_prompt_text("student", SAMPLE, qwen) is None


def test_chat_template_mode_renders_with_the_teachers_template(qwen, other):
    expected_qwen = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+3?<|im_end|>\n"
                     "<|im_start|>assistant\n")
    expected_other = "<<system>> Be brief.\n<<user>> What is 2+3?\n<<assistant>> "
    for tok, expected in ((qwen, expected_qwen), (other, expected_other)):
        ids = build_teacher_prompt("chat_template", SAMPLE, [1, 2], tok)
        assert tok.decode(ids) == expected
        assert ids == tok.encode(expected, add_special_tokens=False)
    assert qwen.convert_ids_to_tokens(build_teacher_prompt("chat_template", SAMPLE, [], qwen))[0] == "<|im_start|>"
    # the parquet form of the messages (a numpy array of dicts) and a plain string prompt
    as_array = {**SAMPLE, "prompt": np.array(SAMPLE["prompt"], dtype=object)}
    assert teacher_prompt_text("chat_template", as_array, other) == expected_other
    assert teacher_prompt_text("chat_template", {"prompt": "hi"}, other) == "<<user>> hi\n<<assistant>> "


def test_template_placeholders():
    template = "{prompt}\nReference: {extra_info[answer]} ({reward_model['ground_truth']}, {extra_info[steps][1]}) {{x}}"
    assert render_template(template, SAMPLE) == "What is 2+3?\nReference: 5 (5, =5) {x}"
    assert render_template("{data_source}/{extra_info[index]}/{prompt[0][content]}", SAMPLE) == "arith/7/Be brief."
    two_users = {"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                            {"role": "user", "content": "c"}]}
    assert user_text(two_users) == "a\n\nc"
    assert render_template("no placeholders", {}) == "no placeholders"


def test_template_mode_wrapped_raw_and_as_messages(qwen, other):
    template = "{prompt} The answer is {reward_model[ground_truth]}."
    ids = build_teacher_prompt("template", SAMPLE, [1], other, template)
    assert other.decode(ids) == "<<user>> What is 2+3? The answer is 5.\n<<assistant>> "
    raw = build_teacher_prompt("template", SAMPLE, [1], other, template, wrap_chat=False)
    assert raw == other.encode("What is 2+3? The answer is 5.") and other.decode(raw) == "What is 2+3? The answer is 5."
    messages = [{"role": "system", "content": "You know the answer: {extra_info[answer]}."},
                {"role": "user", "content": "{prompt}"}]
    ids = build_teacher_prompt("template", SAMPLE, [1], qwen, messages)
    assert qwen.decode(ids) == ("<|im_start|>system\nYou know the answer: 5.<|im_end|>\n<|im_start|>user\n"
                                "What is 2+3?<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("template,match", [
    ("{extra_info[answr]}", r"unknown placeholder \{extra_info\[answr\]\}: 'extra_info' has no 'answr' "
                            r"\(it has: answer, index, steps\)"),
    ("{nope}", r"unknown placeholder \{nope\}: the sample has no 'nope' \(it has: prompt, extra_info, "),
    ("{extra_info[steps][5]}", r"\['steps'\] has no '5' \(it has: 2 items\)"),
    ("{data_source[x]}", r"'data_source' has no 'x' \(it has: a str\)"),
    ("{prompt", r"unclosed '\{' at character 0"),
    ("a } b", r"single '\}' at character 2"),
    ("{}", r"empty placeholder"),
    ("{a[b]c}", r"not of the form"),
])
def test_template_errors_are_one_line_and_name_the_key(template, match):
    with pytest.raises(ValueError, match=match) as err:
        render_template(template, SAMPLE)
    assert "\n" not in str(err.value) and str(err.value).startswith("opd_verl: opd.teacher.prompt")


def test_mode_errors(qwen):
    with pytest.raises(ValueError, match=r"opd.teacher.prompt='teacher' is not one of student, chat_template, "):
        build_teacher_prompt("teacher", SAMPLE, [], qwen)
    with pytest.raises(ValueError, match="needs a template"):
        build_teacher_prompt("template", SAMPLE, [], qwen)
    bare = byte_level_bpe(300, name="tiny-bpe-no-template")
    with pytest.raises(ValueError, match="tokenizer tiny-bpe-no-template has no chat template"):
        build_teacher_prompt("chat_template", SAMPLE, [], bare)
    assert build_teacher_prompt("template", SAMPLE, [], bare, "{prompt}", wrap_chat=False) == bare.encode(
        "What is 2+3?")
    with pytest.raises(ValueError, match="the sample has no 'prompt'"):
        build_teacher_prompt("chat_template", {"x": 1}, [], qwen)


def test_round_trip_check():
    texts = ["the cat sat 12345", "héllo wörld 日本語 🙂", "Answer: 42 #### 42\n"]
    a, b, sp = byte_level_bpe(400, name="tiny-a"), byte_level_bpe(300, name="tiny-b"), sentencepiece_unigram()
    assert round_trip_check(a, b, texts) is None
    assert round_trip_check(a, sp, texts) is None
    # SentencePiece's dummy prefix swallows a leading space: named with the sample and the bytes
    msg = round_trip_check(a, sp, texts + [" leading space"])
    assert msg == ("opd_verl: cross-tokenizer check: 1 of 4 texts do not survive the teacher's tokenizer tiny-sp "
                   "(decode -> encode -> decode, from the student's tiny-a) byte for byte; first: sample 3 at byte 0: "
                   "student b' leading' vs teacher b'leading '")
    # a teacher without the bytes of 'é' drops it
    ascii_teacher = build_tokenizer()
    msg = round_trip_check(a, ascii_teacher, ["plain", "café au lait", "naïve"])
    assert "2 of 3 texts" in msg and "first: sample 1 at byte 3: student b'\\xc3\\xa9 au la' vs teacher b' au lait'" in msg
