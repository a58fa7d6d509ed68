"""Benchmark: trainer step time of OPD (teacher the size of the student) vs GRPO with a same-size reference.

    .venv/bin/python bench/step_overhead.py            # full run (3 pairs of runs, 12 steps each, see FULL)
    .venv/bin/python bench/step_overhead.py --quick    # smoke test (1 pair, 3 steps)

Writes ``bench/results/step_overhead.json`` (``..._quick.json`` with ``--quick``) and prints a table.

What runs (recipes/demo_cpu.yaml on the embedded task, 32 prompts x n=4 per step, through the same trainer):
* ``opd``:  the recipe (adv_estimator=opd, importance-sampling loss) with the demo STUDENT as its own teacher, so
            the teacher in the reference role has exactly the student's size (its advantages are then 0: the
            amount of compute per step does not depend on their values).
* ``grpo``: adv_estimator=grpo, PPO clip loss (bench/bench_common.py) and actor.use_kl_loss=True, so verl builds
            a reference policy (a copy of the student) and runs its forward pass every step.
Both pay one extra forward pass of a same-size model per step (timing_s/ref); the difference is what OPD adds
around it (advantage from teacher and student log-probs, its metrics). No validation, no checkpoints.

Runs are interleaved (opd, grpo, opd, grpo, ...) so that the load of the shared machine falls on both alike;
the first --warmup steps of each run are dropped (the first step includes vLLM/torch warm-up). Reported: the
median of timing_s/step over the remaining steps of all runs of a method, the ratio OPD/GRPO of those medians,
the median of the per-pair ratios, and per-phase medians of every timing_s/* key verl logs. On CPU the rollout
phase (timing_s/gen) is dominated by verl's replay buffer, which polls for finished rollouts every 2 s
(poll_interval in verl/trainer/ppo/v1/replay_buffer.py), not by generation compute, so the ratio of step time
without gen (timing_s/step - timing_s/gen, per step) is reported too.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as common  # noqa: E402

FULL = {"pairs": 3, "steps": 12, "warmup": 2, "seed": 0, "timeout": 900.0}
QUICK = {"pairs": 1, "steps": 3, "warmup": 1, "seed": 0, "timeout": 600.0}
STEP, GEN = "timing_s/step", "timing_s/gen"
NO_GEN = "step_without_gen"
COMMON_OVERRIDES = ("trainer.val_before_train=False",)


# --------------------------------------------------------------------------------------------------------------
# Pure parts (tested in tests/test_bench_step_overhead.py)
# --------------------------------------------------------------------------------------------------------------


def run_order(pairs: int) -> list[tuple[str, int]]:
    """[(method, pair index)] in the order they run: opd, grpo, opd, grpo, ..."""
    return [(method, i) for i in range(pairs) for method in ("opd", "grpo")]


def timed_steps(metrics: dict[int, dict[str, float]], warmup: int) -> dict[str, list[float]]:
    """{timing key: [value per step]} over the steps after the first `warmup` ones, plus step_without_gen."""
    steps = sorted(s for s, m in metrics.items() if s > 0 and STEP in m)[warmup:]
    out: dict[str, list[float]] = {}
    for s in steps:
        for key, value in metrics[s].items():
            if key.startswith("timing_s/"):
                out.setdefault(key, []).append(value)
        if GEN in metrics[s]:
            out.setdefault(NO_GEN, []).append(metrics[s][STEP] - metrics[s][GEN])
    return out


def pool(runs: list[dict[str, list[float]]]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for run in runs:
        for key, values in run.items():
            out.setdefault(key, []).extend(values)
    return out


def ratio_table(opd: dict[str, list[float]], grpo: dict[str, list[float]]) -> dict[str, dict]:
    """Per key present on either side: medians, counts and the ratio OPD/GRPO of the medians."""
    out = {}
    for key in sorted(set(opd) | set(grpo)):
        a, b = opd.get(key, []), grpo.get(key, [])
        ma, mb = (median(a) if a else None), (median(b) if b else None)
        out[key] = {"opd_median_s": ma, "grpo_median_s": mb, "opd_n": len(a), "grpo_n": len(b),
                    "ratio": (ma / mb) if ma is not None and mb else None}
    return out


def pair_ratios(opd_runs: list[dict], grpo_runs: list[dict], key: str) -> list[float | None]:
    """Ratio of the medians of `key` within each (opd, grpo) pair of runs."""
    out = []
    for a, b in zip(opd_runs, grpo_runs):
        va, vb = a.get(key), b.get(key)
        out.append(median(va) / median(vb) if va and vb and median(vb) > 0 else None)
    return out


def parse_args(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 1 pair of runs, 3 steps each")
    p.add_argument("--pairs", type=int, default=None, help="pairs of runs (opd, grpo), interleaved (default 3)")
    p.add_argument("--steps", type=int, default=None, help="steps per run (default 12)")
    p.add_argument("--warmup", type=int, default=None, help="first steps of each run left out (default 2)")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="run directories (default ~/.cache/opd_verl/bench/step_overhead[_quick])")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/step_overhead.json)")
    args = p.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    for key in ("pairs", "steps", "warmup"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if cfg["warmup"] >= cfg["steps"]:
        p.error(f"--warmup {cfg['warmup']} leaves no step of --steps {cfg['steps']}; use fewer warm-up steps")
    cfg["out"], cfg["work_dir"] = common.output_paths("step_overhead", args.quick, args.out, args.work_dir)
    cfg["quick"] = args.quick
    return cfg


# --------------------------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------------------------


def _log(message: str) -> None:
    print(f"[step_overhead] {message}", flush=True)


def overrides_for(method: str, built, seed: int) -> list[str]:
    extra = list(COMMON_OVERRIDES)
    if method == "opd":
        extra.append(f"opd.teacher.path={built.student}")  # a teacher of exactly the student's size
    else:
        extra.append("actor_rollout_ref.actor.use_kl_loss=True")  # verl adds a same-size reference policy
    return common.method_overrides(method, seed=seed, extra=extra)


def run_benchmark(cfg: dict) -> dict:
    from opd_verl.demo.build import build

    t0 = time.monotonic()
    info = common.machine_info()
    built = build(log=_log)
    records: list[dict] = []
    with common.LoadSampler() as load:
        for method, pair in run_order(cfg["pairs"]):
            out = Path(cfg["work_dir"]) / f"{method}_{pair}"
            overrides = overrides_for(method, built, cfg["seed"])
            _log(f"pair {pair}: {method} ({cfg['steps']} steps)")
            load_before = list(os.getloadavg())
            run = common.run_trainer(built, out, cfg["steps"], -1, overrides, cfg["timeout"],
                              log=lambda m: print(m, flush=True))
            metrics = run.pop("metrics_by_step")
            steps = timed_steps(metrics, cfg["warmup"])
            if run["returncode"] != 0 or not steps.get(STEP):
                _log(f"{method}/{pair}: exit {run['returncode']}, {len(steps.get(STEP, []))} timed steps; "
                     f"log tail:\n{common.log_tail(run['log'])}")
            records.append({**run, "method": method, "pair": pair, "overrides": overrides, "steps": steps,
                            "has_ref_phase": "timing_s/ref" in steps, "loadavg_before": load_before,
                            "per_step": {s: {k: v for k, v in m.items() if k.startswith("timing_s/")}
                                         for s, m in sorted(metrics.items()) if s > 0}})
    opd_runs = [r["steps"] for r in records if r["method"] == "opd"]
    grpo_runs = [r["steps"] for r in records if r["method"] == "grpo"]
    phases = ratio_table(pool(opd_runs), pool(grpo_runs))
    summary = {
        "step": phases.get(STEP),
        "step_without_gen": phases.get(NO_GEN),
        "pair_ratios_step": pair_ratios(opd_runs, grpo_runs, STEP),
        "pair_ratios_step_without_gen": pair_ratios(opd_runs, grpo_runs, NO_GEN),
        "target_ratio": 1.05,
    }
    for key in ("pair_ratios_step", "pair_ratios_step_without_gen"):
        valid = [v for v in summary[key] if v is not None]
        summary[key.replace("pair_ratios", "median_pair_ratio")] = median(valid) if valid else None
    return {
        **common.result_header("step_overhead", cfg, info, load, student_params=built.info["student"]["params"],
                               method_overrides={m: overrides_for(m, built, cfg["seed"]) for m in ("opd", "grpo")}),
        "note": ("timing_s/gen on CPU is dominated by verl's replay-buffer poll interval (2 s, "
                 "verl/trainer/ppo/v1/replay_buffer.py), a sleep, not compute; step_without_gen = "
                 "timing_s/step - timing_s/gen per step isolates the compute phases. The machine is shared "
                 "(2 cores, other jobs running): runs are interleaved opd, grpo, opd, grpo, ..."),
        "summary": summary,
        "phases": phases,
        "runs": records,
        "elapsed_s": time.monotonic() - t0,
    }


def format_table(result: dict) -> str:
    lines = ["| phase | OPD median (s) | GRPO + KL-loss ref median (s) | OPD / GRPO |", "| --- | --- | --- | --- |"]
    order = [STEP, NO_GEN, GEN]
    keys = order + [k for k in result["phases"] if k not in order]
    for key in keys:
        row = result["phases"].get(key)
        if not row:
            continue
        fmt = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
        ratio = "—" if row["ratio"] is None else f"{row['ratio']:.3f}"
        lines.append(f"| {key} | {fmt(row['opd_median_s'])} | {fmt(row['grpo_median_s'])} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_args(argv)
    cfg["argv"] = argv
    result = run_benchmark(cfg)
    out = common.write_result(result, cfg["out"])
    print()
    print(format_table(result))
    s = result["summary"]
    print(f"\nper-pair step ratios: {s['pair_ratios_step']}; without gen: {s['pair_ratios_step_without_gen']}")
    print(f"wrote {out} ({result['elapsed_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
