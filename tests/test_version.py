"""One version story: opd_verl.__version__ is the package's version (pyproject.toml reads it), docs/CHANGELOG.md
opens with its section, and every deprecated name still working says a later release removes it."""

from __future__ import annotations

import re

from packaging.version import Version

import opd_verl
from conftest import REPO


def test_pyproject_reads_the_version_from_the_package():
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    assert apply_configuration(Distribution(), REPO / "pyproject.toml").get_version() == opd_verl.__version__
    assert opd_verl.__version__ == "0.2.0"


def test_the_changelog_opens_with_this_version():
    headings = re.findall(r"^## (.+)$", (REPO / "docs" / "CHANGELOG.md").read_text(), flags=re.M)
    assert headings and headings[0].split()[0] == opd_verl.__version__, headings[:2]


def test_deprecated_names_are_removed_in_a_later_release(composed_config):
    from opd_verl.checks.modes import DEPRECATED_DISTILL_LOSS_MODES, deprecation_notes

    for name in DEPRECATED_DISTILL_LOSS_MODES:
        cfg = composed_config()
        cfg["actor_rollout_ref"]["actor"]["policy_loss"]["loss_mode"] = name
        (note,) = deprecation_notes(cfg)
        (removal,) = re.findall(r"until opd_verl (\d+\.\d+)", note)
        assert Version(removal) > Version(opd_verl.__version__), note


def test_the_old_metric_names_are_gone():
    """Dropped in 0.2.0 (docs/CHANGELOG.md): nothing in the package logs distill/* or actor/distill/* any more."""
    hits = [f"{path.relative_to(REPO)}:{n}" for path in (REPO / "opd_verl").rglob("*.py")
            for n, line in enumerate(path.read_text().splitlines(), 1)
            if re.search(r"[\"'](actor/)?distill/", line)]
    assert not hits, hits
