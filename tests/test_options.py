"""Validation of the `opd:` section (opd_verl.checks.options), in-process on the composed default config."""

import re

import pytest

from opd_verl.checks.errors import OPDConfigError
from opd_verl.checks.keys import check_override_keys, opd_defaults
from opd_verl.checks.modes import uses_opd
from opd_verl.checks.options import validate_config
from opd_verl.checks.routing import route_table, route_teacher_indices
from opd_verl.checks.teachers import teacher_entries


def _opd_config(make, estimator="opd", **opd):
    cfg = make()
    cfg["algorithm"]["adv_estimator"] = estimator
    cfg["opd"]["teacher"]["path"] = "/models/teacher"
    for key, value in opd.items():
        cfg["opd"][key] = value
    return cfg


def test_defaults_validate(composed_config):
    validate_config(composed_config())  # grpo, no teacher: nothing of ours is needed
    validate_config(_opd_config(composed_config))


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("beta", 1.5, "opd.beta=1.5 is outside [0, 1]"),
        ("beta", -0.1, "opd.beta=-0.1 is outside [0, 1]"),
        ("temperature", 0.0, "opd.temperature=0.0 must be > 0"),
        ("topk", 0, "opd.topk=0 must be >= 1"),
        ("divergence", "kl", "opd.divergence='kl' is not one of reverse_kl, forward_kl, jsd"),
        ("support", "vocab", "opd.support='vocab' is not one of sampled, topk, full"),
        ("chunk_size", 0, "opd.chunk_size=0 must be >= 1"),
        ("discount", 1.5, "opd.discount=1.5 is outside [0, 1]"),
    ],
)
def test_bad_values_name_the_key(composed_config, key, value, expected):
    cfg = _opd_config(composed_config, **{"support": "full", key: value})
    with pytest.raises(OPDConfigError) as err:
        validate_config(cfg)
    message = str(err.value)
    assert expected in message
    assert "\n" not in message


def test_clip_min_must_be_below_max(composed_config):
    cfg = _opd_config(composed_config, adv_clip_min=1.0, adv_clip_max=1.0)
    with pytest.raises(OPDConfigError, match=r"opd.adv_clip_min=1.0 must be < opd.adv_clip_max=1.0"):
        validate_config(cfg)


@pytest.mark.parametrize("estimator", ["opd", "opd_hybrid"])
def test_missing_teacher_is_an_error(composed_config, estimator):
    cfg = _opd_config(composed_config, estimator=estimator)
    cfg["opd"]["teacher"]["path"] = None
    with pytest.raises(OPDConfigError, match=rf"algorithm.adv_estimator={estimator} needs a teacher; set opd.teacher.path"):
        validate_config(cfg)


def test_distill_loss_needs_teacher(composed_config):
    cfg = composed_config()
    cfg["actor_rollout_ref"]["actor"]["policy_loss"]["loss_mode"] = "ppo_plus_distill"
    with pytest.raises(OPDConfigError, match="needs a teacher"):
        validate_config(cfg)


def test_unknown_key_in_section_lists_valid_keys(composed_config):
    cfg = _opd_config(composed_config)
    cfg["opd"]["betta"] = 0.3
    with pytest.raises(OPDConfigError) as err:
        validate_config(cfg)
    assert "unknown key 'opd.betta'" in str(err.value)
    assert "beta" in str(err.value) and "teacher.path" in str(err.value)


def test_unknown_nested_key(composed_config):
    cfg = _opd_config(composed_config)
    cfg["opd"]["teacher"]["pth"] = "x"
    with pytest.raises(OPDConfigError, match=r"unknown key 'opd.teacher.pth'"):
        validate_config(cfg)


@pytest.mark.parametrize("override", ["opd.betta=1", "+opd.betta=1", "++opd.teacher.pth=x"])
def test_unknown_override_keys(override):
    with pytest.raises(OPDConfigError, match="unknown key"):
        check_override_keys([override])


