"""Benchmark: sample efficiency of OPD vs GRPO on the embedded CPU task, through the same trainer.

    .venv/bin/python bench/sample_efficiency.py            # full run (3 seeds x {opd, grpo}, see FULL)
    .venv/bin/python bench/sample_efficiency.py --quick    # smoke test (1 seed, 4 steps)

Writes ``bench/results/sample_efficiency.json`` (``..._quick.json`` with ``--quick``), a PNG of accuracy vs step
(mean over seeds, per method) next to it, and prints a table.

Setup: opd_verl.demo builds (or reuses) the task, the teacher and the SFT student. Every run starts from that same
student and uses recipes/demo_cpu.yaml: 32 prompts x n=4 samples per step, one optimizer step per training step,
max 32 response tokens, sampling temperature 1. The methods differ only in the overrides of bench/bench_common.py
(OPD: the recipe; GRPO: adv_estimator=grpo + verl's PPO clip loss, no teacher) and in the learning rate if
--lr-opd / --lr-grpo differ. A seed sets the prompt order (data.seed) and vLLM's sampling seed; OPD and GRPO with
the same seed see the same prompts at every step.
Runs go one at a time by default (concurrent verl runs on one host can hang: bench/bench_common.py, STALL_TIMEOUT);
--reuse takes a finished run from --work-dir when its overrides, steps and test frequency match, so an interrupted
benchmark resumes where it stopped.

Accuracy:
* ``val_greedy``: verl's validation, greedy decoding on the task's 300 val prompts, logged before training
  (step 0) and every --test-freq steps (~10-20 s each on 2 cores). Steps to a threshold = the first validated
  step at or above it, so it has a resolution of --test-freq steps (the crossing lies in (s - k, s]).
  Thresholds are fractions of the teacher's greedy val accuracy (measured here with opd_verl.evaluate on the same
  prompts) and fractions of the gap between the student's step-0 accuracy and the teacher's.
* ``val_greedy_smoothed`` (defines "reached"): the same validations as a trailing mean of the last --val-smooth
  of them (default 3, i.e. steps s-10, s-5, s): one lucky validation (300 prompts: a standard error of 2.8
  points at 40% accuracy) does not count as reached. It lags the raw curve alike for both methods.
* ``train_sampled`` (free, every step, noisier): critic/score/mean, the exact-match accuracy of the step's 128
  training samples (T=1), as a trailing mean over --smooth steps; its thresholds are fractions of the teacher's
  avg@k accuracy at T=1 on the val prompts.
A method that does not reach a threshold within the budget is reported as "> budget"; the ratio GRPO/OPD is then
a bound (">=" if GRPO did not reach it, "<=" if OPD did not), or undefined if neither did.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from statistics import mean

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as common  # noqa: E402

SCORE_KEY = "critic/score/mean"
FULL = {
    "seeds": [0, 1, 2],
    "steps": 60,
    "test_freq": 5,
    "lr": {"opd": 3e-4, "grpo": 3e-4},
    "parallel": 1,
    "smooth": 5,
    "val_smooth": 3,
    "teacher_fractions": [0.5, 0.7, 0.9],
    "gap_fractions": [0.1, 0.25, 0.5],
    "eval_k": 8,
    "timeout": 3600.0,
}
QUICK = {**FULL, "seeds": [0], "steps": 4, "test_freq": 2, "parallel": 1, "smooth": 2, "val_smooth": 2, "eval_k": 2, "timeout": 900.0}


# --------------------------------------------------------------------------------------------------------------
# Pure parts (tested in tests/test_bench_sample_efficiency.py)
# --------------------------------------------------------------------------------------------------------------


def steps_to_threshold(points: list[tuple[int, float]], threshold: float, times: int = 1) -> int | None:
    """The first step from which `times` points in a row (by step; points in any order) are >= threshold; None if
    there is none."""
    points = sorted(points)
    for i in range(len(points) - times + 1):
        if all(v >= threshold - 1e-12 for _, v in points[i : i + times]):
            return points[i][0]
    return None


def trailing_mean(points: list[tuple[int, float]], window: int) -> list[tuple[int, float]]:
    """Each point replaced by the mean of the last `window` points up to it (fewer at the start)."""
    points = sorted(points)
    out = []
    for i, (step, _) in enumerate(points):
        chunk = [v for _, v in points[max(0, i - window + 1): i + 1]]
        out.append((step, sum(chunk) / len(chunk)))
    return out


def mean_curve(curves: list[list[tuple[int, float]]]) -> list[tuple[int, float]]:
    """Mean over runs at every step that all runs have."""
    if not curves:
        return []
    common = set.intersection(*(set(s for s, _ in c) for c in curves))
    maps = [dict(c) for c in curves]
    return [(s, mean(m[s] for m in maps)) for s in sorted(common)]


def compare_steps(opd: list[int | None], grpo: list[int | None], budget: int, grpo_budget: int | None = None) -> dict:
    """Steps to a threshold per seed (None = not reached within the budget) -> means and the ratio GRPO/OPD.

    A seed that did not reach the threshold counts as its method's budget (`budget`, or `grpo_budget` for the
    second method when its budget differs) in the mean, which makes that mean a lower bound; the ratio of the means
    is then a lower bound (GRPO censored), an upper bound (OPD censored) or undefined."""
    grpo_budget = budget if grpo_budget is None else grpo_budget

    def side(values, cap):
        reached = [v for v in values if v is not None]
        censored = len(reached) < len(values)
        m = mean(v if v is not None else cap for v in values) if values else None
        return {"per_seed": values, "reached": len(reached), "runs": len(values), "mean": m, "censored": censored,
                "text": _steps_text(m, censored, cap, len(reached))}

    o, g = side(opd, budget), side(grpo, grpo_budget)
    ratio = {"value": None, "kind": "undefined", "text": "n/a"}
    if o["reached"] and g["reached"] and not (o["censored"] and g["censored"]) and o["mean"] > 0:
        value = g["mean"] / o["mean"]
        kind = "lower_bound" if g["censored"] else "upper_bound" if o["censored"] else "exact"
        ratio = {"value": value, "kind": kind, "text": {"exact": "", "lower_bound": ">= ", "upper_bound": "<= "}[kind]
                 + f"{value:.1f}x"}
    elif o["reached"] == o["runs"] and o["runs"] and not g["reached"] and o["mean"] > 0:
        value = grpo_budget / o["mean"]  # GRPO needs more than its budget on every seed
        ratio = {"value": value, "kind": "lower_bound", "text": f"> {value:.1f}x"}
    per_seed = []
    for a, b in zip(opd, grpo):
        if a is not None and b is not None and a > 0:
            per_seed.append({"value": b / a, "kind": "exact"})
        elif a is not None and b is None and a > 0:
            per_seed.append({"value": grpo_budget / a, "kind": "lower_bound"})
        elif a is None and b is not None:
            per_seed.append({"value": b / budget, "kind": "upper_bound"})
        else:
            per_seed.append({"value": None, "kind": "undefined"})
    return {"opd": o, "grpo": g, "ratio_grpo_over_opd": ratio, "ratio_per_seed": per_seed}


def _steps_text(m: float | None, censored: bool, budget: int, reached: int) -> str:
    if m is None:
        return "n/a"
    if reached == 0:
        return f"> {budget}"
    return (">= " if censored else "") + f"{m:.1f}"


def thresholds(teacher: float, start: float, teacher_fractions, gap_fractions) -> list[dict]:
    """Absolute accuracy thresholds: fractions of the teacher's accuracy and of the gap start -> teacher."""
    out = [{"name": f"{round(100 * f)}% of teacher", "value": f * teacher} for f in teacher_fractions]
    out += [{"name": f"{round(100 * f)}% of gap", "value": start + f * (teacher - start)} for f in gap_fractions]
    for t in out:
        t["above_start"] = t["value"] > start
    return out


