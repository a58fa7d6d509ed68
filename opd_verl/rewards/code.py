"""The code reward: the completion's Python code run against the problem's tests in the sandbox (sandbox.py).

A code row's ``reward_model.ground_truth`` is a JSON object (``code_ground_truth`` writes it; the preprocess
scripts data_preprocess/humaneval.py, mbpp.py and kodcode.py call it):

- ``tests``: Python snippets run one by one after the program; each passes when it raises nothing;
- ``setup``: run once after the program, before the tests (MBPP's test_setup_code; KodCode's test file);
- ``entry_point``: the function the tests call (HumanEval, KodCode), or "";
- ``prompt``: the code the model was asked to complete (HumanEval's signature and docstring): when the completion
  does not define ``entry_point`` it is taken as the body that continues this prompt;
- ``module``: if set (KodCode: "solution"), the program is written to ``<module>.py`` in the working directory
  for the tests to import, instead of being run in their namespace.

The program is the last fenced code block of the completion (```python ... ```, or any fence), or the whole
completion when it has no fence; the import lines of ``prompt`` go before it (HumanEval's ``from typing import
List``). Score 1.0 when every test passes; ``code_tests_passed`` is the fraction that passed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from opd_verl.rewards.sandbox import Limits, RunResult, run_python

#: The instruction appended to every code prompt; extract_code reads this format.
CODE_INSTRUCTION = "Write your solution in Python, in one ```python code block."

#: reward kwargs (``reward.custom_reward_function.reward_kwargs``) -> Limits field.
LIMIT_KWARGS = {
    "code_wall_seconds": "wall_seconds",
    "code_cpu_seconds": "cpu_seconds",
    "code_memory_mb": "memory_mb",
    "code_file_size_mb": "file_size_mb",
    "code_open_files": "open_files",
}

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)
_IMPORT = re.compile(r"^(?:from\s+\S+\s+)?import\s+.+$", re.M)


def code_ground_truth(tests: list[str], entry_point: str = "", setup: str = "", prompt: str = "",
                      module: str = "") -> str:
    """The JSON ground truth of a code row (see the module docstring)."""
    return json.dumps({"tests": list(tests), "setup": setup, "entry_point": entry_point, "prompt": prompt,
                       "module": module})


def extract_code(completion: str) -> str:
    """The last fenced block that is Python (or untagged), else the last fenced block, else the whole text;
    leading blank lines and trailing space dropped, indentation kept (a body-only completion starts indented)."""
    blocks = _FENCE.findall(completion or "")
    if blocks:
        python = [code for tag, code in blocks if tag.lower() in ("", "python", "py", "python3")]
        completion = (python or [code for _, code in blocks])[-1]
    return re.sub(r"^\s*\n", "", completion or "").rstrip()


def build_program(completion: str, truth: dict) -> str:
    """The program to run: the prompt's imports + the code, or prompt + code for a body-only completion."""
    code = extract_code(completion)
    prompt = truth.get("prompt") or ""
    entry = truth.get("entry_point") or ""
    if prompt and entry and not re.search(rf"^\s*def\s+{re.escape(entry)}\s*\(", code, re.M):
        return prompt + code + "\n"
    imports = "\n".join(_IMPORT.findall(prompt))
    return (imports + "\n\n" + code + "\n") if imports else code + "\n"


def limits_from(kwargs: dict[str, Any]) -> Limits:
    """Limits from the ``code_*`` reward kwargs; an unknown ``code_*`` key is an error naming the known ones."""
    unknown = sorted(k for k in kwargs if k.startswith("code_") and k not in LIMIT_KWARGS)
    if unknown:
        raise ValueError(f"opd_verl.rewards: unknown reward kwarg(s) {unknown}; the code sandbox reads "
                         f"{sorted(LIMIT_KWARGS)} (reward.custom_reward_function.reward_kwargs)")
    values = {}
    for key, field in LIMIT_KWARGS.items():
        if key not in kwargs:
            continue
        cast = float if field == "wall_seconds" else int
        try:
            value = cast(kwargs[key])
        except (TypeError, ValueError):
            value = None
        if value is None or value <= 0 or isinstance(kwargs[key], bool):
            raise ValueError(f"opd_verl.rewards: reward kwarg {key}={kwargs[key]!r} must be a positive "
                             f"{'number' if cast is float else 'integer'}")
        values[field] = value
    return Limits(**values)


@dataclass(frozen=True)
class CodeResult:
    score: float
    run: RunResult | None  # None: nothing was run (no code, or a ground truth without tests)

    def info(self) -> dict[str, float | int]:
        run = self.run
        return {
            "score": self.score,
            "code_tests_passed": (run.passed / run.total) if run and run.total else 0.0,
            "code_timeout": int(bool(run and run.timed_out)),
            "code_blocked": int(bool(run and run.blocked)),
        }


def code_score(solution_str: str, ground_truth: Any, **kwargs: Any) -> CodeResult:
    """Run the completion against the row's tests; 1.0 when all pass. Raises only on a bad ``code_*`` kwarg."""
    limits = limits_from(kwargs)
    try:
        truth = json.loads(ground_truth) if isinstance(ground_truth, str) else dict(ground_truth)
        tests = [str(t) for t in truth.get("tests") or []]
    except (TypeError, ValueError):
        return CodeResult(0.0, None)
    module = truth.get("module") or ""
    if not tests or not isinstance(solution_str, str) or (module and not str(module).isidentifier()) or not extract_code(solution_str).strip():
        return CodeResult(0.0, None)
    program = build_program(solution_str, truth)
    run = run_python(program, tests, setup=truth.get("setup") or "", module=module,
                     limits=limits)
    return CodeResult(1.0 if run.all_passed else 0.0, run)
