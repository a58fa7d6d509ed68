#!/usr/bin/env bash
# Phase 2 (OPD): the OpenThoughts3 SFT model of Qwen3-1.7B-Base <- Qwen3-8B, rollout.n=16, AIME 2024 validation.
# Recipe: recipes/openthoughts3_qwen3_1.7b_opd_from_qwen3_8b.yaml (what it reproduces, GPU settings). One node, 8 GPUs.
# The student is the latest checkpoint of phase 1 (examples/openthoughts3_qwen3_1.7b_sft.sh) under SFT_DIR
# (default checkpoints/opd_verl/openthoughts3_qwen3_1.7b_sft), unless actor_rollout_ref.model.path=... is given.
#
#   bash examples/openthoughts3_qwen3_1.7b_opd_from_qwen3_8b.sh [hydra overrides]
#   (e.g. trainer.logger=[console] trainer.total_training_steps=10, or --cfg job to print the config only)
#
# Prepares the data under ~/data first when it is missing (skipped with --cfg job). PYTHON=... picks the
# interpreter (default: the repository's .venv, else python).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
# the repository's .venv when there is one (examples/setup_cpu.sh makes it), else python on PATH
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python; fi
fi

print_only=0
for arg in "$@"; do
    case "$arg" in --cfg|--cfg=*|-c) print_only=1 ;; esac
done

# prepare <script> <output file>... -- <script args>: run data_preprocess/<script>.py unless every output exists
prepare() {
    local script="$1"; shift
    local outputs=()
    while [ "$#" -gt 0 ] && [ "$1" != "--" ]; do outputs+=("$1"); shift; done
    [ "$#" -gt 0 ] && shift
    local missing=0 f
    for f in "${outputs[@]}"; do [ -f "$f" ] || missing=1; done
    if [ "$missing" = 1 ] && [ "$print_only" = 0 ]; then
        "$PYTHON" "data_preprocess/$script.py" "$@"
    fi
}

prepare openthoughts3 "$HOME/data/openthoughts3/train.parquet" -- \
    --local_dir "$HOME/data/openthoughts3" --max_samples "${OT3_MAX_SAMPLES:-50000}"
prepare aime2024 "$HOME/data/aime2024/train.parquet" -- --local_dir "$HOME/data/aime2024"

student=()
given=0
for arg in "$@"; do
    case "$arg" in
        actor_rollout_ref.model.path=* | +actor_rollout_ref.model.path=* | ++actor_rollout_ref.model.path=*) given=1 ;;
    esac
done
if [ "$given" = 0 ]; then
    SFT_DIR="${SFT_DIR:-$REPO/checkpoints/opd_verl/openthoughts3_qwen3_1.7b_sft}"
    tracker="$SFT_DIR/latest_checkpointed_iteration.txt"
    if [ -f "$tracker" ]; then
        student=("actor_rollout_ref.model.path=$SFT_DIR/global_step_$(tr -d '[:space:]' < "$tracker")/huggingface")
    elif [ "$print_only" = 0 ]; then
        echo "error: no SFT checkpoint in $SFT_DIR; run examples/openthoughts3_qwen3_1.7b_sft.sh first," \
            "set SFT_DIR, or pass actor_rollout_ref.model.path=<HF model directory>" >&2
        exit 1
    fi
fi

exec "$PYTHON" -m opd_verl.main_opd --config-dir "$REPO" +recipes=openthoughts3_qwen3_1.7b_opd_from_qwen3_8b \
    ${student[@]+"${student[@]}"} "$@"