def curves_of(metrics: dict[int, dict[str, float]], val_key: str | None, smooth: int, val_smooth: int = 1) -> dict:
    """{"val_greedy": [(step, acc)], "val_greedy_smoothed": [(step, trailing mean of `val_smooth` validations)],
    "train_sampled": [(step, trailing mean of `smooth` steps)], "train_sampled_raw": [...]}."""
    raw = sorted((s, m[SCORE_KEY]) for s, m in metrics.items() if SCORE_KEY in m and s > 0)
    val = sorted((s, m[val_key]) for s, m in metrics.items() if val_key and val_key in m)
    return {"val_greedy": val, "val_greedy_smoothed": trailing_mean(val, val_smooth),
            "train_sampled": trailing_mean(raw, smooth), "train_sampled_raw": raw}


#: (curve, the teacher's reference accuracy for its thresholds); the first one defines "reached"
METRICS = (("val_greedy_smoothed", "teacher_greedy"), ("val_greedy", "teacher_greedy"), ("train_sampled", "teacher_sampled"))


def summarize(runs: dict[str, dict[int, dict]], references: dict, cfg: dict) -> dict:
    """runs = {method: {seed: {"curves": ...}}} -> steps to every threshold per metric, means, ratios."""
    budget = cfg["steps"]
    out = {}
    for metric, ref_key in METRICS:
        starts = [c["curves"][metric][0][1] for m in runs.values() for c in m.values() if c["curves"][metric]]
        if not starts or references.get(ref_key) is None:
            continue
        start = mean(starts)
        rows = []
        for thr in thresholds(references[ref_key], start, cfg["teacher_fractions"], cfg["gap_fractions"]):
            steps = {method: [steps_to_threshold(runs.get(method, {})[seed]["curves"][metric], thr["value"])
                              if seed in runs.get(method, {}) else None for seed in cfg["seeds"]]
                     for method in common.METHODS}
            rows.append({**thr, **compare_steps(steps["opd"], steps["grpo"], budget)})
        out[metric] = {"teacher": references[ref_key], "start_mean": start, "rows": rows}
    return out


