"""Teacher-vs-student checks before any model loads (opd_verl.checks.preflight, and its CLI opd_verl.preflight), on
tiny tokenizers: model dirs, and hub names in a Hugging Face cache built here (offline; no hub is ever contacted)."""

import pytest

from opd_verl.checks.errors import OPDConfigError
from opd_verl.checks.preflight import (
    check_model_sources, compare_chat_templates, compare_vocabularies, run_preflight,
)
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


# ---- hub names (issue 13): read from the Hugging Face cache (tokenizer files and config.json only), else skipped ----

REV = "0123456789abcdef0123456789abcdef01234567"
OTHER_VOCAB = "0123456789 +-=\n"


def _cache_hub_model(hub_cache, name, tokenizer=None, vocab_multiple=64):
    """`name` as huggingface_hub caches it (models--org--name/refs/main -> snapshots/<rev>/), with the tokenizer
    files and config.json only: no weights, so a preflight that needed them would fail."""
    repo = hub_cache / ("models--" + name.replace("/", "--"))
    snapshot = repo / "snapshots" / REV
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(REV)
    tokenizer = tokenizer or build_tokenizer()
    tokenizer.save_pretrained(snapshot)
    build_qwen2(tokenizer, hidden_size=64, num_layers=1, vocab_multiple=vocab_multiple).config.save_pretrained(snapshot)
    assert not [f for f in snapshot.iterdir() if f.suffix in (".safetensors", ".bin")]
    return name


def _hub_env(tmp_path):
    """A subprocess that is offline with tmp_path/hf as its Hugging Face home and cache."""
    (tmp_path / "hf" / "hub").mkdir(parents=True, exist_ok=True)
    return {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"), "HF_HUB_OFFLINE": "1"}


def _preflight_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith(("opd_verl: preflight:", "opd_verl: error:"))]


def test_the_suite_is_offline_on_an_empty_hub_cache():
    """conftest makes every test offline (no hub contact) and hides the user's cache (hub names resolve to nothing)."""
    from huggingface_hub import constants

    from conftest import EMPTY_HF_HUB_CACHE

    assert constants.HF_HUB_OFFLINE and constants.HF_HUB_CACHE == EMPTY_HF_HUB_CACHE


def test_hub_names_from_the_cache_are_checked_before_training(tmp_path):
    """main_opd with hub names (as every GPU recipe has) reads their tokenizers from the HF cache: a vocabulary
    mismatch stops the run, offline and without weights."""
    from conftest import run_main_opd

    env = _hub_env(tmp_path)
    hub = tmp_path / "hf" / "hub"
    student = _cache_hub_model(hub, "tiny-org/student")
    teacher = _cache_hub_model(hub, "tiny-org/teacher-other-vocab", build_tokenizer(vocab_chars=OTHER_VOCAB))
    result = run_main_opd(
        "algorithm.adv_estimator=opd",
        f"actor_rollout_ref.model.path={student}",
        f"opd.teacher.path={teacher}",
        "--cfg",
        "job",
        env=env,
    )
    assert result.returncode == 2, result.stderr
    lines = _preflight_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("opd_verl: error:"), result.stderr
    assert "different vocabularies" in lines[0] and student in lines[0] and teacher in lines[0]


def test_each_hub_teacher_is_checked_with_its_tokenizer_path(tmp_path):
    """opd.teachers: every teacher is checked; a teacher's tokenizer_path (a hub name too) is the tokenizer used."""
    from conftest import run_main_opd

    env = _hub_env(tmp_path)
    hub = tmp_path / "hf" / "hub"
    student = _cache_hub_model(hub, "tiny-org/student")
    same = _cache_hub_model(hub, "tiny-org/teacher", vocab_multiple=256)
    other = _cache_hub_model(hub, "tiny-org/teacher-other-vocab", build_tokenizer(vocab_chars=OTHER_VOCAB))
    teachers = f"opd.teachers=[{{path:'{same}'}},{{path:'{other}',tokenizer_path:'{same}'}}]"
    result = run_main_opd(
        "algorithm.adv_estimator=opd", f"actor_rollout_ref.model.path={student}", teachers, "--cfg", "job", env=env
    )
    assert result.returncode == 0, result.stderr
    lines = _preflight_lines(result.stderr)
    assert f"opd_verl: preflight: teacher {same} matches the student's vocabulary and chat template" in lines, lines
    assert f"opd_verl: preflight: teacher {other} matches the student's vocabulary and chat template" in lines, lines
    assert any("embedding sizes differ (student 128, teacher 256)" in line for line in lines), lines
    teachers = f"opd.teachers=[{{path:'{same}'}},{{path:'{other}'}}]"  # without its tokenizer_path: caught
    result = run_main_opd(
        "algorithm.adv_estimator=opd", f"actor_rollout_ref.model.path={student}", teachers, "--cfg", "job", env=env
    )
    assert result.returncode == 2 and f"teacher {other} and student {student} have different" in result.stderr


