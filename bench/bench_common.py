"""Shared parts of the trainer benchmarks (bench/sample_efficiency.py, bench/step_overhead.py).

Both run the real trainer (`python -m opd_verl.main_opd` with recipes/demo_cpu.yaml, see opd_verl.demo) on the
embedded CPU task, once per method and seed, and read verl's per-step metrics from its file logger.

Methods (only the overrides listed here differ from recipes/demo_cpu.yaml):

* ``opd``  the recipe as it is: adv_estimator=opd (A_t = clip(q_t - s_t, -5, 5), the teacher in the reference
           role), policy_loss.loss_mode=importance_sampling.
* ``grpo`` algorithm.adv_estimator=grpo (group-normalised exact-match reward, opd_verl.rewards, the same reward
           function the recipe already logs as critic/score/mean), policy_loss.loss_mode=vanilla (verl's PPO clip
           loss, clip 0.2; one mini-batch per step, so the ratio is 1 and the clip is inactive, like the recipe's
           importance-sampling loss). No teacher is loaded (the opd: section is ignored without an OPD estimator).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from statistics import median

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
if str(REPO) not in sys.path:  # the source tree's opd_verl (as the trainer's processes import it)
    sys.path.insert(0, str(REPO))

#: Seconds without a new step after which a run counts as hung and is restarted. verl 0.9.1 names the IPC socket
#: of the actor -> vLLM weight sync /tmp/rl-colocate-zmq-<Ray job id>-replica-0-rank-0.sock, and the job id is
#: 01000000 in every freshly started Ray cluster: two verl runs on one host (separate Ray clusters) that sync
#: weights at the same moment connect to each other's socket and hang (vLLM worker: KeyError 'name' in
#: bucketed_weight_transfer._init_buffer). Hence the benches run one trainer at a time by default; runs of other
#: users of the machine can still collide with ours.
STALL_TIMEOUT = 600.0
METHODS = ("opd", "grpo")
GRPO_OVERRIDES = (
    "algorithm.adv_estimator=grpo",
    "actor_rollout_ref.actor.policy_loss.loss_mode=vanilla",
)


def method_overrides(method: str, seed: int | None = None, lr: float | None = None,
                     extra: tuple[str, ...] | list[str] = ()) -> list[str]:
    """Hydra overrides of `method` on top of recipes/demo_cpu.yaml (OPD: none; GRPO: GRPO_OVERRIDES); `seed` sets
    the prompt order (data.seed) and vLLM's sampling seed; `lr` the actor's learning rate."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; one of {', '.join(METHODS)}")
    out = list(GRPO_OVERRIDES) if method == "grpo" else []
    if seed is not None:
        out += [f"data.seed={seed}", f"actor_rollout_ref.rollout.seed={seed}"]
    if lr is not None:
        out.append(f"actor_rollout_ref.actor.optim.lr={lr:g}")
    out.append(f"trainer.experiment_name=bench_{method}" + (f"_seed{seed}" if seed is not None else ""))
    return out + list(extra)


def liger_available() -> str | None:
    """liger-kernel's version when importable (its chunked losses are pure torch: no triton needed), else None."""
    try:
        from importlib.metadata import version

        import liger_kernel.chunked_loss.jsd_loss  # noqa: F401
    except Exception:
        return None
    try:
        return version("liger-kernel")
    except Exception:
        return "unknown"


def liger_jsd_loss(beta: float, chunk_size: int, compiled: bool = True):
    """Liger-Kernel's chunked fused-linear JSD as a pure JSD (no hard loss), mean over tokens, our beta convention;
    called as ``loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels)``."""
    from liger_kernel.chunked_loss.jsd_loss import LigerFusedLinearJSDLoss

    return LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta, compiled=compiled,
                                   chunk_size=chunk_size)


def machine_info() -> dict:
    """Date, host, cores, load and library versions, for the JSON (every benchmark's "machine")."""
    cpu_model = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "loadavg": list(os.getloadavg()),
        "loadavg_at_start": list(os.getloadavg()),
    }
    try:  # the code measured: the commit, and whether the tree had changes on top of it
        repo = Path(__file__).resolve().parents[1]
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True)
        info["git_commit"] = head.stdout.strip() or None
        info["git_dirty"] = bool(dirty.stdout.strip()) if dirty.returncode == 0 else None
    except OSError:
        info["git_commit"] = info["git_dirty"] = None
    for module in ("torch", "verl", "vllm", "ray"):
        try:
            info[module] = __import__(module).__version__
        except Exception as err:  # noqa: BLE001 - a version we cannot read is recorded, not fatal
            info[module] = f"unavailable ({type(err).__name__})"
    return info


class LoadSampler:
    """Samples the 1-minute load average every `interval` seconds in a daemon thread (the machine is shared)."""

    def __init__(self, interval: float = 15.0):
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._t0 = time.monotonic()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.samples.append((round(time.monotonic() - self._t0, 1), os.getloadavg()[0]))
            self._stop.wait(self.interval)

    def __enter__(self) -> "LoadSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=1)

    def summary(self) -> dict:
        values = [v for _, v in self.samples]
        return {
            "interval_s": self.interval,
            "loadavg_1min_min": min(values) if values else None,
            "loadavg_1min_median": median(values) if values else None,
            "loadavg_1min_max": max(values) if values else None,
            "samples": self.samples,
        }


def run_trainer(built, out: Path, steps: int, test_freq: int, overrides: list[str], timeout: float, log,
                stall_timeout: float = STALL_TIMEOUT, retries: int = 1, recipe: str | None = None) -> dict:
    """One trainer run (no checkpoints) in OUT of recipes/<recipe>.yaml (default demo_cpu); returns run_opd's record
    plus the per-step metrics. A run that stalls (no step for `stall_timeout` s) is stopped and started again from
    scratch, up to `retries` times."""
    from opd_verl.demo.runs import RECIPE, opd_command, read_metrics, run_opd

    cmd = opd_command(built, out, steps, test_freq, overrides, save_freq=-1, recipe=recipe or RECIPE)
    for attempt in range(1, retries + 2):
        run = run_opd(cmd, out, timeout, log=log, label=out.name, stall_timeout=stall_timeout)
        if not run["stalled"]:
            break
        log(f"{out.name}: stalled (attempt {attempt}); see STALL_TIMEOUT in bench/bench_common.py")
    run["attempts"] = attempt
    run["command"] = cmd
    run["metrics_by_step"] = read_metrics(run["metrics"])
    return run


def output_paths(name: str, quick: bool, out: Path | None, work_dir: Path | None) -> tuple[str, str]:
    """(JSON path, run directory): bench/results/NAME[_quick].json and ~/.cache/opd_verl/bench/NAME[_quick]."""
    stem = f"{name}_quick" if quick else name
    return str(out or RESULTS / f"{stem}.json"), str(work_dir or Path("~/.cache/opd_verl/bench").expanduser() / stem)


def result_header(name: str, cfg: dict, info: dict, load: LoadSampler, **settings) -> dict:
    """The first keys of a result JSON: benchmark, command, machine, load during the runs, settings."""
    return {
        "benchmark": name,
        "command": " ".join(["python", f"bench/{name}.py", *cfg.get("argv", [])]),
        "machine": info,
        "load_during_runs": load.summary(),
        "settings": {**{k: v for k, v in cfg.items() if k not in ("out", "argv")}, "recipe": "recipes/demo_cpu.yaml",
                     **settings},
    }


def write_result(result: dict, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return out


def log_tail(path: str, lines: int = 20) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
