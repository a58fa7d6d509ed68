"""examples/quickstart_gpu.sh: every `python -m opd_verl.main_opd` command it would run (printed by the script
itself with PRINT=1, so after bash's expansion) is run here with --cfg job.

What --cfg job checks, on this CPU-only machine exactly as on the GPU node (each command says trainer.device=cuda,
so no CPU defaults apply and the config printed is the GPU run's): Hydra composes verl's ppo_trainer, the recipe and
the overrides (every key exists, the syntax parses); our option checks; preflight, which here (offline, empty Hugging
Face cache) skips the vocabulary and chat-template checks with one line; verl's keys that verl would reject inside
a Ray worker (missing values, the batch arithmetic over trainer.nnodes x n_gpus_per_node ranks). Not checked: the
data files (read only by a real launch), the device and the Ray cluster (likewise), model downloads, memory, and the
install, data and `ray start` steps, which are only printed here (their arguments are checked against the train
commands below).
"""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "examples" / "quickstart_gpu.sh"
RECIPE = "gsm8k_qwen2_0.5b_reverse_kl"


def printed(step: str, tmp_path: Path, *args: str, **env: str) -> list[list[str]]:
    """The commands `step` runs, as argv lists (PRINT=1: the script prints each, shell-quoted)."""
    result = subprocess.run(
        ["bash", str(SCRIPT), step, *args], capture_output=True, text=True, timeout=60,
        env={**os.environ, "PRINT": "1", "PYTHON": sys.executable, "DATA": str(tmp_path / "data"),
             "RUN_DIR": str(tmp_path / "run"), **env},
    )
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines()]


def split_env(argv: list[str]) -> tuple[dict, list[str]]:
    """`env K=V ... cmd` -> ({K: V}, cmd)."""
    env = {}
    if argv and argv[0] == "env":
        argv = argv[1:]
        while argv and "=" in argv[0] and not argv[0].startswith("-"):
            key, value = argv.pop(0).split("=", 1)
            env[key] = value
    return env, argv


def main_opd_commands(tmp_path: Path, step: str, **env: str) -> list[tuple[dict, list[str]]]:
    out = [split_env(argv) for argv in printed(step, tmp_path, **env)]
    return [(e, argv) for e, argv in out if argv[1:3] == ["-m", "opd_verl.main_opd"]]


def test_script_is_bash_clean_and_the_steps_print_their_commands(tmp_path):
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    install = [" ".join(argv) for argv in printed("install", tmp_path)]
    assert f"{sys.executable} -m pip install -e .[gpu]" in install
    assert install.index(f"{sys.executable} -m pip install -e .[gpu]") < next(
        i for i, line in enumerate(install) if "flash-attn==" in line)  # flash-attn after torch
    assert printed("data", tmp_path) == [[sys.executable, "data_preprocess/gsm8k.py", "--local_dir",
                                          str(tmp_path / "data" / "gsm8k")]]
    ray = str(Path(sys.executable).parent / "ray")
    assert printed("head", tmp_path) == [[ray, "start", "--head", "--port=6379"]]
    assert printed("worker", tmp_path, "10.1.2.3") == [[ray, "start", "--address=10.1.2.3:6379"]]
    for step in ("install", "data", "head"):
        assert not main_opd_commands(tmp_path, step)
    bad = subprocess.run(["bash", str(SCRIPT), "nonsense"], capture_output=True, text=True)
    assert bad.returncode == 2 and "usage:" in bad.stderr


