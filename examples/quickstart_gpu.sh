#!/usr/bin/env bash
# GPU quickstart, step by step: pure OPD (sampled reverse KL) of Qwen/Qwen2-0.5B from Qwen/Qwen2-7B on GSM8K with
# recipes/gsm8k_qwen2_0.5b_reverse_kl.yaml, on one node with 8 GPUs or on several nodes. Run from anywhere; each
# step runs its commands from the repository root. PRINT=1 prints a step's commands instead of running them
# (tests/test_quickstart_gpu.py runs every main_opd command printed here with --cfg job).
#
# One node, 8 GPUs:
#   bash examples/quickstart_gpu.sh install        # .venv with the gpu extra (torch 2.11.0, vLLM 0.24.0, ...), then flash-attn
#                                                  # (compiled from source: needs nvcc of CUDA 13, can take an hour)
#   bash examples/quickstart_gpu.sh data           # GSM8K -> $DATA/gsm8k/{train,test}.parquet
#   bash examples/quickstart_gpu.sh train          # train; metrics on the console and in $RUN_DIR/metrics.jsonl
#   bash examples/quickstart_gpu.sh resume         # after a stop: continue from the newest checkpoint
#   bash examples/quickstart_gpu.sh export [N]     # checkpoint global_step_N (default: the newest) -> HF model
#   bash examples/quickstart_gpu.sh evaluate [N]   # teacher, student before and after on GSM8K's test set (vLLM)
#   bash examples/quickstart_gpu.sh validate       # or: the recipe's own validation of the newest checkpoint
# Several nodes (each with 8 GPUs, the repository and .venv at the same path, $DATA and $RUN_DIR on a file system
# every node sees):
#   bash examples/quickstart_gpu.sh head                 # on the head node: start Ray
#   bash examples/quickstart_gpu.sh worker <head address> # on each other node: join it
#   NNODES=2 bash examples/quickstart_gpu.sh train-nodes  # on the head node, once `ray status` lists every node
#
# Settings (environment): DATA (default ~/data), RUN_DIR (checkpoints and metrics; default
# ~/opd_runs/gsm8k_qwen2_0.5b_reverse_kl), NNODES (train-nodes; default 2: the recipe's 256 prompts x 4 samples
# must divide by NNODES x 8 ranks), RAY_PORT (default 6379), PYTHON (default: .venv/bin/python), MAX_JOBS (install:
# flash-attn's parallel compile jobs; default 4).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
RECIPE=gsm8k_qwen2_0.5b_reverse_kl
DATA="${DATA:-$HOME/data}"
RUN_DIR="${RUN_DIR:-$HOME/opd_runs/$RECIPE}"
NNODES="${NNODES:-2}"
RAY_PORT="${RAY_PORT:-6379}"

run() {  # run a command, or with PRINT=1 print it (shell-quoted, one line)
    if [ -n "${PRINT:-}" ]; then printf '%q ' "$@" | sed 's/ $//'; echo; else "$@"; fi
}

# The run: the recipe plus where its data, checkpoints and metrics go. trainer.device=cuda is explicit so that a
# head node without GPUs launches a GPU run on its cluster (a run says nothing: CPU when no GPU is visible).
TRAIN=(-m opd_verl.main_opd --config-dir "$REPO" +recipes=$RECIPE trainer.device=cuda
       data.train_files="$DATA/gsm8k/train.parquet" data.val_files="$DATA/gsm8k/test.parquet"
       trainer.default_local_dir="$RUN_DIR/checkpoints")

step="${1:-}"
case "$step" in
install)
    # flash-attn is not in the gpu extra: it builds against the installed torch (--no-build-isolation), so it is
    # installed after it. Its setup tries a prebuilt wheel from its GitHub release first, but 2.8.3's release has
    # none for torch 2.11 (PyPI's build is CUDA 13.0), so it compiles: it needs the CUDA 13 toolkit's nvcc and can
    # take an hour. MAX_JOBS compiles run at once, each up to ~9 GB of memory (flash-attn's estimate): 4 here unless
    # you set MAX_JOBS (unset, flash-attn's setup would pick min(cores / 2, free GB / 9) itself).
    fa_jobs="${MAX_JOBS:-4}"
    if ! [[ "$fa_jobs" =~ ^[1-9][0-9]*$ ]]; then
        echo "quickstart_gpu.sh: MAX_JOBS=$fa_jobs is not a positive integer; set e.g. MAX_JOBS=4" >&2
        exit 2
    fi
    [ -x "$PYTHON" ] || run python3 -m venv "$REPO/.venv"
    run "$PYTHON" -m pip install --upgrade "pip>=24"
    run "$PYTHON" -m pip install -e ".[gpu]"
    run "$PYTHON" -m pip install setuptools wheel packaging ninja psutil
    echo "quickstart_gpu.sh: flash-attn 2.8.3 has no prebuilt wheel for torch 2.11: it compiles from source" \
         "with MAX_JOBS=$fa_jobs; this can take an hour" >&2
    run env MAX_JOBS="$fa_jobs" "$PYTHON" -m pip install flash-attn==2.8.3 --no-build-isolation
    run "$PYTHON" -c "import torch, vllm, flash_attn, opd_verl.plugin as p; p.require_plugin_loaded(); print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), '| vllm', vllm.__version__, '| flash_attn', flash_attn.__version__)"
    ;;
