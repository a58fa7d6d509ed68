"""The embedded CPU demo: the whole OPD story on a CPU machine, no downloads.

    python -m opd_verl.demo [--steps N] [--cache-dir D] [--rebuild] [--out DIR]

1. build (once; cached under --cache-dir, default $OPD_VERL_CACHE or ~/.cache/opd_verl/demo, in a directory keyed
   by a hash of the build settings): a synthetic GSM8K-format arithmetic task (opd_verl.demo_task), a tokenizer
   (opd_verl.tiny_models.build_tokenizer), a TEACHER trained here by SFT (opd_verl.sft) to >= 90% greedy accuracy
   on the val split, and a smaller STUDENT given a short SFT phase (it knows the format, but is clearly weaker);
2. OPD: `python -m opd_verl.main_opd` with recipes/demo_cpu.yaml (student = actor, teacher in the reference
   role, reverse KL per token as the advantage), verl's per-step metrics on the console and in a JSONL file;
3. evaluation on the test split (opd_verl.evaluate): greedy accuracy, avg@k and pass@k of the teacher and of the
   student before and after OPD, the "gap closed" = (after - before) / (teacher - before), and a PNG plot of the
   per-token KL (distill/kl_per_token) and accuracy per step.

Outputs (--out, default ./opd_demo): opd.log (the trainer's output), metrics.jsonl (verl's file logger),
results.json, opd_demo.png.
"""

from __future__ import annotations

import argparse
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
from dataclasses import asdict, dataclass, field
from pathlib import Path

from opd_verl.demo_task import TaskSettings, build_task, settings_hash, tokenizer_words
from opd_verl.sft import SFTConfig

#: Bump when the build procedure changes in a way the settings do not show (invalidates caches).
BUILD_VERSION = 2
PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent
RECIPE = "demo_cpu"
#: sequences per `generate` call in the evaluation (tiny models: large batches are cheap, calls are not)
EVAL_BATCH = 1024

# --------------------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    hidden_size: int
    num_layers: int
    intermediate_size: int | None = None
    head_dim: int = 64  # vLLM's CPU attention rejects 16
    seed: int = 0


@dataclass(frozen=True)
class BuildSettings:
    task: TaskSettings = TaskSettings()
    teacher: ModelSpec = ModelSpec(hidden_size=128, num_layers=2, seed=1)
    teacher_sft: SFTConfig = SFTConfig(steps=1500, batch_size=64, lr=3e-3, warmup_steps=30, eval_every=100, target=0.95)
    # the teacher must reach this greedy accuracy on the val split (else the build says so loudly)
    teacher_min_accuracy: float = 0.9
    student: ModelSpec = ModelSpec(hidden_size=64, num_layers=2, seed=2)
    # a short SFT phase: stop once the student has the format and some arithmetic (>= target on val)
    student_sft: SFTConfig = SFTConfig(steps=600, batch_size=64, lr=3e-3, warmup_steps=30, eval_every=10, target=0.3)
    # validation prompts used during the build (greedy accuracy)
    val_prompts: int = 300
    version: int = BUILD_VERSION

    def as_dict(self) -> dict:
        return asdict(self)

    def key(self) -> str:
        return settings_hash(self.as_dict())


DEFAULT_SETTINGS = BuildSettings()


def default_cache_dir() -> Path:
    return Path(os.environ.get("OPD_VERL_CACHE") or "~/.cache/opd_verl/demo").expanduser()


