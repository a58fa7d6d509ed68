"""The teacher's view options (opd.teacher.prompt / wrap_chat / cross_tokenizer, and per opd.teachers entry): their
validation before Ray starts (opd_verl.checks.options), the lines main_opd prints, and the preflight of a view on
the training rows (opd_verl.checks.preflight), with tiny real tokenizers and model directories."""

from __future__ import annotations

import pytest

from opd_verl.checks.errors import OPDConfigError
from opd_verl.checks.keys import check_override_keys
from opd_verl.checks.options import validate_config
from opd_verl.checks.teacher_views import view_notes
from opd_verl.checks.teachers import VIEW_DEFAULTS, teacher_entries
from opd_verl.checks.preflight import run_preflight
from opd_verl.demo.tiny_models import CHAT_TEMPLATE, DEFAULT_CHARS, build_qwen2, build_tokenizer, save_model_dir

TEMPLATE = "{prompt} The reference answer is {reward_model[ground_truth]}."


def _cfg(make, estimator="opd", teachers=None, loss_mode=None, **teacher):
    cfg = make()
    cfg["algorithm"]["adv_estimator"] = estimator
    if teachers is not None:
        cfg["opd"]["teachers"] = teachers
    else:
        cfg["opd"]["teacher"].update({"path": "/models/teacher", **teacher})
    if loss_mode:
        cfg["actor_rollout_ref"]["actor"]["policy_loss"]["loss_mode"] = loss_mode
    return cfg


def test_defaults_are_the_student_view(composed_config):
    cfg = _cfg(composed_config)
    validate_config(cfg)
    entry = teacher_entries(cfg["opd"])[0]
    assert {k: entry[k] for k in VIEW_DEFAULTS} == {"prompt": "student", "wrap_chat": True, "cross_tokenizer": False}
    assert {k: cfg["opd"]["teacher"][k] for k in VIEW_DEFAULTS} == VIEW_DEFAULTS  # the yaml's defaults
    assert view_notes(cfg["opd"]) == [
        "opd.teacher.prompt='student' (default): the student's prompt ids; cross_tokenizer=false (default): the "
        "student's response ids"]


@pytest.mark.parametrize("teacher", [
    {"prompt": "chat_template"},
    {"prompt": TEMPLATE},
    {"prompt": TEMPLATE, "wrap_chat": False},
    {"prompt": [{"role": "system", "content": "Answer: {reward_model[ground_truth]}"},
                {"role": "user", "content": "{prompt}"}]},
    {"prompt": "chat_template", "cross_tokenizer": True},
])
def test_views_validate(composed_config, teacher):
    cfg = _cfg(composed_config, **teacher)
    validate_config(cfg)
    (line,) = view_notes(cfg["opd"])
    assert "(default)" not in line.split(";")[0]


@pytest.mark.parametrize("teacher,loss,expected", [
    ({"prompt": "{prompt"}, None, r"opd.teacher.prompt: unclosed '\{' at character 0"),
    ({"prompt": "{prompt} }"}, None, r"opd.teacher.prompt: single '\}'"),
    ({"prompt": "{}"}, None, "opd.teacher.prompt: empty placeholder"),
    ({"prompt": "template"}, None, "opd.teacher.prompt=template: write the template itself"),
    ({"prompt": 3}, None, "is neither student, chat_template, a template string nor a list of"),
    ({"prompt": "chat_template", "wrap_chat": False}, None, "opd.teacher.wrap_chat=false has no effect"),
    ({"cross_tokenizer": True}, None, "opd.teacher.cross_tokenizer=true needs the teacher's own prompt"),
    ({"prompt": "chat_template", "cross_tokenizer": True}, "topk",
     "opd.teacher.cross_tokenizer=true with .*opd.support=topk: not supported"),
    ({"prompt": "chat_template", "cross_tokenizer": True}, "full",
     "opd.teacher.cross_tokenizer=true with .*opd.support=full: not supported"),
    ({"prompt": TEMPLATE}, "full", "opd.teacher.prompt=.* opd.support=full: not supported: the loss-level teacher"),
    ({"prompt": "chat_template", "cross_tokenizer": True}, "k3", "opd.kl_estimator=k3: not supported"),
])
def test_bad_views_are_one_line_naming_the_key(composed_config, teacher, loss, expected):
    cfg = _cfg(composed_config, loss_mode="ppo_plus_distill" if loss else None, **teacher)
    if loss in ("topk", "full"):
        cfg["opd"]["support"] = loss
    if loss == "k3":
        cfg["opd"]["kl_estimator"] = "k3"
    with pytest.raises(OPDConfigError, match=expected) as err:
        validate_config(cfg)
    assert "\n" not in str(err.value)


