#!/usr/bin/env bash
# Phase 1 (SFT): Qwen3-1.7B-Base on OpenThoughts3 reasoning traces with verl's SFT trainer (torchrun).
# Recipe: recipes/openthoughts3_qwen3_1.7b_sft.yaml (what it reproduces, GPU settings).
# One node, NPROC_PER_NODE GPUs (default 8).
# Phase 2: examples/openthoughts3_qwen3_1.7b_opd_from_qwen3_8b.sh
#
#   bash examples/openthoughts3_qwen3_1.7b_sft.sh [hydra overrides]
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

prepare openthoughts3 "$HOME/data/openthoughts3_sft/train.parquet" -- \
    --mode sft --local_dir "$HOME/data/openthoughts3_sft" --max_samples "${OT3_MAX_SAMPLES:-50000}"

if [ "$print_only" = 1 ]; then
    # compose and print only: no need for torchrun's workers
    exec "$PYTHON" -m verl.trainer.sft_trainer --config-dir "$REPO" +recipes=openthoughts3_qwen3_1.7b_sft "$@"
fi
exec "$PYTHON" -m torch.distributed.run --standalone --nnodes=1 --nproc_per_node="${NPROC_PER_NODE:-8}" \
    -m verl.trainer.sft_trainer --config-dir "$REPO" +recipes=openthoughts3_qwen3_1.7b_sft "$@"
