"""The `verl.plugins` entry point registers our estimators and losses in every process that imports verl."""

import os
import subprocess
import sys

import pytest

CHECK = (
    "import verl\n"
    "from verl.trainer.ppo import core_algos as c\n"
    "import opd_verl.plugin as p\n"
    "p.require_plugin_loaded()\n"
    "print(sorted(k for k in c.ADV_ESTIMATOR_REGISTRY if k.startswith('opd')),"
    " sorted(k for k in c.POLICY_LOSS_REGISTRY if k in ('importance_sampling', 'opd_distill', 'ppo_plus_distill')))\n"
)


def test_registered_in_a_fresh_interpreter():
    env = {k: v for k, v in os.environ.items() if k not in ("VERL_USE_EXTERNAL_PLUGINS", "VERL_USE_EXTERNAL_MODULES")}
    # The check imports verl only; registration must come from the entry point, not from importing opd_verl first.
    code = (
        "import sys, verl\n"
        "assert 'opd_verl.plugin' in sys.modules, 'verl did not load the opd_verl entry point'\n" + CHECK
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "['opd', 'opd_hybrid'] ['importance_sampling', 'opd_distill', 'ppo_plus_distill']" in result.stdout


def test_disabled_plugins_are_reported_as_not_loaded():
    env = {**os.environ, "VERL_USE_EXTERNAL_PLUGINS": "none"}
    code = "import verl, sys\nprint('opd_verl.plugin' in sys.modules)\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("False")


def test_registered_in_a_ray_worker():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:

        @ray.remote
        def registrations():
            import sys

            import verl  # noqa: F401
            from verl.trainer.ppo import core_algos as c

            return "opd_verl.plugin" in sys.modules, "opd" in c.ADV_ESTIMATOR_REGISTRY, os.getpid()

        loaded, registered, pid = ray.get(registrations.remote(), timeout=120)
        assert pid != os.getpid()
        assert loaded and registered
    finally:
        ray.shutdown()
