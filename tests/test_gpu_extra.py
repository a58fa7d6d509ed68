"""The `gpu` extra pins what verl 0.9.1's own `vllm` and `fsdp` extras name, at verl's versions (read offline from
the installed verl's metadata), less flash-attn (installed in a second step, see examples/quickstart_gpu.sh) and
mbridge (Megatron only); the flash-attn step installs the version verl names."""

import re
import sys
from importlib.metadata import requires, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent
LEFT_OUT = {"flash-attn", "mbridge"}

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")


def verl_extra(extra: str, seen: frozenset = frozenset()) -> dict[str, str]:
    """{package: version specifier} of verl's extra, its nested verl[...] extras expanded (verl-core excluded:
    our base dependency verl[verl-core] brings it)."""
    out = {}
    for line in requires("verl"):
        req = Requirement(line)
        if req.marker is None or not req.marker.evaluate({"extra": extra}):
            continue
        if canonicalize_name(req.name) == "verl":
            for nested in req.extras - {"verl-core"} - seen:
                out.update(verl_extra(nested, seen | {extra}))
            continue
        out[canonicalize_name(req.name)] = str(req.specifier)
    return out


def our_extra(name: str) -> dict[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["optional-dependencies"][name]]
    return {canonicalize_name(r.name): str(r.specifier) for r in reqs}


def test_verl_is_the_targeted_version():
    assert version("verl") == "0.9.1"


def test_gpu_extra_is_verls_vllm_and_fsdp_extras():
    named = {**verl_extra("vllm"), **verl_extra("fsdp")}
    assert {"vllm", "torch", "flash-attn"} <= set(named), named  # the metadata is read
    expected = {k: v for k, v in named.items() if k not in LEFT_OUT}
    assert our_extra("gpu") == expected


def test_flash_attn_step_installs_the_version_verl_names():
    pin = verl_extra("fsdp")["flash-attn"]
    script = (REPO / "examples" / "quickstart_gpu.sh").read_text()
    steps = re.findall(r"pip install (?:-\S+ )*flash-attn(\S*) --no-build-isolation", script)
    assert steps and set(steps) == {pin}, (steps, pin)
