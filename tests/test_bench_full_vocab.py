"""bench/full_vocab_divergence.py on tiny sizes: result structure, and chunked == unchunked (values + grads)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("full_vocab_divergence", REPO / "bench" / "full_vocab_divergence.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_full_vocab_bench_tiny(tmp_path):
    bench = _bench()
    cfg = {
        **bench.QUICK,
        "vocab": 512,
        "hidden": 32,
        "ts": [64],
        "chunk": 16,
        "reps": {"64": 1},
        "logits_ts": {"float32": [64], "bfloat16": [64]},
        "liger_variants": [],  # optional dependency; not installed by the test suite
        "naive_probe_t": 64,
        "check_t": 64,  # checked with chunk 64 // 3 = 21: ragged last chunk
    }
    res = bench.run_benchmark(cfg, log=lambda *a, **k: None)
    json.loads(json.dumps(res))  # JSON-able

    for key in ("machine", "settings", "check", "results", "summary"):
        assert key in res, key
    assert {"torch", "cpu_count", "date"} <= set(res["machine"])
    assert res["settings"]["vocab"] == 512 and res["settings"]["ts"] == [64]

    # chunked vs unchunked on the same inputs (a real check, float32)
    chk = res["check"]
    assert "error" not in chk, chk
    assert chk["ours_hidden_vs_naive"]["value"]["max_abs_diff"] < 1e-5
    assert chk["ours_logits_vs_naive"]["value"]["max_abs_diff"] < 1e-5
    for name, cmp in [
        *chk["ours_hidden_vs_naive"].items(),
        *chk["ours_logits_vs_naive"].items(),
        *chk["sampled_hidden_vs_autograd"].items(),
    ]:
        assert cmp["max_abs_diff"] <= 1e-5 * max(1.0, cmp["max_abs_ref"]), (name, cmp)

    for name, cmp in [*chk["vs_float64"]["ours_hidden"].items(), *chk["vs_float64"]["ours_logits"].items()]:
        assert cmp["max_abs_diff"] <= 1e-5 * max(1.0, cmp["max_abs_ref"]), (name, cmp)

    (row,) = res["results"]
    assert row["T"] == 64
    for variant, d in [*((v, row["hidden"][v]) for v in ("ours_hidden", "sampled_hidden")),
                       ("naive_hidden", row["naive_hidden"])]:
        assert d["median_wall_s"] > 0 and d["median_peak_mb"] >= 0, (variant, d)
    assert row["hidden"]["ratio_wall_median"]["ours_hidden"] > 0
    assert [(g["T"], g["dtype"]) for g in res["logits"]] == [(64, "float32"), (64, "bfloat16")]
    for g in res["logits"]:
        assert set(g["ratio_wall_median"]) == {"ours_logits", "topk_logits"}, g
        assert all(g[v]["median_wall_s"] > 0 for v in ("ours_logits", "topk_logits", "sampled_logits"))
    (line,) = res["summary"]["hidden"]
    assert set(line) >= {"T", "time_ours_s", "time_sampled_s", "ratio_ours", "peak_mb_ours", "peak_mb_naive"}
    assert len(res["summary"]["logits"]) == 2 and "logits_ratio_target_met" in res["summary"]
    assert res["settings"]["liger_kernel"].startswith("not installed")  # liger_variants=[]: none looked for

    from PIL import Image

    # the memory plot (log-log): every variant with a peak > 0 MB is drawn in its colour (tiny runs can measure 0)
    groups = {"ours_hidden": row["hidden"]["ours_hidden"], "sampled_hidden": row["hidden"]["sampled_hidden"],
              "naive_hidden": row["naive_hidden"]}
    want = {c for key, c in (("ours_hidden", (31, 119, 180)), ("sampled_hidden", (44, 160, 44)), ("naive_hidden", (214, 39, 40)))
            if (groups[key].get("median_peak_mb") or groups[key].get("predicted_peak_mb") or 0) > 0}
    png = bench._plot_memory(res, tmp_path / "m.png")
    if not want:
        assert png is None and not (tmp_path / "m.png").exists()
        return
    assert png == str(tmp_path / "m.png")
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (900, 360)
        colors = {c for _, c in image.convert("RGB").getcolors(1 << 16)}
    assert want <= colors, want - colors
