"""verl's own CPU tests, run without and with our plugin, and compared (issue 6).

The verl 0.9.1 wheel ships its CPU tests as the top-level package `tests` (files `tests/**/*_on_cpu.py`, listed in
the wheel's RECORD). `import verl` loads every `verl.plugins` entry point, ours included, unless
`VERL_USE_EXTERNAL_PLUGINS=none`. So running the same files twice, once with that variable and once without it,
shows whether installing opd_verl breaks anything verl itself tests. The requirement: every test that passes
without the plugin also passes with it.

Used by tests/test_verl_own_cpu_tests.py (CI) and as a command line for the full survey:

    .venv/bin/python tests/verl_compat.py                 # all verl *_on_cpu.py files, one pytest per file and mode
    .venv/bin/python tests/verl_compat.py --ci-subset     # the CI selection, one pytest per mode
    .venv/bin/python tests/verl_compat.py --json out.json FILE ...

Each pytest runs in a fresh process (cwd: a temporary directory; `-c` an empty ini so our pyproject's pytest
settings don't apply; `--rootdir` site-packages, so the files import as `tests.<...>` like in verl's repo),
outcomes are read from a JUnit XML report, and the process group is killed on timeout (Ray clusters included).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from opd_verl.demo.runs import kill_process_group

PLUGIN_ENV = "VERL_USE_EXTERNAL_PLUGINS"
MODES = ("without", "with")  # without: VERL_USE_EXTERNAL_PLUGINS=none; with: the variable unset (verl's "auto")

# --- Measured here (verl 0.9.1, this project's machine: 2 cores shared with other engineers' e2e runs, load average
# 4-38 during the measurements, so wall times vary 2x between runs).
#
# Full survey, `python tests/verl_compat.py` (one pytest process per file and mode): all 30 verl *_on_cpu.py
# files, 317 tests; 317 passed without the plugin, the same 317 with it; no failure, error, skip or timeout in
# either mode; 2171 s in all (1075 s without + 1095 s with). Per file: tests passed, then the wall time of one
# pytest process (interpreter start, `import verl`, collection and tests) without / with the plugin:
FULL_SURVEY: dict[str, str] = {
    "tests/checkpoint_engine/test_fsdp_lora_only_checkpoint_on_cpu.py": "16 passed; 47 s / 43 s",
    "tests/checkpoint_engine/test_global_steps_on_cpu.py": "2 passed; 35 s / 36 s",
    "tests/checkpoint_engine/test_sglang_fusion_bucketing_on_cpu.py": "12 passed; 29 s / 30 s",
    "tests/experimental/agent_loop/test_agent_loop_extra_fields_schema_on_cpu.py": "7 passed; 42 s / 38 s",
    "tests/experimental/agent_loop/test_audio_server_contract_on_cpu.py": "4 passed; 4 s / 3 s; never imports verl",
    "tests/experimental/agent_loop/test_call_tool_on_cpu.py": "8 passed; 28 s / 52 s",
    "tests/experimental/agent_loop/test_multimodal_position_ids_on_cpu.py": "1 passed; 32 s / 34 s",
    "tests/experimental/agent_loop/test_qwen3_tool_parser_on_cpu.py": "5 passed; 37 s / 51 s",
    "tests/experimental/agent_loop/test_tool_call_id_on_cpu.py": "3 passed; 65 s / 65 s",
    "tests/experimental/fully_async_policy/test_async_genrm_config_on_cpu.py": "5 passed; 53 s / 30 s",
    "tests/single_controller/test_auto_padding_on_cpu.py": "1 passed; 72 s / 104 s; Ray",
    "tests/single_controller/test_decorator_on_cpu.py": "3 passed; 186 s / 139 s; Ray",
    "tests/single_controller/test_fused_workers_on_cpu.py": "1 passed; 35 s / 52 s; Ray",
    "tests/single_controller/test_ray_local_envs_on_cpu.py": "2 passed; 102 s / 83 s; Ray",
    "tests/single_controller/test_ray_utils_on_cpu.py": "3 passed; 43 s / 55 s; Ray",
    "tests/test_base_config_on_cpu.py": "3 passed; 15 s / 16 s",
    "tests/test_protocol_on_cpu.py": "38 passed; 18 s / 20 s",
    "tests/test_protocol_v2_on_cpu.py": "38 passed; 18 s / 20 s",
    "tests/tools/test_function_tool_on_cpu.py": "32 passed; 17 s / 12 s; one test reads verl/... relative to the cwd",
    "tests/tools/test_mixed_tools_on_cpu.py": "10 passed; 10 s / 10 s",
    "tests/trainer/ppo/test_core_algos_on_cpu.py": "23 passed; 11 s / 12 s",
    "tests/trainer/ppo/test_dynamic_policy_losses_on_cpu.py": "1 passed; 15 s / 22 s",
    "tests/trainer/ppo/test_loss_aggregation_on_cpu.py": "6 passed; 20 s / 16 s",
    "tests/trainer/ppo/test_metric_utils_on_cpu.py": "38 passed; 16 s / 18 s",
    "tests/trainer/ppo/test_reinforce_pp_multiturn_on_cpu.py": "6 passed; 19 s / 23 s",
    "tests/trainer/ppo/test_rollout_moe_lb_metrics_on_cpu.py": "15 passed; 31 s / 37 s",
    "tests/trainer/ppo/test_spec_decode_metrics_on_cpu.py": "3 passed; 31 s / 25 s",
    "tests/trainer/ppo/test_value_loss_normalization_on_cpu.py": "26 passed; 16 s / 15 s",
    "tests/trainer/test_constants_ppo_on_cpu.py": "3 passed; 9 s / 7 s",
    "tests/trainer/test_multi_trajectories_advantage_on_cpu.py": "2 passed; 18 s / 27 s",
}
# (test_function_tool_on_cpu's cwd-relative test failed in both modes until run_pytest linked `verl` into the cwd.)
#
# Run in ONE pytest process per mode (how CI runs), the cost is the shared imports plus each file's own:
#   - the 24 files that neither start Ray nor skip `import verl`: 303 tests, 41 s without / 37 s with the plugin
#     (all tests together ran under 5 s; the rest is interpreter start, imports and collection);
#   - the 5 Ray files (tests/single_controller): 10 tests, 379 s / 363 s: every file starts its own Ray cluster
#     (ray.init(num_cpus=100), workers started one by one) and on 2 busy cores that takes minutes. Time in the tests
#     of each, without / with: auto_padding 73/27 s, decorator 162/82 s, fused_workers 38/39 s, ray_local_envs
#     62/132 s, ray_utils 21/68 s;
#   - all 30 files: 317 tests, 414 s / 239 s (11 min with both modes): over the CI budget (~5 min for this test).
#
# The CI selection (tests/test_verl_own_cpu_tests.py), run in one pytest process per mode, sequentially:
# every file that does not start Ray, except test_audio_server_contract_on_cpu.py (it reads verl's sources as text
# and never imports verl, so the plugin is never loaded: it can't tell the modes apart), plus ONE Ray file,
# test_fused_workers_on_cpu.py, the steadiest of them (38-39 s in both modes), which runs verl `Worker`s in Ray
# worker processes, where the plugin is loaded too (and where our CPU platform is what verl's Worker sees).
# The other four Ray files are left out for time only (they passed both ways in the survey above).
# Measured: 304 tests passed without the plugin, the same 304 with it (see MIN_PASSED); the CI test took 73 s
# (37 s + 36 s, load average ~6) and 117 s (62 s + 55 s, load average ~14-22) in all.
CI_SUBSET: tuple[str, ...] = (
    "tests/checkpoint_engine/test_fsdp_lora_only_checkpoint_on_cpu.py",
    "tests/checkpoint_engine/test_global_steps_on_cpu.py",
    "tests/checkpoint_engine/test_sglang_fusion_bucketing_on_cpu.py",
    "tests/experimental/agent_loop/test_agent_loop_extra_fields_schema_on_cpu.py",
    "tests/experimental/agent_loop/test_call_tool_on_cpu.py",
    "tests/experimental/agent_loop/test_multimodal_position_ids_on_cpu.py",
    "tests/experimental/agent_loop/test_qwen3_tool_parser_on_cpu.py",
    "tests/experimental/agent_loop/test_tool_call_id_on_cpu.py",
    "tests/experimental/fully_async_policy/test_async_genrm_config_on_cpu.py",
    "tests/single_controller/test_fused_workers_on_cpu.py",
    "tests/test_base_config_on_cpu.py",
    "tests/test_protocol_on_cpu.py",
    "tests/test_protocol_v2_on_cpu.py",
    "tests/tools/test_function_tool_on_cpu.py",
    "tests/tools/test_mixed_tools_on_cpu.py",
    "tests/trainer/ppo/test_core_algos_on_cpu.py",
    "tests/trainer/ppo/test_dynamic_policy_losses_on_cpu.py",
    "tests/trainer/ppo/test_loss_aggregation_on_cpu.py",
    "tests/trainer/ppo/test_metric_utils_on_cpu.py",
    "tests/trainer/ppo/test_reinforce_pp_multiturn_on_cpu.py",
    "tests/trainer/ppo/test_rollout_moe_lb_metrics_on_cpu.py",
    "tests/trainer/ppo/test_spec_decode_metrics_on_cpu.py",
    "tests/trainer/ppo/test_value_loss_normalization_on_cpu.py",
    "tests/trainer/test_constants_ppo_on_cpu.py",
    "tests/trainer/test_multi_trajectories_advantage_on_cpu.py",
)

# A lower bound on the CI selection's tests passed in each mode, so the comparison can't pass vacuously (say,
# every file failing to import in both modes). Observed: 304 (see above); a little slack for verl 0.9.x patch
# releases that drop or merge a test.
MIN_PASSED = 300

# Junit reports skipped and xfailed tests alike as <skipped>; pytest.xfail's type tells them apart.
PASSED, FAILED, ERROR, SKIPPED, XFAILED, MISSING = "passed", "failed", "error", "skipped", "xfailed", "missing"


def verl_distribution() -> metadata.Distribution:
    return metadata.distribution("verl")


def verl_cpu_test_files() -> list[str]:
    """The `tests/**/*_on_cpu.py` files of the installed verl wheel (its RECORD), relative to site-packages.

    Other wheels also install a top-level `tests` package into the same site-packages; only verl's own files count.
    """
    files = verl_distribution().files or []
    return sorted(
        str(f).replace(os.sep, "/")
        for f in files
        if str(f).startswith("tests/") and str(f).endswith("_on_cpu.py") and "__pycache__" not in str(f)
    )


def site_packages() -> Path:
    """The directory the wheel's `tests` package was installed into."""
    return Path(verl_distribution().locate_file("")).resolve()