@pytest.mark.parametrize("override,closest", [
    ("opd.betta=1", "opd.beta"), ("+opd.divergance=jsd", "opd.divergence"), ("opd.teacher.pth=x", "opd.teacher.path"),
    ("opd.kl_estimater=k3", "opd.kl_estimator"), ("opd.preflight.allow_template=true",
                                                  "opd.preflight.allow_template_mismatch"),
    ("+opd.teacher.model.use_ligr=true", "opd.teacher.model.use_liger"),
])
def test_an_unknown_key_names_the_closest_one_and_keeps_the_list(override, closest):
    with pytest.raises(OPDConfigError) as err:
        check_override_keys([override])
    message = str(err.value)
    assert f"did you mean {closest}?" in message and "\n" not in message
    assert "valid opd keys: teacher, teacher.path" in message or "valid: " in message


def test_an_unknown_key_far_from_every_key_gets_no_guess(composed_config):
    with pytest.raises(OPDConfigError) as err:
        check_override_keys(["opd.zzzqqq=1"])
    assert "did you mean" not in str(err.value) and "valid opd keys:" in str(err.value)
    cfg = _opd_config(composed_config)  # a recipe's key (the composed section) gets the same hint
    cfg["opd"]["teacher"]["tokenizer_pat"] = "x"
    with pytest.raises(OPDConfigError, match=r"unknown key 'opd.teacher.tokenizer_pat'; did you mean "
                                             r"opd.teacher.tokenizer_path\? valid opd keys:"):
        validate_config(cfg)


def test_known_override_keys_pass():
    check_override_keys(["opd.beta=0.2", "opd.teacher.path=/x", "algorithm.adv_estimator=opd", "opd.preflight.allow_template_mismatch=true"])


def test_sampled_support_only_estimates_reverse_kl(composed_config):
    cfg = _opd_config(composed_config, estimator="grpo", divergence="jsd", support="sampled")
    cfg["actor_rollout_ref"]["actor"]["policy_loss"]["loss_mode"] = "ppo_plus_distill"  # where support is read
    with pytest.raises(OPDConfigError, match="support=sampled only estimates reverse_kl"):
        validate_config(cfg)
    cfg["opd"].update(divergence="reverse_kl", temperature=2.0)
    with pytest.raises(OPDConfigError, match="opd.temperature applies to logits, which support=sampled does not use"):
        validate_config(cfg)


def test_multi_teacher_entries_and_routing(composed_config):
    cfg = _opd_config(composed_config, multi_teacher_mode="route")
    cfg["opd"]["teachers"] = [{"path": "/a", "data_source": "gsm8k"}, {"path": "/b"}]
    with pytest.raises(OPDConfigError, match=r"opd.teachers\[1\] has no data_source"):
        validate_config(cfg)
    cfg["opd"]["teachers"][1]["data_source"] = ["gsm8k", "math"]
    with pytest.raises(OPDConfigError, match=r"routes data_source 'gsm8k', already routed to opd.teachers\[0\]"):
        validate_config(cfg)
    cfg["opd"]["teachers"][1]["data_source"] = ["math", "aime"]
    validate_config(cfg)
    cfg["opd"]["multi_teacher_mode"] = "mean_prob"
    validate_config(cfg)
    assert [t["path"] for t in teacher_entries(cfg["opd"])] == ["/a", "/b"]
    cfg["opd"]["multi_teacher_mode"] = "mean_logit"
    with pytest.raises(OPDConfigError, match="mean_logit needs the teachers' logits"):
        validate_config(cfg)
    cfg["opd"]["teachers"][1]["wieght"] = 2
    with pytest.raises(OPDConfigError, match=r"opd.teachers\[1\] has unknown key"):
        validate_config(cfg)


