"""bench/gpu_divergence.py (the script for a GPU machine) runs end to end on CPU at tiny sizes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_divergence_script_tiny_on_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_divergence", REPO / "bench" / "gpu_divergence.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "g.json"
    res = bench.main(["--device", "cpu", "--tiny", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    assert res["command"] == f"python bench/gpu_divergence.py --device cpu --tiny --out {out}"
    (row,) = res["results"]
    for name in ("sampled", "full_jsd", "full_reverse_kl", "topk_jsd", "hidden_jsd"):
        assert row[name]["median_s"] > 0 and row[name]["peak_mb"] is None, (name, row[name])  # no CUDA peak on CPU
    assert set(row["ratio_to_sampled"]) >= {"full_jsd", "full_reverse_kl", "topk_jsd", "hidden_jsd"}
    inv = res["batch_invariance_bf16"]
    assert inv["rows"] == 64 and inv["max_abs_diff"] >= 0 and inv["bitwise_equal"] == (inv["max_abs_diff"] == 0)


def test_gpu_divergence_hidden_size_is_settable(tmp_path):
    """--hidden sets the width of the hidden-state variants (the teacher pool's support=full at a teacher's width)."""
    spec = importlib.util.spec_from_file_location("gpu_divergence", REPO / "bench" / "gpu_divergence.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    res = bench.main(["--device", "cpu", "--tiny", "--hidden", "48", "--out", str(tmp_path / "g.json")])
    assert res["settings"]["hidden"] == 48
    (row,) = res["results"]
    assert row["hidden_jsd"]["median_s"] > 0
