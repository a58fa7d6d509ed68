"""`python -m opd_verl.main_opd` as a user runs it: composing, printing and rejecting bad input before Ray starts."""

import time

import yaml

from conftest import REPO, run_main_opd

# Hub names: preflight reads local model directories only, so these compose without any model on disk.
OPD = ["algorithm.adv_estimator=opd", "opd.teacher.path=Qwen/Qwen2-7B", "actor_rollout_ref.model.path=Qwen/Qwen2-0.5B"]


LOSS_LEVEL = "actor_rollout_ref.actor.policy_loss.loss_mode=ppo_plus_distill"


def test_cfg_job_prints_the_validated_config():
    result = run_main_opd(*OPD, LOSS_LEVEL, "opd.divergence=jsd", "opd.support=full", "opd.beta=0.3", "--cfg", "job")
    assert result.returncode == 0, result.stderr
    cfg = yaml.safe_load(result.stdout)
    assert cfg["algorithm"]["adv_estimator"] == "opd"
    assert cfg["opd"]["divergence"] == "jsd" and cfg["opd"]["beta"] == 0.3
    assert cfg["opd"]["teacher"]["path"] == "Qwen/Qwen2-7B"
    assert "actor_rollout_ref" in cfg and "trainer" in cfg  # verl's ppo_trainer is the base


def _assert_one_line_error(result, *fragments):
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("opd_verl: error:")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "ray init" not in result.stdout  # nothing started


def test_unknown_key_fails_before_anything_loads():
    start = time.monotonic()
    result = run_main_opd(*OPD, "opd.betta=0.5")
    _assert_one_line_error(result, "unknown key 'opd.betta'; did you mean opd.beta?", "valid opd keys:")
    assert time.monotonic() - start < 60


def test_options_the_mode_never_reads_stop_the_run():
    """The review's example: these validated and then trained sampled reverse KL (the advantage path reads none)."""
    result = run_main_opd(*OPD, "opd.support=full", "opd.divergence=jsd", "opd.temperature=2", "--cfg", "job")
    _assert_one_line_error(result, "opd.support=full has no effect here", "loss_mode=ppo_plus_distill")


def test_bad_beta_names_the_key_and_the_fix():
    result = run_main_opd(*OPD, LOSS_LEVEL, "opd.support=full", "opd.divergence=jsd", "opd.beta=1.5")
    _assert_one_line_error(result, "opd.beta=1.5", "set opd.beta between 0")


def test_missing_teacher_is_reported():
    result = run_main_opd("algorithm.adv_estimator=opd")
    _assert_one_line_error(result, "needs a teacher", "opd.teacher.path")


def test_bad_value_with_cfg_job_still_fails():
    result = run_main_opd(*OPD, "opd.topk=0", "--cfg", "job")
    _assert_one_line_error(result, "opd.topk=0 must be >= 1")


def test_missing_teacher_directory_is_reported(tmp_path):
    result = run_main_opd(
        "algorithm.adv_estimator=opd", f"opd.teacher.path={tmp_path}/nope", "actor_rollout_ref.model.path=Qwen/Qwen2-0.5B"
    )
    _assert_one_line_error(result, f"opd.teacher.path={tmp_path}/nope does not exist")


def test_removed_param_offload_is_reported_before_hydra_composes():
    result = run_main_opd(*OPD, "opd.teacher.param_offload=true", "--cfg", "job")  # hydra alone: "Key not found"
    _assert_one_line_error(result, "opd.teacher.param_offload was removed", "forward-only engine", "nothing to set")


def _leaf_keys(section, prefix="opd."):
    return [k for key, value in section.items()
            for k in (_leaf_keys(value, f"{prefix}{key}.") if isinstance(value, dict) and value else [prefix + key])]


