"""CPU step time of the teacher on a pool vs colocated, from the console logs of two runs of the same work (the runs of
tests/e2e/test_teacher_pool_e2e.py: greedy rollouts, the same samples; placeholder GPUs, 2 cores shared with
other jobs, so one run each: an indication, not a GPU figure).

    .venv/bin/python bench/teacher_pool_step_time.py COLOCATED.log POOL.log --label NAME \
        [--out bench/results/teacher_pool_step_time.json]

Writes verl's timing_s/{step,ref,update_actor,gen} per step of each run and the pool / colocated ratios.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "e2e"))
from cpu_run import console_metrics  # noqa: E402  (the e2e tests' parser of verl's console metrics)

TIMINGS = ("timing_s/step", "timing_s/gen", "timing_s/ref", "timing_s/update_actor")


def step_times(log_text: str) -> dict[int, dict[str, float]]:
    return {step: {k: m[k] for k in TIMINGS if k in m} for step, m in console_metrics(log_text).items()}


def compare(colocated: dict, pool: dict) -> dict:
    return {step: {k: pool[step][k] / colocated[step][k] for k in colocated[step] if k in pool.get(step, {})}
            for step in colocated if step in pool}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("colocated")
    parser.add_argument("pool")
    parser.add_argument("--label", required=True)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "teacher_pool_step_time.json"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    colocated = step_times(Path(args.colocated).read_text(errors="replace"))
    pool = step_times(Path(args.pool).read_text(errors="replace"))
    results[args.label] = {
        "command": "PYTHONPATH=$PWD .venv/bin/python -m pytest -m slow -s tests/e2e/test_teacher_pool_e2e.py; then "
                   + " ".join(["bench/teacher_pool_step_time.py", *(argv or sys.argv[1:])]),
        "kind": "one run each, CPU, placeholder GPUs (1 student + 1 teacher), 2 shared cores; step 1 includes warm-up",
        "colocated": colocated, "pool": pool, "pool_over_colocated": compare(colocated, pool)}
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results[args.label]["pool_over_colocated"], indent=2))


if __name__ == "__main__":
    main()
