"""bench/teacher_pool_step_time.py: verl's step timings of two console logs and their ratios."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import teacher_pool_step_time as st  # noqa: E402


def _log(step_s, ref_s):
    return (f"(OPDTaskRunner pid=1) step:1 - timing_s/step:{step_s * 3} - timing_s/ref:{ref_s * 3} - opd/x:1.0\n"
            f"(OPDTaskRunner pid=1) step:2 - timing_s/step:{step_s} - timing_s/ref:{ref_s} - opd/x:1.0\n")


def test_ratios_per_step(tmp_path):
    colocated, pool, out = tmp_path / "c.log", tmp_path / "p.log", tmp_path / "r.json"
    colocated.write_text(_log(4.0, 1.0))
    pool.write_text(_log(3.0, 0.5))
    st.main([str(colocated), str(pool), "--label", "x", "--out", str(out)])
    result = json.loads(out.read_text())["x"]
    assert result["pool"]["2"] == {"timing_s/step": 3.0, "timing_s/ref": 0.5}
    assert result["pool_over_colocated"]["2"]["timing_s/step"] == pytest.approx(0.75)
    assert result["pool_over_colocated"]["1"]["timing_s/ref"] == pytest.approx(0.5)