def mode_env(mode: str, base: dict | None = None) -> dict:
    """The environment of one mode: our plugin disabled ("without") or verl's default discovery ("with")."""
    if mode not in MODES:
        raise ValueError(mode)
    env = dict(os.environ if base is None else base)
    for var in (PLUGIN_ENV, "VERL_USE_EXTERNAL_MODULES", "PYTEST_ADDOPTS", "PYTEST_PLUGINS", "PYTEST_CURRENT_TEST"):
        env.pop(var, None)
    if mode == "without":
        env[PLUGIN_ENV] = "none"
        env.pop("VERL_PLATFORM", None)  # "cpu" names opd_verl's platform, which this mode does not register
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


@dataclass
class RunResult:
    mode: str
    files: list[str]
    outcomes: dict[str, str]  # test id -> outcome
    seconds: float
    returncode: int | None  # None: killed on timeout
    messages: dict[str, str] = field(default_factory=dict)  # test id -> failure/error text (truncated)
    output_tail: str = ""
    # Whether the pytest process had imported verl / loaded opd_verl's entry point at its end ("verl=.. plugin=..").
    loaded: str | None = None
    times: dict[str, float] = field(default_factory=dict)  # test id -> seconds (setup + call + teardown)

    def in_file(self, rel: str) -> set[str]:
        """The ids of the tests of one file (relative to site-packages, e.g. "tests/test_protocol_on_cpu.py")."""
        module = rel[: -len(".py")].replace("/", ".")
        return {t for t in self.outcomes if t.startswith((module + ".", module + "::"))}

    def file_seconds(self) -> dict[str, float]:
        """Seconds spent in each file's tests (collection and imports excluded), by file relative to site-packages."""
        return {f: sum(self.times.get(t, 0.0) for t in self.in_file(f)) for f in self.files}

    @property
    def timed_out(self) -> bool:
        return self.returncode is None

    @property
    def verl_imported(self) -> bool:
        return "verl=True" in (self.loaded or "")

    @property
    def plugin_imported(self) -> bool:
        return "plugin=True" in (self.loaded or "")

    def passed(self) -> set[str]:
        return {t for t, o in self.outcomes.items() if o == PASSED}

    def counts(self) -> dict[str, int]:
        c: dict[str, int] = {}
        for o in self.outcomes.values():
            c[o] = c.get(o, 0) + 1
        return c


