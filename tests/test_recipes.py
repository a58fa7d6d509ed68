"""recipes/*.yaml and their launcher examples/run_recipe.sh <recipe>.

Every recipe is a Hydra experiment config (`# @package _global_`) added to its entry point's base config:
`python -m opd_verl.main_opd --config-dir <repo> +recipes=<name>` (base: opd_trainer) or, for the SFT phase,
`python -m verl.trainer.sft_trainer --config-dir <repo> +recipes=<name>` (base: verl's sft_trainer_engine).

In one process (Hydra's compose API): each recipe composes, sets only keys its base config has (verl's configs are
strict dataclasses), passes our validation (`opd_verl.main_opd.prepare`, as on a GPU machine) and verl's own config
checks, and holds the settings of its seed. The launcher runs against a stand-in interpreter that records its
command lines (the data lines of each recipe's header, the entry point, the SFT student); for every recipe a
subprocess runs the real command line with --cfg job.
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

# recipes/demo_cpu*.yaml belong to the CPU demo (opd_verl.demo) and are tested with it.
OWNED_ELSEWHERE = {"demo_cpu", "demo_cpu_forward_kl"}
# examples/*.sh that are not recipe launchers; the one launcher is examples/run_recipe.sh <recipe>.
# (quickstart_gpu.sh runs one recipe's GPU quickstart; tests/test_quickstart_gpu.py checks its commands.)
NOT_LAUNCHERS = {"setup_cpu.sh", "run_tests.sh", "quickstart_gpu.sh"}
LAUNCHER = EXAMPLES_DIR / "run_recipe.sh"

RECIPES = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml") if p.stem not in OWNED_ELSEWHERE)
SFT_RECIPES = ["openthoughts3_qwen3_1.7b_sft"]
OPD_RECIPES = [name for name in RECIPES if name not in SFT_RECIPES]
LAUNCHERS = sorted(p.name for p in EXAMPLES_DIR.glob("*.sh") if p.name not in NOT_LAUNCHERS)
# phase 2 trains the checkpoint of phase 1 (its header: `# Student: the latest checkpoint of recipe <sft> in <dir>`)
STUDENT_FROM_SFT = {"openthoughts3_qwen3_1.7b_opd_from_qwen3_8b": "openthoughts3_qwen3_1.7b_sft"}

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
        LOSS: "ppo_plus_distill",
        "opd.divergence": "forward_kl",
        "opd.support": "topk",
        "opd.lambda_rl": 0.0,
        "opd.lambda_distill": 1.0,
    },
    "gsm8k_qwen2_0.5b_gkd_jsd": {
        **QWEN2_PAIR,
        LOSS: "ppo_plus_distill",
        "opd.divergence": "jsd",
        "opd.beta": 0.5,
        "opd.support": "full",
        "opd.lambda_rl": 0.0,
        "opd.lambda_distill": 1.0,
    },
    "gsm8k_qwen2_0.5b_hybrid_lambda": {
        **QWEN2_PAIR,
        EST: "grpo",
        LOSS: "ppo_plus_distill",
        "opd.lambda_rl": 1.0,
        "opd.lambda_distill": 1.0,
    },
    "code_deepseek_coder_1.3b_from_6.7b_hybrid": {
        STUDENT: "deepseek-ai/deepseek-coder-1.3b-instruct",
        TEACHER: "deepseek-ai/deepseek-coder-6.7b-instruct",
        EST: "grpo",
        LOSS: "ppo_plus_distill",
        "opd.lambda_rl": 0.3,
        "opd.lambda_distill": 0.7,
        "data.train_files": "~/data/mbpp/train.parquet",
        "data.val_files": "~/data/humaneval/test.parquet",
    },
    "ifeval_qwen2.5_1.5b_from_qwen2.5_7b_opd": {
        STUDENT: "Qwen/Qwen2.5-1.5B-Instruct",
        TEACHER: "Qwen/Qwen2.5-7B-Instruct",
        LOSS: "ppo_plus_distill",
        "opd.temperature": 0.8,
        "opd.lambda_rl": 0.0,
        "opd.lambda_distill": 1.0,
        "data.train_files": "~/data/ifeval/train.parquet",
    },
    "multitask_qwen2.5_1.5b_route_math_code_chat": {
        STUDENT: "Qwen/Qwen2.5-1.5B-Instruct",
        EST: "opd",
        LOSS: "importance_sampling",
        "opd.multi_teacher_mode": "route",
        "data.train_files": "~/data/multitask/train.parquet",
        "data.val_files": "~/data/multitask/test.parquet",
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
    "mbpp": ("mbpp", []),
    "humaneval": ("humaneval", []),
    "ifeval": ("ifeval", []),
    "multitask": ("multitask", ["--train", "--test"]),
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


def header(name: str) -> list[str]:
    return [line for line in (RECIPES_DIR / f"{name}.yaml").read_text().splitlines() if line.startswith("#")]


def brace_expand(word: str) -> list[str]:
    """bash's brace expansion of `{a,b}` groups (not nested)."""
    match = re.match(r"([^{]*)\{([^}]*)\}(.*)$", word)
    if not match:
        return [word]
    pre, alts, post = match.groups()
    return [out for alt in alts.split(",") for out in brace_expand(pre + alt + post)]


