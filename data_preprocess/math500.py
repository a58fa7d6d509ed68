"""MATH-500 (HuggingFaceH4/MATH-500) -> verl parquet.

Source columns: problem, answer (solution, subject, level, unique_id are optional and kept in extra_info).
Output rows: prompt = problem + the \\boxed{} instruction; reward_model.ground_truth = answer;
extra_info = {split, index, question, answer, subject, level, unique_id} (the last three as text, "" if absent).

    python data_preprocess/math500.py --local_dir ~/data/math500                 # its one split, test
    python data_preprocess/math500.py --local_dir OUT --local_path test.jsonl
"""

from __future__ import annotations

import common
from common import get_field, math_row, require_text

from opd_verl.rewards import MATH500

NAME = "math500"
COLUMNS = ("problem", "answer")


def convert(record: dict, index: int, split: str) -> dict:
    problem = require_text(record, "problem")
    answer = require_text(record, "answer")
    optional = {key: str(get_field(record, key, "")) for key in ("subject", "level", "unique_id")}
    return math_row(MATH500, problem, answer, split, index, **optional)


def main() -> None:
    parser = common.build_parser(NAME, __doc__, "HuggingFaceH4/MATH-500", ["test"])
    common.run(parser.parse_args(), COLUMNS, convert)


if __name__ == "__main__":
    common.main_guard(main)
