"""opd_verl.evaluate on code and instruction-following rows: pass@j for several j from one set of samples against
brute force, IFEval's four accuracies against a recount of per-instruction results, per-data_source metrics of a
mixed parquet through the real rewards (code run in the sandbox), and the CLI's before/after/teacher table."""

from __future__ import annotations

import itertools
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from opd_verl import evaluate as ev
from opd_verl.rewards import GSM8K, MBPP
from opd_verl.rewards.code import code_ground_truth

REPO = Path(__file__).resolve().parents[1]


def brute_pass_at(samples: list[int], k: int) -> float:
    subsets = list(itertools.combinations(samples, k))
    return sum(1 for s in subsets if any(s)) / len(subsets)


def test_pass_at_several_k_from_one_set_of_samples_matches_brute_force():
    rng = random.Random(0)
    scores = [[float(rng.random() < p) for _ in range(10)] for p in (0.0, 0.1, 0.3, 0.7, 1.0)]
    ours = ev.pass_at_ks(scores, [1, 5, 10, 12])  # 12 > n: left out
    assert set(ours) == {"pass@1", "pass@5", "pass@10"}
    for k in (1, 5, 10):
        expected = sum(brute_pass_at([int(x) for x in s], k) for s in scores) / len(scores)
        assert ours[f"pass@{k}"] == pytest.approx(expected, abs=1e-12)
    assert ours["pass@1"] == pytest.approx(ev.avg_at_k(scores))  # pass@1 is the mean accuracy of one sample


def test_ifeval_accuracies_match_a_recount_of_each_instruction():
    from opd_verl.rewards.ifeval import IFEvalResult  # the reward's own per-response counts

    rng = random.Random(1)
    responses = []
    for _ in range(30):
        n = rng.randint(1, 4)
        strict = [rng.random() < 0.6 for _ in range(n)]
        loose = [s or rng.random() < 0.5 for s in strict]  # loose accepts whatever strict does
        responses.append((strict, loose))
    infos = [IFEvalResult(strict, loose).info() for strict, loose in responses]
    ours = ev.ifeval_accuracies(infos)
    instructions = [(s, lo) for strict, loose in responses for s, lo in zip(strict, loose)]
    assert ours["prompt_strict"] == pytest.approx(sum(all(s) for s, _ in responses) / 30)
    assert ours["prompt_loose"] == pytest.approx(sum(all(lo) for _, lo in responses) / 30)
    assert ours["inst_strict"] == pytest.approx(sum(s for s, _ in instructions) / len(instructions))
    assert ours["inst_loose"] == pytest.approx(sum(lo for _, lo in instructions) / len(instructions))
    assert ours["inst_strict"] != pytest.approx(sum(i["ifeval_inst_strict"] / i["ifeval_inst_total"] for i in infos) / 30), \
        "instruction level pools the instructions (not a mean of per-prompt fractions)"
    assert ev.ifeval_accuracies([]) == {}


ADD = code_ground_truth(["assert add(1, 2) == 3", "assert add(-1, 1) == 0"], entry_point="add")
RIGHT, WRONG = "```python\ndef add(a, b):\n    return a + b\n```", "def add(a, b):\n    return a - b"


def code_and_math_rows() -> list[ev.EvalRow]:
    code = ev.EvalRow([{"role": "user", "content": "Write add(a, b)."}], ADD, MBPP)
    math = ev.EvalRow([{"role": "user", "content": "What is 2 + 3?"}], "5", GSM8K)
    return [code, code, math]


