"""GSM8K (openai/gsm8k, config "main") -> verl parquet.

Source columns: question, answer (a worked solution ending in "#### <number>").
Output rows: prompt = question + the "####" instruction; reward_model.ground_truth = the number after the last
"####" (commas removed); extra_info = {split, index, question, answer (the full source solution)}.

    python data_preprocess/gsm8k.py --local_dir ~/data/gsm8k                      # train + test via `datasets`
    python data_preprocess/gsm8k.py --local_dir OUT --local_path train.parquet test.parquet --split train,test
"""

from __future__ import annotations

import common
from common import BadRow, math_row, require_text

from opd_verl.rewards import GSM8K, extract_hash_answer

NAME = "gsm8k"
COLUMNS = ("question", "answer")


def convert(record: dict, index: int, split: str) -> dict:
    question = require_text(record, "question")
    answer = require_text(record, "answer")
    if "####" not in answer:
        raise BadRow("no '####' in field 'answer'")
    ground_truth = extract_hash_answer(answer)
    if ground_truth is None:
        raise BadRow("no number after the last '####' in field 'answer'")
    return math_row(GSM8K, question, ground_truth, split, index, answer=answer)  # extra_info keeps the solution


def main() -> None:
    parser = common.build_parser(NAME, __doc__, "openai/gsm8k", ["train", "test"], "main")
    common.run(parser.parse_args(), COLUMNS, convert)


if __name__ == "__main__":
    common.main_guard(main)
