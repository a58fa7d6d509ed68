"""The import graph says what the layout says: the training core and the patches of every platform never import the
CPU support or the demo, the math imports no verl, and the CPU support is loaded only where a CPU run is possible."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "opd_verl"
CORE = ("algorithms", "verl_ext", "checks")
EVERY_PLATFORM = (*CORE, "patches")  # what a GPU run imports (opd_verl/patches: the patches of every platform)
STDLIB_OK = {"__future__", "math", "typing", "collections", "dataclasses", "functools", "itertools"}


def _imports(path: Path) -> list[str]:
    """Every module imported anywhere in the file (function-level imports too; relative ones made absolute)."""
    package = list(path.relative_to(PACKAGE.parent).parent.parts)  # e.g. ["opd_verl", "patches"]
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            names.append(".".join([*base, *([node.module] if node.module else [])]))
    return names


def _modules(folder: str) -> list[Path]:
    """Every module below ``folder``, those of its subpackages too (e.g. algorithms/divergences/)."""
    return sorted((PACKAGE / folder).rglob("*.py"))


@pytest.mark.parametrize("path", [p for f in EVERY_PLATFORM for p in _modules(f)], ids=lambda p: f"{p.parent.name}/{p.name}")
def test_training_core_and_patches_never_import_cpu_support_or_demo(path):
    bad = [m for m in _imports(path) if m.split(".")[:2] in (["opd_verl", "cpu"], ["opd_verl", "demo"])]
    assert not bad, f"{path.relative_to(PACKAGE.parent)} imports {bad}: the GPU path must not touch CPU/demo code"


@pytest.mark.parametrize("path", _modules("algorithms"), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_algorithms_are_pure_torch(path):
    bad = [m for m in _imports(path)
           if m.split(".")[0] not in {"torch", *STDLIB_OK} and not m.startswith("opd_verl.algorithms")]
    where = path.relative_to(PACKAGE)
    assert not bad, f"{where} imports {bad}: opd_verl/algorithms is pure torch (no verl, no other opd_verl)"


def test_each_core_folder_has_modules():
    for folder in (*EVERY_PLATFORM, "cpu", "cpu/patches", "demo"):
        assert _modules(folder), folder


def test_cpu_support_is_loaded_only_where_a_cpu_run_is_possible():
    from opd_verl.plugin import cpu_support_wanted

    assert cpu_support_wanted({}, cpu_only_torch=True)  # a CPU build of torch: nothing else can run here
    assert cpu_support_wanted({"VERL_PLATFORM": "cpu"}, cpu_only_torch=False)  # every process of a CPU run
    assert not cpu_support_wanted({}, cpu_only_torch=False)  # a CUDA/ROCm/NPU torch: never
    assert not cpu_support_wanted({"VERL_PLATFORM": "cuda"}, cpu_only_torch=False)
