"""`+recipes=NAME` resolves from the package: from any directory, with or without `--config-dir`, for the source tree
(editable) and for an installed wheel; a recipe that does not resolve is one line listing the recipes. Real
`python -m opd_verl.main_opd ... --cfg job` subprocesses (no Ray)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, run_main_opd
from opd_verl.checks.errors import OPDConfigError
from opd_verl.checks.recipes import check_recipe_overrides

RECIPES = sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))
REVERSE_KL = "gsm8k_qwen2_0.5b_reverse_kl"  # hub names only: composes without any model on disk (preflight offline)


DEMO_CPU_MAX_NUM_SEQS = ("+recipes=demo_cpu", "actor_rollout_ref.model.path=Qwen/Qwen2-0.5B",
                         "opd.teacher.path=Qwen/Qwen2-7B", "--cfg", "job", "--package",
                         "actor_rollout_ref.rollout.max_num_seqs")


def _opd_section(result) -> dict:
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("# @package opd\n"), result.stdout[:200]
    return yaml.safe_load(result.stdout)


def _one_line_error(result) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = [line for line in result.stderr.splitlines() if line.startswith("opd_verl: error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


@pytest.mark.parametrize("config_dir", [[], ["--config-dir", str(REPO)]], ids=["no-config-dir", "config-dir-repo"])
def test_a_recipe_resolves_from_another_directory(tmp_path, config_dir):
    """Before: without --config-dir "$PWD" from the repository root, +recipes=NAME became a plain key `recipes: NAME`
    on verl's defaults (adv_estimator gae, no teacher) and the command exited 0."""
    result = run_main_opd(*config_dir, f"+recipes={REVERSE_KL}", "--cfg", "job", "--package", "opd", cwd=tmp_path)
    assert _opd_section(result)["teacher"]["path"] == "Qwen/Qwen2-7B"


def test_config_dir_dot_from_the_repository_still_works():
    opd = _opd_section(run_main_opd("--config-dir", ".", f"+recipes={REVERSE_KL}", "--cfg", "job", "--package", "opd"))
    assert opd["teacher"]["path"] == "Qwen/Qwen2-7B"


def test_a_packaged_recipes_keys_are_never_rewritten_by_the_cpu_defaults(tmp_path):
    """checks.device.user_override_keys reads the recipe from the package: demo_cpu sets max_num_seqs 160, which
    the CPU defaults (64) leave alone only if they know the recipe set it."""
    result = run_main_opd(*DEMO_CPU_MAX_NUM_SEQS, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "160"
    assert "max_num_seqs" not in result.stderr  # no CPU default line for it


@pytest.mark.parametrize("arg,fragments", [
    ("+recipes=no_such_recipe", ["unknown recipe 'no_such_recipe'", "available: " + ", ".join(RECIPES)]),
    (f"+recipes={REVERSE_KL[:-1]}", [f"did you mean +recipes={REVERSE_KL}?", "available: "]),
    (f"recipes={REVERSE_KL}", ["leading +", f"+recipes={REVERSE_KL}"]),
    (f"++recipes={REVERSE_KL}", ["leading +", f"+recipes={REVERSE_KL}"]),
    (f"+recipe={REVERSE_KL}", ["'recipe' is not a config group", f"+recipes={REVERSE_KL}"]),
    ("+Recipes=demo_cpu", ["'Recipes' is not a config group", "+recipes=demo_cpu"]),
    ("+recipes=openthoughts3_qwen3_1.7b_sft", ["verl.trainer.sft_trainer",
                                               "bash examples/run_recipe.sh openthoughts3_qwen3_1.7b_sft"]),
])
def test_a_recipe_that_does_not_resolve_is_named_with_the_fix(arg, fragments):
    """Before: +recipe=NAME (and +recipes=NAME outside the repository root) composed a plain key and exited 0;
    recipes=NAME, ++recipes=NAME and an unknown name were Hydra's multi-line errors."""
    with pytest.raises(OPDConfigError) as err:
        check_recipe_overrides(["trainer.total_epochs=1", arg])
    for fragment in fragments:
        assert fragment in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_recipe_overrides_that_resolve_pass(tmp_path):
    check_recipe_overrides([f"+recipes={REVERSE_KL}", "~recipes", "+recipes=[demo_cpu,demo_cpu_forward_kl]",
                            "recipe_dir.x=1", "opd.teacher.path=recipes"])
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "mine.yaml").write_text("# @package _global_\n")
    for where in (["--config-dir", str(tmp_path)], [f"--config-dir={tmp_path}"],
                  [f"hydra.searchpath=[pkg://verl.trainer.config,file://{tmp_path}]"]):
        check_recipe_overrides([*where, "+recipes=mine"])
    with pytest.raises(OPDConfigError, match="unknown recipe 'mine'"):
        check_recipe_overrides(["+recipes=mine"])


