"""IFEval (google/IFEval) -> verl parquet.

Source columns: key, prompt, instruction_id_list (e.g. "punctuation:no_comma"), kwargs (one dict per
instruction; the unused arguments are null).
Output rows: prompt = the IFEval prompt as it is; reward_model.ground_truth = the IFEval reward's JSON (prompt,
instruction_id_list, kwargs without the nulls, see opd_verl/rewards/ifeval.py); extra_info = {split, index, key,
instruction_id_list}. The data set has one split, "train" (541 prompts, an evaluation set: use it as val_files).

    python data_preprocess/ifeval.py --local_dir ~/data/ifeval
    python data_preprocess/ifeval.py --local_dir OUT --local_path ifeval_input_data.jsonl
"""

from __future__ import annotations

import json

import common
from common import BadRow, get_field, require_text, rule_row

from opd_verl.rewards import IFEVAL
from opd_verl.rewards.ifeval import ifeval_ground_truth

NAME = "ifeval"
COLUMNS = ("prompt", "instruction_id_list", "kwargs")


def _list(record: dict, name: str) -> list:
    value = get_field(record, name)
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise BadRow(f"field '{name}' is not a list") from None
    if value is None or isinstance(value, (str, dict)) or not hasattr(value, "__iter__"):
        raise BadRow(f"field '{name}' is not a list")
    return list(value)


def convert(record: dict, index: int, split: str) -> dict:
    prompt = require_text(record, "prompt")
    ids = [str(i) for i in _list(record, "instruction_id_list")]
    kwargs = _list(record, "kwargs")
    if not ids:
        raise BadRow("empty field 'instruction_id_list'")
    if len(kwargs) != len(ids) or not all(isinstance(k, dict) or k is None for k in kwargs):
        raise BadRow(f"field 'kwargs' needs one dict per instruction ({len(ids)}), got {len(kwargs)} entries")
    key = get_field(record, "key", index)
    try:
        key = int(key)
    except (TypeError, ValueError):
        raise BadRow(f"field 'key' is not an integer ({key!r})") from None
    return rule_row(IFEVAL, "instruction_following", prompt, ifeval_ground_truth(prompt, ids, kwargs), split, index,
                    key=key, instruction_id_list=ids)


def main() -> None:
    parser = common.build_parser(NAME, __doc__, "google/IFEval", ["train"])
    common.run(parser.parse_args(), COLUMNS, convert)


if __name__ == "__main__":
    common.main_guard(main)
