"""A main_opd run as a subprocess (the demo, the benchmarks and the e2e tests share it): the command for the demo
recipe, its own process group (killed as a whole), a stall watchdog, and verl's per-step metrics read back from its
console lines and file logger."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from opd_verl.demo.build import Built, _log

REPO_DIR = Path(__file__).resolve().parents[2]
#: the recipe of the benchmarks and e2e tests: pure OPD, the sampled token's reverse KL as the advantage
RECIPE = "demo_cpu"
#: the recipe `python -m opd_verl.demo` runs: demo_cpu + the full-vocabulary forward KL, 128 prompts x 1, 8 updates
#: per step, cosine lr
DEMO_RECIPE = "demo_cpu_forward_kl"


def recipe_dir(recipe: str = RECIPE) -> Path:
    """The directory holding recipes/ (the repository root)."""
    path = REPO_DIR / "recipes" / f"{recipe}.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: run the demo from a source checkout of opd_verl (the recipes live in the repository)"
        )
    return REPO_DIR


def opd_command(built: Built, out: Path, steps: int, test_freq: int, extra: list[str] = (),
                save_freq: int | None = None, recipe: str = RECIPE) -> list[str]:
    """`python -m opd_verl.main_opd` with recipes/<recipe>.yaml (default demo_cpu) and the demo's paths; the actor
    is saved at the last step unless `save_freq` says otherwise (-1: never)."""
    overrides = [
        f"actor_rollout_ref.model.path={built.student}",
        f"opd.teacher.path={built.teacher}",
        f"data.train_files={built.data['train']}",
        f"data.val_files={built.data['val']}",
        f"trainer.total_training_steps={steps}",
        f"trainer.test_freq={test_freq}",
        f"trainer.save_freq={steps if save_freq is None else save_freq}",
        "trainer.logger=['console','file']",
        f"trainer.default_local_dir={out / 'checkpoints'}",
        "actor_rollout_ref.actor.checkpoint.save_contents=['model','hf_model']",
        f"hydra.run.dir={out / 'hydra'}",
    ]
    return [sys.executable, "-m", "opd_verl.main_opd", "--config-dir", str(recipe_dir(recipe)), f"+recipes={recipe}",
            *overrides, *extra]


_STEP_LINE = re.compile(r"step:(\d+) - ")


def kill_process_group(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM, then (after `grace` s) SIGKILL, the process group a run was started in (start_new_session=True):
    the driver, Ray's GCS and raylet, vLLM. Returns when the group is gone."""
    try:
        pgid = os.getpgid(proc.pid) if proc.poll() is None else proc.pid
    except ProcessLookupError:
        pgid = proc.pid
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                proc.poll()
                return
            time.sleep(0.2)
    proc.poll()


