"""Every GPU recipe in recipes/ rehearsed on CPU as written: the real trainer, 2 steps, 2 ranks.

Each run overrides only what this machine cannot have (`rehearsal_overrides`, printed by the test): the models (tiny
ones of the recipe's architecture family, built here; a routed recipe's teachers one each, on the same
data_sources; a LoRA rank scaled down), the data (tiny parquet of the same schema; a code, IFEval or multi-task
recipe's: math, code and IFEval rows, each scored by its own reward), the sizes (batch, lengths, token budgets of ~2 sequences), GPUs per node (2 placeholders) and the device.
Every other key stays the recipe's: packed rows (use_remove_padding), token-budget micro-batches (use_dynamic_bsz),
the bf16 teacher, the supports, LoRA, the rollout's tensor parallel size. The test checks that the CPU defaults
rewrote none of the recipe's keys, that both steps ran, the alignment statistic, and that every sample's student
and teacher (routed: its data_source's) log-probs of step 1 equal a float64 recomputation with HF (the teacher's weights rounded to bf16 where
the recipe loads it in bf16).

The SFT recipe (entry point verl.trainer.sft_trainer) runs under torchrun on 2 CPU processes (gloo) with the same
kind of overrides, plus opd_cpu_varlen for flash attention (there is no main_opd to apply the CPU defaults); its
check: both steps, a finite loss, and a phase-2 student (the checkpoint's huggingface model) that loads and differs
from the start.

The quickstart's recipe (examples/quickstart_gpu.sh) runs in the default suite; the others are `slow`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
import yaml

from cpu_run import REPO, console_metrics, run_main, write_dataset, write_model, write_task_dataset

pytestmark = pytest.mark.e2e

TIMEOUT = 600
RECIPES_DIR = REPO / "recipes"
PROMPT_LEN, RESPONSE_LEN, BATCH, LORA_RANK = 64, 32, 4, 8
TOKEN_BUDGETS = ("actor_rollout_ref.actor.ppo_max_token_len_per_gpu",
                 "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu",
                 "actor_rollout_ref.ref.log_prob_max_token_len_per_gpu")
STUDENT, TEACHER = "actor_rollout_ref.model.path", "opd.teacher.path"
TOLERANCE = 1e-4  # nats: fp32 compute is ~1e-6 off float64; bf16 compute would be ~1/32


def recipe(name: str) -> dict:
    return yaml.safe_load((RECIPES_DIR / f"{name}.yaml").read_text()) or {}


def get(tree: dict, key: str):
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


GPU_RECIPES = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml") if get(recipe(p.stem), "trainer.device") == "cuda")
SFT_ENTRY = re.compile(r"^# Entry point: verl\.trainer\.sft_trainer(\s|$)", re.M)  # as examples/run_recipe.sh reads it
SFT_RECIPES = [n for n in GPU_RECIPES if SFT_ENTRY.search((RECIPES_DIR / f"{n}.yaml").read_text())]
OPD_RECIPES = [n for n in GPU_RECIPES if n not in SFT_RECIPES]
QUICKSTART = re.search(r"^RECIPE=(\S+)$", (REPO / "examples" / "quickstart_gpu.sh").read_text(), re.M).group(1)


def family(name: str) -> str:
    """The recipe's architecture family, from its model names (a placeholder student path names none)."""
    names = f"{get(recipe(name), STUDENT)} {get(recipe(name), TEACHER)} {get(recipe(name), 'model.path')}".lower()
    return "qwen3" if "qwen3" in names else "qwen2"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{family: (student, teacher)}: tiny models of each family, the teacher larger and of other weights."""
    root = tmp_path_factory.mktemp("rehearsal_models")
    return {f: (write_model(root / f / "student", hidden_size=128, seed=0, family=f),
                write_model(root / f / "teacher", hidden_size=256, seed=1, family=f))
            for f in sorted({family(n) for n in GPU_RECIPES})}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("rehearsal_data"))


#: data sets (~/data/<name>/) of code and instruction-following rows: their recipes rehearse on math, code and
#: IFEval rows (cpu_run.write_task_dataset: each task's own data_source and ground truth, scored by its reward)
TASK_DATA = {"mbpp", "humaneval", "kodcode", "ifeval", "multitask"}


def uses_task_data(name: str) -> bool:
    files = [get(recipe(name), "data.train_files"), get(recipe(name), "data.val_files")]
    return any(os.path.basename(os.path.dirname(str(f))) in TASK_DATA for f in files if f)


@pytest.fixture(scope="module")
def task_data(tmp_path_factory):
    return write_task_dataset(tmp_path_factory.mktemp("rehearsal_task_data"))


def routed_teachers(name: str, root) -> list[dict]:
    """The recipe's opd.teachers, each path replaced by a tiny teacher of its own weights (data_source kept)."""
    return [{**entry, "path": write_model(root / f"teacher{i}", hidden_size=256, seed=10 + i, family=family(name))}
            for i, entry in enumerate(get(recipe(name), "opd.teachers") or [])]


