"""The CPU demo's build: a synthetic GSM8K-format task, a tokenizer, a teacher trained here by SFT and a weaker
student, cached under a directory keyed by a hash of the build settings (see opd_verl.demo.main for the story)."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from opd_verl.demo.sft import SFTConfig
from opd_verl.demo.task import TaskSettings, build_task, settings_hash, tokenizer_words

#: Bump when the build procedure changes in a way the settings do not show (invalidates caches).
BUILD_VERSION = 2
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
    from opd_verl.demo.sft import train_sft
    from opd_verl.demo.tiny_models import build_qwen2, save_model_dir

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

    from opd_verl.demo.tiny_models import build_tokenizer

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
