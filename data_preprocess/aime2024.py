"""AIME 2024 (HuggingFaceH4/aime_2024, or Maxwell-Jia/AIME_2024 with capitalised columns) -> verl parquet.

Source columns: problem (or Problem), answer (or Answer; an integer 0-999, text or number); id/ID, solution
and the rest are optional.
Output rows: prompt = problem + the \\boxed{} instruction; reward_model.ground_truth = the answer as text;
extra_info = {split, index, question, answer, id ("" if absent)}.
Both sources publish a single split, "train", written to LOCAL_DIR/train.parquet (use it as val_files).

    python data_preprocess/aime2024.py --local_dir ~/data/aime2024
    python data_preprocess/aime2024.py --local_dir OUT --local_path aime_2024.jsonl
"""

from __future__ import annotations

import common
from common import BadRow, get_field, math_row, require_text

from opd_verl.rewards import AIME2024

NAME = "aime2024"
PROBLEM = ("problem", "Problem")
ANSWER = ("answer", "Answer")
COLUMNS = (PROBLEM, ANSWER)


def convert(record: dict, index: int, split: str) -> dict:
    problem = require_text(record, PROBLEM)
    raw = get_field(record, ANSWER)
    if isinstance(raw, float) and raw == raw and raw.is_integer():
        raw = int(raw)  # a float column from a pandas-written file
    if isinstance(raw, bool):
        raise BadRow(f"field 'answer' is not an answer ({raw!r})")
    answer = require_text({"answer": raw}, "answer")
    return math_row(AIME2024, problem, answer, split, index, id=str(get_field(record, ("id", "ID"), "")))


def main() -> None:
    parser = common.build_parser(NAME, __doc__, "HuggingFaceH4/aime_2024", ["train"])
    common.run(parser.parse_args(), COLUMNS, convert)


if __name__ == "__main__":
    common.main_guard(main)