def teacher_of(teachers: list[dict], source: str) -> str:
    """The path of the routed teacher of a data_source (a name, a list of names, or "*")."""
    for entry in teachers:
        names = entry["data_source"] if isinstance(entry["data_source"], list) else [entry["data_source"]]
        if source in names:
            return entry["path"]
    return next(e["path"] for e in teachers if e["data_source"] == "*")


def rehearsal_overrides(name: str, models: dict, data: tuple[str, str], root) -> dict:
    """What this machine cannot have, and nothing else."""
    r = recipe(name)
    student, teacher = models[family(name)]
    train, mini = get(r, "data.train_batch_size"), get(r, "actor_rollout_ref.actor.ppo_mini_batch_size")
    overrides = {
        "trainer.device": "cpu",
        "trainer.n_gpus_per_node": 2,
        STUDENT: student,
        "data.train_files": data[0],
        "data.val_files": data[1],
        "data.max_prompt_length": PROMPT_LEN,
        "data.max_response_length": RESPONSE_LEN,
        "data.train_batch_size": BATCH,
        "actor_rollout_ref.actor.ppo_mini_batch_size": max(1, BATCH * mini // train),
        "trainer.total_training_steps": 2,
        "trainer.default_local_dir": str(root / "checkpoints"),
    }
    if get(r, TEACHER):
        overrides[TEACHER] = teacher
    if get(r, "opd.teachers"):
        overrides["opd.teachers"] = routed_teachers(name, root)
    if get(r, "actor_rollout_ref.model.lora_rank"):
        overrides["actor_rollout_ref.model.lora_rank"] = LORA_RANK
    for key in TOKEN_BUDGETS:
        if get(r, key) is not None:
            overrides[key] = 2 * (PROMPT_LEN + RESPONSE_LEN)
    return overrides


def hydra_value(value) -> str:
    """A Hydra override value: a list of {key: value} mappings (opd.teachers) in Hydra's syntax, else as is."""
    if isinstance(value, list):
        return "[" + ",".join("{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in e.items()) + "}" if isinstance(e, dict)
                              else f"'{e}'" for e in value) + "]"
    return f"'{value}'" if isinstance(value, str) and "/" in value and not value.startswith("/") else str(value)


def recipe_leaf_keys(node, prefix=""):
    if not isinstance(node, dict):
        return {prefix}
    return set().union(*[recipe_leaf_keys(v, f"{prefix}.{k}" if prefix else k) for k, v in node.items()])


def cpu_rewrites(log: str) -> dict[str, str]:
    """{key: new value} of the CPU defaults' printed changes (`opd_verl[cpu]: key=value (was X)`)."""
    return dict(re.findall(r"^opd_verl\[cpu\]: ([^=\s]+)=(.*) \(was .*\)$", log, re.M))


_REFERENCE_MODELS: dict = {}


def float64_log_probs(model_dir: str, bf16: bool, prompt, response):
    """log p(response_t | prompt, response_<t) under HF in float64; `bf16`: of the model rounded to bf16 first, its
    buffers too, as verl builds a model it loads in bf16 (`model_dtype: bf16`: the rotary inv_freq is bf16 there,
    1.8e-4 nats at these lengths if left in float32)."""
    from transformers import AutoModelForCausalLM

    key = (model_dir, bf16)
    if key not in _REFERENCE_MODELS:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        _REFERENCE_MODELS[key] = (model.to(torch.bfloat16) if bf16 else model).to(torch.float64).eval()
    ids = torch.cat([prompt, response]).view(1, -1)
    with torch.no_grad():
        logp = torch.log_softmax(_REFERENCE_MODELS[key](ids).logits[0].double(), -1)
    positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(response))
    return logp[positions, response]


def worst_log_prob_errors(saved: dict, student: str | None, teacher, teacher_bf16: bool) -> tuple[float, float]:
    """Max |Δ| over every sample's response tokens: the run's old_log_probs vs the student (None: not checked) and
    its ref_log_prob vs the teacher (a path, or a function of the sample's data_source: routed teachers), both in
    float64."""
    worst_s = worst_t = 0.0
    for i, (prompt, response) in enumerate(zip(saved["prompts"], saved["responses"])):
        n = int(saved["response_mask"][i].sum())
        if student is not None:
            s64 = float64_log_probs(student, False, prompt, response)
            worst_s = max(worst_s, float((saved["old_log_probs"][i, :n].double() - s64).abs().max()))
        path = teacher(saved["data_source"][i]) if callable(teacher) else teacher
        q64 = float64_log_probs(path, teacher_bf16, prompt, response)
        worst_t = max(worst_t, float((saved["ref_log_prob"][i, :n].double() - q64).abs().max()))
    return worst_s, worst_t


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n == QUICKSTART else pytest.mark.slow)
                                  for n in OPD_RECIPES])
