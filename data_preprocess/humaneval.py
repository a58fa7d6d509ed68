"""HumanEval (openai/openai_humaneval) -> verl parquet.

Source columns: task_id, prompt (imports, the signature and the docstring of the function to write), test (a
``check(candidate)`` function of asserts), entry_point (the function's name); canonical_solution is optional.
Output rows: prompt = "Complete the following Python function:" + the code prompt + the code instruction;
reward_model.ground_truth = the code reward's JSON (tests: [test + "check(<entry_point>)"], entry_point, prompt,
see opd_verl/rewards/code.py); extra_info = {split, index, task_id, entry_point, question (the code prompt), test,
canonical_solution ("" if absent)}. The data set has one split, "test" (use it as val_files).

    python data_preprocess/humaneval.py --local_dir ~/data/humaneval
    python data_preprocess/humaneval.py --local_dir OUT --local_path humaneval.jsonl --split test
"""

from __future__ import annotations

import common
from common import BadRow, get_field, require_code, require_text, rule_row

from opd_verl.rewards import HUMANEVAL
from opd_verl.rewards.code import CODE_INSTRUCTION, code_ground_truth

NAME = "humaneval"
COLUMNS = ("task_id", "prompt", "test", "entry_point")


def convert(record: dict, index: int, split: str) -> dict:
    task_id = require_text(record, "task_id")
    prompt = require_code(record, "prompt")
    test = require_code(record, "test")
    entry_point = require_text(record, "entry_point")
    if f"def {entry_point}" not in prompt:
        raise BadRow(f"field 'prompt' does not define the entry point '{entry_point}'")
    content = f"Complete the following Python function:\n```python\n{prompt.rstrip()}\n```\n{CODE_INSTRUCTION}"
    truth = code_ground_truth([f"{test}\n\ncheck({entry_point})\n"], entry_point=entry_point, prompt=prompt)
    return rule_row(HUMANEVAL, "code", content, truth, split, index, task_id=task_id, entry_point=entry_point,
                    question=prompt, test=test, canonical_solution=str(get_field(record, "canonical_solution", "")))


def main() -> None:
    parser = common.build_parser(NAME, __doc__, "openai/openai_humaneval", ["test"])
    common.run(parser.parse_args(), COLUMNS, convert)


if __name__ == "__main__":
    common.main_guard(main)