def test_loss_level_sampled_reads_the_view(composed_config):
    """support=sampled in the loss-level mode takes q from the reference pass, which has the view."""
    cfg = _cfg(composed_config, loss_mode="ppo_plus_distill", prompt=TEMPLATE)
    validate_config(cfg)
    cfg = _cfg(composed_config, loss_mode="ppo_plus_distill", prompt="chat_template", cross_tokenizer=True)
    validate_config(cfg)


def test_multi_teacher_views(composed_config):
    views = [{"path": "/a", "prompt": "chat_template", "cross_tokenizer": True, "data_source": "x"},
             {"path": "/b", "data_source": "*"}]
    cfg = _cfg(composed_config, teachers=views)
    cfg["opd"]["multi_teacher_mode"] = "route"
    validate_config(cfg)
    entries = teacher_entries(cfg["opd"])
    assert [e["cross_tokenizer"] for e in entries] == [True, False] and entries[1]["prompt"] == "student"
    cfg["opd"]["multi_teacher_mode"] = "mean_prob"
    with pytest.raises(OPDConfigError, match=r"opd.teachers\[0\].cross_tokenizer=true with "
                                             r"opd.multi_teacher_mode=mean_prob: not supported"):
        validate_config(cfg)
    views[0]["cross_tokenizer"] = False
    validate_config(cfg)  # a same-tokenizer view mixes per token
    assert view_notes(cfg["opd"])[0].startswith("opd.teachers[0].prompt='chat_template': the sample's messages")


def test_allow_template_mismatch_with_every_teacher_viewing_is_an_error(composed_config):
    cfg = _cfg(composed_config, prompt="chat_template")
    cfg["opd"]["preflight"]["allow_template_mismatch"] = True
    with pytest.raises(OPDConfigError, match="allow_template_mismatch=true has no effect"):
        validate_config(cfg)


def test_override_keys_of_the_view_are_known():
    check_override_keys(["opd.teacher.prompt=chat_template", "opd.teacher.wrap_chat=false",
                         "opd.teacher.cross_tokenizer=true"])
    with pytest.raises(OPDConfigError, match="unknown key 'opd.teacher.prompts'"):
        check_override_keys(["opd.teacher.prompts=x"])


# --- preflight of a view on the training rows


def _model_dir(path, tokenizer):
    return save_model_dir(path, tokenizer, build_qwen2(tokenizer, hidden_size=64, num_layers=1))


def _train_file(path, prompts=("What is 2 + 3?", "What is 12 * 3?"), answers=("5", "36")):
    import pandas as pd

    rows = [{"data_source": "arith", "prompt": [{"role": "user", "content": p}], "ability": "math",
             "reward_model": {"style": "rule", "ground_truth": a}, "extra_info": {"split": "train", "index": i}}
            for i, (p, a) in enumerate(zip(prompts, answers))]
    pd.DataFrame(rows).to_parquet(path)
    return str(path)


def _preflight_config(student, teacher, train, **view):
    return {
        "actor_rollout_ref": {"model": {"path": student, "tokenizer_path": None}},
        "data": {"train_files": train, "prompt_key": "prompt"},
        "opd": {"support": "sampled", "topk": 20, "teachers": [],
                "teacher": {"path": teacher, "tokenizer_path": None, **view},
                "preflight": {"allow_template_mismatch": False}},
    }


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("views")
    own = build_tokenizer()
    own.chat_template = CHAT_TEMPLATE.replace("<|im_start|>assistant", "<|im_start|>bot")
    return {
        "student": _model_dir(root / "student", build_tokenizer(all_bytes=True)),
        "own_template": _model_dir(root / "own_template", own),
        # other ids for the same characters, and words of its own: another tokenizer
        "other": _model_dir(root / "other", build_tokenizer(DEFAULT_CHARS[::-1], words=["####", "What", " is"],
                                                            all_bytes=True)),
        "lossy": _model_dir(root / "lossy", build_tokenizer(words=["What"])),  # drops what its vocabulary lacks
        "train": _train_file(root / "train.parquet"),
        "accented": _train_file(root / "accented.parquet", prompts=("What is 2 + 3?", "Combien font 2 et 3, café?")),
    }


