"""recipes/*.yaml and their launchers examples/<recipe>.sh.

Every recipe is a Hydra experiment config (`# @package _global_`) added to its entry point's base config:
`python -m opd_verl.main_opd --config-dir <repo> +recipes=<name>` (base: opd_trainer) or, for the SFT phase,
`python -m verl.trainer.sft_trainer --config-dir <repo> +recipes=<name>` (base: verl's sft_trainer_engine).

In one process (Hydra's compose API): each recipe composes, sets only keys its base config has (verl's configs are
strict dataclasses), passes our validation (`opd_verl.main_opd.prepare`, as on a GPU machine) and verl's own config
checks, and holds the settings of its seed. The launchers run against a stand-in interpreter that records its
command lines; two subprocesses run the real command lines with --cfg job.
"""

from __future__ import annotations

import copy
import importlib
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
RECIPES_DIR = REPO / "recipes"
EXAMPLES_DIR = REPO / "examples"

# recipes/demo_cpu.yaml belongs to the CPU demo (opd_verl.demo) and is tested with it.
OWNED_ELSEWHERE = {"demo_cpu"}
# examples/*.sh that are not recipe launchers.
NOT_LAUNCHERS = {"setup_cpu.sh", "run_tests.sh"}

RECIPES = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml") if p.stem not in OWNED_ELSEWHERE)
SFT_RECIPES = ["openthoughts3_qwen3_1.7b_sft"]
OPD_RECIPES = [name for name in RECIPES if name not in SFT_RECIPES]
LAUNCHERS = sorted(p.name for p in EXAMPLES_DIR.glob("*.sh") if p.name not in NOT_LAUNCHERS)

# Values a user must replace (placeholders that stop the run, naming the key) and what the tests pass instead.
PLACEHOLDERS = {
    "openthoughts3_qwen3_1.7b_opd_from_qwen3_8b": {
        "actor_rollout_ref.model.path": (
            "./checkpoints/opd_verl/openthoughts3_qwen3_1.7b_sft/global_step_N/huggingface",  # the SFT checkpoint
            "checkpoints/opd_verl/openthoughts3_qwen3_1.7b_sft/global_step_1/huggingface",  # not on disk: unchecked
        ),
    },
}

STUDENT = "actor_rollout_ref.model.path"
TEACHER = "opd.teacher.path"
N = "actor_rollout_ref.rollout.n"
LR = "actor_rollout_ref.actor.optim.lr"
LOSS = "actor_rollout_ref.actor.policy_loss.loss_mode"
EST = "algorithm.adv_estimator"
VAL_N = "actor_rollout_ref.rollout.val_kwargs.n"
VAL_SAMPLE = "actor_rollout_ref.rollout.val_kwargs.do_sample"
GSM8K = {"data.train_files": "~/data/gsm8k/train.parquet", "data.val_files": "~/data/gsm8k/test.parquet"}
QWEN2_PAIR = {STUDENT: "Qwen/Qwen2-0.5B", TEACHER: "Qwen/Qwen2-7B", **GSM8K}