def test_task_metrics_score_code_in_the_sandbox_per_data_source():
    rows = code_and_math_rows()
    greedy = [[RIGHT], [WRONG], ["#### 5"]]
    metrics = ev.task_metrics(rows, ev.score_infos(rows, greedy), None)
    assert metrics == {"greedy": pytest.approx(2 / 3), f"{MBPP}/greedy": 0.5, f"{GSM8K}/greedy": 1.0}
    samples = [[RIGHT, WRONG, WRONG], [WRONG, WRONG, WRONG], ["#### 5", "#### 4", "#### 4"]]
    metrics = ev.task_metrics(rows, ev.score_infos(rows, samples), 3, pass_ks=[1, 2])
    # the first code row: 1 of 3 samples right
    assert metrics[f"{MBPP}/pass@1"] == pytest.approx((1 / 3 + 0) / 2)
    assert metrics[f"{MBPP}/pass@2"] == pytest.approx((brute_pass_at([1, 0, 0], 2) + 0) / 2)
    assert metrics[f"{MBPP}/pass@3"] == 0.5 and metrics[f"{GSM8K}/avg@3"] == pytest.approx(1 / 3)


def test_task_metrics_score_ifeval_rows_with_lm_evals_checks():
    """IFEval rows through the reward (lm-eval's checks): two instructions (no comma; lower case) and one (at least
    5 words); strict and loose counted at both levels."""
    from opd_verl.rewards import IFEVAL
    from opd_verl.rewards.ifeval import ifeval_ground_truth

    two = ifeval_ground_truth("p", ["punctuation:no_comma", "change_case:english_lowercase"], [{}, {}])
    words = ifeval_ground_truth("q", ["length_constraints:number_words"], [{"relation": "at least", "num_words": 5}])
    rows = [ev.EvalRow([{"role": "user", "content": "p"}], two, IFEVAL),
            ev.EvalRow([{"role": "user", "content": "q"}], words, IFEVAL)]
    # row 1: lower case but a comma (1 of 2 strict); a loose variant drops the first line, where the comma is
    greedy = [["sure, here it is\nall lower case and no commas"], ["one two three four five six"]]
    metrics = ev.task_metrics(rows, ev.score_infos(rows, greedy), None)
    assert metrics == {"greedy": 0.5, "prompt_strict": 0.5, "prompt_loose": 1.0, "inst_strict": 2 / 3, "inst_loose": 1.0}


def test_cli_table_per_data_source_with_gap(tmp_path):
    """Three tiny models (built here) as teacher / before / after on a math + code parquet: the table holds every
    metric per data_source, the JSON the gap closed of each."""
    import pandas as pd

    from opd_verl.demo.tiny_models import build_model_dir

    models = {name: build_model_dir(tmp_path / name, hidden_size=64, num_layers=1, seed=seed)
              for seed, name in enumerate(("teacher", "before", "after"))}
    data = tmp_path / "mixed.parquet"
    pd.DataFrame([{"data_source": r.data_source, "prompt": r.messages, "reward_model": {"ground_truth": r.ground_truth}}
                  for r in code_and_math_rows()]).to_parquet(data)
    out = tmp_path / "eval.json"
    result = subprocess.run(
        [sys.executable, "-m", "opd_verl.evaluate", "--backend", "hf", "--teacher", models["teacher"],
         "--student-before", models["before"], "--student-after", models["after"], "--data", str(data), "--greedy",
         "--k", "4", "--pass-at", "1", "2", "--max-new-tokens", "8", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=str(REPO))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    expected = {f"{prefix}{m}" for prefix in ("", f"{MBPP}/", f"{GSM8K}/")
                for m in ("greedy", "avg@4", "pass@4", "pass@1", "pass@2")}
    assert set(report["models"]["teacher"]) == expected and set(report["gap_closed"]) == expected
    assert f"{MBPP}/pass@2" in result.stdout and "gap closed" in result.stdout
    bad = subprocess.run([sys.executable, "-m", "opd_verl.evaluate", "--model", models["teacher"], "--data", str(data),
                          "--k", "4", "--pass-at", "5"], capture_output=True, text=True, timeout=120, cwd=str(REPO))
    assert bad.returncode == 2 and "--pass-at 5: each J must be between 1 and --k (4)" in bad.stderr
