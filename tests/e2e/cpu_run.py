"""Helpers of the CPU end-to-end tests: a tiny real dataset in verl's parquet format, a tiny model directory, a
custom reward that varies on a random model, and `python -m opd_verl.main_opd` as a bounded subprocess.

Usable by hand too:  python tests/e2e/cpu_run.py WORKDIR   (writes data, model, reward; prints the command)
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from opd_verl.demo.runs import kill_process_group, line_metrics

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
RUN_TAG_ENV = "OPD_VERL_E2E_RUN"  # set by start_main in each run's environment, inherited by all its processes

# A reward that varies for a random model (GSM8K's exact-match scores 0 and makes GRPO's loss 0): the fraction
# of digits in the response.
REWARD_SOURCE = '''
def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
    if not solution_str:
        return 0.0
    return sum(ch.isdigit() for ch in solution_str) / len(solution_str)
'''


def write_dataset(directory: str | os.PathLike, n_train: int = 32, n_val: int = 8, seed: int = 0,
                  data_sources: tuple[str, ...] = ("opd_cpu_arith",)) -> tuple[str, str]:
    """Arithmetic prompts in verl's RL parquet format (rows take the data_sources in turn); returns
    (train_path, val_path)."""
    import pandas as pd

    rng = random.Random(seed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, n in (("train", n_train), ("test", n_val)):
        rows = []
        for index in range(n):
            a, b = rng.randint(1, 20), rng.randint(1, 20)
            op = rng.choice("+-*")
            answer = {"+": a + b, "-": a - b, "*": a * b}[op]
            rows.append(
                {
                    "data_source": data_sources[index % len(data_sources)],
                    "prompt": [{"role": "user", "content": f"What is {a} {op} {b}? Answer after ####."}],
                    "ability": "math",
                    "reward_model": {"style": "rule", "ground_truth": str(answer)},
                    "extra_info": {"split": split, "index": index},
                }
            )
        path = directory / f"{split}.parquet"
        pd.DataFrame(rows).to_parquet(path)
        paths.append(str(path))
    return paths[0], paths[1]


def math_row(index: int, split: str, rng: random.Random) -> dict:
    """A GSM8K-style row (openai/gsm8k: the math reward reads the number after ####)."""
    from opd_verl.rewards import GSM8K

    a, b = rng.randint(1, 20), rng.randint(1, 20)
    return {"data_source": GSM8K, "prompt": [{"role": "user", "content": f"What is {a} + {b}? Answer after ####."}],
            "ability": "math", "reward_model": {"style": "rule", "ground_truth": str(a + b)},
            "extra_info": {"split": split, "index": index}}


def code_row(index: int, split: str, tests: list[str], data_source: str | None = None, module: str = "") -> dict:
    """A code row as data_preprocess/mbpp.py (or kodcode.py, with ``module``) writes it: the code reward's JSON
    ground truth with ``tests`` run after the completion in the sandbox (``module``: the completion is written to
    <module>.py and the tests run whatever it holds)."""
    from opd_verl.rewards import MBPP
    from opd_verl.rewards.code import code_ground_truth

    content = "Write add(a, b) in Python: the sum of a and b."
    return {"data_source": data_source or MBPP, "prompt": [{"role": "user", "content": content}], "ability": "code",
            "reward_model": {"style": "rule", "ground_truth": code_ground_truth(tests, module=module)},
            "extra_info": {"split": split, "index": index}}


#: IFEval instructions a random response can follow (no nltk data needed): no comma, lower case, a word limit.
IFEVAL_INSTRUCTIONS = (("punctuation:no_comma", {}), ("change_case:english_lowercase", {}),
                       ("length_constraints:number_words", {"relation": "less than", "num_words": 20}))


def ifeval_row(index: int, split: str) -> dict:
    """An IFEval row as data_preprocess/ifeval.py writes it (google/IFEval: lm-eval's instruction checks)."""
    from opd_verl.rewards import IFEVAL
    from opd_verl.rewards.ifeval import ifeval_ground_truth

    ids, kwargs = zip(*IFEVAL_INSTRUCTIONS[: 1 + (index // 3) % len(IFEVAL_INSTRUCTIONS)])  # 1, 2, 3 instructions
    prompt = "Describe a cat: no commas, lower case."
    return {"data_source": IFEVAL, "prompt": [{"role": "user", "content": prompt}], "ability": "instruction",
            "reward_model": {"style": "rule", "ground_truth": ifeval_ground_truth(prompt, list(ids), list(kwargs))},
            "extra_info": {"split": split, "index": index}}


ADD_TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]


def write_task_dataset(directory: str | os.PathLike, n_train: int = 15, n_val: int = 6, seed: int = 0,
                       extra_train_rows: list[dict] = ()) -> tuple[str, str]:
    """Math, code and instruction-following rows in turn (verl's parquet; each task's own data_source and ground
    truth, scored by opd_verl.rewards), ``extra_train_rows[k]`` after the k-th (math, code, instruction) triple
    of the training rows (with data.shuffle=False and batches of 4, one in each batch); returns
    (train_path, val_path)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, n, extra in (("train", n_train, list(extra_train_rows)), ("test", n_val, [])):
        makers = (lambda i: math_row(i, split, rng), lambda i: code_row(i, split, ADD_TESTS), lambda i: ifeval_row(i, split))
        rows = []
        for i in range(n):
            rows.append(makers[i % 3](i))
            if i % 3 == 2 and extra:
                rows.append(extra.pop(0))
        rows += extra
        path = directory / f"{split}.parquet"
        # the tasks' extra_info / reward_model fields merged as data_preprocess/multitask.py merges them
        pq.write_table(pa.concat_tables([pa.Table.from_pylist([r]) for r in rows], promote_options="permissive"), path)
        paths.append(str(path))
    return paths[0], paths[1]


def write_reward(directory: str | os.PathLike) -> str:
    path = Path(directory) / "digit_reward.py"
    path.write_text(REWARD_SOURCE)
    return str(path)


def write_model(directory: str | os.PathLike, hidden_size: int = 128, num_layers: int = 2, seed: int = 0, **kw) -> str:
    """A tiny model directory (opd_verl.demo.tiny_models.build_model_dir; `kw` e.g. family="qwen3")."""
    from opd_verl.demo.tiny_models import build_model_dir

    return build_model_dir(directory, hidden_size=hidden_size, num_layers=num_layers, seed=seed, **kw)


@dataclass
class Workdir:
    root: Path
    model: str
    train: str
    val: str
    reward: str


def prepare_workdir(root: str | os.PathLike) -> Workdir:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    train, val = write_dataset(root / "data")
    return Workdir(root, write_model(root / "model"), train, val, write_reward(root))


def add_routed_teachers(w: Workdir) -> Workdir:
    """Two teachers of other weights (w.teacher, w.teacher_b) and a dataset of two data_sources (arith_a, arith_b:
    w.routed_train / w.routed_val), with w.routes: opd.teachers routing each data_source to its own teacher."""
    w.teacher = write_model(w.root / "teacher", hidden_size=256, num_layers=2, seed=1)
    w.teacher_b = write_model(w.root / "teacher_b", hidden_size=128, num_layers=2, seed=3)
    w.routed_train, w.routed_val = write_dataset(w.root / "routed_data", data_sources=("arith_a", "arith_b"))
    w.routes = f"[{{path:{w.teacher},data_source:arith_a}},{{path:{w.teacher_b},data_source:[arith_b]}}]"
    return w


def grpo_overrides(w: Workdir, **extra) -> list[str]:
    """A small GRPO run; only `trainer.device=cpu` is CPU-specific (the plugin applies the rest)."""
    overrides = {
        "trainer.device": "cpu",
        "algorithm.adv_estimator": "grpo",
        "data.train_files": w.train,
        "data.val_files": w.val,
        "data.train_batch_size": 4,
        "data.val_batch_size": 8,
        "data.max_prompt_length": 64,
        "data.max_response_length": 16,
        "data.dataloader_num_workers": 0,
        "actor_rollout_ref.model.path": w.model,
        "actor_rollout_ref.rollout.name": "vllm",
        "actor_rollout_ref.rollout.n": 4,
        "actor_rollout_ref.actor.ppo_mini_batch_size": 4,
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu": 16,
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu": 16,
        "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu": 16,
        "actor_rollout_ref.actor.optim.lr": 1e-4,
        "reward.custom_reward_function.path": w.reward,
        "reward.custom_reward_function.name": "compute_score",
        "trainer.logger": "['console']",
        "trainer.project_name": "opd_cpu_e2e",
        "trainer.experiment_name": "grpo",
        "trainer.default_local_dir": str(w.root / "checkpoints"),
        "trainer.total_training_steps": 2,
        "trainer.val_before_train": False,
        "trainer.test_freq": -1,
        "trainer.save_freq": -1,
    }
    overrides.update(extra)
    return [f"{k}={v}" for k, v in overrides.items()]


@dataclass
class RunResult:
    returncode: int
    seconds: float
    log: str
    timed_out: bool


def start_main(overrides: list[str], log_path: str | os.PathLike, env: dict | None = None) -> subprocess.Popen:
    """Start `python -m opd_verl.main_opd OVERRIDES` in a new session, output to `log_path`. The driver, Ray's GCS and
    raylet share its process group; Ray's workers (and vLLM in them) make their own groups and end when the raylet
    does. All carry the run's tag (run_processes). The caller waits and kills (see run_main, sigkill_run)."""
    cmd = [PYTHON, "-m", "opd_verl.main_opd", *overrides]
    tag = f"{os.getpid()}-{time.time_ns()}"
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", RUN_TAG_ENV: tag, **(env or {})}
    full_env.pop("RAY_ADDRESS", None)
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=str(REPO), stdout=log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True)
    proc.run_tag = tag
    return proc


def run_main(overrides: list[str], log_path: str | os.PathLike, timeout: float, env: dict | None = None) -> RunResult:
    """`python -m opd_verl.main_opd OVERRIDES` in its own process group; killed (group) after `timeout` s."""
    start = time.monotonic()
    timed_out = False
    proc = start_main(overrides, log_path, env)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        kill_process_group(proc, grace=10)
    finally:
        kill_process_group(proc, grace=5)  # what is left of the group after a normal exit
    return RunResult(proc.returncode, time.monotonic() - start, Path(log_path).read_text(errors="replace"), timed_out)


def run_processes(proc: subprocess.Popen) -> set[int]:
    """The live processes of a run started by start_main, found by the tag in their environment: Ray's workers
    start their own process groups and outlive their parents' links, so neither identifies them all."""
    needle = f"{RUN_TAG_ENV}={proc.run_tag}".encode()
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit() and is_alive(int(entry)):
            try:
                if needle in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                    found.add(int(entry))
            except OSError:
                pass
    return found


def is_alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped, does not count)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def describe(pid: int) -> str:
    try:
        return f"{pid}: " + Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:200]
    except OSError:
        return f"{pid}: (gone)"


