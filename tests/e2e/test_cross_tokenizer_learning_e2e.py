"""OPD learns from a teacher with another tokenizer (issue 14), end to end on CPU: `python -m opd_verl.main_opd` with
the demo's recipe (recipes/demo_cpu.yaml) and `opd.teacher.cross_tokenizer=true` on the demo's task.

Two models of the same size are trained here by SFT on the demo's task, as test_opd_learning_e2e.py trains its
teacher (its settings): one with the demo's tokenizer (the student's), one with another tokenizer (the teacher's):
the same characters under other ids, every two-digit number one token ("16", "76": the student writes them as two
digits), and the answer lines' " + ", " - ", " = ", "Ones: ", "\\nTens: " in pieces (" ", "+", " ";
"\\n", "Tens", ": ": one student token, several teacher tokens). The student is the first model with Gaussian noise
on its weight matrices (perturbed_copy), the teacher the second; 16 OPD steps, the teacher scoring its own tokens
after the sample's messages in its own chat template, each byte span's q - s on its last student token.

Measured (2 cores, two runs; the SFT is the same each run, the OPD sampling is not): both models ~80% greedy on
val, the noisy student 2.3%; per-token KL (opd/kl_per_token: the spans' q - s per student token) 4.40 4.31 4.88 4.67
4.21 4.11 3.63 3.15 2.60 3.77 2.82 2.38 2.99 2.54 2.65 2.51 (first 2 -> last 3: 4.36 -> 2.57, x0.59) and 4.58 4.37
4.42 4.64 4.78 4.27 3.71 3.06 2.53 3.33 2.47 2.19 2.46 2.45 1.97 2.29 (4.47 -> 2.24, x0.50); greedy val accuracy
2.3% -> 3.0% and 2.3% -> 8.3% (a small rise: 7 -> 9 and 7 -> 25 of 300); sampled accuracy, first 3 -> last 3
steps, 2.3% -> 6.0% and 2.3% -> 7.3%; aligned_byte_frac 1.0, 1.05 student and 1.76 teacher tokens per span;
455 s and 405 s per test (~100 s of it the two SFTs).
Asserted: the two tokenizers split every worked answer differently, the preflight's round trip passed, spans of
several tokens on both sides, the per-token KL of the last 3 steps <= 0.7 x that of the first 2, and the greedy val
accuracy and the sampled answers' accuracy rise.
"""

from __future__ import annotations

import pytest

from test_opd_learning_e2e import NOISE, STEPS, _mean, _settings, learning_curves, perturbed_copy, run_opd_steps

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

#: the demo tokenizer's words that the teacher's tokenizer splits into pieces, and the pieces it has instead
SPLIT_WORDS = (" + ", " - ", " = ", "Ones: ", "\nTens: ")
TEACHER_PIECES = ("Ones", "Tens", ": ")
TWO_DIGITS = tuple(str(n) for n in range(10, 100))


def _teacher_tokenizer():
    from opd_verl.demo.task import tokenizer_words
    from opd_verl.demo.tiny_models import DEFAULT_CHARS, build_tokenizer

    words = [w for w in tokenizer_words() if w not in SPLIT_WORDS]
    return build_tokenizer(DEFAULT_CHARS[::-1], words=(*words, *TEACHER_PIECES, *TWO_DIGITS), model_max_length=512)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The demo's build with test_opd_learning_e2e's settings (its teacher: the student's tokenizer), the noisy
    student made from that model, and a model of the same size trained the same way on the teacher's tokenizer."""
    import pyarrow.parquet as pq

    from opd_verl.demo.build import _train_model, build

    settings = _settings()
    b = build(settings, cache_dir=tmp_path_factory.mktemp("cross_tokenizer_build"))
    b.noisy_student = perturbed_copy(b.teacher, tmp_path_factory.mktemp("noisy_student"), NOISE)
    train_rows = pq.read_table(b.data["sft_train"]).to_pylist()
    b.val_rows = pq.read_table(b.data["sft_val"]).to_pylist()[: settings.val_prompts]
    b.other = _train_model("other-tokenizer teacher", settings.teacher, settings.teacher_sft, _teacher_tokenizer(),
                           train_rows, b.val_rows, tmp_path_factory.mktemp("other_teacher"), print)
    return b


def _pieces(tokenizer, text):
    return [tokenizer.decode([i]) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]


def test_a_teacher_with_another_tokenizer_lowers_the_kl_and_raises_the_reward(built, tmp_path):
    from transformers import AutoTokenizer

    s_tok, t_tok = AutoTokenizer.from_pretrained(built.noisy_student), AutoTokenizer.from_pretrained(built.other["path"])
    assert len(s_tok) != len(t_tok) and s_tok.get_vocab() != t_tok.get_vocab()
    for row in built.val_rows[:50]:  # not a same-tokenizer test in disguise: every worked answer splits otherwise
        answer = row["response"]
        s_pieces, t_pieces = _pieces(s_tok, answer), _pieces(t_tok, answer)
        assert "".join(s_pieces) == "".join(t_pieces) == answer
        assert s_pieces != t_pieces, (answer, s_pieces)
    teacher_acc = built.other["val_accuracy"]
    assert teacher_acc >= 0.5, teacher_acc

    steps = run_opd_steps(built.noisy_student, built.other["path"], built.data, tmp_path,
                          "opd.teacher.prompt=chat_template", "opd.teacher.cross_tokenizer=true")
    log = (tmp_path / "opd.log").read_text(errors="replace")
    assert "cross_tokenizer=true) round-trips" in log, "the preflight's round trip did not run"
    for s in range(1, STEPS + 1):
        m = steps[s]
        assert m["opd/cross_tokenizer/aligned_byte_frac"] > 0.9, (s, m["opd/cross_tokenizer/aligned_byte_frac"])
        assert m["opd/cross_tokenizer/student_tokens_per_span"] > 1.0, s
        assert m["opd/cross_tokenizer/teacher_tokens_per_span"] > 1.0, s

    kl, val_before, val_after, score = learning_curves(steps)
    print(f"per-token KL per step: {[round(x, 3) for x in kl]}; greedy val accuracy {val_before:.3f} -> "
          f"{val_after:.3f} (teacher {teacher_acc:.3f}); sampled accuracy per step: {[round(x, 3) for x in score]}")
    kl_start, kl_end = _mean(kl[:2]), _mean(kl[-3:])
    assert kl_end <= 0.7 * kl_start, f"per-token KL fell only from {kl_start:.3f} to {kl_end:.3f}: {kl}"
    assert val_before < teacher_acc - 0.2, f"the student must be weaker: {val_before:.3f} vs teacher {teacher_acc:.3f}"
    assert val_after > val_before, f"greedy val accuracy {val_before:.3f} -> {val_after:.3f}"
    assert _mean(score[-3:]) > _mean(score[:3]), f"sampled accuracy per step: {score}"
