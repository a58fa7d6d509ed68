#!/usr/bin/env bash
# Set up (.venv, CPU) and run the test suite (what CI runs): unit tests and end-to-end tests, without those marked
# `slow`. Extra args go to pytest and a -m of theirs replaces the default selection, e.g.
# `bash examples/run_tests.sh -m slow` (the slow end-to-end runs only), `-m "not e2e"` (unit tests only).
set -uo pipefail
cd "$(dirname "$0")/.."
bash examples/setup_cpu.sh --tests || exit 1
.venv/bin/python -m pytest -q -rs --durations=15 -m "not slow" "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "run_tests: pytest collected no tests (exit 5): failing, a test run must run tests" >&2
  exit 1
fi
exit "$rc"