def sigkill_run(proc: subprocess.Popen, wait: float = 30) -> list[str]:
    """SIGKILL a run started by start_main as a crash would: its process group (the driver, Ray's GCS and raylet,
    which take Ray's workers and vLLM down with them). Returns the processes of the run still alive after `wait`
    s; those are then killed one by one."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=wait)
    deadline = time.monotonic() + wait
    while run_processes(proc) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = run_processes(proc)
    survivors = [describe(pid) for pid in sorted(left)]
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return survivors


def run_ok(w: Workdir, name: str, overrides: list[str], timeout: float) -> dict[int, dict[str, float]]:
    """run_main into W/NAME.log; asserts it neither hung nor failed; returns its console metrics per step."""
    result = run_main(overrides, w.root / f"{name}.log", timeout=timeout)
    assert not result.timed_out, f"{name} hung; log: {w.root / f'{name}.log'}"
    assert result.returncode == 0, result.log[-4000:]
    return console_metrics(result.log)


def console_metrics(text: str) -> dict[int, dict[str, float]]:
    """{step: {metric: value}} from verl's console output (what a run printed)."""
    steps: dict[int, dict[str, float]] = {}
    for line in text.splitlines():
        parsed = line_metrics(line)
        if parsed:
            steps.setdefault(parsed[0], {}).update(parsed[1])
    return steps


def float64_log_probs(model_dir, prompt, response):
    """log p(response_t | prompt, response_<t) under the HF model at model_dir, in float64 (models cached)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = float64_log_probs.cache.get(model_dir)
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float64).eval()
        float64_log_probs.cache[model_dir] = model
    ids = torch.cat([prompt, response]).view(1, -1)
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), -1)
    positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(response))
    return logp[positions, response]


float64_log_probs.cache = {}


if __name__ == "__main__":
    w = prepare_workdir(sys.argv[1])
    print(" ".join([PYTHON, "-m", "opd_verl.main_opd", *grpo_overrides(w)]))
