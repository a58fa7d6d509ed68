"""A multi-task run end to end on CPU: math, code and instruction-following rows in one data set, each routed by
its data_source to its own teacher and scored by its own reward (opd_verl.rewards), per-task KL and reward metrics,
and hostile code rows that leave the run healthy.

The tiny random student never writes hostile code itself, so the hostile code comes from the rows: KodCode-style
code rows (the completion is written to solution.py and the row's tests import it) whose *tests* fork 64 times,
write a file outside the sandbox, connect to a socket this test listens on, or loop forever. The executor runs a
row's tests in the same confined process as the completion, so this is the path a hostile completion takes.
"""

from __future__ import annotations

import socket

import pytest
import torch

from cpu_run import (
    code_row, console_metrics, float64_log_probs, grpo_overrides, prepare_workdir, run_main, write_model,
    write_task_dataset,
)

pytestmark = pytest.mark.e2e

TIMEOUT = 600


def hostile_rows(escape_path, port) -> list[dict]:
    from opd_verl.rewards import KODCODE

    payloads = [
        "import os\nfor _ in range(64):\n    os.fork()",  # bounded: 64 forks at most
        f"open({str(escape_path)!r}, 'w').write('escaped')",
        f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'escaped')",
        "while True:\n    pass",
    ]
    return [code_row(100 + i, "train", [p], data_source=KODCODE, module="solution") for i, p in enumerate(payloads)]


def test_mixed_tasks_routed_to_their_teachers_and_rewards(tmp_path):
    from transformers import AutoTokenizer

    from opd_verl.rewards import GSM8K, IFEVAL, KODCODE, MBPP, compute_score_with_info

    w = prepare_workdir(tmp_path)
    teachers = {"math": write_model(tmp_path / "t_math", hidden_size=256, seed=1),
                "code": write_model(tmp_path / "t_code", hidden_size=128, seed=3),
                "chat": write_model(tmp_path / "t_chat", hidden_size=192, seed=5)}
    route = {GSM8K: "math", MBPP: "code", KODCODE: "code", IFEVAL: "chat"}
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.setblocking(False)
    escape = tmp_path / "escaped.txt"
    # batches of 8 rows: (math, code, instruction) twice, each triple followed by a hostile row
    train, val = write_task_dataset(tmp_path / "tasks", n_train=12, extra_train_rows=hostile_rows(escape, listener.getsockname()[1]))
    routes = (f"[{{path:{teachers['math']},data_source:'{GSM8K}'}},{{path:{teachers['code']},data_source:['{MBPP}','{KODCODE}']}},"
              f"{{path:{teachers['chat']},data_source:'{IFEVAL}'}}]")
    overrides = grpo_overrides(w, **{
        "algorithm.adv_estimator": "opd",
        "actor_rollout_ref.actor.policy_loss.loss_mode": "importance_sampling",
        "opd.teachers": routes,
        "opd.multi_teacher_mode": "route",
        "data.train_files": train,
        "data.val_files": val,
        "data.shuffle": False,
        "data.train_batch_size": 8,
        "data.max_prompt_length": 128,
        "actor_rollout_ref.rollout.n": 2,
        "actor_rollout_ref.actor.ppo_mini_batch_size": 8,
        "reward.custom_reward_function.path": "pkg://opd_verl.rewards",
        "reward.custom_reward_function.name": "compute_score_with_info",
        "+reward.custom_reward_function.reward_kwargs.code_wall_seconds": 3,
        "+reward.custom_reward_function.reward_kwargs.code_cpu_seconds": 2,
        "trainer.experiment_name": "multitask",
    })
    dump = tmp_path / "dump"
    result = run_main(overrides, tmp_path / "multitask.log", timeout=TIMEOUT, env={"OPD_VERL_DUMP_TOKENS": str(dump)})
    assert not result.timed_out, f"hung: {tmp_path / 'multitask.log'}"
    assert result.returncode == 0, result.log[-5000:]
    metrics = console_metrics(result.log)
    assert {1, 2} <= set(metrics), sorted(metrics)

    # the hostile rows changed nothing outside their sandbox
    assert not escape.exists(), "a code row wrote outside its sandbox"
    with pytest.raises(BlockingIOError):
        listener.accept()  # nobody connected
    listener.close()

    tokenizer = AutoTokenizer.from_pretrained(w.model)
    for step in (1, 2):
        m = metrics[step]
        saved = torch.load(dump / f"step_{step}.pt")
        sources = saved["data_source"]
        assert sorted(set(sources)) == sorted(route), sources
        print(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(m.items())
                                           if k.startswith(("opd/kl_per_token", "opd/reward"))))
        rewards: dict[str, list[dict]] = {}
        for i, (prompt, response) in enumerate(zip(saved["prompts"], saved["responses"])):
            n = int(saved["response_mask"][i].sum())
            # routing: the sample's ref_log_prob is its own task's teacher's (float64 recomputation), not another's
            own = float64_log_probs(teachers[route[sources[i]]], prompt, response)
            assert (saved["ref_log_prob"][i, :n].double() - own).abs().max() < 1e-4, (step, i, sources[i])
            for other in set(teachers.values()) - {teachers[route[sources[i]]]}:
                assert (saved["ref_log_prob"][i, :n].double() - float64_log_probs(other, prompt, response)).abs().max() > 1e-2
            # the reward of the sample, recomputed from its decoded response by the same reward function
            text = tokenizer.decode(response[:n], skip_special_tokens=True)
            rewards.setdefault(sources[i], []).append(
                compute_score_with_info(sources[i], text, saved["reward_model"][i]["ground_truth"],
                                        code_wall_seconds=3, code_cpu_seconds=2))
        for source in route:  # per-task KL and reward, from the same terms
            rows = [i for i, x in enumerate(sources) if x == source]
            mask = saved["response_mask"][rows].bool()
            terms = (saved["old_log_probs"][rows].double() - saved["ref_log_prob"][rows].double())[mask]
            assert m[f"opd/kl_per_token/{source}"] == pytest.approx(float(terms.mean()), abs=1e-5)
            scores = [r["score"] for r in rewards[source]]
            assert m[f"opd/reward/{source}"] == pytest.approx(sum(scores) / len(scores), abs=1e-6), (step, source)
        assert m[f"opd/reward/{KODCODE}"] == 0.0
        assert f"opd/reward_extra/ifeval_inst_strict/{IFEVAL}" in m and f"opd/reward_extra/code_tests_passed/{MBPP}" in m
        assert not [k for k in m if k.startswith("opd/reward_extra/code_") and k.endswith(IFEVAL)]
    # a random response often follows "no commas" alone: the rewards compared above are not all zeros
    assert metrics[1][f"opd/reward/{IFEVAL}"] + metrics[2][f"opd/reward/{IFEVAL}"] > 0
    # step 1 held the fork and the file write, step 2 the connection and the endless loop: stopped, and counted
    assert metrics[1][f"opd/reward_extra/code_blocked/{KODCODE}"] > 0
    assert metrics[2][f"opd/reward_extra/code_blocked/{KODCODE}"] > 0
    assert metrics[2][f"opd/reward_extra/code_timeout/{KODCODE}"] > 0
