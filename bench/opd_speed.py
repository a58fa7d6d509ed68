"""What makes OPD learn fast on the demo task: one knob at a time around the demo recipe, in the reference loop.

    .venv/bin/python bench/opd_speed.py                                   # every variant below, seeds 0 1, 40 steps
    .venv/bin/python bench/opd_speed.py --variants base mb4 --seeds 0 1 2 --steps 60 --out /tmp/x.json

Each variant is a set of bench/reference_loop.py LoopConfig fields on top of the demo recipe's (the loop matches
main_opd step for step: bench/parity.py). The loop takes ~0.3 s per step, main_opd ~8 s on 2 CPU cores, which is
why the sweep runs here; whatever wins is then run through main_opd (bench/README.md). The score of a variant
is the greedy val accuracy (300 prompts) at fixed step counts and the fraction of the student -> teacher gap it
closes, mean over seeds. Writes bench/results/opd_speed.json (command, settings, curves per run, summary) and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path
from statistics import mean

sys.path.insert(0, str(Path(__file__).resolve().parent))

import reference_loop  # noqa: E402

from opd_verl.evaluate import gap_closed  # noqa: E402

VAL_KEY = reference_loop.VAL_KEY
KL_KEY = "opd/kl_per_token"
#: name -> LoopConfig fields changed from the demo recipe (lr 3e-4, 5 warm-up steps, 32 prompts x 4, T=1, 32
#: tokens, sampled k1 advantage, one update per step)
VARIANTS: dict[str, dict] = {
    "base": {},
    "lr1e-4": {"lr": 1e-4},
    "lr6e-4": {"lr": 6e-4},
    "lr1e-3": {"lr": 1e-3},
    "warmup0": {"warmup_steps": 0},
    "beta2_0.99": {"betas": (0.9, 0.99)},
    "mb2": {"mini_batches": 2},
    "mb4": {"mini_batches": 4},
    "mb8": {"mini_batches": 8},
    "epochs2": {"epochs": 2},
    "full": {"mode": "full"},
    "full_mb4": {"mode": "full", "mini_batches": 4},
    "discount1": {"discount": 1.0},
    "discount0.9": {"discount": 0.9},
    "n2": {"n": 2},
    "n8": {"n": 8},
    "prompts64": {"prompts": 64},
    "temp0.7": {"temperature": 0.7},
    "temp1.3": {"temperature": 1.3},
    "len24": {"max_new_tokens": 24},
    "sft5": {"sft_steps": 5},
    "sft10": {"sft_steps": 10},
    # round 2: the full-vocabulary loss (round 1's best) with more or larger steps
    "full_fwd": {"mode": "full", "divergence": "forward_kl"},
    "full_mb8": {"mode": "full", "mini_batches": 8},
    "full_lr1e-3": {"mode": "full", "lr": 1e-3},
    "full_mb4_warmup0": {"mode": "full", "mini_batches": 4, "warmup_steps": 0},
    "full_mb4_beta2": {"mode": "full", "mini_batches": 4, "betas": (0.9, 0.99)},
    "full_mb4_n8": {"mode": "full", "mini_batches": 4, "n": 8},
    "full_mb4_lr1e-3": {"mode": "full", "mini_batches": 4, "lr": 1e-3},
    "full_mb4_ep2": {"mode": "full", "mini_batches": 4, "epochs": 2},
    # round 3: forward KL (round 2's best) and JSD
    "full_jsd": {"mode": "full", "divergence": "jsd"},
    "full_fwd_mb4": {"mode": "full", "divergence": "forward_kl", "mini_batches": 4},
    "full_fwd_warmup0": {"mode": "full", "divergence": "forward_kl", "warmup_steps": 0},
    "full_fwd_lr1e-3": {"mode": "full", "divergence": "forward_kl", "lr": 1e-3},
    "full_fwd_mb4_warmup0": {"mode": "full", "divergence": "forward_kl", "mini_batches": 4, "warmup_steps": 0},
    # round 4 (150 steps: the plateau): a cosine decay of the lr to 0 over the run, from 3e-4 and from higher peaks
    "full_fwd_mb4_cosine": {"mode": "full", "divergence": "forward_kl", "mini_batches": 4, "schedule": "cosine"},
    "full_fwd_mb4_cosine_lr6e-4": {"mode": "full", "divergence": "forward_kl", "mini_batches": 4, "schedule": "cosine",
                                   "lr": 6e-4},
    "full_fwd_mb4_cosine_lr1e-3": {"mode": "full", "divergence": "forward_kl", "mini_batches": 4, "schedule": "cosine",
                                   "lr": 1e-3},
    # round 5 (the demo's 50 steps): the cosine recipe with more updates, more prompts per sample budget (the same
    # 128 samples a step to generate), 2 epochs, a faster second moment, no warm-up
    **{f"fwd_cos_{name}": {"mode": "full", "divergence": "forward_kl", "mini_batches": 4, "schedule": "cosine",
                           **fields}
       for name, fields in {"mb8": {"mini_batches": 8}, "p64n2": {"prompts": 64, "n": 2},
                            "p128n1": {"prompts": 128, "n": 1}, "ep2": {"epochs": 2},
                            "beta2": {"betas": (0.9, 0.99)}, "warmup0": {"warmup_steps": 0},
                            # fewer samples a step (a cheaper CPU step): the exact divergence has little noise
                            "p32n2": {"n": 2}, "p64n1": {"prompts": 64, "n": 1}, "p32n1": {"n": 1},
                            "p16n2": {"prompts": 16, "n": 2},
                            # one sample of each of 128 prompts (the best of the above) with more updates
                            "p128n1_ep2": {"prompts": 128, "n": 1, "epochs": 2},
                            "p128n1_mb8": {"prompts": 128, "n": 1, "mini_batches": 8},
                            "p128n1_lr6e-4": {"prompts": 128, "n": 1, "lr": 6e-4},
                            "p128n1_ep2_lr6e-4": {"prompts": 128, "n": 1, "epochs": 2, "lr": 6e-4}}.items()},
}
REPORT_STEPS = (10, 20, 40, 80, 150)
GAP_TARGETS = (0.3, 0.5, 0.6)  # the demo's goal: 60% of the gap


def summarize(runs: dict[str, dict[int, dict]], teacher: float, report_steps=REPORT_STEPS) -> dict:
    """{variant: {seed: metrics_by_step}} -> per variant: mean val and gap closed at each report step, the mean KL of
    the first and last 3 OPD steps, seconds per step."""
    out = {}
    for name, by_seed in runs.items():
        seeds = list(by_seed.values())
        row = {"seeds": len(seeds)}
        val0 = mean(m[0][VAL_KEY] for m in seeds)
        row["val_0"] = val0
        for s in report_steps:
            vals = [m[s][VAL_KEY] for m in seeds if s in m and VAL_KEY in m[s]]
            if len(vals) == len(seeds):
                row[f"val_{s}"] = mean(vals)
                row[f"gap_closed_{s}"] = gap_closed(val0, mean(vals), teacher)
        vsteps = sorted(s for s in seeds[0] if all(VAL_KEY in m.get(s, {}) for m in seeds))
        for target in GAP_TARGETS:  # the first validation at which the seeds' mean closes that much of the gap
            row[f"steps_to_gap_{round(100 * target)}"] = next(
                (s for s in vsteps if gap_closed(val0, mean(m[s][VAL_KEY] for m in seeds), teacher) >= target), None)
        steps = sorted(k for k in seeds[0] if k > 0)
        opd_steps = [s for s in steps if "sft/nll_per_token" not in seeds[0][s]]  # the staged variants' OPD part
        kl = [mean(m[s][KL_KEY] for m in seeds) for s in opd_steps]
        row["kl_first3"], row["kl_last3"] = mean(kl[:3]), mean(kl[-3:])
        row["loop_s_per_step"] = mean(m[s]["timing_s/step"] for m in seeds for s in steps)
        out[name] = row
    return out


COLORS = [(0, 0, 0), (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def plot(runs: dict, summary: dict, teacher: float, path: Path) -> str:
    """The base recipe and the 6 variants with the best final val accuracy: val accuracy and KL per token."""
    from opd_verl.demo.plots import plot_panels

    last = max(int(k[4:]) for k in next(iter(summary.values())) if k.startswith("val_"))
    best = sorted(summary, key=lambda n: -summary[n].get(f"val_{last}", 0))[:6]
    val, kl = [], []
    for name, color in zip(dict.fromkeys([n for n in ("base", *best) if n in runs]), COLORS):
        seeds = list(runs[name].values())
        vsteps = sorted(s for s in seeds[0] if VAL_KEY in seeds[0][s])
        val.append((name, [(s, mean(m[s][VAL_KEY] for m in seeds)) for s in vsteps], color))
        ksteps = sorted(s for s in seeds[0] if s > 0)
        kl.append((name, [(s, mean(m[s][KL_KEY] for m in seeds)) for s in ksteps], color))
    n = len(next(iter(runs.values())))
    panels = [(f"greedy val accuracy, mean of {n} seed(s)", val, (0.0, 1.0), {f"teacher {100 * teacher:.0f}%": teacher}),
              ("KL per token (s_old - q), mean of the seeds", kl, None, None)]
    return plot_panels(panels, path, "OPD in the reference loop: the base recipe and the best variants")


def reusable_runs(args) -> dict[str, dict[int, dict]]:
    """The runs stored in args.out whose variant fields, steps and test frequency are those asked for now."""
    if not args.out.exists():
        return {}
    old = json.loads(args.out.read_text())
    if old.get("settings", {}).get("steps") != args.steps or old["settings"].get("test_freq") != args.test_freq:
        return {}
    same = {n for n, fields in old["variants"].items()
            if n in VARIANTS and json.loads(json.dumps(VARIANTS[n])) == fields}
    return {n: {int(seed): {int(step): m for step, m in by_step.items()} for seed, by_step in old["runs"][n].items()}
            for n in same}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--test-freq", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "opd_speed.json")
    p.add_argument("--reuse", action="store_true", help="keep the runs in --out made with the same variant, steps "
                   "and test frequency")
    args = p.parse_args(argv)

    from opd_verl.demo.build import build

    built = build()
    teacher = built.info["teacher"]["val_accuracy"]
    runs: dict[str, dict[int, dict]] = reusable_runs(args) if args.reuse else {}
    start = time.monotonic()

    def write() -> dict:
        report = tuple(sorted({s for s in REPORT_STEPS if s <= args.steps} | {args.steps}))
        summary = summarize(runs, teacher, report)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "command": "python bench/opd_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": {"node": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version()},
            "seconds": time.monotonic() - start,
            "settings": {"steps": args.steps, "test_freq": args.test_freq, "seeds": args.seeds},
            "teacher_val": teacher,
            "base_config": asdict(reference_loop.LoopConfig()),
            "variants": {n: VARIANTS[n] for n in runs},
            "summary": summary,
            "runs": runs,
        }, indent=1, default=str))
        return summary

    for name in args.variants:
        for seed in args.seeds:
            if seed in runs.get(name, {}):
                continue
            cfg = reference_loop.LoopConfig(seed=seed, steps=args.steps, test_freq=args.test_freq,
                                            **VARIANTS[name])
            t0 = time.monotonic()
            runs.setdefault(name, {})[seed] = reference_loop.run(cfg, built, log=lambda m: None)
            last = runs[name][seed][args.steps][VAL_KEY]
            print(f"[opd_speed] {name} seed {seed}: val {100 * runs[name][seed][0][VAL_KEY]:.1f} -> "
                  f"{100 * last:.1f}% in {time.monotonic() - t0:.0f}s", flush=True)
            write()  # after every run: an interrupted sweep keeps what it measured (--reuse goes on from it)
    summary = write()
    for name, row in summary.items():
        print(f"[opd_speed] {name:12s} " + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                                   for k, v in row.items() if k != "seeds"))
    plot(runs, summary, teacher, args.out.with_suffix(".png"))
    print(f"[opd_speed] wrote {args.out} in {time.monotonic() - start:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