def run_opd(cmd: list[str], out: Path, timeout: float, log=_log, label: str = "OPD",
            stall_timeout: float | None = None) -> dict:
    """Run the trainer in its own process group (so every process it starts can be ended with it); its output goes
    to OUT/opd.log, the per-step lines are echoed (prefixed by `label`). With `stall_timeout`, the run is stopped
    when no step line has come for that many seconds (a hung run: verl waits forever on a failed rollout server or
    weight sync). Returns timing and the exit status."""
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "opd.log"
    metrics_path = out / "metrics.jsonl"
    if metrics_path.exists():
        metrics_path.unlink()
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env["PYTHONUNBUFFERED"] = "1"
    env["VERL_FILE_LOGGER_PATH"] = str(metrics_path)
    # the source tree first: every process (Ray workers, vLLM) imports this copy of opd_verl
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_DIR), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    log(f"{label}: {' '.join(cmd[:6])} ... (full command and output: {log_path})")
    start = time.monotonic()
    first_step = None
    timed_out = False
    last_step = [start]
    stalled = threading.Event()
    with open(log_path, "w") as handle:
        handle.write("$ " + " ".join(cmd) + "\n")
        handle.flush()
        proc = subprocess.Popen(cmd, cwd=str(out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                text=True, errors="replace", bufsize=1, start_new_session=True)
        deadline = start + timeout

        def watchdog():
            while proc.poll() is None:
                if time.monotonic() - last_step[0] > stall_timeout:
                    stalled.set()
                    log(f"{label}: no step for {stall_timeout:.0f}s; stopping the run")
                    kill_process_group(proc)
                    return
                time.sleep(2)

        if stall_timeout:
            threading.Thread(target=watchdog, daemon=True).start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                handle.write(line)
                match = _STEP_LINE.search(line)
                if match:
                    last_step[0] = time.monotonic()
                    if first_step is None:
                        first_step = time.monotonic() - start
                    log(f"{label} {_summarize_step(line)} ({time.monotonic() - start:.0f}s)")
                elif "opd_verl: error" in line or "Error" in line.split(":", 1)[0]:
                    log(f"{label}: " + line.rstrip()[:300])
                if time.monotonic() > deadline:
                    timed_out = True
                    break
            if not timed_out:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            if timed_out:
                log(f"{label}: timed out after {timeout:.0f}s; stopping the run")
            kill_process_group(proc)
            proc.wait()
    seconds = time.monotonic() - start
    return {"returncode": proc.returncode, "timed_out": timed_out, "stalled": stalled.is_set(), "seconds": seconds,
            "seconds_to_first_step": first_step, "log": str(log_path), "metrics": str(metrics_path)}


_NUMBER = r"-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|nan|-?inf"
# "key:1.5" or, for numpy scalars, "key:np.float64(1.5)", in verl's console lines "step:N - key:value - ..."
_METRIC = re.compile(r"([A-Za-z_][\w/@.\-]*):\s*(?:np\.\w+\()?(" + _NUMBER + r")\)?")


def line_metrics(line: str) -> tuple[int, dict[str, float]] | None:
    """(step, {metric: value}) of one console line of verl's, or None for any other line."""
    match = _STEP_LINE.search(line)
    if not match:
        return None
    return int(match.group(1)), {k: float(v) for k, v in _METRIC.findall(line[match.start():])}


_SHOWN = (
    ("opd/kl_per_token", "kl/token"),
    ("critic/score/mean", "sample acc"),
    ("actor/pg_loss", "pg_loss"),
    ("timing_s/step", "step s"),
)


def _summarize_step(line: str) -> str:
    step, metrics = line_metrics(line)
    parts = [f"step {step}"]
    for key, label in _SHOWN:
        if key in metrics:
            parts.append(f"{label} {metrics[key]:.3f}")
    vkey = val_accuracy_key({0: metrics})
    if vkey:
        parts.append(f"val acc (greedy) {metrics[vkey]:.3f}")
    return ", ".join(parts)


def read_metrics(path: str | os.PathLike) -> dict[int, dict[str, float]]:
    """{step: {metric: value}} from verl's file logger (one JSON object per log call: {"step", "data"})."""
    steps: dict[int, dict[str, float]] = {}
    if not os.path.isfile(path):
        return steps
    with open(path) as handle:
        for line in handle:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            data = steps.setdefault(int(record.get("step", 0)), {})
            for key, value in (record.get("data") or {}).items():
                if isinstance(value, (int, float)):
                    data[key] = float(value)
    return steps


def val_accuracy_key(metrics: dict[int, dict[str, float]]) -> str | None:
    """verl's validation accuracy metric (val-core/<data_source>/acc/mean@1; else a reward mean)."""
    keys = sorted({k for m in metrics.values() for k in m if k.startswith("val-")})
    for pattern in (r"^val-core/.*/acc/mean@1$", r"^val-core/.*/acc/mean@\d+$", r"^val-core/.*/reward/mean@\d+$",
                    r"^val-.*/reward/mean@1$"):
        for key in keys:
            if re.match(pattern, key):
                return key
    return None


def find_final_actor(out: Path, student_dir: str) -> str | None:
    """The HF directory of the last saved actor (global_step_N/actor/huggingface), with the tokenizer files."""
    candidates = sorted(
        glob.glob(str(out / "checkpoints" / "global_step_*" / "actor" / "huggingface")),
        key=lambda p: int(re.search(r"global_step_(\d+)", p).group(1)),
    )
    if not candidates:
        return None
    path = Path(candidates[-1])
    if not (path / "model.safetensors").exists() and not glob.glob(str(path / "*.safetensors")):
        return None
    copy_tokenizer_files(student_dir, path)
    return str(path)


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy the tokenizer files (and chat template) of model directory ``src`` into ``dst``, keeping any there."""
    for name in os.listdir(src):
        if name.startswith("tokenizer") or name in ("special_tokens_map.json", "vocab.json", "merges.txt",
                                                    "added_tokens.json", "chat_template.jinja"):
            if not (Path(dst) / name).exists():
                shutil.copy(os.path.join(src, name), Path(dst) / name)