@pytest.mark.parametrize("user_jobs, jobs", [("", "4"), ("16", "16")])  # "": unset (MAX_JOBS="" counts as unset)
def test_flash_attn_compiles_with_max_jobs(tmp_path, user_jobs, jobs):
    """flash-attn 2.8.3 has no prebuilt wheel for torch 2.11, so its install compiles: with MAX_JOBS on the command
    (the user's, else 4), and a line on stderr saying so; a MAX_JOBS that is not a positive integer stops first."""
    result = subprocess.run(
        ["bash", str(SCRIPT), "install"], capture_output=True, text=True, timeout=60,
        env={**os.environ, "PRINT": "1", "PYTHON": sys.executable, "MAX_JOBS": user_jobs},
    )
    assert result.returncode == 0, result.stderr
    [(env, argv)] = [split_env(shlex.split(line)) for line in result.stdout.splitlines() if "flash-attn==" in line]
    assert env == {"MAX_JOBS": jobs}
    assert argv == [sys.executable, "-m", "pip", "install", "flash-attn==2.8.3", "--no-build-isolation"]
    assert f"compiles from source with MAX_JOBS={jobs}; this can take an hour" in result.stderr
    bad = subprocess.run(["bash", str(SCRIPT), "install"], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PRINT": "1", "PYTHON": sys.executable, "MAX_JOBS": "all"})
    assert bad.returncode == 2 and "MAX_JOBS=all is not a positive integer" in bad.stderr and not bad.stdout


@pytest.mark.parametrize("step,nnodes", [("train", 1), ("resume", 1), ("validate", 1), ("train-nodes", 2)])
def test_main_opd_command_composes_and_validates(step, nnodes, tmp_path):
    commands = main_opd_commands(tmp_path, step, NNODES=str(nnodes) if step == "train-nodes" else "2")
    assert len(commands) == 1, commands
    env, argv = commands[0]
    assert argv[0] == sys.executable and f"+recipes={RECIPE}" in argv
    result = subprocess.run([*argv, "--cfg", "job"], cwd=REPO, capture_output=True, text=True, timeout=180,
                            env={**os.environ, **env})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "opd_verl[cpu]" not in result.stderr  # a GPU run's config: no CPU defaults
    cfg = yaml.safe_load(result.stdout)
    trainer = cfg["trainer"]
    assert (trainer["device"], trainer["nnodes"], trainer["n_gpus_per_node"]) == ("cuda", nnodes, 8)
    assert trainer["default_local_dir"] == str(tmp_path / "run" / "checkpoints")
    # the data the data step writes (data_preprocess/gsm8k.py: <local_dir>/{train,test}.parquet)
    local_dir = Path(printed("data", tmp_path)[0][-1])
    assert (cfg["data"]["train_files"], cfg["data"]["val_files"]) == (str(local_dir / "train.parquet"),
                                                                      str(local_dir / "test.parquet"))
    assert cfg["algorithm"]["adv_estimator"] == "opd" and cfg["opd"]["teacher"]["path"] == "Qwen/Qwen2-7B"
    if step == "train-nodes":
        assert cfg["ray_kwargs"]["ray_init"]["address"] == "auto" and trainer["logger"] == ["console"]
        assert not env
    else:
        assert trainer["logger"] == ["console", "file"]
        assert Path(env["VERL_FILE_LOGGER_PATH"]).parent == tmp_path / "run"
        assert trainer["resume_mode"] == "auto"
    if step in ("resume", "validate"):  # a new metrics file: verl's file logger rewrites its file at each start
        assert Path(env["VERL_FILE_LOGGER_PATH"]).name != "metrics.jsonl"
    # validate: the newest checkpoint's validation only (verl returns after val_before_train when val_only)
    assert (trainer["val_only"], trainer["val_before_train"]) == ((True, True) if step == "validate" else (False, True))


def test_export_and_evaluate_steps_print_the_commands(tmp_path):
    """export N: opd_verl.export of global_step_N into run/hf/global_step_N; evaluate N: opd_verl.evaluate with
    vLLM on that directory, the teacher and the student before (the recipe's), on the data step's test file; both
    parse with the tools' own argument parsers. Without N and without a checkpoint: exit 2 naming the fix."""
    from opd_verl import evaluate, export

    run = tmp_path / "run"
    [cmd] = printed("export", tmp_path, "4")
    assert cmd == [sys.executable, "-m", "opd_verl.export", "--checkpoint", str(run / "checkpoints" / "global_step_4"),
                   "--out", str(run / "hf" / "global_step_4")]
    [cmd] = printed("evaluate", tmp_path, "4")
    assert cmd[:3] == [sys.executable, "-m", "opd_verl.evaluate"]
    args = cmd[3:]
    value = lambda flag: args[args.index(flag) + 1]  # noqa: E731
    assert value("--backend") == "vllm" and value("--student-after") == str(run / "hf" / "global_step_4")
    assert (value("--teacher"), value("--student-before")) == ("Qwen/Qwen2-7B", "Qwen/Qwen2-0.5B")
    assert value("--data") == str(Path(printed("data", tmp_path)[0][-1]) / "test.parquet")
    parsed = evaluate.build_parser().parse_args(args)
    assert (parsed.greedy, parsed.k, parsed.max_new_tokens) == (True, 8, 1024)
    assert export.build_parser().parse_args(printed("export", tmp_path, "4")[0][3:]).out == str(run / "hf" / "global_step_4")
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "latest_checkpointed_iteration.txt").write_text("6")
    assert printed("export", tmp_path)[0][4] == str(run / "checkpoints" / "global_step_6")
    (run / "checkpoints" / "latest_checkpointed_iteration.txt").unlink()
    missing = subprocess.run(["bash", str(SCRIPT), "export"], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "PRINT": "1", "RUN_DIR": str(run)})
    assert missing.returncode == 2 and "give the step: export N" in missing.stderr