def test_schema_is_the_packaged_yaml():
    defaults = opd_defaults()
    assert defaults["divergence"] == "reverse_kl" and defaults["support"] == "sampled"
    assert defaults["discount"] == 0.0 and defaults["teacher"]["path"] is None


def test_lora_student_with_its_own_base_as_teacher(composed_config):
    cfg = _opd_config(composed_config)
    cfg["actor_rollout_ref"]["model"]["path"] = "/models/base"
    cfg["actor_rollout_ref"]["model"]["lora_rank"] = 8
    cfg["opd"]["teacher"]["path"] = "/models/base"
    with pytest.raises(OPDConfigError, match="is the LoRA student's own base model"):
        validate_config(cfg)
    cfg["opd"]["teacher"]["path"] = "/models/bigger"
    validate_config(cfg)


def test_route_table_and_indices():
    entries = [{"path": "/a", "data_source": "gsm8k"}, {"path": "/b", "data_source": ["math", "aime"]}]
    table = route_table(entries)
    assert table == {"gsm8k": 0, "math": 1, "aime": 1}
    assert route_teacher_indices(["math", "gsm8k", "aime", "gsm8k"], table) == [1, 0, 1, 0]
    with pytest.raises(OPDConfigError, match=r"data_source 'code' has no teacher .*routes aime, gsm8k, math"):
        route_teacher_indices(["gsm8k", "code"], table)
    # "*" takes every data_source no other teacher claims
    table = route_table(entries + [{"path": "/c", "data_source": "*"}])
    assert route_teacher_indices(["code", "math", "gsm8k"], table) == [2, 1, 0]
    with pytest.raises(OPDConfigError, match=r"opd.teachers\[0\] has no data_source"):
        route_table([{"path": "/a", "data_source": ""}, {"path": "/b", "data_source": "x"}])


def test_old_loss_mode_name_still_works_with_a_deprecation_line(composed_config):
    from opd_verl.checks.modes import deprecation_notes, uses_distill_loss

    cfg = composed_config()
    cfg["actor_rollout_ref"]["actor"]["policy_loss"]["loss_mode"] = "opd_distill"
    assert uses_opd(cfg) and uses_distill_loss(cfg)
    with pytest.raises(OPDConfigError, match="needs a teacher"):
        validate_config(cfg)
    [note] = deprecation_notes(cfg)
    assert "loss_mode=opd_distill is now called ppo_plus_distill" in note
    cfg["actor_rollout_ref"]["actor"]["policy_loss"]["loss_mode"] = "ppo_plus_distill"
    assert deprecation_notes(cfg) == []


@pytest.mark.parametrize(
    "estimator, loss_mode, setting, needs",
    [
        # the example: support/divergence/temperature without the loss-level mode trained sampled reverse KL
        ("opd", None, {"support": "full"}, "loss_mode=ppo_plus_distill"),
        ("opd", None, {"temperature": 2.0}, "loss_mode=ppo_plus_distill"),
        ("opd", None, {"kl_estimator": "k3"}, "loss_mode=ppo_plus_distill"),
        ("opd", None, {"lambda_rl": 1.0}, "loss_mode=ppo_plus_distill"),
        ("opd", None, {"hybrid_alpha": 0.5}, "algorithm.adv_estimator=opd_hybrid"),
        ("opd_hybrid", None, {"discount": 0.9}, "algorithm.adv_estimator=opd"),
        ("grpo", "ppo_plus_distill", {"adv_clip_max": 3.0}, "algorithm.adv_estimator=opd|opd_hybrid"),
        ("grpo", "ppo_plus_distill", {"support": "full", "topk": 50}, "opd.support=topk"),
        ("grpo", "ppo_plus_distill", {"support": "sampled", "chunk_size": 64}, "opd.support=topk|full"),
        ("grpo", "ppo_plus_distill", {"support": "topk", "kl_estimator": "k3"}, "opd.support=sampled"),
        ("grpo", "ppo_plus_distill", {"support": "full", "beta": 0.3}, "opd.divergence=jsd"),
        ("opd", None, {"multi_teacher_mode": "route"}, "several teachers"),
        # the loss-level mode with lambda_rl = 0: the estimator's advantage enters no loss
        ("opd", "ppo_plus_distill", {"discount": 0.5}, "opd.lambda_rl > 0"),
        ("opd", "ppo_plus_distill", {"adv_clip_min": -5.0}, "opd.lambda_rl > 0"),
        ("opd_hybrid", "ppo_plus_distill", {"adv_clip_max": 5.0}, "opd.lambda_rl > 0"),
    ],
)
def test_an_option_the_mode_never_reads_is_an_error(composed_config, estimator, loss_mode, setting, needs):
    cfg = _opd_config(composed_config, estimator=estimator)
    if loss_mode:
        cfg["actor_rollout_ref"]["actor"]["policy_loss"]["loss_mode"] = loss_mode
    cfg["opd"].update(setting)
    key = next(k for k in setting if k != "support") if len(setting) > 1 else next(iter(setting))
    with pytest.raises(OPDConfigError, match=rf"opd\.{key}=.* has no effect here: it is read only with .*{re.escape(needs)}"):
        validate_config(cfg)


