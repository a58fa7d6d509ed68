"""bench/step_profile.py: /proc parsing, process names, CPU deltas per name, steady-state window, arguments."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("step_profile", REPO / "bench" / "step_profile.py")
sp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sp)


def test_parse_stat_reads_session_and_cpu_of_this_process():
    text = Path(f"/proc/{os.getpid()}/stat").read_text()
    session, cpu = sp.parse_stat(text)
    assert session == os.getsid(0)
    times = os.times()
    assert abs(cpu - (times.user + times.system)) < 0.5


def test_parse_stat_survives_parentheses_and_spaces_in_the_command_name():
    fields = ["S", "1", "2", "77"] + ["0"] * 7 + ["250", "150"] + ["0"] * 30
    session, cpu = sp.parse_stat("123 (a b) (c)) " + " ".join(fields))
    assert session == 77
    assert cpu == pytest.approx(400 / sp._CLK_TCK)


@pytest.mark.parametrize("cmdline, name", [
    ("ray::AgentLoopWorkerTQ", "ray::AgentLoopWorkerTQ"),
    ("ray::WorkerDict.actor_rollout_ref_compute_log_prob", "ray::WorkerDict"),
    ("VLLM::Worker   ", "VLLM::Worker"),
    ("/x/.venv/bin/python -m opd_verl.main_opd --config-dir /x +recipes=demo_cpu", "python -m opd_verl.main_opd"),
    ("/x/bin/python -u /x/ray/_private/log_monitor.py --a", "python log_monitor.py"),
    ("/x/ray/core/src/ray/raylet/raylet --x", "raylet"),
    ("", "?"),
])
def test_process_name(cmdline, name):
    assert sp.process_name(cmdline) == name


def test_cpu_by_name_sums_per_name_counts_new_pids_from_zero_and_skips_reused_pids():
    before = {1: ("ray::A", 10.0), 2: ("ray::B", 5.0), 3: ("ray::A", 1.0), 9: ("gone", 3.0)}
    after = {1: ("ray::A", 12.5), 2: ("ray::B", 5.25), 3: ("ray::A", 2.0), 4: ("new", 0.5), 5: ("x", 0.0)}
    assert sp.cpu_by_name(before, after) == {"ray::A": 3.5, "new": 0.5, "ray::B": 0.25, "x": 0.0}
    # a pid reused by another process counts from 0
    assert sp.cpu_by_name({1: ("old", 10.0)}, {1: ("ray::A", 2.0)}) == {"ray::A": 2.0}


def test_steady_state_starts_at_the_warmup_step_line():
    snap = lambda a, b: {1: ("ray::A", a), 2: ("ray::B", b)}  # noqa: E731
    marks = [(1, 100.0, snap(50, 5)), (2, 110.0, snap(60, 6)), (3, 114.0, snap(64, 7)), (4, 118.0, snap(68, 8))]
    ss = sp.steady_state(marks, warmup=2)
    assert ss["steps"] == 2
    assert ss["wall_s_per_step"] == pytest.approx(4.0)
    assert ss["cpu_s_per_step_by_process"] == {"ray::A": 4.0, "ray::B": 1.0}
    assert ss["cpu_s_per_step"] == pytest.approx(5.0)
    assert sp.steady_state(marks, warmup=4) is None
    assert sp.steady_state(marks[:1], warmup=0) is None


def test_timing_medians_leave_out_warmup_steps():
    metrics = {1: {"timing_s/step": 30.0}, 2: {"timing_s/step": 4.0, "timing_s/gen": 2.0},
               3: {"timing_s/step": 6.0, "timing_s/gen": 3.0, "x": 1.0}, 4: {"timing_s/step": 5.0}}
    assert sp.timing_medians(metrics, warmup=1) == {"timing_s/gen": 2.5, "timing_s/step": 5.0}


def test_variants_and_arguments():
    assert sp.parse_variant("omp1=a.b=1,c=x") == ("omp1", ["a.b=1", "c=x"])
    # a quoted Hydra value holding commas stays one override
    assert sp.parse_variant("off=env.X='p,q,r',b=False") == ("off", ["env.X='p,q,r'", "b=False"])
    with pytest.raises(ValueError, match="NAME=KEY=VALUE"):
        sp.parse_variant("novalue")
    cfg = sp.parse_args(["--variant", "v=a=1", "--steps", "6", "--warmup", "2"])
    assert cfg["variants"] == [("defaults", []), ("v", ["a=1"])]
    assert (cfg["steps"], cfg["warmup"]) == (6, 2)
    assert cfg["out"].endswith("bench/results/step_profile.json")
    assert sp.parse_args(["--no-defaults", "--variant", "v=a=1"])["variants"] == [("v", ["a=1"])]
    for bad in (["--no-defaults"], ["--steps", "3", "--warmup", "3"], ["--variant", "x"]):
        with pytest.raises(SystemExit):
            sp.parse_args(bad)