data)
    run "$PYTHON" data_preprocess/gsm8k.py --local_dir "$DATA/gsm8k"
    ;;
train)
    # Metrics: verl's console lines (opd/kl_per_token, opd/teacher_logprob, ...: docs/metrics.md) and the same as
    # JSON lines in $RUN_DIR/metrics.jsonl (verl's file logger, which rewrites the file at each start). For wandb
    # too: trainer.logger=[console,file,wandb] after `wandb login`. Checkpoints: $RUN_DIR/checkpoints/global_step_<N>
    # every trainer.save_freq=50 steps (the recipe's), the newest 2 kept.
    run mkdir -p "$RUN_DIR"
    run env VERL_FILE_LOGGER_PATH="$RUN_DIR/metrics.jsonl" "$PYTHON" "${TRAIN[@]}" 'trainer.logger=[console,file]'
    ;;
resume)
    # The train command again: trainer.resume_mode=auto (verl's default, explicit here) continues from the newest
    # complete checkpoint in $RUN_DIR/checkpoints (trainer.resume_mode=resume_path
    # trainer.resume_from_path=$RUN_DIR/checkpoints/global_step_<N> picks one). Metrics go to a new file, since the
    # file logger would overwrite the first run's.
    run env VERL_FILE_LOGGER_PATH="$RUN_DIR/metrics_resumed_$(date +%Y%m%d_%H%M%S).jsonl" "$PYTHON" "${TRAIN[@]}" \
        'trainer.logger=[console,file]' trainer.resume_mode=auto
    ;;
head)
    # Ray of this .venv (the workers run its python); the head's GPUs count as one of the nodes.
    run "$(dirname "$PYTHON")/ray" start --head --port="$RAY_PORT"
    ;;
worker)
    head_address="${2:?usage: bash examples/quickstart_gpu.sh worker <head node address>}"
    run "$(dirname "$PYTHON")/ray" start --address="$head_address:$RAY_PORT"
    ;;
train-nodes)
    # On the head node. +ray_kwargs.ray_init.address=auto joins the cluster started above (without it a head
    # without GPUs would stop: no accelerator and no cluster given). Metrics on the console: the file logger writes
    # on whichever node verl's TaskRunner lands; for a record use trainer.logger=[console,wandb] or
    # [console,tensorboard] with TENSORBOARD_DIR on the shared file system.
    run "$PYTHON" "${TRAIN[@]}" trainer.nnodes="$NNODES" trainer.n_gpus_per_node=8 +ray_kwargs.ray_init.address=auto \
        'trainer.logger=[console]'
    ;;
export | evaluate)
    # N: the step to export (default: the newest, from verl's tracker latest_checkpointed_iteration.txt)
    n="${2:-$(cat "$RUN_DIR/checkpoints/latest_checkpointed_iteration.txt" 2>/dev/null || true)}"
    [ -n "$n" ] || { echo "quickstart_gpu.sh: no checkpoint in $RUN_DIR/checkpoints; give the step: $step N" >&2; exit 2; }
    HF_OUT="$RUN_DIR/hf/global_step_$n"
    if [ "$step" = export ]; then
        # The recipe saves hf_model (actor/huggingface), which is copied; a LoRA student's FSDP shards are merged
        # with verl's model merger and the adapter merged into the base. The result loads in transformers and vLLM.
        run "$PYTHON" -m opd_verl.export --checkpoint "$RUN_DIR/checkpoints/global_step_$n" --out "$HF_OUT"
    else
        # vLLM's offline engine in bf16, one model after the other on one GPU (--tensor-parallel-size for more):
        # greedy accuracy, avg@8 and pass@8 at temperature 1, and the gap closed by OPD; answers up to the recipe's
        # max_response_length (1024 tokens). The metrics also go to $RUN_DIR/eval_global_step_N.json.
        run "$PYTHON" -m opd_verl.evaluate --backend vllm --teacher Qwen/Qwen2-7B --student-before Qwen/Qwen2-0.5B \
            --student-after "$HF_OUT" --data "$DATA/gsm8k/test.parquet" --greedy --k 8 --temperature 1.0 \
            --max-new-tokens 1024 --out "$RUN_DIR/eval_global_step_$n.json"
    fi
    ;;
validate)
    # The in-trainer way: the recipe's validation (val-core/openai/gsm8k/acc/mean@1 with its val_kwargs) of the
    # newest checkpoint, then exit: trainer.val_only=True with the recipe's val_before_train=True.
    run env VERL_FILE_LOGGER_PATH="$RUN_DIR/metrics_val_$(date +%Y%m%d_%H%M%S).jsonl" "$PYTHON" "${TRAIN[@]}" \
        'trainer.logger=[console,file]' trainer.resume_mode=auto trainer.val_only=True
    ;;
*)
    echo "usage: bash examples/quickstart_gpu.sh install|data|train|resume|export [N]|evaluate [N]|validate|head|worker <head address>|train-nodes" >&2
    exit 2
    ;;
esac