@pytest.mark.parametrize(
    "estimator, loss_mode, setting",
    [
        ("opd", None, {"adv_clip_max": 3.0, "discount": 0.5}),
        ("opd_hybrid", None, {"hybrid_alpha": 0.5, "hybrid_base_estimator": "rloo", "adv_clip_min": -3.0}),
        ("grpo", "ppo_plus_distill", {"support": "full", "divergence": "jsd", "beta": 0.3, "temperature": 2.0,
                                      "chunk_size": 64, "lambda_rl": 1.0}),
        ("grpo", "ppo_plus_distill", {"support": "topk", "topk": 5, "divergence": "forward_kl", "chunk_size": 64}),
        ("grpo", "ppo_plus_distill", {"support": "sampled", "kl_estimator": "k3"}),
        # both paths active (lambda_rl > 0): both read
        ("opd", "ppo_plus_distill", {"discount": 0.5, "adv_clip_max": 3.0, "support": "full", "lambda_rl": 0.5}),
    ],
)
def test_options_the_mode_reads_are_accepted(composed_config, estimator, loss_mode, setting):
    cfg = _opd_config(composed_config, estimator=estimator)
    if loss_mode:
        cfg["actor_rollout_ref"]["actor"]["policy_loss"]["loss_mode"] = loss_mode
    cfg["opd"].update(setting)
    validate_config(cfg)


REMOVED_OFFLOAD = (r"opd.teacher.param_offload was removed: verl 0.9.1 always keeps a forward-only engine's "
                   r"parameters \(the teacher's\) offloaded to CPU between passes; nothing to set")


@pytest.mark.parametrize("override", ["opd.teacher.param_offload=true", "+opd.teacher.param_offload=false"])
def test_removed_param_offload_override_says_why(override):
    assert "param_offload" not in opd_defaults()["teacher"]
    with pytest.raises(OPDConfigError, match=REMOVED_OFFLOAD):
        check_override_keys([override])


def test_removed_param_offload_in_a_composed_config_says_why(composed_config):
    cfg = _opd_config(composed_config)
    cfg["opd"]["teacher"]["param_offload"] = True  # e.g. from an old recipe YAML
    with pytest.raises(OPDConfigError, match=REMOVED_OFFLOAD):
        validate_config(cfg)
    cfg = _opd_config(composed_config, teachers=[{"path": "/a", "param_offload": True}, {"path": "/b"}])
    with pytest.raises(OPDConfigError, match=r"opd.teachers\[0\].param_offload was removed"):
        validate_config(cfg)