def _log(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def pick_threads() -> int:
    """Torch threads for the build: all cores on an idle machine, 1 on a busy one (OpenMP threads that wait for a
    descheduled sibling make a 2-thread step several times slower than a 1-thread one under contention)."""
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = 0.0
    return cores if load < 0.75 * cores else 1


# --------------------------------------------------------------------------------------------------------------
# Build: task, tokenizer, teacher, student
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Built:
    root: str
    data: dict[str, str]
    teacher: str
    student: str
    info: dict = field(default_factory=dict)
    cached: bool = False


def _train_model(name, spec: ModelSpec, sft: SFTConfig, tokenizer, train_rows, val_rows, out_dir, log):
    from opd_verl.evaluate import EvalRow, greedy_accuracy
    from opd_verl.sft import train_sft
    from opd_verl.tiny_models import build_qwen2, save_model_dir

    model = build_qwen2(
        tokenizer,
        hidden_size=spec.hidden_size,
        num_layers=spec.num_layers,
        seed=spec.seed,
        head_dim=spec.head_dim,
        intermediate_size=spec.intermediate_size,
        max_position_embeddings=512,
    )
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{name}: Qwen2 hidden {spec.hidden_size}, {spec.num_layers} layers, {n_params / 1e6:.2f}M parameters; "
        f"SFT up to {sft.steps} steps x {sft.batch_size} examples")
    rows = [EvalRow([{"role": "user", "content": r["prompt"]}], r["extra_info"]["answer"].rsplit("#### ", 1)[-1],
                    r["data_source"]) for r in val_rows]
    evaluate = lambda step: greedy_accuracy(model, tokenizer, rows)  # noqa: E731
    start, cpu = time.monotonic(), time.process_time()
    result = train_sft(model, tokenizer, [r["prompt"] for r in train_rows], [r["response"] for r in train_rows], sft,
                       eval_fn=evaluate, log=lambda m: log(m), tag=name)
    seconds, cpu_seconds = time.monotonic() - start, time.process_time() - cpu
    accuracy = result.evals[-1][1]
    save_model_dir(out_dir, tokenizer, model)
    log(f"{name}: val greedy accuracy {100 * accuracy:.1f}% after {result.steps} steps "
        f"({seconds:.0f}s wall, {cpu_seconds:.0f}s CPU)")
    return {
        "path": str(out_dir),
        "params": n_params,
        "steps": result.steps,
        "val_accuracy": accuracy,
        "evals": result.evals,
        "final_loss": result.final_loss,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
    }


def build(settings: BuildSettings = DEFAULT_SETTINGS, cache_dir: str | os.PathLike | None = None,
          rebuild: bool = False, log=_log) -> Built:
    """Build (or reuse) the task, teacher and student under CACHE/<hash of settings>; returns their paths."""
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    root = cache / settings.key()
    info_path = root / "build.json"
    if info_path.is_file() and not rebuild:
        info = json.loads(info_path.read_text())
        log(f"build: cached in {root} (built in {info['seconds']:.0f}s; --rebuild to redo)")
        return Built(str(root), info["data"], info["teacher"]["path"], info["student"]["path"], info, cached=True)

    import pyarrow.parquet as pq
    import torch

    threads = pick_threads()
    torch.set_num_threads(threads)
    tmp = cache / f".{settings.key()}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    log(f"build: {tmp.name} -> {root} (torch threads: {threads})")
    start = time.monotonic()

    t0 = time.monotonic()
    data = build_task(tmp / "data", settings.task)
    counts = {s: pq.read_metadata(data[s]).num_rows for s in ("train", "val", "test")}
    task_seconds = time.monotonic() - t0
    log(f"task: {counts['train']} train / {counts['val']} val / {counts['test']} test problems ({task_seconds:.1f}s)")

    from opd_verl.tiny_models import build_tokenizer

    tokenizer = build_tokenizer(words=("####",) + tokenizer_words(), model_max_length=512)
    tokenizer.save_pretrained(tmp / "tokenizer")
    train_rows = pq.read_table(data["sft_train"]).to_pylist()
    val_rows = pq.read_table(data["sft_val"]).to_pylist()[: settings.val_prompts]

    teacher = _train_model("teacher", settings.teacher, settings.teacher_sft, tokenizer, train_rows, val_rows,
                           tmp / "teacher", log)
    if teacher["val_accuracy"] < settings.teacher_min_accuracy:
        log(f"WARNING: the teacher reached only {100 * teacher['val_accuracy']:.1f}% < "
            f"{100 * settings.teacher_min_accuracy:.0f}% on val; the demo goes on with it")
    student = _train_model("student", settings.student, settings.student_sft, tokenizer, train_rows, val_rows,
                           tmp / "student", log)
    seconds = time.monotonic() - start
    final = {k: v.replace(str(tmp), str(root)) for k, v in data.items()}
    teacher["path"] = str(root / "teacher")
    student["path"] = str(root / "student")
    info = {
        "settings": settings.as_dict(),
        "key": settings.key(),
        "data": final,
        "counts": counts,
        "teacher": teacher,
        "student": student,
        "task_seconds": task_seconds,
        "seconds": seconds,
        "threads": threads,
    }
    (tmp / "build.json").write_text(json.dumps(info, indent=2))
    if root.exists():  # --rebuild (or a concurrent build finished first): the new build replaces it
        shutil.rmtree(root)
    os.replace(tmp, root)
    log(f"build: done in {seconds:.0f}s (teacher {100 * teacher['val_accuracy']:.1f}%, "
        f"student {100 * student['val_accuracy']:.1f}% greedy on val)")
    return Built(str(root), final, teacher["path"], student["path"], info)


