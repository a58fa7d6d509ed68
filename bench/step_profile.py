"""Benchmark: where a CPU step of the demo recipe goes — wall time per phase and CPU seconds per process.

    .venv/bin/python bench/step_profile.py                       # the demo recipe as it is (variant "defaults")
    .venv/bin/python bench/step_profile.py --variant NAME=KEY=VALUE[,KEY=VALUE...] ...   # more variants, in order
    .venv/bin/python bench/step_profile.py --quick               # smoke test (4 steps)

Writes ``bench/results/step_profile.json`` (``..._quick.json`` with ``--quick``) and prints a table.

Each variant is one run of recipes/demo_cpu.yaml (--recipe demo_cpu_forward_kl: the demo's) on the embedded task
(32 prompts x n=4, no validation, no checkpoints), one trainer at a time. At every console step line the CPU time
(utime + stime, /proc/PID/stat) of every process of the run's session is read; the steps after the first --warmup
ones give

* wall seconds per step (between step lines) and verl's ``timing_s/*`` medians;
* CPU seconds per step of each process, by its name (``ray::AgentLoopWorkerTQ``, ``VLLM::Worker``, ``raylet``, ...),
  and their sum: with 2 cores, a step cannot take less than (CPU seconds per step) / 2 of wall time;
* start-up: seconds from launch to the first step, and the CPU seconds each live process had used by then.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as common  # noqa: E402

from opd_verl.demo.runs import DEMO_RECIPE, RECIPE  # noqa: E402

FULL = {"steps": 14, "warmup": 3, "seed": 0, "timeout": 1200.0}
QUICK = {"steps": 4, "warmup": 1, "seed": 0, "timeout": 900.0}
COMMON_OVERRIDES = ("trainer.val_before_train=False",)
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_STEP = re.compile(r"\bstep (\d+)\b")


# --------------------------------------------------------------------------------------------------------------
# Pure parts (tested in tests/test_bench_step_profile.py)
# --------------------------------------------------------------------------------------------------------------


def parse_stat(text: str) -> tuple[int, float]:
    """(session id, CPU seconds = utime + stime) from the text of /proc/PID/stat."""
    rest = text[text.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    # rest[0] is field 3 (state): session is field 6, utime/stime are fields 14/15
    return int(rest[3]), (int(rest[11]) + int(rest[12])) / _CLK_TCK


def process_name(cmdline: str) -> str:
    """A stable name for a process of a run: Ray's and vLLM's process titles, else the program (and module)."""
    cmdline = cmdline.strip()
    for prefix in ("ray::", "VLLM::"):
        if cmdline.startswith(prefix):
            return cmdline.split()[0].split(".")[0]
    parts = cmdline.split()
    if not parts:
        return "?"
    if "-m" in parts[:-1]:
        return f"{Path(parts[0]).name} -m {parts[parts.index('-m') + 1]}"
    script = next((p for p in parts[1:] if p.endswith(".py")), None)
    return f"{Path(parts[0]).name} {Path(script).name}" if script else Path(parts[0]).name


def cpu_by_name(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds used between two snapshots {pid: (name, cpu s)}, summed per name (a pid new in `after` counts
    from 0; a pid gone from `after` is left out: its last interval cannot be read)."""
    out: dict[str, float] = {}
    for pid, (name, cpu) in after.items():
        start = before[pid][1] if pid in before and before[pid][0] == name else 0.0
        out[name] = out.get(name, 0.0) + max(0.0, cpu - start)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def steady_state(marks: list[tuple[int, float, dict]], warmup: int) -> dict | None:
    """From [(step, monotonic time, snapshot)] at each step line: wall and CPU per step over the steps after the
    first `warmup` ones (from the line of step `warmup` to the last line)."""
    marks = sorted(marks, key=lambda m: m[0])
    start = next((m for m in marks if m[0] == warmup), None)
    if start is None or marks[-1][0] <= warmup:
        return None
    end = marks[-1]
    steps = end[0] - start[0]
    per_name = {k: v / steps for k, v in cpu_by_name(start[2], end[2]).items()}
    return {"steps": steps, "wall_s_per_step": (end[1] - start[1]) / steps,
            "cpu_s_per_step": sum(per_name.values()), "cpu_s_per_step_by_process": per_name}


def timing_medians(metrics: dict[int, dict[str, float]], warmup: int) -> dict[str, float]:
    steps = sorted(s for s in metrics if s > warmup)
    keys = sorted({k for s in steps for k in metrics[s] if k.startswith("timing_s/")})
    return {k: median(metrics[s][k] for s in steps if k in metrics[s]) for k in keys}


def parse_variant(text: str) -> tuple[str, list[str]]:
    """'name=key=value,key=value' -> (name, [overrides]); a comma-separated part without '=' belongs to the value
    before it (a quoted Hydra value holding commas: key='a,b')."""
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise ValueError(f"--variant {text!r}: expected NAME=KEY=VALUE[,KEY=VALUE...]")
    overrides: list[str] = []
    for part in rest.split(","):
        if "=" not in part and overrides:
            overrides[-1] += "," + part
        elif part:
            overrides.append(part)
    return name, overrides


# --------------------------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------------------------


def _log(message: str) -> None:
    print(f"[step_profile] {message}", flush=True)


