#!/usr/bin/env bash
# Set up (.venv, CPU) and run the whole test suite, end-to-end tests included. Extra args go to pytest,
# e.g. `bash examples/run_tests.sh -m "not e2e"` for the fast unit tests only.
set -uo pipefail
cd "$(dirname "$0")/.."
bash examples/setup_cpu.sh --tests || exit 1
.venv/bin/python -m pytest -q -rs "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "run_tests: pytest collected no tests (exit 5): failing, a test run must run tests" >&2
  exit 1
fi
exit "$rc"
