#!/usr/bin/env bash
# Hybrid GRPO + 0.1 x per-token KL (opd_hybrid): Qwen2.5-1.5B <- Qwen2.5-7B-Instruct on GSM8K.
# Recipe: recipes/hybrid_grpo_kl_qwen2.5_1.5b_from_qwen2.5_7b.yaml (what it reproduces, GPU settings). One node, 8 GPUs.
#
#   bash examples/hybrid_grpo_kl_qwen2.5_1.5b_from_qwen2.5_7b.sh [hydra overrides]
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

prepare gsm8k "$HOME/data/gsm8k/train.parquet" "$HOME/data/gsm8k/test.parquet" -- --local_dir "$HOME/data/gsm8k"

exec "$PYTHON" -m opd_verl.main_opd --config-dir "$REPO" +recipes=hybrid_grpo_kl_qwen2.5_1.5b_from_qwen2.5_7b "$@"