# The settings each seed asks for (checked on the composed config).
SEEDS: dict[str, dict] = {
    "deepmath_qwen3_8b_base_from_qwen3_32b": {
        STUDENT: "Qwen/Qwen3-8B-Base",
        TEACHER: "Qwen/Qwen3-32B",
        "opd.teacher.param_offload": True,
        "actor_rollout_ref.model.lora_rank": 128,
        "actor_rollout_ref.model.target_modules": "all-linear",
        N: 4,
        LR: 1e-4,
        VAL_N: 8,
        VAL_SAMPLE: True,
        EST: "opd",
        LOSS: "importance_sampling",
        "opd.divergence": "reverse_kl",
        "opd.support": "sampled",
        "data.train_files": "~/data/deepmath/train.parquet",
        "data.val_files": "~/data/aime2024/train.parquet",
    },
    "openthoughts3_qwen3_1.7b_sft": {
        "model.path": "Qwen/Qwen3-1.7B-Base",
        "data.train_files": "~/data/openthoughts3_sft/train.parquet",
        "data.messages_key": "messages",
        "engine.strategy": "fsdp2",
        "trainer.project_name": "opd_verl",
        "trainer.experiment_name": "openthoughts3_qwen3_1.7b_sft",
        "trainer.default_local_dir": "checkpoints/opd_verl/openthoughts3_qwen3_1.7b_sft",
    },
    "openthoughts3_qwen3_1.7b_opd_from_qwen3_8b": {
        TEACHER: "Qwen/Qwen3-8B",
        N: 16,
        EST: "opd",
        LOSS: "importance_sampling",
        "data.train_files": "~/data/openthoughts3/train.parquet",
        "data.val_files": "~/data/aime2024/train.parquet",
        VAL_N: 8,
        VAL_SAMPLE: True,
    },
    "hybrid_grpo_kl_qwen2.5_1.5b_from_qwen2.5_7b": {
        STUDENT: "Qwen/Qwen2.5-1.5B",
        TEACHER: "Qwen/Qwen2.5-7B-Instruct",
        EST: "opd_hybrid",
        "opd.hybrid_base_estimator": "grpo",
        "opd.hybrid_alpha": 0.1,
        "actor_rollout_ref.actor.use_kl_loss": False,
        **GSM8K,
    },
    "gsm8k_qwen2_0.5b_reverse_kl": {
        **QWEN2_PAIR,
        EST: "opd",
        LOSS: "importance_sampling",
        "opd.divergence": "reverse_kl",
        "opd.support": "sampled",
    },
    "gsm8k_qwen2_0.5b_forward_kl": {
        **QWEN2_PAIR,
        LOSS: "opd_distill",
        "opd.divergence": "forward_kl",
        "opd.support": "topk",
        "opd.lambda_rl": 0.0,
        "opd.lambda_distill": 1.0,
    },
    "gsm8k_qwen2_0.5b_gkd_jsd": {
        **QWEN2_PAIR,
        LOSS: "opd_distill",
        "opd.divergence": "jsd",
        "opd.beta": 0.5,
        "opd.support": "full",
        "opd.lambda_rl": 0.0,
        "opd.lambda_distill": 1.0,
    },
    "gsm8k_qwen2_0.5b_hybrid_lambda": {
        **QWEN2_PAIR,
        EST: "grpo",
        LOSS: "opd_distill",
        "opd.lambda_rl": 1.0,
        "opd.lambda_distill": 1.0,
    },
    "gsm8k_qwen3_8b_base_from_qwen3_8b_4gpu": {
        STUDENT: "Qwen/Qwen3-8B-Base",
        TEACHER: "Qwen/Qwen3-8B",
        "trainer.n_gpus_per_node": 4,
        "trainer.nnodes": 1,
        "actor_rollout_ref.rollout.tensor_model_parallel_size": 2,
        EST: "opd",
        LOSS: "importance_sampling",
        **GSM8K,
    },
}

# data_preprocess script (and its extra arguments) writing each ~/data/<dir>/
DATA_SCRIPTS = {
    "gsm8k": ("gsm8k", []),
    "deepmath": ("deepmath", []),
    "aime2024": ("aime2024", []),
    "math500": ("math500", []),
    "openthoughts3": ("openthoughts3", []),
    "openthoughts3_sft": ("openthoughts3", ["--mode", "sft"]),
}


# --------------------------------------------------------------------------------------------------------------
# composing in process
# --------------------------------------------------------------------------------------------------------------


def _base(entry: str) -> tuple[str, str, list[str]]:
    """(config dir, config name, search path) of an entry point, as its own @hydra.main sees them."""
    if entry == "sft":
        import verl.trainer

        return str(Path(verl.trainer.__file__).parent / "config"), "sft_trainer_engine", []
    opd_trainer = yaml.safe_load((REPO / "opd_verl" / "config" / "opd_trainer.yaml").read_text())
    return str(REPO / "opd_verl" / "config"), "opd_trainer", list(opd_trainer["hydra"]["searchpath"])


def compose(entry: str, recipe: str | None = None, overrides: list[str] = ()):
    """The composed config of `<entry point> --config-dir <repo> [+recipes=<recipe>] <overrides>`."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    config_dir, config_name, searchpath = _base(entry)
    args = [f"hydra.searchpath=[{','.join([*searchpath, f'file://{REPO}'])}]"]
    if recipe:
        args.append(f"+recipes={recipe}")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return hydra_compose(config_name=config_name, overrides=[*args, *overrides])


def entry_of(name: str) -> str:
    return "sft" if name in SFT_RECIPES else "opd"


def required_overrides(name: str) -> list[str]:
    return [f"{key}={value}" for key, (_, value) in PLACEHOLDERS.get(name, {}).items()]


@pytest.fixture(scope="module")
def base_configs():
    return {entry: OmegaConf.to_container(compose(entry), resolve=False) for entry in ("opd", "sft")}


@pytest.fixture(scope="module")
def composed():
    """name -> the recipe's composed config (mandatory values filled in as a user would)."""
    return {name: compose(entry_of(name), name, required_overrides(name)) for name in RECIPES}