def _online(monkeypatch, *answers):
    """Online as far as the preflight can tell; each hub request (HEAD) raises the next of `answers` (nothing leaves
    this machine)."""
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    errors = iter(answers)

    def head(url, *args, **kwargs):
        raise next(errors)

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", head)


def _not_found():
    import httpx
    from huggingface_hub.errors import RepositoryNotFoundError

    response = httpx.Response(404, request=httpx.Request("HEAD", "https://hub.invalid/nobody/teacher"))
    return RepositoryNotFoundError("404", response=response)


def _no_connection():
    import httpx

    return httpx.ConnectError("[Errno -2] Name or service not known")


@pytest.mark.parametrize("key", ["actor_rollout_ref.model.path", "actor_rollout_ref.model.tokenizer_path",
                                 "opd.teacher.path", "opd.teacher.tokenizer_path", "opd.teachers[1].path",
                                 "opd.teachers[1].tokenizer_path"])
def test_a_name_neither_a_directory_nor_cached_offline_is_one_error_naming_both_readings(tmp_path, key):
    """Offline (conftest) with an empty cache: a model or tokenizer name that is no directory here cannot load; for a
    launch (check_model_sources) one line names the key, both readings and the fix (issue 28: a skip line, then a
    traceback in verl); the preflight (also under `--cfg job`) prints the skip line with the fix and goes on."""
    student, teacher = _model_dir(tmp_path / "s"), _model_dir(tmp_path / "t")
    config = _config(student, teacher)
    if key.startswith("opd.teachers"):
        config["opd"]["teachers"] = [{"path": teacher, "tokenizer_path": None}, {"path": teacher, "tokenizer_path": None}]
    section, _, field = key.rpartition(".")
    entry = {"actor_rollout_ref.model": config["actor_rollout_ref"]["model"], "opd.teacher": config["opd"]["teacher"],
             "opd.teachers[1]": (config["opd"]["teachers"] or [None, None])[1]}[section]
    entry[field] = "no_such_dir_for_opd"
    reports = run_preflight(config)
    assert [r for r in reports if "skipped: offline (HF_HUB_OFFLINE=1)" in r and "HF_ENDPOINT" in r], reports
    with pytest.raises(OPDConfigError) as err:
        check_model_sources(config)
    message = str(err.value)
    assert message.startswith(f"{key}=no_such_dir_for_opd is no directory here (from "), message
    assert "as a hub id it cannot be fetched: offline (HF_HUB_OFFLINE=1)" in message
    assert "not in the Hugging Face cache" in message and "hf download no_such_dir_for_opd" in message
    assert "HF_ENDPOINT" in message and "\n" not in message


def test_a_name_that_is_no_hub_id_either_is_an_error(tmp_path):
    student = _model_dir(tmp_path / "s")
    with pytest.raises(OPDConfigError, match=r"opd.teacher.path=no such dir is neither an existing directory .* nor "
                                             r"a valid hub id"):
        check_model_sources(_config(student, "no such dir"))
    (line,) = run_preflight(_config(student, "no such dir"))  # --cfg job: a phase may still make it
    assert "skipped: no such dir is neither a local directory nor a hub name" in line, line


