"""The teacher on a pool of its own (opd.teacher_pool), emulated on CPU with placeholder GPUs: the student's pool of
1 and the teacher's pool of 1, against the colocated run on the same data.

Rollouts are greedy (`rollout.top_k=1`), so both runs sample the same responses. Advantage path: the reference
pass (ref_log_prob, dumped per step) of every sample agrees between the runs and with HF in float64. Loss-level
support=topk (the pool sends the loss its top-k) and support=full (the pool sends the teacher's final hidden
states): the loss's metrics agree over two steps (step 2's samples come from the student step 1 trained). Two routed teachers on a pool placed on another Ray node than the student (a
head without GPUs and two one-GPU nodes): every sample's teacher log-prob equals its teacher's in float64. Seven
trainer runs (~3 min each on 2 cores): marked `slow`.
"""

from __future__ import annotations

import pytest
import torch

from cpu_run import (
    add_routed_teachers, console_metrics, float64_log_probs, grpo_overrides, prepare_workdir, run_main, write_model,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TIMEOUT = 900
SAME_RUN_TOLERANCE = 1e-5  # nats, float32: pool vs colocated
FLOAT64_TOLERANCE = 1e-4  # nats: float32 compute vs HF in float64


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    w = prepare_workdir(tmp_path_factory.mktemp("teacher_pool"))
    w.teacher = write_model(w.root / "teacher", hidden_size=256, num_layers=2, seed=1)
    return w


def _overrides(w, name, **extra):
    return grpo_overrides(w, **{
        "algorithm.adv_estimator": "opd",
        "opd.teacher.path": w.teacher,
        "actor_rollout_ref.actor.policy_loss.loss_mode": "importance_sampling",
        "actor_rollout_ref.rollout.top_k": 1,
        "trainer.n_gpus_per_node": 1,
        "trainer.experiment_name": name,
        "trainer.total_training_steps": 1,
        "trainer.default_local_dir": str(w.root / f"ckpt_{name}"),
        **extra,
    })


def _dumped_run(w, name, overrides, tmp_path):
    dump = tmp_path / f"dump_{name}"
    result = run_main(overrides, w.root / f"{name}.log", timeout=TIMEOUT, env={"OPD_VERL_DUMP_TOKENS": str(dump)})
    assert not result.timed_out, f"{name} hung; log: {w.root / f'{name}.log'}"
    assert result.returncode == 0, result.log[-4000:]
    return result.log, console_metrics(result.log), torch.load(dump / "step_1.pt")


def _colocated_and_pool(w, name, extra, tmp_path):
    """The colocated run and the pool run of the same settings: (the pool's log, colocated metrics, pool metrics,
    colocated dump, pool dump)."""
    _, colocated, saved_colocated = _dumped_run(w, f"{name}_colocated", _overrides(w, f"{name}_colocated", **extra),
                                                tmp_path)
    log, pooled, saved_pool = _dumped_run(w, f"{name}_pool", _overrides(
        w, f"{name}_pool", **extra, **{"opd.teacher_pool.n_gpus_per_node": 1, "opd.teacher_pool.nnodes": 1}), tmp_path)
    return log, colocated, pooled, saved_colocated, saved_pool


def _by_sample(saved) -> dict:
    """{(prompt ids, response ids): (ref_log_prob, old_log_probs) over the response}."""
    out = {}
    for i, (prompt, response) in enumerate(zip(saved["prompts"], saved["responses"])):
        n = int(saved["response_mask"][i].sum())
        out[(tuple(prompt.tolist()), tuple(response.tolist()))] = (saved["ref_log_prob"][i, :n],
                                                                  saved["old_log_probs"][i, :n])
    return out


def test_advantage_path_on_a_teacher_pool_equals_colocated(workdir, tmp_path):
    _, colocated_metrics, colocated = _dumped_run(workdir, "colocated", _overrides(workdir, "colocated"), tmp_path)
    pool_overrides = _overrides(workdir, "pool", **{"opd.teacher_pool.n_gpus_per_node": 1,
                                                    "opd.teacher_pool.nnodes": 1})
    log, pool_metrics, pooled = _dumped_run(workdir, "pool", pool_overrides, tmp_path)
    assert "opd_verl: teachers on opd_teacher_pool [1] (GPUs per node), the student on [1]" in log
    assert f"opd_verl: teacher {workdir.teacher} on its own pool: parameters resident" in log
    a, b = _by_sample(colocated), _by_sample(pooled)
    assert sorted(a) == sorted(b) and len(a) == 4  # greedy: the same samples (a prompt's 4 rollouts are one)
    worst_runs = worst_f64 = 0.0
    for key, (q_pool, _) in b.items():
        q_colocated = a[key][0]
        worst_runs = max(worst_runs, float((q_pool.double() - q_colocated.double()).abs().max()))
        q64 = float64_log_probs(workdir.teacher, torch.tensor(key[0]), torch.tensor(key[1]))
        worst_f64 = max(worst_f64, float((q_pool.double() - q64).abs().max()))
    print(f"pool vs colocated: max |Δ ref_log_prob| {worst_runs:.2e}; pool vs HF float64 {worst_f64:.2e}; "
          f"opd/kl_per_token {pool_metrics[1]['opd/kl_per_token']:.6f} vs {colocated_metrics[1]['opd/kl_per_token']:.6f}")
    assert worst_runs <= SAME_RUN_TOLERANCE, worst_runs
    assert worst_f64 <= FLOAT64_TOLERANCE, worst_f64
    assert pool_metrics[1]["opd/kl_per_token"] == pytest.approx(colocated_metrics[1]["opd/kl_per_token"], abs=1e-5)
    assert pool_metrics[1]["opd/kl_per_token"] > 1e-3  # a teacher other than the student


LOSS_METRICS = ("opd/divergence_per_token", "opd/topk_mass", "opd/student_topk_mass", "opd/topk_overlap",
                "opd/distill_loss", "opd/kl_per_token")


def test_loss_level_topk_on_a_teacher_pool_equals_colocated(workdir, tmp_path):
    topk = {"actor_rollout_ref.actor.policy_loss.loss_mode": "ppo_plus_distill", "opd.support": "topk",
            "opd.topk": 8, "opd.temperature": 1.5, "opd.divergence": "jsd", "opd.beta": 0.3,
            "trainer.total_training_steps": 2}
    log, colocated, pooled, saved_colocated, saved_pool = _colocated_and_pool(workdir, "topk", topk, tmp_path)
    assert "parameters resident" in log
    for step in (1, 2):
        print(f"step {step}: " + ", ".join(f"{name} pool {pooled[step][name]:.7f} colocated {colocated[step][name]:.7f}"
                                          for name in LOSS_METRICS))
        for name in LOSS_METRICS:
            assert pooled[step][name] == pytest.approx(colocated[step][name], abs=1e-5, rel=1e-5), (step, name)
        assert pooled[step]["opd/teacher_alignment_seq_median_max"] <= pooled[step]["opd/teacher_alignment_tolerance"]
    assert colocated[1]["opd/divergence_per_token"] > 1e-3 and colocated[1]["opd/topk_mass"] < 1.0
    assert sorted(_by_sample(saved_pool)) == sorted(_by_sample(saved_colocated))


def test_loss_level_full_on_a_teacher_pool_equals_colocated(workdir, tmp_path):
    """support=full: the pool sends the teacher's final hidden states, the student's process applies its output
    head (read from its checkpoint) and the full-vocabulary divergence."""
    full = {"actor_rollout_ref.actor.policy_loss.loss_mode": "ppo_plus_distill", "opd.support": "full",
            "opd.temperature": 1.5, "opd.divergence": "jsd", "opd.beta": 0.3, "trainer.total_training_steps": 2}
    log, colocated, pooled, saved_colocated, saved_pool = _colocated_and_pool(workdir, "full", full, tmp_path)
    assert "parameters resident" in log
    names = ("opd/divergence_per_token", "opd/distill_loss", "opd/kl_per_token")
    for step in (1, 2):
        print(f"step {step}: " + ", ".join(f"{name} pool {pooled[step][name]:.9f} colocated {colocated[step][name]:.9f}"
                                          for name in names))
        for name in names:
            assert pooled[step][name] == pytest.approx(colocated[step][name], abs=1e-5, rel=1e-5), (step, name)
        assert pooled[step]["opd/topk_mass"] == 1.0
        assert pooled[step]["opd/teacher_alignment_seq_median_max"] <= pooled[step]["opd/teacher_alignment_tolerance"]
    assert colocated[1]["opd/divergence_per_token"] > 1e-3
    assert sorted(_by_sample(saved_pool)) == sorted(_by_sample(saved_colocated))


@pytest.fixture(scope="module")
def two_nodes():
    """A real Ray cluster on this machine: the head (the driver's node) without GPUs and two worker nodes with one
    placeholder GPU each, so the student's pool and the teachers' pool land on different nodes."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "num_gpus": 0})
    for _ in range(2):
        cluster.add_node(num_cpus=8, num_gpus=1)
    yield cluster
    cluster.shutdown()


def test_two_routed_teachers_on_a_pool_on_another_node_match_float64(tmp_path_factory, two_nodes, tmp_path):
    """Two teachers (routed by data_source) resident on a pool of their own, on another Ray node than the student:
    every sample's teacher log-probs equal its own teacher's in float64 (HF)."""
    w = add_routed_teachers(prepare_workdir(tmp_path_factory.mktemp("teacher_pool_nodes")))
    overrides = _overrides(w, "pool_nodes", **{
        "opd.teacher.path": "null", "opd.teachers": w.routes, "opd.multi_teacher_mode": "route",
        "data.train_files": w.routed_train, "data.val_files": w.routed_val,
        "opd.teacher_pool.n_gpus_per_node": 1, "opd.teacher_pool.nnodes": 1,
        "+ray_kwargs.ray_init.address": two_nodes.address})
    # the cluster's processes were started without the dump variable: the TaskRunner gets it from the runtime env
    dump = tmp_path / "dump_pool_nodes"
    overrides.append(f"+ray_kwargs.ray_init.runtime_env.env_vars.OPD_VERL_DUMP_TOKENS={dump}")
    log, metrics, saved = _dumped_run(w, "pool_nodes", overrides, tmp_path)
    assert log.count("on its own pool: parameters resident") == 2
    routes = {"arith_a": w.teacher, "arith_b": w.teacher_b}
    assert sorted(set(saved["data_source"])) == ["arith_a", "arith_b"]
    worst = 0.0
    for i, (prompt, response) in enumerate(zip(saved["prompts"], saved["responses"])):
        n = int(saved["response_mask"][i].sum())
        q64 = float64_log_probs(routes[saved["data_source"][i]], prompt, response)
        worst = max(worst, float((saved["ref_log_prob"][i, :n].double() - q64).abs().max()))
    print(f"two routed teachers on a pool on another node: max |ref_log_prob - f64| {worst:.2e}")
    assert worst <= FLOAT64_TOLERANCE, worst
    assert metrics[1]["opd/kl_per_token"] > 1e-3