# --------------------------------------------------------------------------------------------------------------
# OPD run
# --------------------------------------------------------------------------------------------------------------


def recipe_dir() -> Path:
    """The directory holding recipes/ (the repository root)."""
    path = REPO_DIR / "recipes" / f"{RECIPE}.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: run the demo from a source checkout of opd_verl (the recipes live in the repository)"
        )
    return REPO_DIR


def opd_command(built: Built, out: Path, steps: int, test_freq: int, extra: list[str] = (),
                save_freq: int | None = None) -> list[str]:
    """`python -m opd_verl.main_opd` with recipes/demo_cpu.yaml and the demo's paths; the actor is saved at the
    last step unless `save_freq` says otherwise (-1: never)."""
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
    return [sys.executable, "-m", "opd_verl.main_opd", "--config-dir", str(recipe_dir()), f"+recipes={RECIPE}",
            *overrides, *extra]


_STEP_LINE = re.compile(r"step:(\d+) - ")


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, the run's own process group (the driver, its Ray processes, vLLM)."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.3)


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
                    _kill_group(proc)
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
            _kill_group(proc)
            proc.wait()
    seconds = time.monotonic() - start
    return {"returncode": proc.returncode, "timed_out": timed_out, "stalled": stalled.is_set(), "seconds": seconds,
            "seconds_to_first_step": first_step, "log": str(log_path), "metrics": str(metrics_path)}


# "key:value" or "key:np.float64(value)" in verl's console lines
_METRIC = re.compile(r"([\w/@.\-]+):(?:np\.\w+\()?(-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)")

_SHOWN = (
    ("distill/kl_per_token", "kl/token"),
    ("critic/score/mean", "sample acc"),
    ("actor/pg_loss", "pg_loss"),
    ("timing_s/step", "step s"),
)


def _summarize_step(line: str) -> str:
    match = _STEP_LINE.search(line)
    parts = [f"step {match.group(1)}"]
    metrics = {k: float(v) for k, v in _METRIC.findall(line[match.start():])}
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


# --------------------------------------------------------------------------------------------------------------
# Plot (Pillow, which vLLM and transformers' image stack already install)
# --------------------------------------------------------------------------------------------------------------


def _nice_ceil(value: float) -> float:
    """The smallest of 1, 1.2, 1.6, 2, 2.4, 3, 4, 5, 6, 8 (x 10^k) that is >= value: axis tops with round quarters."""
    import math

    scale = 10 ** math.floor(math.log10(value))
    for mantissa in (1.0, 1.2, 1.6, 2.0, 2.4, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0):
        if mantissa * scale >= value - 1e-12:
            return mantissa * scale
    return 10 * scale


def plot_metrics(metrics: dict[int, dict[str, float]], path: str | os.PathLike, title: str = "OPD demo",
                 references: dict[str, float] | None = None) -> str:
    """PNG with two panels: per-token KL (distill/kl_per_token) and accuracy (training samples, val greedy), with
    `references` ({label: accuracy}, e.g. the teacher's) as dashed horizontal lines in the accuracy panel."""
    kl = sorted((s, m["distill/kl_per_token"]) for s, m in metrics.items() if "distill/kl_per_token" in m)
    train_acc = sorted((s, m["critic/score/mean"]) for s, m in metrics.items() if "critic/score/mean" in m)
    vkey = val_accuracy_key(metrics)
    val_acc = sorted((s, m[vkey]) for s, m in metrics.items() if vkey and vkey in m)
    panels = [
        ("reverse KL per token (distill/kl_per_token)", [("kl/token", kl, (200, 60, 40))], None, None),
        ("accuracy", [("sampled (train, T=1)", train_acc, (40, 110, 200)),
                      ("greedy (val)", val_acc, (30, 150, 60))], (0.0, 1.0), references),
    ]
    return plot_panels(panels, path, title)


