"""The stall watchdog the benches use (opd_verl.demo.runs.run_opd(stall_timeout=...)): a run whose steps stop is ended."""

from __future__ import annotations

import sys
import time

from opd_verl.demo.runs import run_opd


def test_a_run_without_new_steps_is_stopped_as_stalled(tmp_path):
    script = "import time; print('step:0 - val:0.3', flush=True); time.sleep(120)"
    start = time.monotonic()
    run = run_opd([sys.executable, "-c", script], tmp_path, timeout=100, log=lambda m: None, stall_timeout=3)
    assert run["stalled"] and not run["timed_out"]
    assert run["seconds_to_first_step"] is not None
    assert time.monotonic() - start < 20


def test_a_run_that_keeps_stepping_is_not_stalled(tmp_path):
    script = "import time\nfor i in range(4):\n    print(f'step:{i} - x:1', flush=True); time.sleep(1)"
    run = run_opd([sys.executable, "-c", script], tmp_path, timeout=100, log=lambda m: None, stall_timeout=3)
    assert run["returncode"] == 0 and not run["stalled"]