def test_a_cached_hub_name_passes_offline_without_weights(tmp_path, monkeypatch):
    """The same name in the Hugging Face cache (tokenizer files and config.json only) is checked, not refused."""
    from huggingface_hub import constants

    hub = tmp_path / "hf" / "hub"
    teacher = _cache_hub_model(hub, "tiny-org/teacher")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    student = _model_dir(tmp_path / "s")
    check_model_sources(_config(student, teacher))
    reports = run_preflight(_config(student, teacher))
    assert reports == [f"preflight: teacher {teacher} matches the student's vocabulary and chat template"], reports


def test_main_opd_stops_on_a_mistyped_path_offline_in_one_line_before_any_model(tmp_path):
    """`opd.teacher.path=no_such_dir_for_opd` on an offline node: one error line, exit 2, no Ray (it was a ~40-line
    Hydra InstantiationException from verl's HFModelConfig); the student's path the same."""
    import time

    from conftest import run_main_opd

    student = _model_dir(tmp_path / "s")
    env = {"HF_HUB_OFFLINE": "1"}
    for overrides, key in (
        ([f"actor_rollout_ref.model.path={student}", "opd.teacher.path=no_such_dir_for_opd"], "opd.teacher.path"),
        (["actor_rollout_ref.model.path=no_such_dir_for_opd", f"opd.teacher.path={student}"],
         "actor_rollout_ref.model.path"),
    ):
        started = time.monotonic()
        result = run_main_opd("algorithm.adv_estimator=opd", *overrides, env=env)
        elapsed = time.monotonic() - started
        assert result.returncode == 2, result.stderr[-3000:]
        errors = [line for line in result.stderr.splitlines() if line.startswith("opd_verl: error:")]
        assert len(errors) == 1, result.stderr[-3000:]
        assert errors[0].startswith(f"opd_verl: error: {key}=no_such_dir_for_opd is no directory here"), errors[0]
        assert "as a hub id it cannot be fetched" in errors[0] and "Traceback" not in result.stderr
        assert "ray init" not in result.stdout.lower() and elapsed < 60, elapsed


def test_a_skipped_check_prints_the_command_with_the_teachers_tokenizer_and_trust(tmp_path, monkeypatch):
    """The hub answers "not found" (a private repository the workers may have a token for): not an error; one line
    with the reason and the command that runs the checks, which carries tokenizer_path and trust_remote_code."""
    student = _model_dir(tmp_path / "s")
    _online(monkeypatch, _not_found(), _not_found(), _not_found(), _not_found())
    config = _config(student, "nobody/uncached-teacher")
    config["opd"]["teacher"].update(tokenizer_path="nobody/tok", model={"trust_remote_code": True})
    check_model_sources(config)  # not an error
    (line,) = run_preflight(config)
    assert "checks of teacher nobody/uncached-teacher against student" in line and "skipped" in line, line
    assert line.endswith(
        f"python -m opd_verl.preflight --teacher nobody/uncached-teacher --student {student} "
        "--teacher-tokenizer nobody/tok --trust-remote-code"
    ), line


def test_an_unreachable_hub_is_an_error_and_an_unknown_name_a_skip(tmp_path, monkeypatch):
    """Online but no connection: the uncached name cannot load, an error with the fix; the hub answers "no such
    repository": skipped with that reason (the request is faked: nothing leaves this machine)."""
    student = _model_dir(tmp_path / "s")
    _online(monkeypatch, _no_connection(), _not_found(), _not_found())
    with pytest.raises(OPDConfigError) as err:
        check_model_sources(_config(student, "nobody/teacher"))
    message = str(err.value)
    assert "opd.teacher.path=nobody/teacher is no directory here" in message, message
    assert "the hub cannot be reached for nobody/teacher (ConnectError: [Errno -2]" in message, message
    assert "set HF_HUB_OFFLINE=1, or set HF_ENDPOINT to a hub mirror" in message, message
    check_model_sources(_config(student, "nobody/teacher"))  # not an error
    (line,) = run_preflight(_config(student, "nobody/teacher"))
    assert "skipped: nobody/teacher is not on the hub, or is private and this machine has no token for it" in line