def format_table(summary: dict, metric: str = METRICS[0][0]) -> str:
    part = summary.get(metric)
    if not part:
        return f"({metric}: no data)"
    lines = [f"| threshold ({metric}) | accuracy | OPD steps (per seed) | GRPO steps (per seed) | GRPO / OPD |",
             "| --- | --- | --- | --- | --- |"]
    for row in part["rows"]:
        def seeds(side):
            return ", ".join("—" if v is None else str(v) for v in side["per_seed"])
        lines.append(f"| {row['name']} | {100 * row['value']:.1f}% | {row['opd']['text']} ({seeds(row['opd'])}) | "
                     f"{row['grpo']['text']} ({seeds(row['grpo'])}) | {row['ratio_grpo_over_opd']['text']} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, dict]:
    """Arguments -> (args, cfg): the FULL or QUICK preset with the options given on the command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 4 steps (a few minutes)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (0..N-1; default 3)")
    p.add_argument("--seed-list", default=None, help="comma-separated seeds to run instead of 0..N-1 (e.g. 2)")
    p.add_argument("--steps", type=int, default=None, help="training steps per run = the budget (default 60)")
    p.add_argument("--test-freq", type=int, default=None, help="greedy validation every N steps (default 5)")
    p.add_argument("--lr", type=float, default=None, help="learning rate of both methods")
    p.add_argument("--lr-opd", type=float, default=None)
    p.add_argument("--lr-grpo", type=float, default=None)
    p.add_argument("--smooth", type=int, default=None, help="training-sample accuracy: trailing mean over N steps (5)")
    p.add_argument("--val-smooth", type=int, default=None, help="smoothed val accuracy: trailing mean of N validations (3)")
    p.add_argument("--methods", default=",".join(common.METHODS), help="comma-separated subset of opd,grpo")
    p.add_argument("--parallel", type=int, default=None,
                   help="runs at the same time (default 1: concurrent verl runs on one host can hang, see "
                        "bench/bench_common.py STALL_TIMEOUT, and 2 cores gain little from overlap)")
    p.add_argument("--timeout", type=float, default=None, help="seconds before a run is stopped (default 3600)")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="run directories (default ~/.cache/opd_verl/bench/sample_efficiency[_quick])")
    p.add_argument("--reuse", action="store_true", help="reuse finished runs found in --work-dir with the same settings")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/sample_efficiency.json)")
    args = p.parse_args(argv)
    cfg = json.loads(json.dumps(QUICK if args.quick else FULL))
    if args.seeds is not None:
        cfg["seeds"] = list(range(args.seeds))
    if args.seed_list:
        cfg["seeds"] = [int(x) for x in args.seed_list.split(",") if x.strip()]
    for key in ("steps", "test_freq", "parallel", "smooth", "val_smooth", "timeout"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    for method in common.METHODS:
        lr = getattr(args, f"lr_{method}") or args.lr
        if lr is not None:
            cfg["lr"][method] = lr
    cfg["methods"] = [m for m in args.methods.split(",") if m]
    unknown = set(cfg["methods"]) - set(common.METHODS)
    if unknown:
        p.error(f"--methods: unknown {sorted(unknown)}; choose from {', '.join(common.METHODS)}")
    cfg["out"], cfg["work_dir"] = common.output_paths("sample_efficiency", args.quick, args.out, args.work_dir)
    cfg["reuse"] = args.reuse
    cfg["quick"] = args.quick
    return args, cfg


# --------------------------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------------------------


def _log(message: str) -> None:
    print(f"[sample_efficiency] {message}", flush=True)


def measure_references(built, k: int) -> dict:
    """Teacher and student on the val prompts with opd_verl.evaluate: greedy accuracy and avg@k at T=1."""
    import torch

    from opd_verl.demo.build import EVAL_BATCH, pick_threads
    from opd_verl.evaluate import evaluate_paths

    torch.set_num_threads(pick_threads())
    res = evaluate_paths([("teacher", built.teacher), ("student", built.student)], built.data["val"], k=k,
                         batch_size=EVAL_BATCH)
    out = {"data": built.data["val"], "k": k, "models": {r.name: {**r.metrics, "seconds": r.seconds} for r in res}}
    out["teacher_greedy"] = out["models"]["teacher"]["greedy"]
    out["teacher_sampled"] = out["models"]["teacher"][f"avg@{k}"]
    return out


def _run_one(built, cfg: dict, method: str, seed: int) -> dict:
    from opd_verl.demo.runs import val_accuracy_key

    out = Path(cfg["work_dir"]) / f"{method}_seed{seed}"
    overrides = common.method_overrides(method, seed=seed, lr=cfg["lr"][method])
    record_path = out / "run.json"
    if cfg["reuse"] and record_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("overrides") == overrides and record.get("steps") == cfg["steps"] and \
                record.get("test_freq") == cfg["test_freq"] and record.get("returncode") == 0:
            _log(f"{method} seed {seed}: reusing {record_path}")
            from opd_verl.demo.runs import read_metrics

            record["metrics_by_step"] = read_metrics(record["metrics"])
            return record
    tag = f"{method}/s{seed}"
    run = common.run_trainer(built, out, cfg["steps"], cfg["test_freq"], overrides, cfg["timeout"],
                      log=lambda m: print(m, flush=True))
    metrics = run["metrics_by_step"]
    done = max((s for s in metrics if SCORE_KEY in metrics[s]), default=0)
    if run["returncode"] != 0 or done < cfg["steps"]:
        _log(f"{tag}: exit {run['returncode']}, {done}/{cfg['steps']} steps; log tail:\n{common.log_tail(run['log'])}")
    record = {k: v for k, v in run.items() if k != "metrics_by_step"}
    record.update(method=method, seed=seed, overrides=overrides, steps=cfg["steps"], test_freq=cfg["test_freq"],
                  steps_done=done, val_key=val_accuracy_key(metrics))
    record_path.write_text(json.dumps(record, indent=2))
    record["metrics_by_step"] = metrics
    return record


def run_benchmark(cfg: dict) -> dict:
    from opd_verl.demo.build import build

    t0 = time.monotonic()
    info = common.machine_info()
    built = build(log=_log)
    _log(f"teacher {built.teacher}, student {built.student}")
    references = measure_references(built, cfg["eval_k"])
    _log("references on val: " + json.dumps({n: {k: round(v, 4) for k, v in m.items()}
                                             for n, m in references["models"].items()}))
    jobs = [(method, seed) for seed in cfg["seeds"] for method in cfg["methods"]]
    _log(f"{len(jobs)} runs x {cfg['steps']} steps, {cfg['parallel']} at a time: {jobs}")
    with common.LoadSampler() as load, ThreadPoolExecutor(max_workers=cfg["parallel"]) as pool:
        records = list(pool.map(lambda job: _run_one(built, cfg, *job), jobs))
    runs: dict[str, dict[int, dict]] = {}
    for rec in records:
        metrics = rec.pop("metrics_by_step")
        rec["curves"] = curves_of(metrics, rec["val_key"], cfg["smooth"], cfg["val_smooth"])
        rec["per_step"] = {s: {k: v for k, v in m.items() if k == SCORE_KEY or k.startswith(("val-core", "opd/",
                               "timing_s/step", "actor/pg_loss", "response_length/mean"))}
                           for s, m in sorted(metrics.items())}
        runs.setdefault(rec["method"], {})[rec["seed"]] = rec
    summary = summarize(runs, references, cfg)
    mean_curves = {metric: {method: mean_curve([r["curves"][metric] for r in runs.get(method, {}).values()])
                            for method in cfg["methods"]} for metric, _ in METRICS}
    overrides = {m: common.method_overrides(m, seed=0, lr=cfg["lr"][m]) for m in cfg["methods"]}
    return {
        **common.result_header("sample_efficiency", cfg, info, load, method_overrides=overrides),
        "build": {"root": built.root, "teacher_val_accuracy_at_build": built.info["teacher"]["val_accuracy"],
                  "student_val_accuracy_at_build": built.info["student"]["val_accuracy"],
                  "teacher_params": built.info["teacher"]["params"], "student_params": built.info["student"]["params"]},
        "references": references,
        "defines_reached": METRICS[0][0],
        "summary": summary,
        "mean_curves": mean_curves,
        "runs": {m: {str(s): r for s, r in by_seed.items()} for m, by_seed in runs.items()},
        "elapsed_s": time.monotonic() - t0,
    }


COLORS = {"opd": (200, 60, 40), "grpo": (40, 110, 200)}


def plot(result: dict, path: Path) -> str:
    from opd_verl.demo.plots import plot_panels

    refs = result["references"]
    n = len(result["settings"]["seeds"])
    panels = []
    for metric, title, ref_key, ref_label in (
        ("val_greedy", f"greedy val accuracy, mean of {n} seed(s)", "teacher_greedy", "teacher greedy"),
        ("train_sampled", f"training-sample accuracy (T=1, trailing mean of {result['settings']['smooth']} steps)",
         "teacher_sampled", f"teacher avg@{refs['k']}"),
    ):
        series = [(method.upper(), pts, COLORS[method]) for method, pts in result["mean_curves"][metric].items()]
        teacher = refs[ref_key]
        panels.append((title, series, (0.0, 1.0), {f"{ref_label} {100 * teacher:.0f}%": teacher,
                                                    "90% of it": 0.9 * teacher}))
    return plot_panels(panels, path, f"OPD vs GRPO on the embedded task: accuracy per step "
                                     f"({result['settings']['steps']} steps budget)")


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args, cfg = parse_args(argv)
    cfg["argv"] = argv
    result = run_benchmark(cfg)
    out = common.write_result(result, cfg["out"])
    png = plot(result, out.with_suffix(".png"))
    print()
    for metric, _ in METRICS:
        print(format_table(result["summary"], metric))
        print()
    print(f"wrote {out} and {png} ({result['elapsed_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
