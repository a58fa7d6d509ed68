"""critic.enable in an OPD run (opd_verl.checks.critic): verl 0.9.1's need_critic warns "Disabled critic as
algorithm.adv_estimator != gae" whenever critic.enable is null; the OPD estimators set it to false, printed, and keep
a user's value."""

from __future__ import annotations

import warnings

import pytest
from omegaconf import OmegaConf

from opd_verl.checks.critic import apply_critic_default
from opd_verl.checks.errors import OPDConfigError


def _config(make, estimator, enable=None, base="grpo"):
    plain = make()
    plain["algorithm"]["adv_estimator"] = estimator
    plain["opd"]["hybrid_base_estimator"] = base
    plain["critic"]["enable"] = enable
    return OmegaConf.create(plain)


def _need_critic(config) -> tuple[bool, list[str]]:
    from verl.trainer.ppo.utils import need_critic

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        needed = need_critic(config)
    return needed, [str(w.message) for w in caught]


@pytest.mark.parametrize("estimator, base", [("opd", "grpo"), ("opd_hybrid", "grpo"), ("opd_hybrid", "rloo")])
def test_the_opd_estimators_set_critic_enable_false_and_verl_stays_quiet(composed_config, estimator, base):
    config = _config(composed_config, estimator, base=base)
    assert _need_critic(config) == (False, ["Disabled critic as algorithm.adv_estimator != gae. If it is not "
                                            "intended, please set critic.enable=True"])  # verl's default
    line = apply_critic_default(config)
    assert line == f"critic.enable=false (was null: algorithm.adv_estimator={estimator} trains no critic)"
    assert config.critic.enable is False and _need_critic(config) == (False, [])


@pytest.mark.parametrize("enable", [True, False])
def test_a_users_critic_enable_is_kept(composed_config, enable):
    config = _config(composed_config, "opd", enable=enable)
    assert apply_critic_default(config) is None and config.critic.enable is enable
    assert _need_critic(config) == (enable, [])  # as verl reads it


def test_verls_estimators_keep_verls_rule(composed_config):
    for estimator in ("grpo", "gae"):
        config = _config(composed_config, estimator)
        assert apply_critic_default(config) is None and config.critic.enable is None


def test_opd_hybrid_on_gae_needs_the_critic(composed_config):
    for enable in (None, False):
        with pytest.raises(OPDConfigError, match=r"opd.hybrid_base_estimator=gae needs verl's critic \(its values\); "
                                                 rf"set critic.enable=true \(it is {enable}\)"):
            apply_critic_default(_config(composed_config, "opd_hybrid", enable=enable, base="gae"))
    config = _config(composed_config, "opd_hybrid", enable=True, base="gae")
    assert apply_critic_default(config) is None and _need_critic(config) == (True, [])


def test_main_opd_prints_the_setting_and_cfg_job_shows_it(tmp_path):
    import yaml

    from conftest import run_main_opd
    from opd_verl.demo.tiny_models import build_qwen2, build_tokenizer, save_model_dir

    tokenizer = build_tokenizer()
    model = save_model_dir(tmp_path / "m", tokenizer, build_qwen2(tokenizer, hidden_size=64, num_layers=1))
    result = run_main_opd("algorithm.adv_estimator=opd", f"actor_rollout_ref.model.path={model}",
                          f"opd.teacher.path={model}", "--cfg", "job")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "opd_verl: critic.enable=false (was null: algorithm.adv_estimator=opd trains no critic)" in result.stderr
    assert yaml.safe_load(result.stdout)["critic"]["enable"] is False
    result = run_main_opd("algorithm.adv_estimator=opd", f"actor_rollout_ref.model.path={model}",
                          f"opd.teacher.path={model}", "critic.enable=true", "--cfg", "job")
    assert result.returncode == 0 and "critic.enable=false" not in result.stderr, result.stderr[-3000:]
    assert yaml.safe_load(result.stdout)["critic"]["enable"] is True
