"""MBPP (google-research-datasets/mbpp, config "full" or "sanitized") -> verl parquet.

Source columns: task_id, text ("full"; "sanitized": prompt), test_list (asserts); code, test_setup_code
("full") / test_imports ("sanitized") and challenge_test_list are optional.
Output rows: prompt = the task + "Your code should pass these tests:" + the asserts + the code instruction (as in
the MBPP paper, the asserts name the function); reward_model.ground_truth = the code reward's JSON (tests: the
asserts, setup: test_setup_code or the test imports, see opd_verl/rewards/code.py); extra_info = {split, index,
task_id, question, test_list, test_setup, code ("" if absent)}.

    python data_preprocess/mbpp.py --local_dir ~/data/mbpp                          # train, validation, test
    python data_preprocess/mbpp.py --local_dir OUT --dataset_config sanitized
    python data_preprocess/mbpp.py --local_dir OUT --local_path mbpp_test.jsonl --split test
"""

from __future__ import annotations

import common
from common import BadRow, get_field, require_text, rule_row

from opd_verl.rewards import MBPP
from opd_verl.rewards.code import CODE_INSTRUCTION, code_ground_truth

NAME = "mbpp"
TASK = ("text", "prompt")
COLUMNS = ("task_id", TASK, "test_list")


def _setup(record: dict) -> str:
    imports = get_field(record, "test_imports")
    if imports is not None and not isinstance(imports, str):
        return "\n".join(str(line) for line in imports)
    return str(get_field(record, ("test_setup_code", "test_imports"), "") or "")


def convert(record: dict, index: int, split: str) -> dict:
    task_id = str(require_text(record, "task_id"))
    question = require_text(record, TASK)
    tests = get_field(record, "test_list")
    if isinstance(tests, str) or not hasattr(tests, "__iter__"):
        raise BadRow("field 'test_list' is not a list of asserts")
    tests = [str(t).strip() for t in tests if str(t).strip()]
    if not tests:
        raise BadRow("empty field 'test_list'")
    setup = _setup(record)
    content = f"{question}\nYour code should pass these tests:\n\n" + "\n".join(tests) + f"\n\n{CODE_INSTRUCTION}"
    truth = code_ground_truth(tests, setup=setup)
    return rule_row(MBPP, "code", content, truth, split, index, task_id=task_id, question=question, test_list=tests,
                    test_setup=setup, code=str(get_field(record, "code", "")))


def main() -> None:
    parser = common.build_parser(NAME, __doc__, "google-research-datasets/mbpp", ["train", "validation", "test"],
                                 "full")
    common.run(parser.parse_args(), COLUMNS, convert)


if __name__ == "__main__":
    common.main_guard(main)
