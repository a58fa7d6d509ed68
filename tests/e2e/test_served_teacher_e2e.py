"""A served teacher end to end on CPU: verl 0.9.1's teacher pool (one vLLM-CPU replica on a placeholder GPU of its
own, opd.teacher_pool 1 x 1) scores each sample; its q_t feeds the OPD advantage. Against the colocated FSDP teacher
on the same data with greedy rollouts (`rollout.top_k=1`): the same responses, the same per-token q_t within
float32 noise, and both against HF in float64. Slow on 2 cores (two runs of 2 steps):

    bash examples/run_tests.sh -m slow tests/e2e/test_served_teacher_e2e.py
"""

from __future__ import annotations

import pytest
import torch

from cpu_run import float64_log_probs, grpo_overrides, prepare_workdir, run_main, write_model, console_metrics

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TIMEOUT = 900
# vLLM-CPU's KV cache per engine (bytes): plenty for 16 sequences of 80 tokens; two engines at the CPU default of
# 1 GiB each met Ray's OOM killer on a shared 24 GB machine
KV_CACHE = 1 << 28


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    w = prepare_workdir(tmp_path_factory.mktemp("served"))
    w.teacher = write_model(w.root / "teacher", hidden_size=256, num_layers=2, seed=1)
    return w


def _advantage_path(w, name, **extra):
    return grpo_overrides(w, **{
        "algorithm.adv_estimator": "opd",
        "opd.teacher.path": w.teacher,
        "actor_rollout_ref.rollout.top_k": 1,
        "+actor_rollout_ref.rollout.engine_kwargs.vllm.kv_cache_memory_bytes": KV_CACHE,
        "trainer.experiment_name": name,
        "trainer.default_local_dir": str(w.root / f"ckpt_{name}"),
        **extra,
    })


def _dumped_run(w, name, overrides, tmp_path):
    dump = tmp_path / f"dump_{name}"
    result = run_main(overrides, w.root / f"{name}.log", timeout=TIMEOUT, env={"OPD_VERL_DUMP_TOKENS": str(dump)})
    assert not result.timed_out, f"{name} hung; log: {w.root / f'{name}.log'}"
    assert result.returncode == 0, result.log[-4000:]
    return console_metrics(result.log), [torch.load(dump / f"step_{s}.pt") for s in (1, 2)], result.log


def _by_tokens(saved):
    """{(prompt ids, response ids): (q_t, s_t, advantages)} of a dumped step."""
    out = {}
    for i, (prompt, response) in enumerate(zip(saved["prompts"], saved["responses"])):
        n = int(saved["response_mask"][i].sum())
        out[(tuple(prompt.tolist()), tuple(response.tolist()))] = (
            saved["ref_log_prob"][i, :n], saved["old_log_probs"][i, :n], saved["advantages"][i, :n])
    return out


def test_served_q_t_equals_the_colocated_fsdp_teachers(workdir, tmp_path):
    served_metrics, served, log = _dumped_run(workdir, "served", _advantage_path(
        workdir, "served", **{"opd.teacher.engine": "vllm", "opd.teacher_pool.n_gpus_per_node": 1,
                              "opd.teacher_pool.nnodes": 1,
                              "+opd.teacher.inference.engine_kwargs.vllm.kv_cache_memory_bytes": KV_CACHE}), tmp_path)
    assert "opd_verl[served teacher]: distillation.enabled=True" in log
    assert {1, 2} <= set(served_metrics) and all("opd/kl_per_token" in served_metrics[s] for s in (1, 2))
    _, colocated, _ = _dumped_run(workdir, "colocated", _advantage_path(workdir, "colocated"), tmp_path)

    a, b = _by_tokens(served[0]), _by_tokens(colocated[0])
    assert sorted(a) == sorted(b), "greedy rollouts of the same student sampled other responses"
    worst_pair = worst_f64 = 0.0
    for key, (q_served, s, adv) in a.items():
        q_colocated = b[key][0]
        worst_pair = max(worst_pair, float((q_served - q_colocated).abs().max()))
        prompt, response = (torch.tensor(t) for t in key)
        q64 = float64_log_probs(workdir.teacher, prompt, response)
        s64 = float64_log_probs(workdir.model, prompt, response)
        worst_f64 = max(worst_f64, float((q_served.double() - q64).abs().max()))
        torch.testing.assert_close(adv.double(), (q64 - s64).clamp(-10, 10), atol=1e-4, rtol=0)
    print(f"served vs colocated q_t: max |diff| {worst_pair:.2e}; served vs float64: {worst_f64:.2e}")
    assert worst_pair < 1e-5 and worst_f64 < 1e-4, (worst_pair, worst_f64)
    # step 2: the served teacher scored the updated student's rollouts too (every response token has a q_t < 0)
    for q, _, _ in _by_tokens(served[1]).values():
        assert torch.isfinite(q).all() and (q < 0).all()


def test_loss_level_sampled_with_a_served_teacher_equals_the_colocated_one(workdir, tmp_path):
    """ppo_plus_distill, support=sampled (k1 on s - q): the loss reads the served q_t as ref_log_prob."""
    loss_level = {"actor_rollout_ref.actor.policy_loss.loss_mode": "ppo_plus_distill"}
    served_metrics, served, _ = _dumped_run(workdir, "served_loss", _advantage_path(
        workdir, "served_loss", **loss_level, **{
            "opd.teacher.engine": "vllm", "opd.teacher_pool.n_gpus_per_node": 1, "opd.teacher_pool.nnodes": 1,
            "+opd.teacher.inference.engine_kwargs.vllm.kv_cache_memory_bytes": KV_CACHE}), tmp_path)
    colocated_metrics, colocated, _ = _dumped_run(
        workdir, "colocated_loss", _advantage_path(workdir, "colocated_loss", **loss_level), tmp_path)
    assert sorted(_by_tokens(served[0])) == sorted(_by_tokens(colocated[0]))
    for step in (1, 2):
        assert served_metrics[step]["opd/divergence_per_token"] > 1e-3
    for key in ("opd/divergence_per_token", "opd/kl_per_token", "opd/distill_loss"):
        assert served_metrics[1][key] == pytest.approx(colocated_metrics[1][key], rel=1e-4, abs=1e-6), key
