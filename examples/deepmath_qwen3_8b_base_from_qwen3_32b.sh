#!/usr/bin/env bash
# Pure OPD: Qwen3-8B-Base (LoRA rank 128) <- Qwen3-32B on DeepMath-103K, validated on AIME 2024 (8 samples).
# Recipe: recipes/deepmath_qwen3_8b_base_from_qwen3_32b.yaml (what it reproduces, GPU settings). One node, 8 GPUs.
#
#   bash examples/deepmath_qwen3_8b_base_from_qwen3_32b.sh [hydra overrides]
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

prepare deepmath "$HOME/data/deepmath/train.parquet" -- --local_dir "$HOME/data/deepmath"
prepare aime2024 "$HOME/data/aime2024/train.parquet" -- --local_dir "$HOME/data/aime2024"

exec "$PYTHON" -m opd_verl.main_opd --config-dir "$REPO" +recipes=deepmath_qwen3_8b_base_from_qwen3_32b "$@"