def test_teacher_model_options(composed_config):
    cfg = _opd_config(composed_config)
    cfg["opd"]["teacher"]["model"] = {"override_config": {"rope_theta": 1e6}, "trust_remote_code": True}
    validate_config(cfg)
    assert teacher_entries(cfg["opd"])[0]["model"] == cfg["opd"]["teacher"]["model"]
    cfg["opd"]["teacher"]["model"] = {"use_ligr": True}
    with pytest.raises(OPDConfigError, match=r"unknown key 'opd.teacher.model.use_ligr' \(not a verl HFModelConfig"):
        validate_config(cfg)
    cfg["opd"]["teacher"]["model"] = {"use_remove_padding": False}
    with pytest.raises(OPDConfigError, match=r"opd.teacher.model.use_remove_padding cannot be set for a teacher: it "
                                             r"follows actor_rollout_ref.model.use_remove_padding"):
        validate_config(cfg)
    cfg = _opd_config(composed_config, teachers=[{"path": "/a", "model": {"use_liger": True}},
                                                 {"path": "/b", "model": {"lora_rank": 8}}])
    with pytest.raises(OPDConfigError, match=r"opd.teachers\[1\].model.lora_rank cannot be set .* frozen"):
        validate_config(cfg)


@pytest.mark.parametrize("override,error", [
    ("+opd.teacher.model.use_liger=true", None),
    ("+opd.teacher.model.override_config.rope_theta=1e6", None),
    ("+opd.teacher.model.use_remove_padding=false", "follows actor_rollout_ref.model.use_remove_padding"),
    ("+opd.teacher.model.use_ligr=true", "unknown key 'opd.teacher.model.use_ligr'"),
])
def test_teacher_model_override_keys(override, error):
    if error is None:
        check_override_keys([override])
    else:
        with pytest.raises(OPDConfigError, match=re.escape(error)):
            check_override_keys([override])


def test_fused_kernels_teacher_is_an_error_where_its_logits_are_needed(composed_config):
    cfg = _opd_config(composed_config, support="full")
    cfg["actor_rollout_ref"]["actor"]["policy_loss"]["loss_mode"] = "ppo_plus_distill"
    cfg["opd"]["teacher"]["model"] = {"use_fused_kernels": True}
    with pytest.raises(OPDConfigError, match=r"opd.teacher.model.use_fused_kernels=true: opd.support=full needs the "
                                             r"teacher's logits"):
        validate_config(cfg)
    cfg["opd"]["support"] = "sampled"  # the reference pass needs the sampled tokens' log-probs only
    validate_config(cfg)


BYPASS = "algorithm.rollout_correction.bypass_mode"


def _bypass_config(make, estimator="opd", loss_mode=None, bypass=True, accept=False, **rollout):
    cfg = _opd_config(make, estimator=estimator)
    if loss_mode:
        cfg["actor_rollout_ref"]["actor"]["policy_loss"]["loss_mode"] = loss_mode
    cfg["algorithm"]["rollout_correction"]["bypass_mode"] = bypass
    cfg["opd"]["accept_rollout_log_probs"] = accept
    cfg["actor_rollout_ref"]["rollout"].update(rollout)
    return cfg


def test_rollout_sampling_defaults_are_untruncated(composed_config):
    # the truncation check below treats top_p=1 and top_k<=0 as "off": verl 0.9.1's defaults must be those
    rollout = composed_config()["actor_rollout_ref"]["rollout"]
    assert float(rollout["top_p"]) == 1.0 and int(rollout["top_k"]) == -1
    assert composed_config()["algorithm"]["rollout_correction"]["bypass_mode"] is False


