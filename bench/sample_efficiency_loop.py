"""Sample efficiency, OPD (the demo's recipe) vs GRPO vs SFT on teacher samples, in the reference loop.

    .venv/bin/python bench/sample_efficiency_loop.py            # lr grid on seed 0, then seeds 1 2 at each best lr
    .venv/bin/python bench/sample_efficiency_loop.py --quick    # smoke run: 1 seed, 1 lr, a few steps
    .venv/bin/python bench/sample_efficiency_loop.py --methods opd128 --with-results OLD.json   # + OLD's other runs

Every run starts from the demo's SFT student on the demo's prompts, in verl's order for the seed (the same prompts
at every step for every method), 32 prompts x 4 samples a step, T = 1, 32 tokens, AdamW with 5 warm-up steps and
a cosine decay to 0 over the method's budget, 4 updates per step (mini-batches), grad clip 1 - the recipe
recipes/demo_cpu_forward_kl.yaml had until 2026-12-07 as bench/reference_loop.py mirrors it (bench/parity.py: the
loop matches main_opd step for step). The methods differ only in their loss and their learning rate (opd128 also in
its prompts per step and epochs):
* opd: the recipe, the full-vocabulary forward KL(teacher || student) on the student's own samples;
* opd128: the demo's recipe since 2026-12-07: the same loss, the step's 128 samples as 128 prompts x 1, 2 epochs;
* grpo: the exact-match reward, group-normalized over each prompt's 4 samples, verl's PPO clip loss; no teacher;
* sft: token-mean NLL of the teacher's own samples (T = 1) of the same prompts: sequence-level distillation.
Each method's lr is the best of a small grid on seed 0 (the highest mean greedy val accuracy over the run's
validations); seeds 1 and 2 then run at that lr. Greedy val accuracy (300 prompts) every --test-freq steps.
Steps, wall time and FLOPs to 50/70/90% of the teacher's greedy val accuracy: the first validated step from which
two validations in a row reach it (one lucky validation does not count). FLOPs = 2 x parameters x tokens per
forward pass, 6 x per forward + backward (parameters without the input embedding; attention's own FLOPs, ~1% at
these lengths, left out), counting what the method needs: opd generation + the teacher's forward + the old
log-probs + the updates; grpo the same without the teacher; sft the teacher's generation + the updates. The wall
time is the loop's (it also computes the teacher's log-probs for the KL metric in every mode); main_opd takes
~9 s per step on 2 cores. Writes bench/results/sample_efficiency_loop.json and a PNG of the curves (step, log x)
and one against FLOPs; runs are kept in --work-dir, so an interrupted benchmark goes on where it stopped.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from statistics import mean

sys.path.insert(0, str(Path(__file__).resolve().parent))

import opd_speed  # noqa: E402
import reference_loop  # noqa: E402
from sample_efficiency import compare_steps, steps_to_threshold  # noqa: E402

VAL_KEY = reference_loop.VAL_KEY
SUSTAINED = 2  # a threshold counts as reached from the first of this many validations in a row at or above it
#: LoopConfig fields of each method (the lr comes from the grid)
METHODS: dict[str, dict] = {
    "opd": opd_speed.VARIANTS["full_fwd_mb4_cosine"],  # recipes/demo_cpu_forward_kl.yaml before 2026-12-07
    # recipes/demo_cpu_forward_kl.yaml since 2026-12-07: the same 128 samples a step as 128 prompts x 1, 2 epochs
    "opd128": opd_speed.VARIANTS["fwd_cos_p128n1_ep2_lr6e-4"],
    "grpo": {"mode": "grpo", "mini_batches": 4, "schedule": "cosine"},
    "sft": {"mode": "sft", "mini_batches": 4, "schedule": "cosine"},
}
FULL = {
    "budget": {"opd": 150, "opd128": 150, "sft": 300, "grpo": 1500},  # GRPO: 10x OPD's budget
    # GRPO at 1e-3 collapsed through main_opd even with one update per step (results/sample_efficiency_lr_tuning.json);
    # 3e-5 was added when 1e-4 came out best, at the edge of the first grid
    "lr_grid": {"opd": [1e-4, 3e-4, 1e-3], "opd128": [3e-4, 6e-4, 1e-3], "sft": [3e-4, 1e-3, 3e-3],
                "grpo": [3e-5, 1e-4, 3e-4]},
    "seeds": [0, 1, 2],
    "test_freq": 10,
    "teacher_fractions": [0.5, 0.7, 0.9],
    "parallel": 2,
}
QUICK = {**FULL, "budget": {"opd": 4, "opd128": 4, "sft": 4, "grpo": 8}, "lr_grid": {m: [3e-4] for m in METHODS}, "seeds": [0],
         "test_freq": 2}
COLORS = {"opd": (200, 60, 40), "opd128": (140, 30, 140), "grpo": (40, 110, 200), "sft": (40, 150, 60)}


# ---- pure parts (tested in tests/test_bench_sample_efficiency_loop.py) --------------------------------------


def flop_params(model) -> int:
    """Parameters that cost 2 FLOPs per token in a forward pass: all but the input embedding (a lookup), whose
    weights count when the output head is tied to it."""
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is emb
    return sum(p.numel() for p in model.parameters()) - (0 if tied else emb.numel())


def step_flops(method: str, tokens: float, student: int, teacher: int, epochs: int = 1) -> float:
    """FLOPs of one step over `tokens` prompt + response tokens: the rollout (2 N per token, with a KV cache), the
    forward passes the method needs (2 N) and the updates (6 N per epoch)."""
    update = 6 * student * tokens * epochs
    if method == "sft":  # the teacher samples; no old log-probs (no ratio in the NLL)
        return 2 * teacher * tokens + update
    rollout_and_old_logprobs = 2 * 2 * student * tokens
    if method == "grpo":
        return rollout_and_old_logprobs + update
    if method == "opd":
        return rollout_and_old_logprobs + 2 * teacher * tokens + update
    raise ValueError(f"unknown method {method!r}")


def flops_kind(method: str) -> str:
    """The step_flops method of a METHODS entry: both OPD recipes count as "opd"."""
    mode = METHODS[method]["mode"]
    return "opd" if mode in ("full", "sampled") else mode


def cumulative_flops(method: str, metrics: dict[int, dict], params: dict[str, int]) -> dict[int, float]:
    """{step: FLOPs of steps 1..step} of a run, from each step's token count (and the method's epochs)."""
    epochs = METHODS[method].get("epochs", 1)
    per_step = {s: {"flops": step_flops(flops_kind(method), m["tokens"], params["student"], params["teacher"],
                                        epochs)}
                for s, m in metrics.items() if s > 0}
    return cumulative(per_step, "flops")


def cumulative(metrics: dict[int, dict], key: str) -> dict[int, float]:
    """{step: sum of metrics[s][key] for s in 1..step}, and 0 at step 0."""
    out, total = {0: 0.0}, 0.0
    for step in sorted(s for s in metrics if s > 0):
        total += metrics[step][key]
        out[step] = total
    return out


def val_curve(metrics: dict[int, dict]) -> list[tuple[int, float]]:
    return sorted((s, m[VAL_KEY]) for s, m in metrics.items() if VAL_KEY in m)


def best_lr(grid_runs: dict[float, dict[int, dict]]) -> float:
    """The lr whose run has the highest mean greedy val accuracy over its validations after step 0."""
    return max(grid_runs, key=lambda lr: mean(v for s, v in val_curve(grid_runs[lr]) if s > 0))


def grid_summary(grid: dict[str, dict[float, dict[int, dict]]], teacher: float, fractions) -> dict:
    """Per method and lr (the grid's seed): mean and last greedy val accuracy, steps to each fraction of the
    teacher (None: not within the budget)."""
    out = {}
    for method, by_lr in grid.items():
        out[method] = {}
        for lr, metrics in sorted(by_lr.items()):
            curve = val_curve(metrics)
            out[method][str(lr)] = {"mean_val": mean(v for s, v in curve if s > 0), "last_val": curve[-1][1],
                                    "steps_to": {f"{round(100 * f)}%": steps_to_threshold(curve, f * teacher, SUSTAINED)
                                                 for f in fractions}, "val": curve}
    return out


def format_grid(grid: dict) -> str:
    names = list(next(iter(next(iter(grid.values())).values()))["steps_to"])  # the same fractions in every row
    lines = ["| method | lr | mean val | last val | " + " | ".join(f"steps to {k} of teacher" for k in names) + " |",
             "| --- " * (4 + len(names)) + "|"]
    for method, by_lr in grid.items():
        for lr, row in by_lr.items():
            steps = " | ".join("—" if v is None else str(v) for v in row["steps_to"].values())
            lines.append(f"| {method} | {float(lr):g} | {100 * row['mean_val']:.1f}% | {100 * row['last_val']:.1f}% | {steps} |")
    return "\n".join(lines)


def summarize(runs: dict[str, dict[int, dict]], teacher: float, cfg: dict,
              flops: dict[str, dict[int, dict[int, float]]]) -> dict:
    """runs = {method: {seed: metrics_by_step}} at each method's best lr; flops = {method: {seed: cumulative_flops}}
    -> per threshold: steps, wall and FLOPs per seed and method, and the ratios of the
    steps over OPD's (compare_steps: a method that does not reach a threshold counts its budget, a bound)."""
    rows = []
    for fraction in cfg["teacher_fractions"]:
        thr = fraction * teacher
        row = {"name": f"{round(100 * fraction)}% of teacher", "value": thr, "methods": {}}
        for method, by_seed in runs.items():
            per = []
            for seed, metrics in sorted(by_seed.items()):
                step = steps_to_threshold(val_curve(metrics), thr, SUSTAINED)
                wall, fl = cumulative(metrics, "timing_s/step"), flops[method][seed]
                per.append({"seed": seed, "steps": step, "wall_s": None if step is None else wall[step],
                            "flops": None if step is None else fl[step]})
            reached = [p for p in per if p["steps"] is not None]
            row["methods"][method] = {
                "per_seed": per, "reached": len(reached), "runs": len(per),
                **{f"mean_{k}": mean(p[k] for p in reached) if len(reached) == len(per) else None
                   for k in ("steps", "wall_s", "flops")}}
        refs = opd_methods(runs)
        for ref in refs:
            for other in (m for m in runs if m not in refs):
                cmp = compare_steps([p["steps"] for p in row["methods"][ref]["per_seed"]],
                                    [p["steps"] for p in row["methods"][other]["per_seed"]],
                                    cfg["budget"][ref], cfg["budget"][other])
                row[f"{other}_over_{ref}_steps"] = {"ratio": cmp["ratio_grpo_over_opd"],
                                                    "per_seed": cmp["ratio_per_seed"],
                                                    "text": {ref: cmp["opd"]["text"], other: cmp["grpo"]["text"]}}
        rows.append(row)
    return {"teacher": teacher, "rows": rows}


def opd_methods(methods) -> list[str]:
    """The OPD recipes among `methods` (the others are compared with each of them)."""
    return [m for m in methods if flops_kind(m) == "opd"]


def format_table(summary: dict, methods) -> str:
    head = " | ".join(f"{m.upper()} steps (per seed) / wall s / GFLOPs" for m in methods)
    pairs = [(m, ref) for ref in opd_methods(methods) for m in ("grpo", "sft")]
    lines = [f"| threshold | accuracy | {head} | " + " | ".join(f"{m.upper()} / {ref.upper()} steps" for m, ref in pairs)
             + " |", "| --- | --- | " + " | ".join("---" for _ in [*methods, *pairs]) + " |"]
    for row in summary["rows"]:
        cells = []
        for m in methods:
            r = row["methods"].get(m)
            if r is None:
                cells.append("—")
                continue
            seeds = ", ".join("—" if p["steps"] is None else str(p["steps"]) for p in r["per_seed"])
            if r["mean_steps"] is None:
                cells.append(f"{r['reached']}/{r['runs']} reached ({seeds})")
            else:
                cells.append(f"{r['mean_steps']:.0f} ({seeds}) / {r['mean_wall_s']:.0f} / {r['mean_flops'] / 1e9:.0f}")
        ratios = [row.get(f"{m}_over_{ref}_steps", {}).get("ratio", {}).get("text", "—") for m, ref in pairs]
        lines.append(f"| {row['name']} | {100 * row['value']:.1f}% | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    return "\n".join(lines)


def stored_methods(old: dict, path, cfg: dict, running) -> dict[str, dict]:
    """The methods of an earlier result (`old`, read from `path`) that are not `running` now: their runs at their
    best lr, that lr, their grid summary and budget. Refused (SystemExit) when the earlier result used other method
    fields, seeds, test frequency or thresholds, which would make the comparison unfair."""
    same = {k: old["settings"][k] == cfg[k] for k in ("seeds", "test_freq", "teacher_fractions")}
    if not all(same.values()):
        raise SystemExit(f"--with-results {path}: its {', '.join(k for k, ok in same.items() if not ok)} differ from "
                         f"this run's; rerun those methods here instead")
    out = {}
    for m, by_seed in old["runs"].items():
        if m in running:
            continue
        if m not in METHODS or old["methods"][m] != json.loads(json.dumps(METHODS[m])):
            raise SystemExit(f"--with-results {path}: method {m!r} was run with fields {old['methods'].get(m)}, not "
                             f"{METHODS.get(m)}; rerun it here instead")
        out[m] = {"runs": {int(seed): {int(step): met for step, met in r.items()} for seed, r in by_seed.items()},
                  "best_lr": old["best_lr"][m], "grid": old["grid"][m], "budget": old["settings"]["budget"][m]}
    return out


def parse_budgets(items) -> dict[str, int]:
    """["opd=300"] -> {"opd": 300}; an unknown method or a step count < 1 is an error."""
    out = {}
    for item in items:
        method, _, steps = item.partition("=")
        if method not in METHODS or not steps.isdigit() or int(steps) < 1:
            raise SystemExit(f"--budget {item!r}: expected METHOD=STEPS with METHOD one of {', '.join(METHODS)}")
        out[method] = int(steps)
    return out


# ---- runs ----------------------------------------------------------------------------------------------------


def _job_path(work_dir: Path, method: str, lr: float, seed: int, steps: int, test_freq: int) -> Path:
    return work_dir / f"{method}_lr{lr:g}_seed{seed}_steps{steps}_tf{test_freq}.json"


def _run_job(job: dict) -> dict:
    """One run in its own process (1 torch thread; the pool runs --parallel of them), stored at job["path"]."""
    cfg = reference_loop.LoopConfig(**job["fields"])
    t0, name = time.monotonic(), Path(job["path"]).stem

    def progress(line):  # one line per 50 steps: the reference loop logs every step as JSON
        step = json.loads(line)
        if step["step"] % 50 == 0:
            print(f"[sample_efficiency_loop] {name}: step {step['step']}/{cfg.steps}, "
                  f"{time.monotonic() - t0:.0f} s", flush=True)

    metrics = reference_loop.run(cfg, log=progress, threads=1)
    record = {"config": asdict(cfg), "seconds": time.monotonic() - t0, "metrics_by_step": metrics}
    Path(job["path"]).write_text(json.dumps(record))
    return {"path": job["path"], "seconds": record["seconds"]}


def _load(path: Path) -> dict[int, dict]:
    return {int(s): m for s, m in json.loads(path.read_text())["metrics_by_step"].items()}


def run_jobs(jobs: list[dict], parallel: int, log) -> None:
    todo = [j for j in jobs if not Path(j["path"]).exists()]
    for j in jobs:
        if j not in todo:
            log(f"reusing {j['path']}")
    todo.sort(key=lambda j: -j["fields"]["steps"])  # longest first: the pool ends together
    with ProcessPoolExecutor(max_workers=parallel, mp_context=multiprocessing.get_context("spawn")) as pool:
        for done in pool.map(_run_job, todo):
            metrics = _load(Path(done["path"]))
            curve = val_curve(metrics)
            log(f"{Path(done['path']).name}: val {100 * curve[0][1]:.1f} -> {100 * curve[-1][1]:.1f}% "
                f"(max {100 * max(v for _, v in curve):.1f}%) in {done['seconds']:.0f} s")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--parallel", type=int, default=None, help="runs at a time, one torch thread each (default 2)")
    p.add_argument("--budget", action="append", default=[], metavar="METHOD=STEPS",
                   help="a method's budget in steps instead of the preset's, e.g. --budget opd=300")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="where each run is stored (default ~/.cache/opd_verl/bench/sample_efficiency_loop[_quick])")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--with-results", type=Path, default=None, metavar="JSON",
                   help="add the other methods' runs stored in an earlier result of this benchmark (same settings)")
    args = p.parse_args(argv)
    cfg = json.loads(json.dumps(QUICK if args.quick else FULL))
    cfg["parallel"] = args.parallel or cfg["parallel"]
    cfg["budget"].update(parse_budgets(args.budget))
    name = "sample_efficiency_loop" + ("_quick" if args.quick else "")
    work_dir = args.work_dir or Path.home() / ".cache" / "opd_verl" / "bench" / name
    work_dir.mkdir(parents=True, exist_ok=True)
    out = args.out or Path(__file__).parent / "results" / f"{name}.json"

    def log(message):
        print(f"[sample_efficiency_loop] {message}", flush=True)

    from transformers import AutoModelForCausalLM

    from opd_verl.demo.build import build

    start = time.monotonic()
    built = build(log=log)
    teacher_acc = built.info["teacher"]["val_accuracy"]
    params = {role: flop_params(AutoModelForCausalLM.from_pretrained(path)) for role, path in
              (("student", built.student), ("teacher", built.teacher))}
    log(f"teacher val {100 * teacher_acc:.1f}%, FLOP parameters {params}")

    def job(method, lr, seed):
        steps = cfg["budget"][method]
        return {"fields": {**METHODS[method], "lr": lr, "seed": seed, "steps": steps, "test_freq": cfg["test_freq"]},
                "path": str(_job_path(work_dir, method, lr, seed, steps, cfg["test_freq"]))}

    seed0 = cfg["seeds"][0]
    log("lr grid on seed " + str(seed0) + ": " + json.dumps({m: cfg["lr_grid"][m] for m in args.methods}))
    jobs = [job(m, lr, seed0) for m in args.methods for lr in cfg["lr_grid"][m]]
    run_jobs(jobs, cfg["parallel"], log)
    grid = {m: {lr: _load(Path(job(m, lr, seed0)["path"])) for lr in cfg["lr_grid"][m]} for m in args.methods}
    best = {m: best_lr(grid[m]) for m in args.methods}
    log(f"best lr: {best}")
    seed_jobs = [job(m, best[m], s) for m in args.methods for s in cfg["seeds"][1:]]
    run_jobs(seed_jobs, cfg["parallel"], log)
    jobs += seed_jobs
    runs = {m: {s: _load(Path(job(m, best[m], s)["path"])) for s in cfg["seeds"]} for m in args.methods}
    grid = grid_summary(grid, teacher_acc, cfg["teacher_fractions"])
    if args.with_results:
        for m, stored in stored_methods(json.loads(args.with_results.read_text()), args.with_results, cfg,
                                        args.methods).items():
            runs[m], best[m], grid[m] = stored["runs"], stored["best_lr"], stored["grid"]
            cfg["budget"][m] = stored["budget"]
            log(f"{m}: {len(stored['runs'])} runs at lr {stored['best_lr']:g} from {args.with_results}")
    flops = {m: {s: cumulative_flops(m, metrics, params) for s, metrics in by_seed.items()} for m, by_seed in runs.items()}
    summary = summarize(runs, teacher_acc, cfg, flops)
    mean_curves = {m: [(s, mean(dict(val_curve(r))[s] for r in by_seed.values())) for s, _ in
                       val_curve(next(iter(by_seed.values())))] for m, by_seed in runs.items()}
    result = {
        "benchmark": "sample_efficiency_loop",
        "command": "python bench/sample_efficiency_loop.py " + " ".join(argv),
        "machine": {"cpus": os.cpu_count(), "loadavg_at_end": os.getloadavg()},
        "settings": cfg,
        "methods": METHODS,
        "base_config": asdict(reference_loop.LoopConfig()),
        "teacher_val": teacher_acc,
        "student_val": built.info["student"]["val_accuracy"],
        "flop_params": params,
        "grid": grid,
        "with_results": None if args.with_results is None else str(args.with_results),
        "best_lr": best,
        "summary": summary,
        "mean_val_curves": mean_curves,
        "mean_kl_curves": {m: [(s, mean(r[s]["opd/kl_per_token"] for r in by_seed.values()))
                               for s in sorted(next(iter(by_seed.values()))) if s > 0] for m, by_seed in runs.items()},
        "runs": {m: {str(s): r for s, r in by_seed.items()} for m, by_seed in runs.items()},
        "run_seconds": {Path(j["path"]).stem: json.loads(Path(j["path"]).read_text())["seconds"] for j in jobs},
        "seconds": time.monotonic() - start,  # this invocation's (runs reused from --work-dir take none)
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"), flops)
    print(format_grid(result["grid"]))
    print()
    print(format_table(summary, list(runs)))
    log(f"wrote {out} ({result['seconds']:.0f} s)")
    return 0


def plot(result: dict, path: Path, flops: dict) -> None:
    from opd_verl.demo.plots import plot_panels

    teacher = result["teacher_val"]
    refs = {f"teacher {100 * teacher:.0f}%": teacher, **{f"{round(100 * f)}%": f * teacher
                                                       for f in result["settings"]["teacher_fractions"]}}
    n = len(result["settings"]["seeds"])
    label = {m: f"{m.upper()} lr {result['best_lr'][m]:g}" for m in result["mean_val_curves"]}
    series = [(label[m], pts, COLORS[m]) for m, pts in result["mean_val_curves"].items()]
    kl = [(label[m], pts, COLORS[m]) for m, pts in result["mean_kl_curves"].items()]
    plot_panels([(f"greedy val accuracy, mean of {n} seeds", series, (0.0, 1.0), refs),
                 ("per-token s_old - q on the step's samples (for SFT: on the teacher's)", kl, None, None)],
                path, "OPD vs GRPO vs SFT on teacher samples (reference loop), each at its best lr", logx=True)
    seed0 = result["settings"]["seeds"][0]
    by_flops = [(label[m], [(flops[m][seed0][s] / 1e9, v) for s, v in pts if s > 0], COLORS[m])
                for m, pts in result["mean_val_curves"].items()]
    plot_panels([(f"greedy val accuracy, mean of {n} seeds (x: GFLOPs of seed {seed0}'s run)", by_flops, (0.0, 1.0), refs)],
                path.with_name(path.stem + "_flops.png"), "The same curves against training FLOPs",
                xlabel="GFLOPs", logx=True)


if __name__ == "__main__":
    sys.exit(main())