def test_hub_names_use_each_models_tokenizer_and_trust_remote_code(tmp_path, monkeypatch):
    """The student's model.trust_remote_code and tokenizer_path, the teacher's own (opd.teacher.model): hub names are
    loaded with them (the loads are faked here)."""
    from opd_verl.checks import preflight

    calls = []

    def load_tokenizer(path, trust_remote_code):
        calls.append((path, trust_remote_code))
        return build_tokenizer()

    monkeypatch.setattr(preflight, "load_tokenizer", load_tokenizer)
    monkeypatch.setattr(preflight, "vocab_size", lambda path: 128)
    monkeypatch.setattr(preflight, "_in_hub_cache", lambda name, files: True)  # as the faked loads imply
    config = _config("org/student", "org/teacher")
    config["actor_rollout_ref"]["model"].update(tokenizer_path="org/student-tok", trust_remote_code=False)
    config["opd"]["teacher"].update(tokenizer_path="org/teacher-tok", model={"trust_remote_code": True})
    reports = run_preflight(config)
    assert reports == ["preflight: teacher org/teacher matches the student's vocabulary and chat template"]
    assert calls == [("org/student-tok", False), ("org/teacher-tok", True)]


def _run_cli(*args, env=None):
    import os
    import subprocess
    import sys

    from conftest import REPO

    return subprocess.run(
        [sys.executable, "-m", "opd_verl.preflight", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, **(env or {})},
    )


def test_cli_match_on_hub_names_from_the_cache(tmp_path):
    env = _hub_env(tmp_path)
    hub = tmp_path / "hf" / "hub"
    student, teacher = _cache_hub_model(hub, "tiny-org/student"), _cache_hub_model(hub, "tiny-org/teacher")
    result = _run_cli("--teacher", teacher, "--student", student, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"opd_verl: preflight: teacher {teacher} matches the student's vocabulary and chat template"
    ], result.stdout
    assert "opd_verl: error" not in result.stderr


def test_cli_mismatch_is_one_error_line_and_a_nonzero_exit(tmp_path):
    other = build_tokenizer()
    other.chat_template = CHAT_TEMPLATE.replace("<|im_start|>assistant", "<|im_start|>bot")
    student, teacher = _model_dir(tmp_path / "s"), _model_dir(tmp_path / "t", other)
    result = _run_cli("--teacher", teacher, "--student", student)
    assert result.returncode == 2, (result.stdout, result.stderr)
    errors = [line for line in result.stderr.splitlines() if line.startswith("opd_verl: error:")]
    assert len(errors) == 1 and "render the same prompt differently" in errors[0], result.stderr
    assert errors[0].endswith("set --allow-template-mismatch if that is intended"), errors[0]
    assert "matches" not in result.stdout


def test_cli_allow_template_mismatch_and_tokenizer_flags(tmp_path, capsys):
    from opd_verl.preflight import main

    other = build_tokenizer()
    other.chat_template = CHAT_TEMPLATE.replace("<|im_start|>assistant", "<|im_start|>bot")
    student, teacher = _model_dir(tmp_path / "s"), _model_dir(tmp_path / "t", other)
    capsys.readouterr()
    assert main(["--teacher", teacher, "--student", student, "--allow-template-mismatch"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "opd_verl: preflight: chat templates differ (allowed by --allow-template-mismatch)", out
    assert out[-1].endswith("matches the student's vocabulary and chat template")
    assert main(["--teacher", teacher, "--student", student, "--teacher-tokenizer", student]) == 0  # its tokenizer
    capsys.readouterr()


def test_cli_cannot_run_offline_without_the_files(tmp_path, capsys):
    from opd_verl.preflight import EXIT_UNAVAILABLE, main

    student = _model_dir(tmp_path / "s")
    capsys.readouterr()
    assert main(["--teacher", "nobody/uncached", "--student", student]) == EXIT_UNAVAILABLE
    captured = capsys.readouterr()
    (line,) = captured.err.splitlines()
    assert line.startswith("opd_verl: error: preflight could not run: offline (HF_HUB_OFFLINE=1)"), line
    assert "not in the Hugging Face cache" in line and not captured.out
    assert line.endswith("(hf download nobody/uncached) and set HF_HUB_OFFLINE=1, or set HF_ENDPOINT to a hub mirror")