def recipe_yaml(name: str) -> dict:
    return yaml.safe_load((RECIPES_DIR / f"{name}.yaml").read_text())


def _value(container, path):
    for key in path:
        container = container[key]
    return container


def leaf_paths(node, prefix=()):
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from leaf_paths(value, (*prefix, str(key)))
    else:
        yield prefix


def data_files(cfg) -> list[str]:
    files = []
    for key in ("data.train_files", "data.val_files"):
        value = OmegaConf.select(cfg, key)
        if value is None:
            continue
        files += [value] if isinstance(value, str) else list(value)
    return files


# --------------------------------------------------------------------------------------------------------------
# the recipes
# --------------------------------------------------------------------------------------------------------------


def test_every_recipe_has_its_seed_and_a_launcher():
    assert RECIPES, "no recipes found"
    assert set(RECIPES) == set(SEEDS), (
        f"recipes without seed expectations in this test: {sorted(set(RECIPES) - set(SEEDS))}; "
        f"seeds without a recipe: {sorted(set(SEEDS) - set(RECIPES))}"
    )
    missing = [name for name in RECIPES if not (EXAMPLES_DIR / f"{name}.sh").is_file()]
    assert not missing, f"recipes without examples/<recipe>.sh: {missing}"


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_is_an_experiment_config_with_a_header(name):
    text = (RECIPES_DIR / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_\n"), "a recipe is added to the base config at the root"
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    assert "Reproduces" in header or "Phase" in header, "the header says what the recipe reproduces"
    assert f"examples/{name}.sh" in header and f"+recipes={name}" in header, "the header gives the launch commands"
    assert "defaults" not in recipe_yaml(name), "a recipe sets values only (its base config is the entry point's)"


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_sets_only_keys_that_exist(name, base_configs):
    """Every key a recipe sets exists in its base config (or lies in a free-form mapping such as
    data.apply_chat_template_kwargs): verl builds strict dataclasses from these sections."""
    base = base_configs[entry_of(name)]
    unknown = []
    for path in leaf_paths(recipe_yaml(name)):
        node = base
        for key in path:
            if isinstance(node, dict) and not node:  # free-form mapping ({} in the base)
                break
            if not isinstance(node, dict) or key not in node:
                unknown.append(".".join(path))
                break
            node = node[key]
    assert not unknown, f"{name} sets keys its base config does not have: {unknown}"


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_holds_its_seed(name, composed):
    cfg = composed[name]
    wrong = {
        key: (OmegaConf.select(cfg, key), value)
        for key, value in SEEDS[name].items()
        if OmegaConf.select(cfg, key) != value
    }
    assert not wrong, f"{name}: (got, want) {wrong}"


@pytest.mark.parametrize("name", RECIPES + sorted(OWNED_ELSEWHERE))
def test_recipe_has_no_missing_values(name):
    """`???` does nothing in a recipe: merged over the base config, OmegaConf keeps the base value (verl's default
    model path, say). Values a user must set are placeholders that fail validation instead."""
    recipe = recipe_yaml(name)
    assert not [".".join(p) for p in leaf_paths(recipe) if _value(recipe, p) == "???"]


@pytest.mark.parametrize("name", sorted(PLACEHOLDERS))
def test_placeholder_stops_the_run_naming_the_key(name, gpu_machine):
    from opd_verl.main_opd import prepare
    from opd_verl.checks.options import OPDConfigError

    cfg = compose(entry_of(name), name)
    for key, (placeholder, _) in PLACEHOLDERS[name].items():
        assert OmegaConf.select(cfg, key) == placeholder
        with pytest.raises(OPDConfigError, match=f"{re.escape(key)}=.*does not exist"):
            prepare(cfg)


@pytest.fixture
def gpu_machine(monkeypatch):
    """Validate as on a GPU machine: opd_verl.cpu.defaults leaves the config alone."""
    from opd_verl.cpu import defaults as cpu_defaults

    monkeypatch.setattr(cpu_defaults, "torch_has_accelerator", lambda: True)


@pytest.mark.parametrize("name", OPD_RECIPES)
def test_opd_recipe_passes_our_and_verls_validation(name, composed, gpu_machine, capsys):
    from verl.trainer.ppo.utils import need_critic
    from verl.utils.config import omega_conf_to_dataclass, validate_config

    from opd_verl.main_opd import prepare
    from opd_verl.checks.options import uses_opd

    cfg = copy.deepcopy(composed[name])
    prepare(cfg)  # our checks (opd section, teacher, preflight of local paths), then platform defaults: none on GPU
    assert OmegaConf.to_container(cfg, resolve=True) == OmegaConf.to_container(composed[name], resolve=True)
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert uses_opd(plain), "every OPD recipe runs with a teacher"
    validate_config(cfg, use_reference_policy=True, use_critic=need_critic(cfg))  # what opd_verl.verl_ext.task_runner runs
    assert "All configuration checks passed" in capsys.readouterr().out
    # sections verl turns into dataclasses at start-up (unknown or mistyped keys fail here)
    for key in ("actor_rollout_ref.rollout", "algorithm"):
        omega_conf_to_dataclass(OmegaConf.select(cfg, key))
    reward_fn = cfg.reward.custom_reward_function
    module = importlib.import_module(reward_fn.path.removeprefix("pkg://"))
    assert callable(getattr(module, reward_fn.name))


@pytest.mark.parametrize("name", OPD_RECIPES)
def test_opd_recipe_gpu_settings(name, composed):
    cfg = composed[name]
    get = lambda key: OmegaConf.select(cfg, key)  # noqa: E731
    assert get("trainer.device") == "cuda"
    assert get("actor_rollout_ref.rollout.name") == "vllm"
    assert get("actor_rollout_ref.actor.strategy") == "fsdp2" == get("actor_rollout_ref.ref.strategy")
    assert get("trainer.project_name") == "opd_verl" and get("trainer.experiment_name") == name
    assert "console" in get("trainer.logger")
    assert get("trainer.save_freq") > 0 and get("trainer.test_freq") > 0 and get("trainer.val_before_train")
    assert get("reward.custom_reward_function.path") == "pkg://opd_verl.rewards"
    assert get("reward.custom_reward_function.name") == "compute_score"
    n_gpus = get("trainer.n_gpus_per_node") * get("trainer.nnodes")
    batch, n = get("data.train_batch_size"), get(N)
    assert batch % get("actor_rollout_ref.actor.ppo_mini_batch_size") == 0
    assert (batch * n) % n_gpus == 0, "the rollouts of a step split evenly over the GPUs"
    assert n_gpus % get("actor_rollout_ref.rollout.tensor_model_parallel_size") == 0
    seq = get("data.max_prompt_length") + get("data.max_response_length")
    assert get("actor_rollout_ref.actor.use_dynamic_bsz")
    assert get("actor_rollout_ref.actor.ppo_max_token_len_per_gpu") >= seq, "a whole sequence fits a micro-batch"
    assert get("actor_rollout_ref.ref.log_prob_max_token_len_per_gpu") >= seq
    assert get("actor_rollout_ref.actor.use_kl_loss") is False, "the reference role holds the teacher"
    if get("actor_rollout_ref.model.lora_rank"):
        assert get("actor_rollout_ref.rollout.load_format") == "safetensors", "vLLM loads the LoRA base from disk"


def test_sft_recipe_builds_verls_sft_configs(composed):
    from verl.utils.config import omega_conf_to_dataclass

    cfg = composed["openthoughts3_qwen3_1.7b_sft"]
    for key in ("engine", "optim", "checkpoint"):
        omega_conf_to_dataclass(cfg[key])
    assert "hf_model" in cfg.checkpoint.save_contents, "phase 2 loads the SFT model as a Hugging Face directory"
    assert cfg.data.max_token_len_per_gpu >= cfg.data.max_length
    # phase 2's launcher looks for the checkpoints where this recipe writes them
    launcher = (EXAMPLES_DIR / "openthoughts3_qwen3_1.7b_opd_from_qwen3_8b.sh").read_text()
    assert f"$REPO/{cfg.trainer.default_local_dir}" in launcher


def test_sft_chat_template_keeps_the_reasoning(tmp_path):
    """With the recipe's chat template verl's multi-turn SFT dataset trains on the whole answer, reasoning
    included, and its per-turn tokenization equals the whole conversation's (its sanity check passes)."""
    import pandas as pd
    from verl.utils.dataset.multiturn_sft_dataset import MultiTurnSFTDataset

    from opd_verl.demo.tiny_models import build_tokenizer

    recipe = recipe_yaml("openthoughts3_qwen3_1.7b_sft")
    tokenizer = build_tokenizer(words=("####", "<think>", "</think>"))
    tokenizer.chat_template = recipe["model"]["custom_chat_template"]
    question = "What is 2+3? Put the answer in \\boxed{}."
    answer = "<think>\n2+3=5\n</think>\n\nThe answer is \\boxed{5}."
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n", "Qwen's prompt format"
    pd.DataFrame({"messages": [messages]}).to_parquet(tmp_path / "sft.parquet")
    data = dict(recipe["data"], max_length=256, truncation="error")
    data = OmegaConf.create({k: v for k, v in data.items() if k not in ("train_files", "val_files")})
    item = MultiTurnSFTDataset(str(tmp_path / "sft.parquet"), tokenizer, data)[0]
    trained = tokenizer.decode(item["input_ids"][item["loss_mask"].bool()])
    assert trained == answer + "<|im_end|>\n"


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_data_comes_from_the_documented_scripts(name, composed):
    text = (RECIPES_DIR / f"{name}.yaml").read_text()
    launcher = (EXAMPLES_DIR / f"{name}.sh").read_text()
    files = data_files(composed[name])
    assert files
    for path in files:
        match = re.fullmatch(r"~/data/([^/]+)/(train|test)\.parquet", path)
        assert match, f"{path}: not a data_preprocess output (~/data/<name>/<split>.parquet)"
        script, args = DATA_SCRIPTS[match.group(1)]
        assert (REPO / "data_preprocess" / f"{script}.py").is_file()
        assert f"data_preprocess/{script}.py" in text, f"the header of {name} says how {path} is made"
        assert f'"$HOME/data/{match.group(1)}/{match.group(2)}.parquet"' in launcher
        assert all(arg in launcher for arg in args)


# --------------------------------------------------------------------------------------------------------------
# the launchers
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_launcher_is_bash_clean_and_runs_its_recipe(launcher):
    path = EXAMPLES_DIR / launcher
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    text = path.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
    assert os.stat(path).st_mode & stat.S_IXUSR, "executable"
    recipes = set(re.findall(r"\+recipes=([\w.\-]+)", text))
    assert recipes == {path.stem}, f"{launcher} runs recipes {recipes}"
    assert (RECIPES_DIR / f"{path.stem}.yaml").is_file()
    assert '"$@"' in text, "overrides are passed through"


@pytest.fixture
def fake_python(tmp_path):
    """A stand-in interpreter recording each command line (one per line) in $FAKE_LOG."""
    script = tmp_path / "python"
    script.write_text('#!/usr/bin/env bash\nprintf \'%s\\n\' "$*" >> "$FAKE_LOG"\n')
    script.chmod(0o755)
    return script


def run_launcher(launcher: str, args: list[str], home: Path, python: Path, **env) -> tuple[int, list[str], str]:
    log = home / "calls.log"
    log.unlink(missing_ok=True)
    result = subprocess.run(
        ["bash", str(EXAMPLES_DIR / launcher), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "HOME": str(home), "PYTHON": str(python), "FAKE_LOG": str(log), **env},
    )
    calls = log.read_text().splitlines() if log.exists() else []
    return result.returncode, calls, result.stderr


@pytest.mark.parametrize("name", RECIPES)
def test_launcher_prepares_missing_data_then_runs_the_recipe(name, composed, fake_python, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {}
    if name == "openthoughts3_qwen3_1.7b_opd_from_qwen3_8b":  # phase 2 needs phase 1's checkpoint
        sft = tmp_path / "sft"
        sft.mkdir()
        (sft / "latest_checkpointed_iteration.txt").write_text("1200\n")
        env["SFT_DIR"] = str(sft)
    files = [Path(f.replace("~", str(home), 1)) for f in data_files(composed[name])]

    code, calls, stderr = run_launcher(f"{name}.sh", ["trainer.total_epochs=7"], home, fake_python, **env)
    assert code == 0, stderr
    *prep, main = calls
    prepared_dirs = {re.search(r"--local_dir (\S+)", call).group(1) for call in prep}
    assert prepared_dirs == {str(f.parent) for f in files}, "each missing data set is prepared where the recipe reads it"
    assert all(call.startswith("data_preprocess/") for call in prep)
    assert f"--config-dir {REPO} +recipes={name}" in main and main.endswith("trainer.total_epochs=7")
    if name in SFT_RECIPES:
        assert main.startswith("-m torch.distributed.run --standalone") and "-m verl.trainer.sft_trainer" in main
    else:
        assert main.startswith("-m opd_verl.main_opd")
    if env.get("SFT_DIR"):
        assert f"{STUDENT}={env['SFT_DIR']}/global_step_1200/huggingface" in main

    for f in files:  # data present: straight to the run
        f.parent.mkdir(parents=True, exist_ok=True)
        f.touch()
    code, calls, stderr = run_launcher(f"{name}.sh", [], home, fake_python, **env)
    assert code == 0 and len(calls) == 1, (stderr, calls)


def test_launchers_skip_data_for_cfg_job_and_phase_2_needs_a_student(fake_python, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    name = "openthoughts3_qwen3_1.7b_opd_from_qwen3_8b"
    code, calls, _ = run_launcher(f"{name}.sh", ["--cfg", "job"], home, fake_python, SFT_DIR=str(tmp_path / "none"))
    assert code == 0 and len(calls) == 1 and calls[0].endswith("--cfg job"), calls
    code, calls, stderr = run_launcher(f"{name}.sh", [], home, fake_python, SFT_DIR=str(tmp_path / "none"))
    assert code != 0 and "no SFT checkpoint" in stderr and not any("main_opd" in c for c in calls)
    code, calls, _ = run_launcher(f"{name}.sh", [f"{STUDENT}=/models/mine"], home, fake_python, SFT_DIR="/none")
    assert code == 0 and calls[-1].endswith(f"{STUDENT}=/models/mine") and calls[-1].count(STUDENT) == 1
    code, calls, _ = run_launcher("openthoughts3_qwen3_1.7b_sft.sh", ["--cfg", "job"], home, fake_python)
    assert code == 0 and calls == [f"-m verl.trainer.sft_trainer --config-dir {REPO} "
                                   "+recipes=openthoughts3_qwen3_1.7b_sft --cfg job"]


# --------------------------------------------------------------------------------------------------------------
# the real command lines (subprocesses)
# --------------------------------------------------------------------------------------------------------------


def _cfg_job(launcher: str, home: Path) -> dict:
    result = subprocess.run(
        ["bash", str(EXAMPLES_DIR / launcher), "--cfg", "job"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=home,
        env={**os.environ, "HOME": str(home), "PYTHON": sys.executable},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return yaml.safe_load(result.stdout)


def _select(cfg: dict, key: str):
    return OmegaConf.select(OmegaConf.create(cfg), key)


def test_opd_launcher_cfg_job_composes_and_validates_through_main_opd(tmp_path):
    """The CLI path: launcher -> python -m opd_verl.main_opd --config-dir <repo> +recipes=... --cfg job (which
    validates, and on this CPU machine applies the CPU defaults before printing)."""
    name = "gsm8k_qwen3_8b_base_from_qwen3_8b_4gpu"
    cfg = _cfg_job(f"{name}.sh", tmp_path)
    for key, value in SEEDS[name].items():
        if key != "actor_rollout_ref.rollout.tensor_model_parallel_size":  # 1 on CPU (opd_verl.cpu.defaults)
            assert _select(cfg, key) == value, key
    recipe = OmegaConf.create(recipe_yaml(name))
    for key in (N, LR, "opd.teacher.param_offload", "trainer.experiment_name"):
        assert _select(cfg, key) == OmegaConf.select(recipe, key), key


def test_sft_launcher_cfg_job_composes_through_verls_sft_entry_point(tmp_path):
    name = "openthoughts3_qwen3_1.7b_sft"
    cfg = _cfg_job(f"{name}.sh", tmp_path)
    for key, value in SEEDS[name].items():
        assert _select(cfg, key) == value, key
    assert cfg["model"]["custom_chat_template"] == recipe_yaml(name)["model"]["custom_chat_template"]