def parse_junit(path: Path) -> tuple[dict[str, str], dict[str, str], dict[str, float]]:
    """(test id -> outcome, test id -> message, test id -> seconds) from a pytest JUnit XML report.

    Id: "classname::name", e.g. "tests.trainer.ppo.test_core_algos_on_cpu.TestRegisterAdvEst::test_register_enum".
    """
    outcomes: dict[str, str] = {}
    messages: dict[str, str] = {}
    times: dict[str, float] = {}
    root = ET.parse(path).getroot()
    for case in root.iter("testcase"):
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
        times[test_id] = float(case.get("time") or 0.0)
        outcome = PASSED
        message = ""
        for child in case:
            if child.tag == "failure":
                outcome, message = FAILED, (child.get("message") or "") + "\n" + (child.text or "")
            elif child.tag == "error":
                # An error in setup/teardown (or collection) wins over the call's outcome.
                outcome, message = ERROR, (child.get("message") or "") + "\n" + (child.text or "")
                break
            elif child.tag == "skipped" and outcome == PASSED:
                outcome = XFAILED if child.get("type") == "pytest.xfail" else SKIPPED
                message = child.get("message") or ""
        outcomes[test_id] = outcome
        if message:
            messages[test_id] = message[-4000:]
    return outcomes, messages, times