def test_a_template_mismatch_is_refused_for_the_student_view_and_rendered_for_chat_template(dirs):
    student, teacher, train = dirs["student"], dirs["own_template"], dirs["train"]
    with pytest.raises(OPDConfigError, match="vocabularies"):  # all_bytes student vs a smaller vocabulary
        run_preflight(_preflight_config(student, teacher, train, prompt="chat_template"))
    same_vocab_student = _model_dir(dirs["student"] + "_plain", build_tokenizer())
    with pytest.raises(OPDConfigError, match="render the same prompt differently"):
        run_preflight(_preflight_config(same_vocab_student, teacher, train))  # prompt=student: kept
    reports = run_preflight(_preflight_config(same_vocab_student, teacher, train, prompt="chat_template",
                                              wrap_chat=True, cross_tokenizer=False))
    (line,) = [r for r in reports if "reads its own prompt" in r]
    assert "row 0: '<|im_start|>user\\nWhat is 2 + 3?<|im_end|>\\n<|im_start|>bot\\n'" in line
    assert "the student's: '<|im_start|>user\\nWhat is 2 + 3?<|im_end|>\\n<|im_start|>assistant\\n'" in line


def test_an_unknown_placeholder_names_the_row_and_what_it_has(dirs):
    plain = _model_dir(dirs["student"] + "_plain2", build_tokenizer())
    with pytest.raises(OPDConfigError, match=r"training row 0: opd.teacher.prompt: unknown placeholder "
                                             r"\{extra_info\[answer\]\}: 'extra_info' has no 'answer' "
                                             r"\(it has: split, index\)") as err:
        run_preflight(_preflight_config(plain, dirs["own_template"], dirs["train"],
                                        prompt="{prompt} {extra_info[answer]}", wrap_chat=True, cross_tokenizer=False))
    assert "\n" not in str(err.value)
    reports = run_preflight(_preflight_config(plain, dirs["own_template"], dirs["train"], prompt=TEMPLATE,
                                              wrap_chat=True, cross_tokenizer=False))
    assert any("The reference answer is 5." in r for r in reports), reports


def test_cross_tokenizer_round_trip_on_the_training_rows(dirs):
    student = dirs["student"]
    with pytest.raises(OPDConfigError, match=r"different vocabularies .*or set opd.teacher.cross_tokenizer=true"):
        run_preflight(_preflight_config(student, dirs["other"], dirs["train"], prompt="chat_template",
                                        wrap_chat=True, cross_tokenizer=False))
    reports = run_preflight(_preflight_config(student, dirs["other"], dirs["accented"], prompt="chat_template",
                                              wrap_chat=True, cross_tokenizer=True))
    assert any("round-trips 2 training prompts and 2 answers byte for byte; student eos '<|im_end|>' -> teacher eos"
               in r for r in reports), reports
    with pytest.raises(OPDConfigError, match=r"1 of 4 texts do not survive .* first: sample 1 at byte 24: student "
                                             r"b'\\xc3\\xa9\?' vs teacher b'\?'") as err:
        run_preflight(_preflight_config(student, dirs["lossy"], dirs["accented"], prompt="chat_template",
                                        wrap_chat=True, cross_tokenizer=True))
    assert "\n" not in str(err.value)


def test_main_opd_prints_the_views_and_takes_a_template_on_the_command_line(tmp_path, dirs):
    from conftest import run_main_opd

    plain = _model_dir(tmp_path / "plain", build_tokenizer())
    result = run_main_opd(
        "algorithm.adv_estimator=opd", f"actor_rollout_ref.model.path={plain}", "actor_rollout_ref.rollout.name=vllm",
        f"opd.teacher.path={dirs['own_template']}", f"data.train_files={dirs['train']}",
        f"data.val_files={dirs['train']}", "opd.teacher.prompt='{prompt} The reference answer is "
        "{reward_model[ground_truth]}.'", "--cfg", "job")
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("opd_verl: opd.teacher.prompt='{prompt} The reference answer is {reward_model[ground_truth]}.': the "
            "template as the user message of the teacher's chat template; cross_tokenizer=false (default)") in result.stderr
    assert "The reference answer is 5." in result.stderr
    assert "prompt: '{prompt} The reference answer is {reward_model[ground_truth]}.'" in result.stdout


