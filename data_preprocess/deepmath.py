"""DeepMath-103K (zwhe99/DeepMath-103K) -> verl parquet.

Source columns: question, final_answer (and difficulty, topic, r1_solution_1..3, which are not needed).
Output rows: prompt = question + the \\boxed{} instruction; reward_model.ground_truth = final_answer;
extra_info = {split, index, question, answer, difficulty (float, NaN if absent), topic ("" if absent)}.

    python data_preprocess/deepmath.py --local_dir ~/data/deepmath              # its one split, train
    python data_preprocess/deepmath.py --local_dir OUT --local_path deepmath.parquet --max_samples 20000
"""

from __future__ import annotations

import math

import common
from common import BadRow, get_field, math_row, require_text

from opd_verl.rewards import DEEPMATH

NAME = "deepmath"
COLUMNS = ("question", "final_answer")


def _float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def convert(record: dict, index: int, split: str) -> dict:
    question = require_text(record, "question")
    answer = require_text(record, "final_answer")
    if answer.lower() in ("none", "null", "nan"):
        raise BadRow(f"field 'final_answer' holds no answer ({answer!r})")
    return math_row(
        DEEPMATH, question, answer, split, index,
        difficulty=_float(get_field(record, "difficulty")), topic=str(get_field(record, "topic", "")),
    )


def main() -> None:
    parser = common.build_parser(NAME, __doc__, "zwhe99/DeepMath-103K", ["train"])
    common.run(parser.parse_args(), COLUMNS, convert)


if __name__ == "__main__":
    common.main_guard(main)
