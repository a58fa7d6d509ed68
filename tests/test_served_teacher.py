"""A served teacher (opd.teacher.engine=vllm): the checks before Ray (opd_verl.checks.served_teacher), verl's
`distillation:` section written from opd.* and accepted by verl's own DistillationConfig, and q_t read from the
server's per-sample log-probs (opd_verl.verl_ext.served_teacher) against a brute-force recomputation."""

import io
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from opd_verl.checks.errors import OPDConfigError
from opd_verl.checks.options import validate_config
from opd_verl.checks.served_teacher import check_server_fits, served_inference, verl_inference_defaults
from opd_verl.checks.teacher_pool import placement_note
from opd_verl.verl_ext.served_teacher import (
    apply_served_teacher, check_distillation_untouched, distillation_settings, sampled_token_log_probs,
    served_ref_log_prob, served_worker_class,
)

REPO = Path(__file__).resolve().parents[1]


def _served(make, estimator="opd", pool=(1, 1), **teacher):
    cfg = OmegaConf.to_container(OmegaConf.create(make()), resolve=True)
    cfg["algorithm"]["adv_estimator"] = estimator
    cfg["opd"]["teacher"].update({"path": "/models/teacher", "engine": "vllm", **teacher})
    if pool:
        cfg["opd"]["teacher_pool"] = {"n_gpus_per_node": pool[0], "nnodes": pool[1]}
    return cfg


def test_the_advantage_path_with_a_pool_validates(composed_config):
    for estimator in ("opd", "opd_hybrid"):
        cfg = _served(composed_config, estimator)
        validate_config(cfg)
        assert "served by verl's teacher pool" in placement_note(cfg["opd"])
    validate_config(_loss_level(_served(composed_config), "sampled"))  # the loss level reads ref_log_prob too


def _loss_level(cfg, support, **opd):
    cfg["actor_rollout_ref"]["actor"]["policy_loss"]["loss_mode"] = "ppo_plus_distill"
    cfg["opd"].update({"support": support, **opd})
    return cfg


@pytest.mark.parametrize("edit, expected", [
    (lambda c: c["opd"].update(teacher_pool={"n_gpus_per_node": None, "nnodes": None}),
     r"opd.teacher.engine=vllm needs GPUs of its own.*opd.teacher_pool.n_gpus_per_node"),
    (lambda c: c["algorithm"].update(adv_estimator="grpo"), r"opd.teacher.engine=vllm but no teacher runs"),
    (lambda c: _loss_level(c, "full", divergence="forward_kl"),
     r"opd.support=full with opd.teacher.engine=vllm.*never the full vocabulary.*engine=fsdp with opd.teacher_pool.*"
     r"colocated"),
    (lambda c: _loss_level(c, "topk", divergence="forward_kl"),
     r"opd.support=topk with opd.teacher.engine=vllm is not yet available \(the server's top-k in the loss\)"),
    (lambda c: _loss_level(c, "topk", divergence="forward_kl", topk=64)["opd"]["teacher"].update(
        inference={"engine_kwargs": {"vllm": {"max_logprobs": 20}}}),
     r"opd.topk=64 exceeds the server's opd.teacher.inference.engine_kwargs.vllm.max_logprobs=20"),
    (lambda c: c["actor_rollout_ref"]["rollout"].update(temperature=0.7),
     r"actor_rollout_ref.rollout.temperature=0.7 with opd.teacher.engine=vllm: verl's teacher server scores at "
     r"temperature 1"),
    (lambda c: c["opd"]["teacher"].update(inference={"tensor_parallel_size": 2}),
     r"opd.teacher.inference.tensor_parallel_size is not a setting of verl's teacher server"),
    (lambda c: c["opd"]["teacher"].update(inference={"name": "sglang"}),
     r"opd.teacher.inference.name=sglang: opd.teacher.engine=vllm serves the teacher from vLLM"),
    (lambda c: c["opd"]["teacher"].update(model={"use_liger": True}),
     r"opd.teacher.model is read by the FSDP engine only.*opd.teacher.inference"),
    (lambda c: c["opd"]["teacher"].update(prompt="chat_template"),
     r"opd.teacher.prompt / cross_tokenizer with opd.teacher.engine=vllm"),
    (lambda c: c["opd"].update(teachers=[{"path": "/a"}, {"path": "/b"}]),
     r"opd.teachers with opd.teacher.engine=vllm: several served teachers are not yet available"),
])
def test_what_a_served_teacher_cannot_do_is_an_error_before_ray(composed_config, edit, expected):
    cfg = _served(composed_config)
    edit(cfg)
    with pytest.raises(OPDConfigError, match=expected):
        validate_config(cfg)


