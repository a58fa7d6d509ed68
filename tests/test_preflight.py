"""Teacher-vs-student checks before any model loads (opd_verl.checks.preflight), on tiny tokenizers and model dirs."""

import pytest

from opd_verl.checks.options import OPDConfigError
from opd_verl.checks.preflight import compare_chat_templates, compare_vocabularies, run_preflight
from opd_verl.demo.tiny_models import CHAT_TEMPLATE, build_qwen2, build_tokenizer, save_model_dir


def _model_dir(path, tokenizer=None, vocab_multiple=64):
    tokenizer = tokenizer or build_tokenizer()
    model = build_qwen2(tokenizer, hidden_size=64, num_layers=1, vocab_multiple=vocab_multiple)
    return save_model_dir(path, tokenizer, model)


def _config(student, teacher, allow_template_mismatch=False, support="sampled", topk=20):
    return {
        "actor_rollout_ref": {"model": {"path": student, "tokenizer_path": None}},
        "opd": {
            "support": support,
            "topk": topk,
            "teacher": {"path": teacher, "tokenizer_path": None},
            "teachers": [],
            "preflight": {"allow_template_mismatch": allow_template_mismatch},
        },
    }


def test_same_tokenizer_passes(tmp_path):
    student, teacher = _model_dir(tmp_path / "s"), _model_dir(tmp_path / "t")
    reports = run_preflight(_config(student, teacher))
    assert any("matches the student's vocabulary and chat template" in line for line in reports)


def test_padded_vocabulary_is_reconciled_and_reported(tmp_path):
    student = _model_dir(tmp_path / "s", vocab_multiple=64)
    teacher = _model_dir(tmp_path / "t", vocab_multiple=256)
    reports = run_preflight(_config(student, teacher))
    assert any("embedding sizes differ (student 128, teacher 256)" in r for r in reports), reports


def test_vocabulary_mismatch_names_both_models(tmp_path):
    student = _model_dir(tmp_path / "s")
    teacher = _model_dir(tmp_path / "t", build_tokenizer(vocab_chars="0123456789abcdefghijklmnopqrstuvwxyz +-=\n"))
    with pytest.raises(OPDConfigError) as err:
        run_preflight(_config(student, teacher))
    message = str(err.value)
    assert student in message and teacher in message and "different vocabularies" in message
    assert "\n" not in message


def test_chat_template_mismatch_is_an_error_unless_allowed(tmp_path):
    other = build_tokenizer()
    other.chat_template = CHAT_TEMPLATE.replace("<|im_start|>assistant", "<|im_start|>bot")
    student, teacher = _model_dir(tmp_path / "s"), _model_dir(tmp_path / "t", other)
    with pytest.raises(OPDConfigError, match="render the same prompt differently.*allow_template_mismatch=true"):
        run_preflight(_config(student, teacher))
    reports = run_preflight(_config(student, teacher, allow_template_mismatch=True))
    assert any("chat templates differ" in r for r in reports)


def test_compare_functions_on_tokenizers():
    a, b = build_tokenizer(), build_tokenizer()
    assert compare_vocabularies(a, b, "s", "t") is None
    assert compare_chat_templates(a, b, "s", "t") is None


def test_missing_teacher_dir(tmp_path):
    student = _model_dir(tmp_path / "s")
    with pytest.raises(OPDConfigError, match=r"opd.teacher.path=.*/missing does not exist"):
        run_preflight(_config(student, str(tmp_path / "missing")))


def test_teacher_dir_without_config(tmp_path):
    student = _model_dir(tmp_path / "s")
    (tmp_path / "empty").mkdir()
    with pytest.raises(OPDConfigError, match="has no readable config.json"):
        run_preflight(_config(student, str(tmp_path / "empty")))


def test_topk_larger_than_the_teachers_vocabulary(tmp_path):
    student, teacher = _model_dir(tmp_path / "s"), _model_dir(tmp_path / "t")
    run_preflight(_config(student, teacher, support="topk", topk=128))
    with pytest.raises(OPDConfigError, match=r"opd.topk=129 is larger than the vocabulary of teacher .* \(128\)"):
        run_preflight(_config(student, teacher, support="topk", topk=129))


def test_main_opd_stops_on_a_vocabulary_mismatch_before_training(tmp_path):
    from conftest import run_main_opd

    student = _model_dir(tmp_path / "s")
    teacher = _model_dir(tmp_path / "t", build_tokenizer(vocab_chars="0123456789 +-=\n"))
    result = run_main_opd("algorithm.adv_estimator=opd", f"actor_rollout_ref.model.path={student}", f"opd.teacher.path={teacher}")
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("opd_verl: error:")]
    assert len(errors) == 1 and "different vocabularies" in errors[0] and teacher in errors[0], result.stderr
    assert "ray init" not in result.stdout