def _cmdline(proc_dir: str) -> str:
    return Path(proc_dir, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")


def snapshot(session: int | None) -> dict[int, tuple[str, float]]:
    """{pid: (name, CPU seconds)} of the processes of `session` (every process when None)."""
    out = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            sid, cpu = parse_stat(Path(entry.path, "stat").read_text())
            if session is not None and sid != session:
                continue
            out[int(entry.name)] = (process_name(_cmdline(entry.path)), cpu)
        except (OSError, ValueError, IndexError):
            continue
    return out


def find_session(marker: str) -> int | None:
    """The session of the trainer whose command line holds `marker` (run_opd starts it in a new session)."""
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                cmdline = _cmdline(entry.path)
                if marker in cmdline and "main_opd" in cmdline:
                    return parse_stat(Path(entry.path, "stat").read_text())[0]
            except (OSError, ValueError, IndexError):
                continue
    return None


def run_variant(built, name: str, overrides: list[str], cfg: dict) -> dict:
    out = Path(cfg["work_dir"]) / name
    marks: list[tuple[int, float, dict]] = []
    session: list[int | None] = [None]

    def on_line(message: str) -> None:
        print(message, flush=True)
        match = _STEP.search(message)
        if not match:
            return
        if session[0] is None:
            session[0] = find_session(str(out))
        marks.append((int(match.group(1)), time.monotonic(), snapshot(session[0])))

    run = common.run_trainer(built, out, cfg["steps"], -1, list(COMMON_OVERRIDES) + overrides, cfg["timeout"],
                             log=on_line, recipe=cfg["recipe"])
    metrics = run.pop("metrics_by_step")
    first = min(marks, key=lambda m: m[0]) if marks else None
    return {**run, "variant": name, "overrides": overrides,
            "steady_state": steady_state(marks, cfg["warmup"]),
            "startup_cpu_s_by_process": cpu_by_name({}, first[2]) if first else None,
            "timing_medians": timing_medians(metrics, cfg["warmup"]),
            "per_step": {s: {k: v for k, v in m.items() if k.startswith("timing_s/")}
                         for s, m in sorted(metrics.items()) if s > 0}}


def parse_args(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 4 steps")
    p.add_argument("--steps", type=int, default=None, help="steps per run (default 14)")
    p.add_argument("--warmup", type=int, default=None, help="first steps left out (default 3)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=KEY=VALUE[,KEY=VALUE...]",
                   help="a run with these overrides, after the 'defaults' run (repeatable)")
    p.add_argument("--no-defaults", action="store_true", help="leave out the run of the recipe as it is")
    p.add_argument("--recipe", default=RECIPE, choices=[RECIPE, DEMO_RECIPE],
                   help=f"recipes/<name>.yaml (default {RECIPE}; {DEMO_RECIPE}: the demo's)")
    p.add_argument("--work-dir", type=Path, default=None, help="run directories")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/step_profile.json)")
    args = p.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    for key in ("steps", "warmup"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if cfg["warmup"] >= cfg["steps"]:
        p.error(f"--warmup {cfg['warmup']} leaves no step of --steps {cfg['steps']}")
    try:
        variants = ([] if args.no_defaults else [("defaults", [])]) + [parse_variant(v) for v in args.variant]
    except ValueError as err:
        p.error(str(err))
    if not variants:
        p.error("no variant to run (--no-defaults without --variant)")
    cfg["variants"] = variants
    cfg["out"], cfg["work_dir"] = common.output_paths("step_profile", args.quick, args.out, args.work_dir)
    cfg["quick"] = args.quick
    cfg["recipe"] = args.recipe
    cfg["argv"] = list(argv or [])
    return cfg


def format_table(result: dict, top: int = 8) -> str:
    lines = []
    for run in result["runs"]:
        ss = run["steady_state"] or {}
        lines.append(f"== {run['variant']} {' '.join(run['overrides'])}")
        if not ss:
            lines.append(f"   no steady-state steps (exit {run['returncode']})")
            continue
        lines.append(f"   launch to first step {run['seconds_to_first_step'] or float('nan'):.0f} s; "
                     f"{ss['wall_s_per_step']:.2f} s per step; {ss['cpu_s_per_step']:.2f} CPU s per step")
        lines.append("   " + ", ".join(f"{k.split('/', 1)[1]} {v:.2f}" for k, v in run["timing_medians"].items()))
        for name, cpu in list(ss["cpu_s_per_step_by_process"].items())[:top]:
            lines.append(f"   {cpu:6.2f} CPU s/step  {name}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_args(sys.argv[1:] if argv is None else argv)
    from opd_verl.demo.build import build

    t0 = time.monotonic()
    info = common.machine_info()
    built = build(log=_log)
    with common.LoadSampler() as load:
        runs = []
        for name, overrides in cfg["variants"]:
            _log(f"{name}: {cfg['steps']} steps {' '.join(overrides)}")
            runs.append(run_variant(built, name, overrides, cfg))
    result = {**common.result_header("step_profile", cfg, info, load, student_params=built.info["student"]["params"]),
              "runs": runs, "elapsed_s": time.monotonic() - t0}
    out = common.write_result(result, cfg["out"])
    print(format_table(result))
    print(f"wrote {out} ({result['elapsed_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
