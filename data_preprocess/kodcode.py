"""KodCode (KodCode/KodCode-V1: 484K synthetic Python problems, each with pytest-style unit tests) -> verl parquet:
a code training set in the same schema as HumanEval and MBPP.

Source columns: question, test (a pytest file that imports the solution, ``from solution import ...``, and
defines ``test_*`` functions; ``test_code`` in earlier revisions of the data set), and the name(s) the tests
import: test_info (a list of {function_name, function_declaration, ...}) or, in earlier revisions,
test_entry_point; question_id (conversation_id), style, subset and the rest are optional.
Output rows: prompt = the question + the function name(s) the tests import + the code instruction;
reward_model.ground_truth = the code reward's JSON (module "solution": the program is written to solution.py;
setup: the test file; tests: one call per ``test_*`` function, see opd_verl/rewards/code.py); extra_info =
{split, index, question_id, question, entry_point, test}. A test function that takes arguments (a pytest fixture
or parametrisation) cannot be called bare: such a row is reported as bad and left out.
The data set has one split, "train".

    python data_preprocess/kodcode.py --local_dir ~/data/kodcode --max_samples 20000
    python data_preprocess/kodcode.py --local_dir OUT --local_path kodcode_train.parquet
"""

from __future__ import annotations

import re

import common
from common import BadRow, get_field, require_code, require_text, rule_row

from opd_verl.rewards import KODCODE
from opd_verl.rewards.code import CODE_INSTRUCTION, code_ground_truth

NAME = "kodcode"
TEST = ("test", "test_code")
COLUMNS = ("question", TEST)
_TEST_DEF = re.compile(r"^def\s+(test_\w*)\s*\(([^)]*)\)", re.M)


def _function_names(record: dict) -> list[str]:
    info = get_field(record, "test_info")
    if info is None:
        entry = str(get_field(record, "test_entry_point", "") or "").strip()
        if not entry:
            raise BadRow("no field 'test_info' or 'test_entry_point' naming the function under test")
        return [entry]
    if isinstance(info, (str, dict)) or not hasattr(info, "__iter__"):
        raise BadRow("field 'test_info' is not a list of {function_name, ...}")
    names = [str(i.get("function_name") or "").strip() for i in info if isinstance(i, dict)]
    names = [n for n in names if n]
    if not names:
        raise BadRow("no function_name in field 'test_info'")
    return names


def convert(record: dict, index: int, split: str) -> dict:
    question = require_text(record, "question")
    test = require_code(record, TEST)
    names = _function_names(record)
    tests = []
    for name, params in _TEST_DEF.findall(test):
        if params.strip():
            raise BadRow(f"test function '{name}' takes arguments ({params.strip()}); it needs pytest")
        tests.append(f"{name}()")
    if not tests:
        raise BadRow("no top-level test_* function in field 'test'")
    listed = ", ".join(f"`{n}`" for n in names)
    content = f"{question}\n\nThe tests import {listed} from your solution (solution.py).\n{CODE_INSTRUCTION}"
    truth = code_ground_truth(tests, entry_point=names[0], setup=test, module="solution")
    return rule_row(KODCODE, "code", content, truth, split, index,
                    question_id=str(get_field(record, ("question_id", "conversation_id"), "")), question=question,
                    entry_point=names[0], test=test)


def main() -> None:
    parser = common.build_parser(NAME, __doc__, "KodCode/KodCode-V1", ["train"])
    common.run(parser.parse_args(), COLUMNS, convert)


if __name__ == "__main__":
    common.main_guard(main)
