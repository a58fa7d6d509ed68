"""bench/cross_tokenizer_alignment.py --quick runs and writes what it says (a smoke test of the benchmark)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import cross_tokenizer_alignment as bench  # noqa: E402


def test_quick_run_writes_timings_and_full_alignment(tmp_path):
    out = tmp_path / "x.json"
    result = bench.main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert result["samples"] == 64 and result["response_tokens"] == 256
    for teacher in result["teachers"].values():
        assert teacher["stats"]["aligned_byte_frac"] == 1.0 and teacher["stats"]["mismatched_samples"] == 0
        assert teacher["num_spans"] >= 64
        seconds = teacher["seconds"]
        parts = ("student_bytes", "retokenize", "teacher_bytes", "align_and_span_terms")
        assert abs(seconds["total_per_step"] - sum(seconds[k] for k in parts)) < 0.01