def test_server_settings_are_read_only_by_the_vllm_engine(composed_config):
    cfg = _served(composed_config, inference={"max_model_len": 4096})
    cfg["opd"]["teacher"]["engine"] = "fsdp"
    with pytest.raises(OPDConfigError, match=r"opd.teacher.inference is read only with opd.teacher.engine=vllm"):
        validate_config(cfg)


def test_the_server_must_fit_the_pool_and_the_sequences(composed_config):
    opd = _served(composed_config)["opd"]
    assert verl_inference_defaults()["tensor_model_parallel_size"] == 2  # verl's default replica: 2 GPUs
    with pytest.raises(OPDConfigError, match=r"replica needs 2 GPUs .* does not divide opd.teacher_pool's 1"):
        check_server_fits(opd, served_inference(opd), 1, 64, 16)
    check_server_fits(opd, served_inference(opd), 4, 64, 16)
    opd["teacher"]["inference"] = {"tensor_model_parallel_size": 1, "max_model_len": 80}
    with pytest.raises(OPDConfigError, match=r"max_model_len=80 cannot hold .* \(81 = data.max_prompt_length"):
        check_server_fits(opd, served_inference(opd), 1, 64, 16)
    opd["teacher"]["inference"]["max_model_len"] = 81
    check_server_fits(opd, served_inference(opd), 1, 64, 16)


def test_the_distillation_section_is_written_from_opd_and_verl_accepts_it(composed_config):
    from verl.utils.config import omega_conf_to_dataclass

    plain = _served(composed_config, pool=(2, 1), inference={"tensor_model_parallel_size": 1, "max_model_len": 200})
    validate_config(plain)
    config = OmegaConf.create(composed_config())
    config.opd = plain["opd"]
    config.algorithm.adv_estimator = "opd"
    config.data.max_prompt_length, config.data.max_response_length = 64, 16
    out = io.StringIO()
    apply_served_teacher(config, explicit={"opd.teacher.engine"}, out=out)
    assert out.getvalue().count("opd_verl[served teacher]: distillation.") == len(distillation_settings(plain["opd"]))
    verl = omega_conf_to_dataclass(config.distillation)  # verl's own checks: pool size, max_model_len, top-k
    teacher = verl.teacher_models["default"]
    assert verl.enabled and (verl.n_gpus_per_node, verl.nnodes) == (2, 1)
    assert teacher.model_path == "/models/teacher" and teacher.num_replicas == 2
    assert teacher.inference.tensor_model_parallel_size == 1 and teacher.inference.max_model_len == 200
    # verl's loss settings stay a sampled-token estimator: the server is asked for the actual tokens' log-probs only
    assert verl.distillation_loss.loss_settings.use_estimator


def test_explicit_distillation_overrides_are_refused_with_a_served_teacher():
    check_distillation_untouched({"opd.teacher.engine", "trainer.device"})
    with pytest.raises(OPDConfigError, match=r"distillation.teacher_models.teacher_model.inference.max_model_len is "
                                             r"set together with opd.teacher.engine=vllm"):
        check_distillation_untouched({"distillation.teacher_models.teacher_model.inference.max_model_len"})


def _vllm_prompt_log_probs(logits: torch.Tensor, ids: torch.Tensor):
    """What verl's vLLM server returns with prompt_logprobs=0 (vllm_rollout.utils.extract_prompt_logprobs): for
    i < L - 1 the log-prob and id of token i + 1, then a dummy (0.0, id 0)."""
    logp = torch.log_softmax(logits.double(), -1)
    values = [[float(logp[i, ids[i + 1]])] for i in range(len(ids) - 1)] + [[0.0]]
    token_ids = [[int(ids[i + 1])] for i in range(len(ids) - 1)] + [[0]]
    return torch.tensor(values), torch.tensor(token_ids, dtype=torch.int32)