@pytest.mark.parametrize("estimator, loss_mode, setting", [
    ("opd", None, {}),
    ("opd_hybrid", None, {}),
    ("opd", "ppo_plus_distill", {"lambda_rl": 0.5}),  # the PG term reads the advantage
])
def test_bypass_mode_on_the_advantage_path_needs_acceptance(composed_config, estimator, loss_mode, setting):
    cfg = _bypass_config(composed_config, estimator, loss_mode)
    cfg["opd"].update(setting)
    with pytest.raises(OPDConfigError) as err:
        validate_config(cfg)
    message = str(err.value)
    assert message.startswith(f"{BYPASS}=true with algorithm.adv_estimator={estimator}: s_t of the OPD advantage")
    assert f"set {BYPASS}=false, or opd.accept_rollout_log_probs=true to accept it" in message
    assert "\n" not in message
    cfg["opd"]["accept_rollout_log_probs"] = True
    validate_config(cfg)
    cfg["algorithm"]["rollout_correction"]["bypass_mode"] = False  # the actor recomputes s_t: nothing to accept
    with pytest.raises(OPDConfigError, match=r"opd.accept_rollout_log_probs=True has no effect here: it is read only "
                                             rf"with {re.escape(BYPASS)}=true and the OPD advantage in a loss"):
        validate_config(cfg)
    cfg["opd"]["accept_rollout_log_probs"] = False
    validate_config(cfg)


@pytest.mark.parametrize("rollout, named", [
    ({"top_p": 0.9}, "actor_rollout_ref.rollout.top_p=0.9"),
    ({"top_k": 20}, "actor_rollout_ref.rollout.top_k=20"),
    ({"top_p": 0.95, "top_k": 50}, "actor_rollout_ref.rollout.top_p=0.95 and actor_rollout_ref.rollout.top_k=50"),
])
@pytest.mark.parametrize("accept", [False, True])
def test_bypass_mode_with_a_truncated_rollout_is_always_an_error(composed_config, rollout, named, accept):
    cfg = _bypass_config(composed_config, accept=accept, **rollout)
    with pytest.raises(OPDConfigError) as err:
        validate_config(cfg)
    message = str(err.value)
    assert message.startswith(f"{BYPASS}=true with {named}: ") and "truncated, renormalised distribution" in message
    assert f"set {BYPASS}=false" in message and "top_p=1 and top_k=-1" in message and "\n" not in message
    cfg["algorithm"]["rollout_correction"]["bypass_mode"] = False
    cfg["opd"]["accept_rollout_log_probs"] = False
    validate_config(cfg)  # without bypass the actor recomputes s_t over the whole vocabulary


@pytest.mark.parametrize("top_k", [0, -1])
def test_top_k_zero_or_minus_one_is_off(composed_config, top_k):
    validate_config(_bypass_config(composed_config, accept=True, top_k=top_k, top_p=1.0))


@pytest.mark.parametrize("estimator, loss_mode, setting", [
    ("opd", "ppo_plus_distill", {"support": "full", "divergence": "forward_kl"}),  # lambda_rl=0: demo_cpu_forward_kl
    ("opd_hybrid", "ppo_plus_distill", {}),
    ("opd_hybrid", None, {"hybrid_alpha": 0.0}),  # A = A_base exactly: s_t enters no advantage
    ("grpo", None, {}),  # no OPD advantage (and no teacher needed)
    ("grpo", "ppo_plus_distill", {"lambda_rl": 1.0}),  # the loss-level pass reads the current log-probs, not s_t
])
def test_bypass_mode_where_the_opd_advantage_enters_no_loss(composed_config, estimator, loss_mode, setting):
    cfg = _bypass_config(composed_config, estimator, loss_mode, top_p=0.9)
    cfg["opd"].update(setting)
    validate_config(cfg)  # nothing to accept, truncated or not
    cfg["opd"]["accept_rollout_log_probs"] = True  # an option the mode never reads
    with pytest.raises(OPDConfigError, match=r"^opd.accept_rollout_log_probs=True has no effect here: it is read only "
                                             rf"with {re.escape(BYPASS)}=true and .*; set that, or drop "
                                             r"opd.accept_rollout_log_probs \(default False\)$"):
        validate_config(cfg)