_LOADED_MARK = "VERL_COMPAT_LOADED"
# `python -m pytest`, plus one line at the end telling whether verl and our plugin were imported by the tests.
_PYTEST_MAIN = (
    "import sys, pytest\n"
    "rc = pytest.main(sys.argv[1:])\n"
    f"print('\\n{_LOADED_MARK}', 'verl=%s' % ('verl' in sys.modules),"
    " 'plugin=%s' % ('opd_verl.plugin' in sys.modules))\n"
    "sys.exit(int(rc))\n"
)


def run_pytest(files: list[str], mode: str, timeout: float = 300.0, extra_args: tuple[str, ...] = ()) -> RunResult:
    """One pytest process over `files` (relative to site-packages) in `mode`; outcomes parsed from JUnit XML."""
    sp = site_packages()
    with tempfile.TemporaryDirectory(prefix=f"verl_compat_{mode}_", ignore_cleanup_errors=True) as tmp:
        tmpdir = Path(tmp)
        ini = tmpdir / "pytest.ini"
        ini.write_text("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
        junit = tmpdir / "junit.xml"
        log = tmpdir / "output.txt"
        # verl's tests run from the root of verl's repository; one opens "verl/trainer/config/rollout/rollout.yaml"
        # relative to the cwd. The cwd is a temporary directory with `verl` linked to the installed package, and
        # `-P` keeps the cwd off sys.path so that the link is never imported instead of the package.
        (tmpdir / "verl").symlink_to(sp / "verl", target_is_directory=True)
        cmd = [
            sys.executable,
            "-P",
            "-c",
            _PYTEST_MAIN,
            "-c",
            str(ini),
            "--rootdir",
            str(sp),
            "-p",
            "no:cacheprovider",
            "-q",
            "-rA",
            f"--junitxml={junit}",
            *extra_args,
            *(str(sp / f) for f in files),
        ]
        start = time.monotonic()
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                cmd, cwd=tmpdir, env=mode_env(mode), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
            try:
                returncode: int | None = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                kill_process_group(proc, grace=0)
                proc.wait()
                returncode = None
            else:
                # Leftovers in the group (a Ray cluster a test forgot to shut down) would outlive the run.
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        seconds = time.monotonic() - start
        outcomes, messages, times = ({}, {}, {})
        if junit.exists() and junit.stat().st_size:
            outcomes, messages, times = parse_junit(junit)
        output = log.read_text(errors="replace")
        loaded = None
        for line in output.splitlines():
            if line.startswith(_LOADED_MARK):
                loaded = line[len(_LOADED_MARK) :].strip()
    return RunResult(mode, list(files), outcomes, seconds, returncode, messages, output[-6000:], loaded, times)


@dataclass
class Comparison:
    without: RunResult
    with_: RunResult

    def regressions(self) -> dict[str, str]:
        """Tests that pass without the plugin but not with it: test id -> outcome with the plugin."""
        return {t: self.with_.outcomes.get(t, MISSING) for t in sorted(self.without.passed() - self.with_.passed())}

    def passed_both(self) -> set[str]:
        return self.without.passed() & self.with_.passed()

    def only_with(self) -> set[str]:
        """Tests passing with the plugin only (not a failure; reported for information)."""
        return self.with_.passed() - self.without.passed()

    def report(self) -> str:
        lines = [
            f"without plugin: {self.without.counts()} in {self.without.seconds:.1f}s"
            + (" (TIMED OUT)" if self.without.timed_out else ""),
            f"with plugin:    {self.with_.counts()} in {self.with_.seconds:.1f}s"
            + (" (TIMED OUT)" if self.with_.timed_out else ""),
            f"passed both ways: {len(self.passed_both())}; passed only with the plugin: {len(self.only_with())}",
        ]
        reg = self.regressions()
        lines.append(f"REGRESSIONS (pass without, not with): {len(reg)}")
        for t, o in reg.items():
            lines.append(f"  {t}: {o}")
            msg = self.with_.messages.get(t)
            if msg:
                lines.append("    " + msg.strip()[-1500:].replace("\n", "\n    "))
        if reg and not self.with_.outcomes:
            lines.append("with-plugin output tail:\n" + self.with_.output_tail)
        return "\n".join(lines)


def compare(files: list[str], timeout: float = 300.0) -> Comparison:
    """Run `files` in one pytest process per mode, sequentially (2 cores: parallel runs would distort timings
    and timeouts), and compare."""
    without = run_pytest(files, "without", timeout=timeout)
    with_ = run_pytest(files, "with", timeout=timeout)
    return Comparison(without, with_)


def _main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="*", help="files relative to site-packages (default: every verl *_on_cpu.py)")
    p.add_argument("--ci-subset", action="store_true", help="the CI_SUBSET files, one pytest per mode")
    p.add_argument("--one-process", action="store_true", help="the files in one pytest per mode, not one per file")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per pytest process")
    p.add_argument("--json", type=Path, help="write per-file outcomes and timings here")
    args = p.parse_args(argv)

    files = list(CI_SUBSET) if args.ci_subset else (args.files or verl_cpu_test_files())
    if args.ci_subset or args.one_process:
        comp = compare(files, timeout=args.timeout)
        print(comp.report())
        print(f"loaded: without {comp.without.loaded}; with {comp.with_.loaded}")
        for f in files:
            print(f"  {f}: tests took {comp.without.file_seconds()[f]:.1f}s / {comp.with_.file_seconds()[f]:.1f}s")
        return 1 if comp.regressions() else 0

    results = []
    regressions = 0
    total = time.monotonic()
    for f in files:
        comp = compare([f], timeout=args.timeout)
        reg = comp.regressions()
        regressions += len(reg)
        w, p_ = comp.without, comp.with_
        print(
            f"{f}\n  without: {w.counts()} {w.seconds:.1f}s rc={w.returncode} {w.loaded}\n"
            f"  with:    {p_.counts()} {p_.seconds:.1f}s rc={p_.returncode} {p_.loaded}\n  regressions: {len(reg)}",
            flush=True,
        )
        if reg:
            print("  " + comp.report().replace("\n", "\n  "), flush=True)
        results.append(
            {
                "file": f,
                "regressions": reg,
                **{
                    m: {
                        "seconds": round(r.seconds, 1),
                        "returncode": r.returncode,
                        "counts": r.counts(),
                        "loaded": r.loaded,
                        "outcomes": r.outcomes,
                        "messages": r.messages,
                        "output_tail": r.output_tail if not r.outcomes else "",
                    }
                    for m, r in (("without", w), ("with", p_))
                },
            }
        )
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
    print(f"total {time.monotonic() - total:.0f}s, {len(files)} files, regressions: {regressions}")
    return 1 if regressions else 0


if __name__ == "__main__":
    sys.exit(_main())