def test_q_t_is_the_log_prob_of_each_response_token_under_the_teacher():
    torch.manual_seed(0)
    vocab, rows, expected = 11, [], []
    for prompt_len, response_len in ((5, 3), (2, 6), (7, 1)):
        ids = torch.randint(0, vocab, (prompt_len + response_len,))
        logits = torch.randn(len(ids), vocab)
        rows.append((ids, *_vllm_prompt_log_probs(logits, ids), torch.ones(response_len, dtype=torch.int64)))
        logp = torch.log_softmax(logits.double(), -1)  # brute force: token t scored from the positions before it
        expected.append(torch.stack([logp[t - 1, ids[t]] for t in range(prompt_len, len(ids))]))
    nested = lambda ts: torch.nested.as_nested_tensor(list(ts), layout=torch.jagged)  # noqa: E731
    ids, lps, tids, masks = zip(*rows)
    q = served_ref_log_prob(nested(lps), nested(tids), nested(ids), nested(masks))
    for got, want in zip(q.unbind(), expected):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=0)


def test_misaligned_server_output_is_an_error():
    ids = torch.tensor([3, 1, 4, 1, 5])
    lp, tid = _vllm_prompt_log_probs(torch.randn(5, 7), ids)
    tid[2, 0] = 6
    with pytest.raises(RuntimeError, match="scored other token ids"):
        sampled_token_log_probs(lp, tid, ids)
    with pytest.raises(RuntimeError, match=r"expected \[5, 1\]"):
        sampled_token_log_probs(torch.zeros(5, 4), tid, ids)


def test_the_served_worker_drops_verls_distillation_loss():
    class Base:
        def __init__(self, config, role, distillation_config=None, **kwargs):
            self.args = (config, role, distillation_config, kwargs)

    worker = served_worker_class(Base)("cfg", "actor_rollout", distillation_config={"enabled": True}, extra=1)
    assert worker.args == ("cfg", "actor_rollout", None, {"extra": 1})
    assert served_worker_class(Base).__name__ == "Base"


def test_cpu_defaults_size_the_server_and_keep_explicit_values(monkeypatch):
    from hydra import compose, initialize_config_dir

    from opd_verl.cpu.defaults import DEFAULT_KV_CACHE_BYTES, apply_cpu_defaults

    monkeypatch.setenv("VERL_PLATFORM", "cpu")
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    overrides = ["trainer.device=cpu", "opd.teacher.engine=vllm", "+opd.teacher.inference.max_num_seqs=8",
                 "+opd.teacher.inference.free_cache_engine=true"]
    with initialize_config_dir(config_dir=str(REPO / "opd_verl" / "config"), version_base=None):
        cfg = compose(config_name="opd_trainer", overrides=overrides)
    out = io.StringIO()
    apply_cpu_defaults(cfg, overrides=overrides, out=out)
    inference = OmegaConf.to_container(cfg.opd.teacher.inference)
    assert inference == {"max_num_seqs": 8,  # explicit: kept
                         "free_cache_engine": False,  # cannot work on CPU (vLLM's sleep mode): replaced, printed
                         "enable_sleep_mode": False, "tensor_model_parallel_size": 1,
                         "engine_kwargs": {"vllm": {"kv_cache_memory_bytes": DEFAULT_KV_CACHE_BYTES}}}
    assert "opd.teacher.inference.free_cache_engine=False (was True)" in out.getvalue()
    with initialize_config_dir(config_dir=str(REPO / "opd_verl" / "config"), version_base=None):
        fsdp = compose(config_name="opd_trainer", overrides=["trainer.device=cpu"])
    apply_cpu_defaults(fsdp, overrides=["trainer.device=cpu"], out=io.StringIO())
    assert OmegaConf.to_container(fsdp.opd.teacher.inference) == {}  # an FSDP teacher: nothing of the server's