def test_an_unknown_recipe_stops_the_command_line_in_one_line(tmp_path):
    line = _one_line_error(run_main_opd("+recipe=demo_cpu", "--cfg", "job", cwd=tmp_path))
    assert "+recipes=demo_cpu" in line


def test_a_config_dirs_own_recipes_are_found(tmp_path):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "mine.yaml").write_text(
        "# @package _global_\n# Mine.\nalgorithm:\n  adv_estimator: opd\nopd:\n  teacher:\n    path: Qwen/Qwen2-7B\n"
        "actor_rollout_ref:\n  model:\n    path: Qwen/Qwen2-0.5B\n")
    opd = _opd_section(run_main_opd("--config-dir", str(tmp_path), "+recipes=mine", "--cfg", "job", "-p", "opd",
                                    cwd=tmp_path))
    assert opd["teacher"]["path"] == "Qwen/Qwen2-7B"
    line = _one_line_error(run_main_opd("+recipes=mine", "--cfg", "job", cwd=tmp_path))  # not without it
    assert "unknown recipe 'mine'" in line


def _copy_source(destination: Path) -> Path:
    """What a wheel is built from (the package, its recipes/ link target, pyproject.toml, README.md), so the build
    writes nothing into the checkout."""
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, destination / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "opd_verl", destination / "opd_verl", symlinks=True, ignore=ignore)
    shutil.copytree(REPO / "recipes", destination / "recipes", ignore=ignore)
    return destination


def test_an_installed_wheel_resolves_its_recipes(tmp_path):
    """pip wheel + pip install --target (not editable), run with only the installed copy on PYTHONPATH from
    another directory: --help lists the recipes and +recipes=NAME composes."""
    (tmp_path / "src").mkdir()
    source = _copy_source(tmp_path / "src")
    wheels, target, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(source)],
                   check=True, capture_output=True, timeout=300)
    wheel = next(wheels.glob("opd_verl-*.whl"))
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    assert sorted(p.stem for p in (target / "opd_verl" / "config" / "recipes").glob("*.yaml")) == RECIPES
    env = {"PYTHONPATH": str(target)}
    where = subprocess.run([sys.executable, "-c", "import opd_verl; print(opd_verl.__file__)"], cwd=elsewhere,
                           env={**os.environ, **env}, capture_output=True, text=True, check=True)
    assert where.stdout.strip() == str(target / "opd_verl" / "__init__.py")  # the installed copy, not the checkout
    # the recipe composes, and checks.device.user_override_keys finds it in the installed package (160: the
    # recipe's value, kept; 64: the CPU default's, 256: verl's)
    result = run_main_opd(*DEMO_CPU_MAX_NUM_SEQS, cwd=elsewhere, env=env)
    assert result.returncode == 0 and result.stdout.strip() == "160", result.stderr
    usage = run_main_opd("--help", cwd=elsewhere, env=env)
    assert usage.returncode == 0 and all(f"\n  {name}" in usage.stdout for name in RECIPES), usage.stdout
