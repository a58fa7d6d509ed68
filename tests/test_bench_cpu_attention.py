"""bench/cpu_attention.py on one tiny shape: the result's structure, and the two packed kernels agree."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_cpu_attention_bench_quick():
    spec = importlib.util.spec_from_file_location("cpu_attention", REPO / "bench" / "cpu_attention.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    res = bench.run_benchmark({**bench.QUICK, "argv": ["--quick"]}, log=lambda *a, **k: None)
    json.loads(json.dumps(res))
    assert res["command"] == "python bench/cpu_attention.py --quick"
    (row,) = res["results"]
    assert row["tokens"] == 4 * 16 and row["max_abs_logprob_diff"] < 1e-5
    assert all(row[k] > 0 for k in ("sdpa_packed_ms", "opd_cpu_varlen_packed_ms", "sdpa_padded_ms"))