def test_help_is_a_usage_not_hydras_config_dump():
    """Before: Hydra's dump of the whole composed config (1,103 lines, the opd: keys at line 1,072)."""
    from opd_verl.checks.keys import opd_defaults

    result = run_main_opd("--help")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert text.startswith("usage: python -m opd_verl.main_opd [+recipes=NAME]")
    assert len(text.splitlines()) < 150
    for mode in ("algorithm.adv_estimator=opd\n", "algorithm.adv_estimator=opd_hybrid\n", LOSS_LEVEL + "\n"):
        assert f"\n  {mode}" in text, mode
    recipes = sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))
    assert all(f"\n  {name}" in text for name in recipes)
    assert "--cfg job" in text and "--package opd" in text and "--hydra-help" in text
    assert all(f"  {key}=" in text or f", {key}=" in text for key in _leaf_keys(opd_defaults()))
    assert all(page in text for page in ("docs/options.md", "docs/modes.md", "docs/recipes.md"))
    assert run_main_opd("-h").stdout == text


def test_hydras_own_help_is_still_reachable():
    result = run_main_opd("--hydra-help")
    assert result.returncode == 0 and "Hydra (" in result.stdout and "--cfg" in result.stdout


def test_every_opd_key_has_one_help_line_from_the_yaml_comments():
    """The help's option lines come from opd_trainer.yaml's comments (one source): a key added without a comment of
    its own shares the line of the key before it; a section's comment serves its first key."""
    from opd_verl.checks.keys import opd_defaults
    from opd_verl.usage import option_lines

    rows = option_lines()
    listed = [key.split("=")[0] for keys, _ in rows for key in keys.split(", ")]
    assert listed == _leaf_keys(opd_defaults())
    docs = dict(rows)
    assert docs["opd.divergence=reverse_kl"] == "reverse_kl | forward_kl | jsd"
    assert docs["opd.adv_clip_min=-10.0, opd.adv_clip_max=10.0"].startswith("Per-token advantage A_t = clip(")
    assert docs["opd.teacher.path=null"] == "The teacher (HF model directory or hub name)."
    assert docs["opd.teacher.model={}"].endswith("verl's defaults otherwise.")  # 'e.g.' does not end a sentence
    assert all(doc for doc in docs.values())


def test_cfg_job_package_prints_only_that_section():
    """Before: --package was dropped with --cfg job and the whole config was printed."""
    from opd_verl.checks.keys import opd_defaults

    result = run_main_opd(*OPD, "opd.beta=0.5", "--cfg", "job", "--package", "opd")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("# @package opd\n")  # as Hydra's --cfg job --package prints it
    opd = yaml.safe_load(result.stdout)
    assert set(opd) == set(opd_defaults()) and opd["teacher"]["path"] == "Qwen/Qwen2-7B"
    leaf = run_main_opd(*OPD, "--cfg=job", "-p", "algorithm.adv_estimator")
    assert leaf.returncode == 0 and leaf.stdout == "opd\n", leaf.stderr
    _assert_one_line_error(run_main_opd(*OPD, "--cfg", "job", "--package", "opdd"), "--package opdd: no such key")


def test_user_override_keys_is_read_once_per_start(composed_config, monkeypatch, capsys):
    """main_opd used to call checks.device.user_override_keys (which reads every selected recipe) up to 3 times."""
    from omegaconf import OmegaConf

    from opd_verl import main_opd

    calls = []
    monkeypatch.setattr(main_opd, "user_override_keys", lambda: calls.append(1) or set())
    monkeypatch.setitem(main_opd._PRINT_ONLY, "package", "opd.teacher")
    monkeypatch.setitem(main_opd._PRINT_ONLY, "resolve", False)
    cfg = OmegaConf.create(composed_config())
    for override in OPD:
        key, value = override.split("=")
        OmegaConf.update(cfg, key, value)
    main_opd.main(cfg)  # Hydra's decorated main runs the task on a config it is given
    assert calls == [1]
    assert "path: Qwen/Qwen2-7B" in capsys.readouterr().out