def plot_panels(panels, path: str | os.PathLike, title: str) -> str:
    """PNG of stacked line-chart panels sharing the step axis. Each panel is (name, series, yrange, references):
    series = [(label, [(step, value), ...], (r, g, b))]; yrange = (lo, hi) or None (from 0 to a round top);
    references = {label: value} drawn as dashed horizontal lines, or None."""
    from PIL import Image, ImageDraw, ImageFont

    width, height, margin = 900, 360 * len(panels), 70
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    try:
        font = ImageFont.load_default(size=14)
        big = ImageFont.load_default(size=18)
    except TypeError:  # Pillow < 10.1
        font = big = ImageFont.load_default()
    draw.text((margin, 12), title, fill="black", font=big)
    all_steps = [s for _, series, _, _ in panels for _, pts, _ in series for s, _ in pts] or [0, 1]
    x0, x1 = min(all_steps), max(max(all_steps), min(all_steps) + 1)
    panel_h = (height - 60) // len(panels)
    for index, (name, series, yrange, refs) in enumerate(panels):
        top = 50 + index * panel_h + 20
        bottom = top + panel_h - 70
        left, right = margin, width - 30
        values = [v for _, pts, _ in series for _, v in pts]
        if yrange is None:
            lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
            lo = min(lo, 0.0)
            hi = _nice_ceil(max(hi, lo + 1e-6) * 1.02)
        else:
            lo, hi = yrange
        draw.rectangle([left, top, right, bottom], outline="black")
        draw.text((left, top - 20), name, fill="black", font=font)
        for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
            y = bottom - frac * (bottom - top)
            value = lo + frac * (hi - lo)
            draw.line([left - 4, y, left, y], fill="black")
            if 0 < frac < 1:
                draw.line([left + 1, y, right - 1, y], fill=(225, 225, 225))
            draw.text((5, y - 8), f"{value:.2f}", fill="black", font=font)
        for i in range(6):
            step = x0 + (x1 - x0) * i / 5
            x = left + (step - x0) / (x1 - x0) * (right - left)
            draw.line([x, bottom, x, bottom + 4], fill="black")
            draw.text((x - 8, bottom + 6), f"{step:.0f}", fill="black", font=font)
        draw.text(((left + right) // 2 - 15, bottom + 24), "step", fill="black", font=font)
        legend_x = left + int(draw.textlength(name, font=font)) + 40  # legend on the panel's title line
        for label, value in (refs or {}).items():
            if lo <= value <= hi:
                y = bottom - (value - lo) / (hi - lo) * (bottom - top)
                for xs in range(left, right, 12):
                    draw.line([xs, y, min(xs + 6, right), y], fill=(120, 120, 120), width=2)
                draw.text((right - 10 - draw.textlength(label, font=font), y + 4), label, fill=(90, 90, 90), font=font)
        for label, pts, color in series:
            xy = [(left + (s - x0) / (x1 - x0) * (right - left), bottom - (v - lo) / (hi - lo) * (bottom - top))
                  for s, v in pts]
            if len(xy) > 1:
                draw.line(xy, fill=color, width=2)
            for x, y in xy:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
            draw.line([legend_x, top - 11, legend_x + 20, top - 11], fill=color, width=3)
            draw.text((legend_x + 25, top - 20), label, fill="black", font=font)
            legend_x += 40 + int(draw.textlength(label, font=font))
    path = os.fspath(path)
    image.save(path)
    return path


# --------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------


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
    parser.add_argument("--steps", type=int, default=50, help="OPD training steps (default %(default)s)")
    parser.add_argument("--test-freq", type=int, default=25, help="validate every N steps (default %(default)s)")
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
    cmd = opd_command(built, out, args.steps, args.test_freq, args.overrides)
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
    print("== OPD demo ==")
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
              "student_after": after, "steps": args.steps}
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str))
    print(f"results: {out / 'results.json'}")
    return 0 if after is not None else 1


if __name__ == "__main__":
    sys.exit(main())