def data_lines(name: str) -> list[tuple[list[str], list[str]]]:
    """(argv after `python`, outputs with {a,b} expanded) of each header line
    `#   python data_preprocess/<script>.py <args>   # -> <output>...`, as examples/run_recipe.sh reads them."""
    lines = []
    for line in header(name):
        if re.match(r"#\s+python data_preprocess/", line):
            command, sep, outputs = line.lstrip("#").partition(" # -> ")
            assert sep, f"{name}: data line without '# -> <outputs>': {line}"
            words = command.split()
            lines.append((words[1:], [out for word in outputs.split() for out in brace_expand(word)]))
    return lines


def intermediate_outputs(name: str) -> list[str]:
    """Outputs of a recipe's data lines that a later data line reads (e.g. the files data_preprocess/multitask.py
    merges), in the header's spelling."""
    lines = data_lines(name)
    return [out for i, (_, outputs) in enumerate(lines) for out in outputs
            if any(out in argv for argv, _ in lines[i + 1:])]


def expand_word(word: str, home: Path, env: dict) -> str:
    """A leading ~ and ${NAME:-default}, as the launcher (and bash) expand a data line's words."""
    if word == "~" or word.startswith("~/"):
        word = str(home) + word[1:]
    return re.sub(r"\$\{(\w+):-([^}$]*)\}", lambda m: env.get(m.group(1)) or m.group(2), word)


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


