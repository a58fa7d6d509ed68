"""The embedded CPU demo: the whole OPD story on a CPU machine, no downloads.

    python -m opd_verl.demo [--steps N] [--cache-dir D] [--rebuild] [--out DIR]

1. build (once; cached under --cache-dir, default $OPD_VERL_CACHE or ~/.cache/opd_verl/demo, in a directory keyed
   by a hash of the build settings): a synthetic GSM8K-format arithmetic task (opd_verl.demo.task), a tokenizer
   (opd_verl.demo.tiny_models.build_tokenizer), a TEACHER trained here by SFT (opd_verl.demo.sft) to >= 90% greedy accuracy
   on the val split, and a smaller STUDENT given a short SFT phase (it knows the format, but is clearly weaker);
2. OPD: `python -m opd_verl.main_opd` with recipes/demo_cpu_forward_kl.yaml (student = actor, teacher in the
   reference role, forward KL over the vocabulary at every token of the student's samples, one sample of each of 128
   prompts, 8 updates per step, a cosine lr; --recipe demo_cpu: the sampled token's reverse KL as the advantage,
   32 prompts x 4, one update per step), verl's per-step metrics on the console and in a JSONL file;
3. evaluation on the test split (opd_verl.evaluate): greedy accuracy, avg@k and pass@k of the teacher and of the
   student before and after OPD, the "gap closed" = (after - before) / (teacher - before), and a PNG plot of the
   per-token KL (opd/kl_per_token) and accuracy per step.

Outputs (--out, default ./opd_demo): opd.log (the trainer's output), metrics.jsonl (verl's file logger),
results.json, opd_demo.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from opd_verl.demo.build import EVAL_BATCH, Built, _log, build, pick_threads
from opd_verl.demo.plots import plot_metrics
from opd_verl.demo.runs import DEMO_RECIPE, find_final_actor, opd_command, read_metrics, run_opd


def evaluate_all(built: Built, after: str | None, k: int, log=_log) -> dict:
    from opd_verl.evaluate import evaluate_model, format_gap, format_table, gap_report, load_model, load_rows

    import torch

    torch.set_num_threads(pick_threads())
    rows = load_rows(built.data["test"])
    log(f"eval: {len(rows)} test prompts, greedy + {k} samples (T=1) per prompt")
    models = [("teacher", built.teacher), ("student_before", built.student)]
    if after:
        models.append(("student_after", after))
    results = []
    for name, path in models:
        model, tokenizer = load_model(path)
        res = evaluate_model(model, tokenizer, rows, k=k, greedy=True, name=name, batch_size=EVAL_BATCH)
        log(f"eval: {name}: " + ", ".join(f"{m} {100 * v:.1f}%" for m, v in res.metrics.items()) +
            f" ({res.seconds:.0f}s)")
        results.append(res)
    table = format_table(results)
    out = {"table": table, "models": {r.name: r.metrics for r in results},
           "examples": {r.name: r.samples for r in results}}
    if after:
        gaps = gap_report({r.name: r for r in results})
        out["gap_closed"] = gaps
        out["gap_text"] = format_gap(gaps)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m opd_verl.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="OPD training steps (default %(default)s)")
    parser.add_argument("--test-freq", type=int, default=15, help="validate every N steps (default %(default)s)")
    parser.add_argument("--recipe", default=DEMO_RECIPE, choices=[DEMO_RECIPE, "demo_cpu"],
                        help="recipes/<name>.yaml (default %(default)s; demo_cpu: the sampled reverse-KL advantage)")
    parser.add_argument("--cache-dir", default=None,
                        help="build cache (default $OPD_VERL_CACHE or ~/.cache/opd_verl/demo)")
    parser.add_argument("--rebuild", action="store_true", help="rebuild task, teacher and student")
    parser.add_argument("--out", default="opd_demo", help="output directory (default ./%(default)s)")
    parser.add_argument("--k", type=int, default=8, help="samples per test prompt for avg@k/pass@k")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds before the OPD run is stopped")
    parser.add_argument("--build-only", action="store_true", help="build (or check the cache) and stop")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for the OPD run (key=value)")
    args = parser.parse_args(argv)

    out = Path(args.out).expanduser().resolve()
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    built = build(cache_dir=args.cache_dir, rebuild=args.rebuild)
    timings["build"] = time.monotonic() - t0
    if args.build_only:
        print(json.dumps({"root": built.root, "teacher": built.teacher, "student": built.student,
                          "data": built.data}, indent=2))
        return 0

    out.mkdir(parents=True, exist_ok=True)
    cmd = opd_command(built, out, args.steps, args.test_freq, args.overrides, recipe=args.recipe)
    run = run_opd(cmd, out, args.timeout)
    timings["opd"] = run["seconds"]
    metrics = read_metrics(run["metrics"])
    after = find_final_actor(out, built.student)
    if run["returncode"] != 0 or after is None:
        _log(f"OPD: the run failed (exit {run['returncode']}{', timed out' if run['timed_out'] else ''}); "
             f"see {run['log']}")
        tail = Path(run["log"]).read_text(errors="replace").splitlines()[-25:]
        print("\n".join("    " + line for line in tail), flush=True)

    t1 = time.monotonic()
    evaluation = evaluate_all(built, after, args.k)
    timings["eval"] = time.monotonic() - t1
    teacher_val = built.info.get("teacher", {}).get("val_accuracy")
    refs = {f"teacher (val, greedy) {100 * teacher_val:.0f}%": teacher_val} if teacher_val is not None else None
    png = plot_metrics(metrics, out / "opd_demo.png", title=f"OPD demo: {args.steps} steps", references=refs) \
        if metrics else None
    timings["total"] = time.monotonic() - t0

    print()
    print(f"== OPD demo (recipes/{args.recipe}.yaml) ==")
    info = built.info
    build_line = (f"build: {'cached, built in ' if built.cached else ''}"
                  f"{info.get('seconds', 0):.0f}s (task {info.get('task_seconds', 0):.1f}s, "
                  f"teacher {info['teacher']['seconds']:.0f}s -> {100 * info['teacher']['val_accuracy']:.1f}% val, "
                  f"student {info['student']['seconds']:.0f}s -> {100 * info['student']['val_accuracy']:.1f}% val)")
    print(build_line)
    train_steps = [m["timing_s/step"] for m in metrics.values() if "timing_s/step" in m]
    print(f"OPD: {len([s for s in metrics if s > 0])} steps, {run['seconds']:.0f}s"
          + (f" ({run['seconds_to_first_step']:.0f}s to the first step" if run["seconds_to_first_step"] else " (")
          + (f", {sum(train_steps) / len(train_steps):.1f}s per step)" if train_steps else ")"))
    print(f"eval: {timings['eval']:.0f}s; total {timings['total']:.0f}s this run")
    print(evaluation["table"])
    if "gap_text" in evaluation:
        print(evaluation["gap_text"])
        models = evaluation["models"]
        before, after_acc = models["student_before"]["greedy"], models["student_after"]["greedy"]
        print(f"student greedy accuracy on test: {100 * before:.1f}% -> {100 * after_acc:.1f}% "
              f"({100 * (after_acc - before):+.1f} points; teacher {100 * models['teacher']['greedy']:.1f}%)")
    if png:
        print(f"plot: {png}")
    result = {"build": built.info, "opd": run, "evaluation": evaluation, "timings": timings, "plot": png,
              "student_after": after, "steps": args.steps, "recipe": args.recipe}
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str))
    print(f"results: {out / 'results.json'}")
    return 0 if after is not None else 1


if __name__ == "__main__":
    sys.exit(main())
