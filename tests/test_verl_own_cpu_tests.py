"""verl's own CPU tests still pass with our plugin installed (issue 6).

verl 0.9.1 ships its CPU tests (`tests/**/*_on_cpu.py`) in its wheel. The plugin is loaded by `import verl` in every
process, so it must not break them: every test of tests/verl_compat.py's CI_SUBSET that passes with
`VERL_USE_EXTERNAL_PLUGINS=none` (plugin not loaded) must also pass with the plugin loaded. The subset, why it is a
subset, and the time of each file are documented in tests/verl_compat.py; the full survey is
`.venv/bin/python tests/verl_compat.py`.
"""

from __future__ import annotations

import pytest
from verl_compat import (
    CI_SUBSET, MIN_PASSED, PLUGIN_ENV, Comparison, RunResult, compare, mode_env, parse_junit, verl_cpu_test_files,
)


def test_ci_subset_is_verls_own_cpu_tests():
    """The selection names files the installed verl wheel really ships (a verl upgrade that drops one fails here)."""
    shipped = verl_cpu_test_files()
    assert len(shipped) >= 25, shipped
    missing = sorted(set(CI_SUBSET) - set(shipped))
    assert not missing, f"CI_SUBSET names files verl no longer ships: {missing}"
    assert MIN_PASSED > 0


def test_without_mode_drops_the_cpu_platform_name():
    """VERL_PLATFORM=cpu (set in the driver by a CPU run's defaults, and inherited) names opd_verl's platform:
    without the plugin verl cannot resolve it and every file fails to import. The "with" mode keeps it."""
    base = {"VERL_PLATFORM": "cpu", "PATH": "/bin"}
    assert "VERL_PLATFORM" not in mode_env("without", base) and mode_env("without", base)[PLUGIN_ENV] == "none"
    assert mode_env("with", base)["VERL_PLATFORM"] == "cpu"


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="1" failures="1"
 skipped="2" tests="6" time="1.0"><testcase classname="tests.test_a_on_cpu" name="test_ok" time="0.5" />
<testcase classname="tests.test_a_on_cpu.TestX" name="test_fail[1]" time="0.1"><failure message="AssertionError">
tb</failure></testcase><testcase classname="tests.test_a_on_cpu" name="test_err" time="0.1"><error message="setup
failed">tb</error></testcase><testcase classname="tests.test_a_on_cpu" name="test_skip" time="0"><skipped
type="pytest.skip" message="no GPU">skip</skipped></testcase><testcase classname="tests.test_a_on_cpu"
name="test_xf" time="0"><skipped type="pytest.xfail" message="known" /></testcase><testcase
classname="tests.test_a_on_cpu" name="test_teardown" time="0.2"><error message="teardown">tb</error></testcase>
</testsuite></testsuites>"""


def test_parse_junit_and_compare(tmp_path):
    path = tmp_path / "junit.xml"
    path.write_text(JUNIT)
    outcomes, messages, times = parse_junit(path)
    m = "tests.test_a_on_cpu"
    assert outcomes == {
        f"{m}::test_ok": "passed",
        f"{m}.TestX::test_fail[1]": "failed",
        f"{m}::test_err": "error",
        f"{m}::test_skip": "skipped",
        f"{m}::test_xf": "xfailed",
        f"{m}::test_teardown": "error",
    }
    assert "AssertionError" in messages[f"{m}.TestX::test_fail[1]"] and times[f"{m}::test_ok"] == 0.5

    files = ["tests/test_a_on_cpu.py"]
    without = RunResult("without", files, {"a": "passed", "b": "passed", "c": "passed", "d": "skipped"}, 1.0, 0)
    with_ = RunResult("with", files, {"a": "passed", "b": "failed", "d": "passed"}, 1.0, 1)
    comp = Comparison(without, with_)
    # b fails and c vanished (a crash or timeout of the run) with the plugin; d passing only with it is no failure.
    assert comp.regressions() == {"b": "failed", "c": "missing"}
    assert comp.passed_both() == {"a"} and comp.only_with() == {"d"}
    assert "REGRESSIONS (pass without, not with): 2" in comp.report()


@pytest.mark.e2e
def test_verl_cpu_tests_pass_with_plugin():
    comp = compare(list(CI_SUBSET), timeout=600)
    report = comp.report()
    print(report)
    assert not comp.without.timed_out, report + "\n" + comp.without.output_tail
    assert not comp.with_.timed_out, report + "\n" + comp.with_.output_tail

    # The two modes really differ (else this compares a run with itself): verl was imported in both pytest
    # processes, our entry point only in the second.
    assert comp.without.loaded == "verl=True plugin=False", comp.without.output_tail
    assert comp.with_.loaded == "verl=True plugin=True", comp.with_.output_tail

    # Not vacuous: the files ran and their tests passed without the plugin, each file contributing.
    assert len(comp.without.passed()) >= MIN_PASSED, report + "\n" + comp.without.output_tail
    for rel in CI_SUBSET:
        assert comp.without.in_file(rel) & comp.without.passed(), (
            f"no test of {rel} passed without the plugin\n{report}\n{comp.without.output_tail}"
        )

    # The requirement: nothing that passes without the plugin fails, errors, is skipped or vanishes with it.
    assert not comp.regressions(), report
    assert len(comp.passed_both()) >= MIN_PASSED, report