def test_gpu_recipe_rehearsed_on_cpu_as_written(name, models, data, task_data, tmp_path):
    overrides = rehearsal_overrides(name, models, task_data if uses_task_data(name) else data, tmp_path)
    print(f"{name}: overrides {overrides}")
    dump = tmp_path / "dump"
    args = ["--config-dir", str(REPO), f"+recipes={name}", *(f"{k}={hydra_value(v)}" for k, v in overrides.items())]
    result = run_main(args, tmp_path / f"{name}.log", timeout=TIMEOUT, env={"OPD_VERL_DUMP_TOKENS": str(dump)})
    assert not result.timed_out, f"{name} hung: {tmp_path / f'{name}.log'}"
    assert result.returncode == 0, result.log[-5000:]

    rewritten = set(cpu_rewrites(result.log)) & recipe_leaf_keys(recipe(name))
    assert not rewritten, f"the CPU defaults rewrote the recipe's {sorted(rewritten)}"
    metrics = console_metrics(result.log)
    assert {1, 2} <= set(metrics), sorted(metrics)
    r = recipe(name)
    if get(r, "opd.support") in ("topk", "full"):  # the loss-level pass's teacher vs verl's reference pass
        for step in (1, 2):
            m = metrics[step]
            assert m["opd/teacher_alignment_seq_median_max"] <= m["opd/teacher_alignment_tolerance"], m
    assert metrics[1]["opd/teacher_invalid_frac"] == 0.0

    teacher_bf16 = get(r, "actor_rollout_ref.ref.fsdp_config.model_dtype") in ("bf16", "bfloat16")
    student, teacher = models[family(name)]
    if get(r, "opd.teachers"):  # routed: each sample's own teacher
        teacher = lambda source, routes=overrides["opd.teachers"]: teacher_of(routes, source)  # noqa: E731
    for step in (1, 2):  # the student moves after step 1; the teacher does not
        saved = torch.load(dump / f"step_{step}.pt")
        lengths = {len(x) for x in saved["responses"]}
        worst_s, worst_t = worst_log_prob_errors(saved, student if step == 1 else None, teacher, teacher_bf16)
        student_error = f"{worst_s:.2e}" if step == 1 else "(not checked: the student moved)"
        print(f"{name} step {step}: {len(saved['responses'])} samples, response lengths {sorted(lengths)}, "
              f"max |old_log_probs - f64| {student_error}, max |ref_log_prob - f64| {worst_t:.2e}")
        assert worst_s < TOLERANCE and worst_t < TOLERANCE, (step, worst_s, worst_t)


def sft_rehearsal_overrides(name: str, models: dict, root) -> dict:
    """The SFT recipe's overrides: the same kinds as rehearsal_overrides, and the CPU attention for flash attention."""
    import pandas as pd

    r, rows = recipe(name), 16
    data = root / "sft_train.parquet"
    pd.DataFrame([{"data_source": "sft_rehearsal", "messages": [
        {"role": "user", "content": f"What is {i} + {i}?"},
        {"role": "assistant", "content": f"<think>{i} plus {i}</think> The answer is \\boxed{{{2 * i}}}."}]}
        for i in range(rows)]).to_parquet(data)
    overrides = {
        "trainer.device": "cpu",
        "+model.override_config.attn_implementation": "opd_cpu_varlen",  # flash-attn's stand-in, as main_opd sets on CPU
        "model.path": models[family(name)][0],
        "data.train_files": str(data),
        "data.max_length": PROMPT_LEN + RESPONSE_LEN,
        "data.train_batch_size": BATCH,
        "trainer.total_training_steps": 2,
        "trainer.default_local_dir": str(root / "checkpoints"),
    }
    if get(r, "data.max_token_len_per_gpu") is not None:
        overrides["data.max_token_len_per_gpu"] = 2 * (PROMPT_LEN + RESPONSE_LEN)
    return overrides


@pytest.mark.slow
@pytest.mark.parametrize("name", SFT_RECIPES)
def test_sft_recipe_rehearsed_on_cpu_as_written(name, models, tmp_path):
    from transformers import AutoModelForCausalLM

    overrides = sft_rehearsal_overrides(name, models, tmp_path)
    print(f"{name}: overrides {overrides}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
           "-m", "verl.trainer.sft_trainer", "--config-dir", str(REPO), f"+recipes={name}",
           *(f"{k}={v}" for k, v in overrides.items())]
    env = {**os.environ, "VERL_PLATFORM": "cpu", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT, env=env)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-5000:]
    # verl's console lines; step 2's follows tqdm's progress bar on the same line
    losses = {int(step): float(loss) for step, loss in re.findall(r"\bstep:(\d+) - .*?train/loss:([-\d.e]+)", log)}
    assert sorted(losses) == [1, 2] and all(0 < x < 20 for x in losses.values()), losses
    student = tmp_path / "checkpoints" / "global_step_2" / "huggingface"
    # its config.json names the attention it trained with (opd_cpu_varlen, registered where opd_verl's CPU support
    # is loaded; opd_verl.export drops it): loaded here with sdpa
    trained = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32, attn_implementation="sdpa").state_dict()
    start = AutoModelForCausalLM.from_pretrained(models[family(name)][0], dtype=torch.float32).state_dict()
    assert set(trained) == set(start)
    assert max(float((trained[k] - start[k]).abs().max()) for k in start) > 0, "the student did not move"
