"""Parity benchmark: main_opd's per-step curves vs the plain PyTorch reference loop (bench/reference_loop.py).

    .venv/bin/python bench/parity.py                          # 3 seeds x {sampled, full} x 30 steps (the default)
    .venv/bin/python bench/parity.py --modes sampled --seeds 0 1 --steps 20 --reuse
    .venv/bin/python bench/parity.py --modes demo --out bench/results/parity_demo.json   # the demo's own recipe

For each mode and seed, one trainer run (`python -m opd_verl.main_opd`, recipes/demo_cpu.yaml (mode demo:
recipes/demo_cpu_forward_kl.yaml), overrides of
bench_common.method_overrides("opd", seed) plus the mode's below) and one reference-loop run with the same seed
(data.seed sets the prompt order of both: the same prompts at every step; the sampling RNGs differ: vLLM vs
transformers). Metrics compared per step: greedy val accuracy (every --test-freq steps and step 0) and the
per-token reverse KL opd/kl_per_token (every step). Verdict per metric: the fraction of compared steps at which
the trainer's mean over seeds lies within the reference seeds' [min, max], and vice versa; "within spread" when
both fractions are at least what two sets of seeds from one and the same distribution reach 95% of the time
(`null_in_spread_quantile`: with 3 vs 3 seeds the expected fraction is only 0.63, its 5th percentile 0.5 over 30
steps and 0.29 over 7 validations), and the difference of the curves' means over the compared steps is within
2 standard errors of 0 (the standard error from the seeds: each seed's curve averaged over steps is one sample).

Writes bench/results/parity.json (the command, machine, settings, curves per run, the summary) and parity.png.
Trainer runs go one at a time (bench_common.STALL_TIMEOUT); --reuse takes finished runs from --work-dir.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from statistics import mean, stdev

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as common  # noqa: E402
import opd_speed  # noqa: E402
import reference_loop  # noqa: E402

from opd_verl.demo.runs import DEMO_RECIPE, RECIPE  # noqa: E402

MODES = {
    "sampled": [],  # the recipe as it is: adv_estimator=opd, importance_sampling
    # demo_cpu's +-5 advantage clip goes back to the default: with lambda_rl=0 no loss reads it (refused otherwise)
    "full": ["actor_rollout_ref.actor.policy_loss.loss_mode=ppo_plus_distill", "opd.lambda_rl=0", "opd.support=full",
             "opd.divergence=reverse_kl", "opd.adv_clip_min=-10.0", "opd.adv_clip_max=10.0"],
    "demo": [],  # recipes/demo_cpu_forward_kl.yaml as it is (TRAINER_RECIPE)
}
#: the recipe each mode's trainer runs (default demo_cpu) and the reference loop's LoopConfig fields that mirror it
TRAINER_RECIPE = {"demo": DEMO_RECIPE}
LOOP_FIELDS = {"sampled": {"mode": "sampled"}, "full": {"mode": "full"},
               "demo": opd_speed.VARIANTS["fwd_cos_p128n1_ep2_lr6e-4"]}
KL_KEY = "opd/kl_per_token"
VAL_KEY = reference_loop.VAL_KEY
METRICS = (VAL_KEY, KL_KEY)
EXTRA = ("critic/score/mean", "response_length/mean", "actor/grad_norm", "actor/lr", "actor/pg_loss",
         "opd/divergence_per_token")
NULL_QUANTILE = 0.05
DEFAULTS = {"modes": ["sampled", "full"], "seeds": [0, 1, 2], "steps": 30, "test_freq": 5, "timeout": 3600.0}


def _log(msg: str) -> None:
    print(f"[parity] {msg}", flush=True)


# ---- comparison (pure) ----------------------------------------------------------------------------------------


def curves(metrics_by_step: dict, key: str) -> dict[int, float]:
    return {int(s): m[key] for s, m in metrics_by_step.items() if key in m}


def null_in_spread_quantile(n_trainer: int, n_reference: int, steps: int, q: float = NULL_QUANTILE,
                            sims: int = 4000) -> float:
    """The q-quantile of the in-spread fraction (the mean of n_trainer seeds within the [min, max] of n_reference
    seeds, over `steps` independent steps) when both sides are draws of one distribution (Gaussian, simulated)."""
    import numpy as np

    rng = np.random.default_rng(0)
    t = rng.standard_normal((sims, n_trainer, steps)).mean(1)
    r = rng.standard_normal((sims, n_reference, steps))
    return float(np.quantile(((t >= r.min(1)) & (t <= r.max(1))).mean(-1), q))


def compare(trainer_by_seed: dict, reference_by_seed: dict) -> dict:
    """Per-step seed statistics of two sets of curves ({seed: {step: value}}) and the verdict (module docstring);
    plus the paired difference trainer - reference of the seeds both have (same seed = same prompts at each step,
    so the prompts' share of the step-to-step noise cancels), per seed averaged over the steps."""
    trainer, reference = list(trainer_by_seed.values()), list(reference_by_seed.values())
    steps = sorted(set.intersection(*(set(c) for c in trainer + reference))) if trainer and reference else []
    rows = []
    for s in steps:
        t, r = [c[s] for c in trainer], [c[s] for c in reference]
        rows.append({"step": s, "trainer_mean": mean(t), "trainer_min": min(t), "trainer_max": max(t),
                     "reference_mean": mean(r), "reference_min": min(r), "reference_max": max(r),
                     "trainer_in_reference_spread": min(r) <= mean(t) <= max(r),
                     "reference_in_trainer_spread": min(t) <= mean(r) <= max(t)})
    if not rows:
        return {"steps": [], "verdict": "no common steps"}
    frac_t = sum(x["trainer_in_reference_spread"] for x in rows) / len(rows)
    frac_r = sum(x["reference_in_trainer_spread"] for x in rows) / len(rows)
    # each seed's curve averaged over the compared steps: the seeds are the independent samples
    per_seed_t = [mean(c[s] for s in steps) for c in trainer]
    per_seed_r = [mean(c[s] for s in steps) for c in reference]
    mean_diff = mean(per_seed_t) - mean(per_seed_r)
    var = lambda xs: stdev(xs) ** 2 / len(xs) if len(xs) > 1 else float("inf")  # noqa: E731
    se = (var(per_seed_t) + var(per_seed_r)) ** 0.5
    paired = {seed: mean(trainer_by_seed[seed][s] - reference_by_seed[seed][s] for s in steps)
              for seed in trainer_by_seed if seed in reference_by_seed}
    need_t = null_in_spread_quantile(len(trainer), len(reference), len(steps))
    need_r = null_in_spread_quantile(len(reference), len(trainer), len(steps))
    ok = frac_t >= need_t and frac_r >= need_r and abs(mean_diff) <= 2 * se
    return {"steps": rows, "trainer_in_reference_spread_frac": frac_t, "reference_in_trainer_spread_frac": frac_r,
            "null_5pct_trainer_in_reference": need_t, "null_5pct_reference_in_trainer": need_r,
            "mean_diff_trainer_minus_reference": mean_diff, "mean_diff_se": se,
            "per_seed_mean_trainer": per_seed_t, "per_seed_mean_reference": per_seed_r,
            "paired_mean_diff_by_seed": paired,
            "paired_mean_diff": mean(paired.values()) if paired else None,
            "paired_mean_diff_se": stdev(paired.values()) / len(paired) ** 0.5 if len(paired) > 1 else None,
            "verdict": "within spread" if ok else "differs"}


# ---- runs -----------------------------------------------------------------------------------------------------


def trainer_run(built, mode: str, seed: int, cfg: dict, work: Path) -> dict:
    out = work / f"trainer_{mode}_seed{seed}"
    overrides = common.method_overrides("opd", seed, extra=MODES[mode] + [f"trainer.experiment_name=parity_{mode}_seed{seed}"])
    record_path = out / "record.json"
    if cfg["reuse"] and record_path.is_file():
        rec = json.loads(record_path.read_text())
        if rec.get("overrides") == overrides and rec.get("steps") == cfg["steps"] and rec.get("test_freq") == cfg["test_freq"] \
                and rec.get("returncode") == 0:
            _log(f"trainer {mode} seed {seed}: reusing {record_path}")
            return rec
    run = common.run_trainer(built, out, cfg["steps"], cfg["test_freq"], overrides, cfg["timeout"], _log,
                             recipe=TRAINER_RECIPE.get(mode, RECIPE))
    run.update(overrides=overrides, steps=cfg["steps"], test_freq=cfg["test_freq"])
    record_path.write_text(json.dumps(run))
    return run


def reference_run(built, mode: str, seed: int, cfg: dict, work: Path) -> dict:
    path = work / f"reference_{mode}_seed{seed}.json"
    lc = reference_loop.LoopConfig(seed=seed, steps=cfg["steps"], test_freq=cfg["test_freq"], **LOOP_FIELDS[mode])
    if cfg["reuse"] and path.is_file():
        rec = json.loads(path.read_text())
        if rec.get("config") == json.loads(json.dumps(reference_loop.asdict(lc))):
            _log(f"reference {mode} seed {seed}: reusing {path}")
            return rec
    start = time.monotonic()
    metrics = reference_loop.run(lc, built, log=lambda m: None)
    rec = {"config": reference_loop.asdict(lc), "seconds": time.monotonic() - start, "metrics_by_step": metrics}
    path.write_text(json.dumps(rec))
    _log(f"reference {mode} seed {seed}: {rec['seconds']:.0f}s, val {metrics[0][VAL_KEY]:.3f} -> "
         f"{metrics[cfg['steps']][VAL_KEY]:.3f}")
    return json.loads(json.dumps(rec))


def plot(summary: dict, path: Path, cfg: dict) -> str:
    """Per mode two panels (KL per token, greedy val accuracy): each side's mean over seeds (solid) and the seeds'
    min and max (dashed)."""
    from opd_verl.demo.plots import plot_panels

    colors = {"trainer": (200, 60, 40), "reference": (40, 110, 200)}
    names = {"trainer": "main_opd", "reference": "reference loop"}
    panels = []
    for mode, res in summary.items():
        for key, name in ((KL_KEY, "KL/token"), (VAL_KEY, "greedy val acc")):
            rows = res["comparison"][key]["steps"]
            series = []
            for side in ("trainer", "reference"):
                light = tuple(min(255, c + 90) for c in colors[side])
                series += [(f"{names[side]} mean", [(x["step"], x[f"{side}_mean"]) for x in rows], colors[side]),
                           ("min, max", [(x["step"], x[f"{side}_min"]) for x in rows], light, "dashed"),
                           ("", [(x["step"], x[f"{side}_max"]) for x in rows], light, "dashed")]
            panels.append((f"{mode}: {name} ({res['comparison'][key]['verdict']})", series,
                           (0.0, 1.0) if key == VAL_KEY else None, None))
    seeds = ",".join(str(s) for s in cfg["seeds"])
    return plot_panels(panels, path, f"main_opd vs the plain PyTorch reference loop (demo recipe; seeds {seeds}; "
                                     f"{cfg['steps']} steps)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=DEFAULTS["modes"])
    p.add_argument("--seeds", nargs="+", type=int, default=DEFAULTS["seeds"])
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    p.add_argument("--test-freq", type=int, default=DEFAULTS["test_freq"])
    p.add_argument("--timeout", type=float, default=DEFAULTS["timeout"], help="seconds per trainer run")
    p.add_argument("--reuse", action="store_true", help="reuse finished runs in --work-dir with the same settings")
    p.add_argument("--skip-trainer", action="store_true", help="reference loop only (reads trainer runs via --reuse)")
    p.add_argument("--skip-reference", action="store_true", help="trainer runs only (reads reference runs via --reuse)")
    p.add_argument("--work-dir", type=Path, default=Path("~/.cache/opd_verl/bench/parity").expanduser())
    p.add_argument("--out", type=Path, default=common.RESULTS / "parity.json")
    args = p.parse_args(argv)
    cfg = {"modes": args.modes, "seeds": args.seeds, "steps": args.steps, "test_freq": args.test_freq,
           "timeout": args.timeout, "reuse": args.reuse or args.skip_trainer or args.skip_reference, "argv": list(argv or sys.argv[1:])}
    args.work_dir.mkdir(parents=True, exist_ok=True)
    from opd_verl.demo.build import build

    built = build()
    info = common.machine_info()
    runs: dict = {m: {"trainer": {}, "reference": {}} for m in cfg["modes"]}
    with common.LoadSampler() as load:
        for mode in cfg["modes"]:
            for seed in cfg["seeds"]:
                if args.skip_reference:
                    continue
                runs[mode]["reference"][seed] = reference_run(built, mode, seed, cfg, args.work_dir)
        for mode in cfg["modes"]:
            for seed in cfg["seeds"]:
                path = args.work_dir / f"trainer_{mode}_seed{seed}" / "record.json"
                if args.skip_trainer and not path.is_file():
                    continue
                runs[mode]["trainer"][seed] = trainer_run(built, mode, seed, cfg, args.work_dir)
    summary = {}
    for mode, sides in runs.items():
        res = {"curves": {}, "comparison": {}, "runs": {}}
        for side, by_seed in sides.items():
            res["curves"][side] = {k: {s: curves(r["metrics_by_step"], k) for s, r in by_seed.items()}
                                   for k in METRICS + EXTRA}
            res["runs"][side] = {s: {k: r.get(k) for k in ("seconds", "seconds_to_first_step", "returncode", "command",
                                                          "log", "config")} for s, r in by_seed.items()}
        for key in METRICS + EXTRA:
            t = {seed: c for seed, c in res["curves"]["trainer"][key].items() if c}
            r = {seed: c for seed, c in res["curves"]["reference"][key].items() if c}
            res["comparison"][key] = compare(t, r)
        summary[mode] = res
        for key in METRICS:
            c = res["comparison"][key]
            _log(f"{mode} {key}: {c['verdict']} (trainer in ref spread {c.get('trainer_in_reference_spread_frac', 0):.2f}, "
                 f"ref in trainer spread {c.get('reference_in_trainer_spread_frac', 0):.2f}, "
                 f"mean diff {c.get('mean_diff_trainer_minus_reference', float('nan')):+.4f} "
                 f"± {c.get('mean_diff_se', float('nan')):.4f}; paired by seed {c.get('paired_mean_diff')} "
                 f"± {c.get('paired_mean_diff_se')})")
    result = common.result_header("parity", cfg, info, load, null_quantile=NULL_QUANTILE)
    result["modes"] = {m: {"verdict": {k: s["comparison"][k]["verdict"] for k in METRICS}, **s} for m, s in summary.items()}
    out = common.write_result(result, args.out)
    png = plot(summary, out.with_suffix(".png"), cfg)
    _log(f"wrote {out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