def test_the_preflight_cli_checks_a_view(dirs, capsys):
    from opd_verl.preflight import main

    args = ["--student", dirs["student"], "--teacher", dirs["other"], "--data", dirs["accented"]]
    assert main(args + ["--teacher-prompt", "chat_template"]) == 2  # another vocabulary, no --cross-tokenizer
    assert "or set opd.teacher.cross_tokenizer=true" in capsys.readouterr().err
    assert main(args + ["--teacher-prompt", "chat_template", "--cross-tokenizer"]) == 0
    out = capsys.readouterr().out
    assert "reads its own prompt" in out and "round-trips 2 training prompts and 2 answers" in out
    assert main(args + ["--cross-tokenizer"]) == 2
    assert "--cross-tokenizer needs the teacher's own prompt" in capsys.readouterr().err
    assert main(args[:4] + ["--teacher-prompt", "{prompt", "--data", dirs["accented"]]) == 2
    assert "--teacher-prompt: unclosed '{'" in capsys.readouterr().err


def test_the_preview_of_a_long_view_shows_the_appended_context(tmp_path, dirs):
    """A rendering longer than the preview's width shows the part that differs from the student's (the privileged
    context appended at the end of the user message), not only its first 120 characters (issue 28)."""
    plain = _model_dir(tmp_path / "plain", build_tokenizer())
    template = "{prompt} " + "Check each step twice. " * 8 + "The reference answer is {reward_model[ground_truth]}."
    reports = run_preflight(_preflight_config(plain, dirs["own_template"], dirs["train"], prompt=template,
                                              wrap_chat=True, cross_tokenizer=False))
    (line,) = [r for r in reports if "reads its own prompt" in r]
    row0 = line[line.index("row 0: "):line.index(", the student's: ")]
    assert "'<|im_start|>user\\nWhat is 2 + 3? Check" in row0, row0  # the head
    assert "The reference answer is 5.<|im_end|>\\n<|im_start|>bot\\n'" in row0, row0  # the appended context
    assert " ... " in row0 and "characters)" in row0, row0
    assert "the student's: '<|im_start|>user\\nWhat is 2 + 3?<|im_end|>\\n<|im_start|>assistant\\n'" in line


def test_show_rendering_keeps_the_head_and_the_differing_part():
    from opd_verl.checks.preflight import show_rendering

    student = "S" * 200 + "<user>question</user>" + "T" * 200
    teacher = student.replace("question", "question CONTEXT")
    shown = show_rendering(teacher, student)
    assert shown.startswith(repr("S" * 60) + " ... ") and "question CONTEXT</user>" in shown, shown
    assert shown.endswith(f" ... ({len(teacher)} characters)"), shown
    assert "question</user>" in show_rendering(student, teacher)
    assert show_rendering("short", student) == "'short'"
    long_context = student.replace("question", "question " + "C" * 1000)
    shown = show_rendering(long_context, student)
    assert "question CCC" in shown and "CCC</user>" in shown and len(shown) < 700, shown  # both ends of it


def test_the_preflight_cli_removes_hydra_style_outer_quotes_and_says_so(tmp_path, dirs, capsys):
    """`--teacher-prompt "'{prompt} ...'"` (pasted from a Hydra override) is the template without the quotes, as
    Hydra reads opd.teacher.prompt='...'; a line says so (issue 28: the quotes became part of the prompt)."""
    from opd_verl.preflight import main

    plain = _model_dir(tmp_path / "plain", build_tokenizer())
    args = ["--student", plain, "--teacher", dirs["own_template"], "--data", dirs["train"], "--teacher-prompt"]
    assert main(args + [f"'{TEMPLATE}'"]) == 0
    out = capsys.readouterr().out
    assert f"opd_verl: --teacher-prompt: its outer quotes are removed, as Hydra removes them" in out, out
    assert "What is 2 + 3? The reference answer is 5.<|im_end|>" in out, out
    assert main(args + [TEMPLATE]) == 0
    out = capsys.readouterr().out
    assert "outer quotes" not in out and "What is 2 + 3? The reference answer is 5.<|im_end|>" in out, out


def test_a_skipped_view_check_prints_the_cli_command_with_the_view():
    from opd_verl.checks.preflight import preflight_command

    view = {"prompt": [{"role": "system", "content": "{reward_model[ground_truth]}"}], "wrap_chat": True,
            "cross_tokenizer": True}
    command = preflight_command("S", "T", view=view, data="train.parquet")
    assert command == ("python -m opd_verl.preflight --teacher T --student S --teacher-prompt "
                       "'[{\"role\": \"system\", \"content\": \"{reward_model[ground_truth]}\"}]' --cross-tokenizer "
                       "--data train.parquet")
    assert preflight_command("S", "T", view={"prompt": "student", "wrap_chat": True, "cross_tokenizer": False}) == (
        "python -m opd_verl.preflight --teacher T --student S")
