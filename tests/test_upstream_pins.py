"""Code mirrored from verl is pinned by the sha256 of the upstream source (opd_verl.verl_ext.upstream.MIRRORS): a
verl upgrade that changes an original fails here, naming our copy to revisit."""

from __future__ import annotations

import importlib

import pytest

from opd_verl.verl_ext.upstream import MIRRORS, VERL_VERSION, upstream_sha


def test_installed_verl_is_the_pinned_version():
    import verl

    assert verl.__version__ == VERL_VERSION


@pytest.mark.parametrize("copy", sorted(MIRRORS))
def test_mirrored_verl_code_is_unchanged(copy):
    target, pinned = MIRRORS[copy]
    assert upstream_sha(target) == pinned, (
        f"verl's {target} changed since verl {VERL_VERSION}: revisit our copy {copy}, then update its pin")


@pytest.mark.parametrize("copy", sorted(MIRRORS))
def test_our_copy_exists_and_names_its_original(copy):
    module_name, qualname = copy.split(":")
    obj = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    source = importlib.import_module(module_name).__file__
    text = open(source).read()
    original = MIRRORS[copy][0].split(":")[1].split(".")[-1]
    assert original in text, f"{copy} should say which verl function it mirrors ({MIRRORS[copy][0]})"