def test_every_recipe_has_its_seed_and_the_launcher():
    assert RECIPES, "no recipes found"
    assert set(RECIPES) == set(SEEDS), (
        f"recipes without seed expectations in this test: {sorted(set(RECIPES) - set(SEEDS))}; "
        f"seeds without a recipe: {sorted(set(SEEDS) - set(RECIPES))}"
    )
    assert LAUNCHERS == ["run_recipe.sh"], "one launcher for every recipe: examples/run_recipe.sh <recipe>"
    missing = [name for name in RECIPES if f"#   bash examples/run_recipe.sh {name} [overrides]" not in header(name)]
    assert not missing, f"recipes whose header does not launch them with examples/run_recipe.sh: {missing}"


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_is_an_experiment_config_with_a_header(name):
    text = (RECIPES_DIR / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_\n"), "a recipe is added to the base config at the root"
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    assert "Mirrors the settings of" in header or "Phase" in header, (
        "the header says whose settings the recipe mirrors (nothing has run on a GPU: none 'reproduces' a result)"
    )
    assert "Reproduces" not in header, "no recipe has reproduced a published result (none has run on a GPU)"
    assert f"bash examples/run_recipe.sh {name} [overrides]" in header and f"+recipes={name}" in header, (
        "the header gives the launch commands"
    )
    sft = "# Entry point: verl.trainer.sft_trainer" in header
    assert sft == (name in SFT_RECIPES), "an SFT recipe declares its entry point (the launcher reads it)"
    if not sft:
        assert f"python -m opd_verl.main_opd +recipes={name}" in header and "--config-dir" not in header, (
            "main_opd resolves recipes from the package: the header's command needs no --config-dir"
        )
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
    from opd_verl.checks.errors import OPDConfigError

    cfg = compose(entry_of(name), name)
    for key, (placeholder, _) in PLACEHOLDERS[name].items():
        assert OmegaConf.select(cfg, key) == placeholder
        with pytest.raises(OPDConfigError, match=f"{re.escape(key)}=.*does not exist"):
            prepare(cfg)


@pytest.fixture
def gpu_machine(monkeypatch):
    """Validate as on a GPU machine: not a CPU run, the CPU defaults are not applied."""
    from opd_verl.checks import device

    monkeypatch.setattr(device, "torch_has_accelerator", lambda: True)


@pytest.mark.parametrize("name", OPD_RECIPES)
def test_opd_recipe_passes_our_and_verls_validation(name, composed, gpu_machine, capsys):
    from verl.trainer.ppo.utils import need_critic
    from verl.utils.config import omega_conf_to_dataclass, validate_config

    from opd_verl.main_opd import prepare
    from opd_verl.checks.modes import uses_opd

    cfg = copy.deepcopy(composed[name])
    prepare(cfg)  # our checks (opd section, teacher, preflight of local paths), then platform defaults: none on GPU
    expected = OmegaConf.to_container(composed[name], resolve=True)
    if expected["algorithm"]["adv_estimator"] in ("opd", "opd_hybrid") and expected["critic"]["enable"] is None:
        expected["critic"]["enable"] = False  # opd_verl.checks.critic: the OPD estimators train no critic
    assert OmegaConf.to_container(cfg, resolve=True) == expected
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
    assert get("reward.custom_reward_function.name") in ("compute_score", "compute_score_with_info")
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
    # the student as an HF model (python -m opd_verl.export copies it); a LoRA student's hf_model is verl's
    # PeftModel state dict, which transformers cannot load: export merges its shards instead
    contents = list(get("actor_rollout_ref.actor.checkpoint.save_contents"))
    assert {"model", "optimizer", "extra"} <= set(contents), "resume needs the model, optimizer and extra state"
    assert ("hf_model" in contents) == (not get("actor_rollout_ref.model.lora_rank")), contents


def test_sft_recipe_builds_verls_sft_configs(composed):
    from verl.utils.config import omega_conf_to_dataclass

    cfg = composed["openthoughts3_qwen3_1.7b_sft"]
    for key in ("engine", "optim", "checkpoint"):
        omega_conf_to_dataclass(cfg[key])
    assert "hf_model" in cfg.checkpoint.save_contents, "phase 2 loads the SFT model as a Hugging Face directory"
    assert cfg.data.max_token_len_per_gpu >= cfg.data.max_length
    # phase 2's header (which the launcher reads) looks for the checkpoints where this recipe writes them
    declared = f"# Student: the latest checkpoint of recipe openthoughts3_qwen3_1.7b_sft in {cfg.trainer.default_local_dir}"
    assert declared in header("openthoughts3_qwen3_1.7b_opd_from_qwen3_8b")


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
    """The header's data lines (what the launcher runs) make exactly the files the recipe reads."""
    lines = data_lines(name)
    files = data_files(composed[name])
    assert files
    declared = [out for _, outputs in lines for out in outputs]
    assert sorted(declared) == sorted(set(declared)) == sorted(set(files) | set(intermediate_outputs(name))), (
        "each data line makes what the recipe reads, or what a later data line reads")
    for path in files:
        match = re.fullmatch(r"~/data/([^/]+)/(train|test)\.parquet", path)
        assert match, f"{path}: not a data_preprocess output (~/data/<name>/<split>.parquet)"
        script, args = DATA_SCRIPTS[match.group(1)]
        assert (REPO / "data_preprocess" / f"{script}.py").is_file()
        (argv,) = [argv for argv, outputs in lines if path in outputs]
        assert argv[0] == f"data_preprocess/{script}.py", f"the header of {name} says how {path} is made"
        joined = " ".join(argv)
        assert f"--local_dir ~/data/{match.group(1)}" in joined and all(arg in argv for arg in args)
        if script == "openthoughts3":  # a sample of the 1.2M rows; OT3_MAX_SAMPLES overrides the recipe's default
            assert "--max_samples ${OT3_MAX_SAMPLES:-50000}" in joined


# --------------------------------------------------------------------------------------------------------------
# the launchers
# --------------------------------------------------------------------------------------------------------------


def test_launcher_is_bash_clean_and_reads_the_recipe_from_its_argument():
    result = subprocess.run(["bash", "-n", str(LAUNCHER)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    text = LAUNCHER.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
    assert os.stat(LAUNCHER).st_mode & stat.S_IXUSR, "executable"
    assert set(re.findall(r"\+recipes=(\S+)", text)) == {'"$recipe"'}, "runs the recipe it is given"
    assert '"$@"' in text, "overrides are passed through"
    named = [name for name in RECIPES + sorted(OWNED_ELSEWHERE) if name in text]
    assert not named, f"what a recipe needs comes from its header, not from the launcher: {named}"


@pytest.fixture
def fake_python(tmp_path):
    """A stand-in interpreter recording each command line (one per line) in $FAKE_LOG."""
    script = tmp_path / "python"
    script.write_text('#!/usr/bin/env bash\nprintf \'%s\\n\' "$*" >> "$FAKE_LOG"\n')
    script.chmod(0o755)
    return script


def run_launcher(
    recipe: str | None, args: list[str], home: Path, python: Path, launcher: Path = LAUNCHER, **env
) -> tuple[int, list[str], str]:
    log = home / "calls.log"
    log.unlink(missing_ok=True)
    result = subprocess.run(
        ["bash", str(launcher), *([recipe] if recipe is not None else []), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "HOME": str(home), "PYTHON": str(python), "FAKE_LOG": str(log), **env},
    )
    calls = log.read_text().splitlines() if log.exists() else []
    return result.returncode, calls, result.stderr


def declared_commands(name: str, home: Path, env: dict) -> list[str]:
    """The data lines of the recipe's header as the stand-in interpreter records them."""
    return [" ".join(expand_word(w, home, env) for w in argv) for argv, _ in data_lines(name)]


@pytest.mark.parametrize("name", RECIPES)
def test_launcher_prepares_missing_data_then_runs_the_recipe(name, composed, fake_python, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {}
    if name in STUDENT_FROM_SFT:  # phase 2 needs phase 1's checkpoint
        sft = tmp_path / "sft"
        sft.mkdir()
        (sft / "latest_checkpointed_iteration.txt").write_text("1200\n")
        env["SFT_DIR"] = str(sft)
    files = [Path(f.replace("~", str(home), 1)) for f in data_files(composed[name])]

    code, calls, stderr = run_launcher(name, ["--cfg", "job"], home, fake_python, **env)  # print only: no data
    assert code == 0 and len(calls) == 1 and calls[0].endswith("--cfg job"), (stderr, calls)

    code, calls, stderr = run_launcher(name, ["trainer.total_epochs=7"], home, fake_python, **env)
    assert code == 0, stderr
    *prep, main = calls
    prepared_dirs = {re.search(r"--local_dir (\S+)", call).group(1) for call in prep}
    made = files + [Path(f.replace("~", str(home), 1)) for f in intermediate_outputs(name)]
    assert prepared_dirs == {str(f.parent) for f in made}, "each missing data set is prepared where the recipe reads it"
    assert all(call.startswith("data_preprocess/") for call in prep)
    assert prep == declared_commands(name, home, {}), "the header's data lines, as declared"
    assert f"--config-dir {REPO} +recipes={name}" in main and main.endswith("trainer.total_epochs=7")
    if name in SFT_RECIPES:
        assert main.startswith("-m torch.distributed.run --standalone --nnodes=1 --nproc_per_node=8 ")
        assert "-m verl.trainer.sft_trainer" in main
    else:
        assert main.startswith("-m opd_verl.main_opd")
    if env.get("SFT_DIR"):
        assert f"{STUDENT}={env['SFT_DIR']}/global_step_1200/huggingface" in main
    else:
        assert STUDENT not in main

    for f in made:  # data present: straight to the run
        f.parent.mkdir(parents=True, exist_ok=True)
        f.touch()
    code, calls, stderr = run_launcher(name, [], home, fake_python, **env)
    assert code == 0 and len(calls) == 1, (stderr, calls)


def test_launcher_runs_a_data_line_until_all_its_outputs_exist(fake_python, tmp_path):
    """With a temporary HOME: `# -> ~/data/gsm8k/{train,test}.parquet` runs while either file is missing."""
    home = tmp_path / "home"
    (home / "data" / "gsm8k").mkdir(parents=True)
    name = "gsm8k_qwen2_0.5b_reverse_kl"
    prep = f"data_preprocess/gsm8k.py --local_dir {home}/data/gsm8k"
    code, calls, stderr = run_launcher(name, [], home, fake_python)
    assert code == 0 and calls[:-1] == [prep], (stderr, calls)
    (home / "data" / "gsm8k" / "train.parquet").touch()
    code, calls, stderr = run_launcher(name, [], home, fake_python)
    assert code == 0 and calls[:-1] == [prep], "test.parquet is still missing"
    (home / "data" / "gsm8k" / "test.parquet").touch()
    code, calls, stderr = run_launcher(name, [], home, fake_python)
    assert code == 0 and len(calls) == 1 and calls[0].startswith("-m opd_verl.main_opd"), (stderr, calls)


def test_launcher_takes_ot3_max_samples_from_the_environment(fake_python, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    for name, local_dir in (("openthoughts3_qwen3_1.7b_sft", "openthoughts3_sft"),
                            ("openthoughts3_qwen3_1.7b_opd_from_qwen3_8b", "openthoughts3")):
        args = [f"{STUDENT}=/models/mine"] if name in STUDENT_FROM_SFT else []
        for env, samples in (({}, "50000"), ({"OT3_MAX_SAMPLES": "123"}, "123")):
            code, calls, stderr = run_launcher(name, args, home, fake_python, **env)
            assert code == 0, stderr
            (ot3,) = [call for call in calls if call.startswith("data_preprocess/openthoughts3.py")]
            assert f"--local_dir {home}/data/{local_dir} " in ot3 and ot3.endswith(f"--max_samples {samples}")


def test_launcher_parses_data_lines_as_documented(fake_python, tmp_path):
    """A recipe of its own in a copy of the layout: several outputs, {a,b}, ~ and ${NAME:-default} in the
    arguments; a line without outputs or with other shell syntax stops the launcher before anything runs."""
    repo = tmp_path / "repo"
    (repo / "examples").mkdir(parents=True)
    (repo / "recipes").mkdir()
    launcher = repo / "examples" / "run_recipe.sh"
    launcher.write_text(LAUNCHER.read_text())
    home = tmp_path / "home"
    (home / "d").mkdir(parents=True)

    def recipe(name: str, *lines: str) -> None:
        (repo / "recipes" / f"{name}.yaml").write_text("\n".join(["# @package _global_", *lines, "trainer: {}", ""]))

    recipe(
        "mine",
        "# Data (once):",
        "#   python data_preprocess/a.py --local_dir ~/d --n ${FAKE_N:-5}   # -> ~/d/{x,y}.parquet ~/d/z.parquet",
        "#   python data_preprocess/b.py --out ~/d/w   # -> ~/d/w.parquet",
        "#   (prose about data_preprocess/c.py is not a data line)",
    )
    a, b = f"data_preprocess/a.py --local_dir {home}/d --n", f"data_preprocess/b.py --out {home}/d/w"
    main = f"-m opd_verl.main_opd --config-dir {repo} +recipes=mine"
    code, calls, stderr = run_launcher("mine", [], home, fake_python, launcher=launcher)
    assert code == 0 and calls == [f"{a} 5", b, main], (stderr, calls)
    code, calls, _ = run_launcher("mine", [], home, fake_python, launcher=launcher, FAKE_N="9")
    assert calls == [f"{a} 9", b, main]
    for out in ("x", "y", "w"):
        (home / "d" / f"{out}.parquet").touch()
    code, calls, _ = run_launcher("mine", [], home, fake_python, launcher=launcher)
    assert calls == [f"{a} 5", main], "z.parquet is missing"
    (home / "d" / "z.parquet").touch()
    code, calls, _ = run_launcher("mine", [], home, fake_python, launcher=launcher)
    assert calls == [main]

    for bad in ("#   python data_preprocess/a.py --local_dir ~/d", "#   python data_preprocess/a.py $(touch ~/x)  # -> ~/d/q"):
        recipe("bad", "# Data (once):", bad)
        code, calls, stderr = run_launcher("bad", [], home, fake_python, launcher=launcher)
        assert code == 1 and calls == [] and "recipes/bad.yaml" in stderr, (bad, stderr, calls)
    assert not (home / "x").exists()


def test_launcher_rejects_an_unknown_recipe_listing_the_recipes(fake_python, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    for args in (["no_such_recipe"], ["../recipes/gsm8k_qwen2_0.5b_reverse_kl"], []):
        code, calls, stderr = run_launcher(None, args, home, fake_python)
        assert code == 2 and calls == [], (args, stderr)
        assert len(stderr.splitlines()) == 1, stderr
        assert all(name in stderr for name in RECIPES), stderr
    assert "unknown recipe 'no_such_recipe'" in run_launcher("no_such_recipe", [], home, fake_python)[2]


def test_launchers_skip_data_for_cfg_job_and_phase_2_needs_a_student(fake_python, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    name = "openthoughts3_qwen3_1.7b_opd_from_qwen3_8b"
    code, calls, _ = run_launcher(name, ["--cfg", "job"], home, fake_python, SFT_DIR=str(tmp_path / "none"))
    assert code == 0 and len(calls) == 1 and calls[0].endswith("--cfg job"), calls
    code, calls, stderr = run_launcher(name, [], home, fake_python, SFT_DIR=str(tmp_path / "none"))
    assert code != 0 and "no SFT checkpoint" in stderr and calls == [], "fails before preparing data"
    assert "bash examples/run_recipe.sh openthoughts3_qwen3_1.7b_sft" in stderr
    code, calls, _ = run_launcher(name, [f"{STUDENT}=/models/mine"], home, fake_python, SFT_DIR="/none")
    assert code == 0 and calls[-1].endswith(f"{STUDENT}=/models/mine") and calls[-1].count(STUDENT) == 1
    code, calls, _ = run_launcher("openthoughts3_qwen3_1.7b_sft", ["--cfg", "job"], home, fake_python)
    assert code == 0 and calls == [f"-m verl.trainer.sft_trainer --config-dir {REPO} "
                                   "+recipes=openthoughts3_qwen3_1.7b_sft --cfg job"]
    code, calls, _ = run_launcher("openthoughts3_qwen3_1.7b_sft", ["--cfg", "job"], home, fake_python, NPROC_PER_NODE="4")
    code, calls, _ = run_launcher("openthoughts3_qwen3_1.7b_sft", [], home, fake_python, NPROC_PER_NODE="4")
    assert code == 0 and "--nproc_per_node=4 -m verl.trainer.sft_trainer" in calls[-1]


def test_phase_2_student_defaults_to_where_phase_1_writes(composed, fake_python, tmp_path):
    """Without SFT_DIR the launcher looks in <repo>/<phase 1's trainer.default_local_dir>."""
    home = tmp_path / "home"
    home.mkdir()
    for name, sft in STUDENT_FROM_SFT.items():
        sft_dir = REPO / composed[sft].trainer.default_local_dir
        env = {k: v for k, v in os.environ.items() if k != "SFT_DIR"}
        code, calls, stderr = run_launcher(name, [], home, fake_python, **{**env, "SFT_DIR": ""})
        if (sft_dir / "latest_checkpointed_iteration.txt").is_file():  # a phase 1 run in this checkout
            assert code == 0 and f"{STUDENT}={sft_dir}/global_step_" in calls[-1], (stderr, calls)
        else:
            assert code == 1 and f"no SFT checkpoint in {sft_dir};" in stderr, stderr


# --------------------------------------------------------------------------------------------------------------
# the real command lines (subprocesses), every recipe through the launcher
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cfg_job(tmp_path_factory):
    """name -> (printed config, stderr) of `bash examples/run_recipe.sh <name> --cfg job` with the real
    interpreter (all recipes at once; HOME without data: --cfg job prepares none)."""
    home = tmp_path_factory.mktemp("home")
    env = {**os.environ, "HOME": str(home), "PYTHON": sys.executable, "SFT_DIR": str(home / "no_sft")}
    procs = {
        name: subprocess.Popen(
            ["bash", str(LAUNCHER), name, *required_overrides(name), "--cfg", "job"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=home,
            env=env,
        )
        for name in RECIPES
    }
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        results[name] = (proc.returncode, out, err)
    assert not list(home.joinpath("data").glob("*")), "--cfg job prepared data"
    return results


# seed settings the CPU defaults (opd_verl.cpu.defaults) may change when --cfg job runs on this CPU machine
CPU_CHANGES_ALLOWED = {"actor_rollout_ref.rollout.tensor_model_parallel_size"}


@pytest.mark.parametrize("name", RECIPES)
def test_launcher_cfg_job_composes_the_recipe(name, cfg_job, composed):
    """The CLI path: run_recipe.sh -> python -m opd_verl.main_opd (which validates, and on this CPU machine applies
    the CPU defaults before printing) or python -m verl.trainer.sft_trainer, --config-dir <repo> +recipes=<name>
    --cfg job: every value the recipe sets and every seed setting reaches the printed config."""
    code, out, err = cfg_job[name]
    assert code == 0, err[-3000:]
    printed = yaml.safe_load(out)
    cfg = OmegaConf.create(printed)
    changed = set(re.findall(r"^opd_verl\[cpu\]: ([^=\s]+)=", err, flags=re.M))
    if name in SFT_RECIPES:
        assert not changed
        assert printed["model"]["custom_chat_template"] == recipe_yaml(name)["model"]["custom_chat_template"]
    assert changed & set(SEEDS[name]) <= CPU_CHANGES_ALLOWED, changed
    for key, value in SEEDS[name].items():
        if key not in changed:
            assert OmegaConf.select(cfg, key) == value, key

    def plain(node):
        return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node

    for path in leaf_paths(recipe_yaml(name)):
        key = ".".join(path)
        if key not in changed:
            assert plain(OmegaConf.select(cfg, key)) == plain(OmegaConf.select(composed[name], key)), key
    assert OmegaConf.select(cfg, "trainer.experiment_name") == name


@pytest.mark.parametrize("recipe, extra", [
    ("demo_cpu", []),
    ("demo_cpu_forward_kl", []),
    ("demo_cpu", "PARITY_FULL"),  # bench/parity.py's full-vocabulary mode on top of demo_cpu
])
def test_the_demo_recipes_pass_our_option_checks(recipe, extra):
    """The demo recipes are run by opd_verl.demo and the benches; their opd: sections (demo_cpu_forward_kl inherits
    demo_cpu's) must pass opd_verl's checks, e.g. no option the mode never reads (an inherited +-5 clip under
    ppo_plus_distill with lambda_rl=0)."""
    from opd_verl.checks.options import validate_config

    if extra == "PARITY_FULL":
        sys.path.insert(0, str(REPO / "bench"))
        import parity

        extra = parity.MODES["full"]
    cfg = compose("opd", recipe, ["opd.teacher.path=/t", *extra])
    validate_config(OmegaConf.to_container(cfg, resolve=True))
