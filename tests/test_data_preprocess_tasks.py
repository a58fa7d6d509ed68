"""data_preprocess/humaneval.py, mbpp.py, kodcode.py and ifeval.py: each run as a subprocess on a small file in its
data set's original schema (the rows below copy the real data sets' fields), the verl parquet read back and
checked value by value, bad rows reported; then the rows' ground truths scored by the real rewards: the
reference solution passes, a wrong one fails (code), a response that follows the instructions scores 1 (IFEval)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from test_data_preprocess import VERL_COLUMNS, assert_bad_rows_reported, read_rows, run_script, user, write_jsonl

from opd_verl.rewards import DATA_SOURCES, compute_score
from opd_verl.rewards.code import CODE_INSTRUCTION

FAST = {"code_wall_seconds": 5.0}


def convert(name: str, src, tmp_path, split: str, bad: int, of: int, indices: list[int],
            *args: str) -> tuple[list[dict], str]:
    """Run the script on `src`, check its bad-row report; the rows of its parquet (verl's columns) and stderr."""
    out = tmp_path / "out"
    proc = run_script(name, "--local_dir", str(out), "--local_path", str(src), "--split", split, *args)
    assert proc.returncode == 0, proc.stderr
    if bad:
        assert_bad_rows_reported(proc.stderr, f"{name}[{split}]", bad, of, indices)
    else:
        assert "bad row" not in proc.stderr
    columns, rows = read_rows(out / f"{split}.parquet")
    assert columns == VERL_COLUMNS
    return rows, proc.stderr

HUMANEVAL_ROWS = [
    {
        "task_id": "HumanEval/0",
        "prompt": 'from typing import List\n\n\ndef total(xs: List[int]) -> int:\n    """ Sum of xs.\n    >>> total([1, 2])'
        '\n    3\n    """\n',
        "canonical_solution": "    return sum(xs)\n",
        "test": "\n\nMETADATA = {}\n\n\ndef check(candidate):\n    assert candidate([1, 2]) == 3\n"
        "    assert candidate([]) == 0\n",
        "entry_point": "total",
    },
    {"task_id": "HumanEval/1", "prompt": "def f():\n", "canonical_solution": "", "test": "", "entry_point": "f"},
    {"task_id": "HumanEval/2", "prompt": "def g():\n", "canonical_solution": "", "test": "x", "entry_point": "h"},
]


def test_humaneval(tmp_path):
    src = tmp_path / "humaneval.parquet"
    pd.DataFrame(HUMANEVAL_ROWS).to_parquet(src)
    rows, stderr = convert("humaneval", src, tmp_path, "test", 2, 3, [1, 2])
    assert "empty field 'test'" in stderr and "does not define the entry point 'h'" in stderr
    assert len(rows) == 1
    row, src_row = rows[0], HUMANEVAL_ROWS[0]
    assert row["data_source"] == DATA_SOURCES["humaneval"] and row["ability"] == "code"
    assert row["prompt"] == user(
        f"Complete the following Python function:\n```python\n{src_row['prompt'].rstrip()}\n```\n{CODE_INSTRUCTION}"
    )
    assert row["extra_info"] == {
        "split": "test", "index": 0, "task_id": "HumanEval/0", "entry_point": "total", "question": src_row["prompt"],
        "test": src_row["test"], "canonical_solution": src_row["canonical_solution"],
    }
    truth = row["reward_model"]["ground_truth"]
    assert json.loads(truth)["tests"] == [src_row["test"] + "\n\ncheck(total)\n"]
    # the data set's own solution (a body that continues the prompt) passes; as a full function too
    assert compute_score(row["data_source"], src_row["canonical_solution"], truth, **FAST) == 1.0
    full = "```python\ndef total(xs: List[int]) -> int:\n    return sum(xs)\n```"
    assert compute_score(row["data_source"], full, truth, **FAST) == 1.0
    assert compute_score(row["data_source"], "    return len(xs)\n", truth, **FAST) == 0.0


MBPP_FULL = [
    {
        "task_id": 11,
        "text": "Write a python function to remove first and last occurrence of a given character from the string.",
        "code": "def remove_Occ(s,ch):\n    s = s.replace(ch, '', 1)\n    return s[::-1].replace(ch, '', 1)[::-1]",
        "test_list": ['assert remove_Occ("hello","l") == "heo"', 'assert remove_Occ("abcda","a") == "bcd"'],
        "test_setup_code": "",
        "challenge_test_list": [],
    },
    {"task_id": 12, "text": "No tests.", "code": "", "test_list": [], "test_setup_code": "", "challenge_test_list": []},
    {
        "task_id": 13,
        "text": "Write a function to count the most common words.",
        "code": "def count_common(words):\n    return Counter(words).most_common(1)",
        "test_list": ["assert count_common(['a', 'b', 'a']) == [('a', 2)]"],
        "test_setup_code": "from collections import Counter",
        "challenge_test_list": [],
    },
]


def test_mbpp_full(tmp_path):
    src = write_jsonl(tmp_path / "mbpp_test.jsonl", MBPP_FULL)
    rows, stderr = convert("mbpp", src, tmp_path, "test", 1, 3, [1])
    assert [r["extra_info"]["task_id"] for r in rows] == ["11", "13"]
    first = rows[0]
    assert first["data_source"] == DATA_SOURCES["mbpp"]
    assert first["prompt"] == user(
        MBPP_FULL[0]["text"] + "\nYour code should pass these tests:\n\n" + "\n".join(MBPP_FULL[0]["test_list"])
        + f"\n\n{CODE_INSTRUCTION}"
    )
    assert first["extra_info"]["test_list"] == MBPP_FULL[0]["test_list"]
    for row, src_row in zip(rows, (MBPP_FULL[0], MBPP_FULL[2])):
        truth = row["reward_model"]["ground_truth"]
        assert json.loads(truth)["setup"] == src_row["test_setup_code"]
        assert compute_score(row["data_source"], f"```python\n{src_row['code']}\n```", truth, **FAST) == 1.0
    wrong = "```python\ndef remove_Occ(s, ch):\n    return s.replace(ch, '', 1)\n```"  # the first one only
    assert compute_score(DATA_SOURCES["mbpp"], wrong, rows[0]["reward_model"]["ground_truth"], **FAST) == 0.0


def test_mbpp_sanitized_schema(tmp_path):
    src = write_jsonl(tmp_path / "sanitized.jsonl", [{
        "source_file": "x.py", "task_id": 2, "prompt": "Write a function to find the shared elements.",
        "code": "def similar_elements(a, b):\n    return tuple(set(a) & set(b))",
        "test_imports": ["import math"], "test_list": ["assert set(similar_elements((3, 4), (4, 5))) == {4}"],
    }])
    rows, stderr = convert("mbpp", src, tmp_path, "test", 0, 1, [], "--dataset_config", "sanitized")
    truth = json.loads(rows[0]["reward_model"]["ground_truth"])
    assert (truth["setup"], rows[0]["extra_info"]["question"]) == ("import math", "Write a function to find the "
                                                                    "shared elements.")


KODCODE_ROWS = [
    {
        "question_id": "Leetcode_1", "style": "instruct", "subset": "Leetcode",
        "question": "Write a function `two_sum(nums, target)` returning the indices of two numbers adding to target.",
        "solution": "def two_sum(nums, target):\n    seen = {}\n    for i, x in enumerate(nums):\n"
        "        if target - x in seen:\n            return [seen[target - x], i]\n        seen[x] = i\n",
        "test": "import pytest\nfrom solution import two_sum\n\ndef test_basic():\n    assert two_sum([2, 7, 11], 9) == [0, 1]"
        "\n\ndef test_later():\n    assert two_sum([1, 3, 4], 7) == [1, 2]\n",
        "test_info": [{"function_name": "two_sum", "function_declaration": "def two_sum(nums, target):",
                       "docstring": None, "parameter_list": "(nums, target)"}],
    },
    {
        "question_id": "Leetcode_2", "style": "instruct", "subset": "Leetcode", "question": "Uses a fixture.",
        "solution": "", "test": "from solution import f\n\ndef test_tmp(tmp_path):\n    assert f(tmp_path)\n",
        "test_info": [{"function_name": "f", "function_declaration": "", "docstring": None, "parameter_list": ""}],
    },
]


def test_kodcode(tmp_path):
    src = tmp_path / "kodcode.parquet"
    pd.DataFrame(KODCODE_ROWS).to_parquet(src)
    rows, stderr = convert("kodcode", src, tmp_path, "train", 1, 2, [1])
    assert "test function 'test_tmp' takes arguments (tmp_path)" in stderr
    assert len(rows) == 1
    row, src_row = rows[0], KODCODE_ROWS[0]
    assert row["data_source"] == DATA_SOURCES["kodcode"]
    assert row["prompt"] == user(f"{src_row['question']}\n\nThe tests import `two_sum` from your solution "
                                 f"(solution.py).\n{CODE_INSTRUCTION}")
    truth = json.loads(row["reward_model"]["ground_truth"])
    assert (truth["tests"], truth["module"], truth["setup"]) == (["test_basic()", "test_later()"], "solution",
                                                                 src_row["test"])
    gt = row["reward_model"]["ground_truth"]
    assert compute_score(row["data_source"], f"```python\n{src_row['solution']}```", gt, **FAST) == 1.0
    assert compute_score(row["data_source"], "```python\ndef two_sum(nums, target):\n    return [0, 1]\n```", gt,
                         **FAST) == 0.0


def test_kodcode_earlier_revision_schema(tmp_path):
    """Earlier revisions of KodCode-V1 name the columns test_code, test_entry_point and conversation_id."""
    src_row = KODCODE_ROWS[0]
    old = {"split": "instruct", "subset": "Leetcode", "conversation_id": "Leetcode_1", "question": src_row["question"],
           "solution": src_row["solution"], "test_code": src_row["test"], "test_entry_point": "two_sum"}
    rows, _ = convert("kodcode", write_jsonl(tmp_path / "old.jsonl", [old]), tmp_path, "train", 0, 1, [])
    assert rows[0]["extra_info"]["question_id"] == "Leetcode_1"
    gt = rows[0]["reward_model"]["ground_truth"]
    assert json.loads(gt)["tests"] == ["test_basic()", "test_later()"]
    assert compute_score(rows[0]["data_source"], f"```python\n{src_row['solution']}```", gt, **FAST) == 1.0


IFEVAL_ROWS = [
    {
        "key": 1000, "prompt": "Write a short note about apples. Do not use any commas.",
        "instruction_id_list": ["punctuation:no_comma", "keywords:existence"],
        "kwargs": [{"keywords": None, "num_words": None}, {"keywords": ["apple"], "num_words": None}],
    },
    {"key": 1001, "prompt": "Mismatched.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": []},
]


def test_ifeval(tmp_path):
    pytest.importorskip("lm_eval.tasks.ifeval.utils", reason="the 'ifeval' extra (lm-eval) is not installed")
    src = write_jsonl(tmp_path / "ifeval_input_data.jsonl", IFEVAL_ROWS)
    rows, stderr = convert("ifeval", src, tmp_path, "train", 1, 2, [1])
    assert "field 'kwargs' needs one dict per instruction (1), got 0 entries" in stderr
    assert len(rows) == 1
    row = rows[0]
    assert (row["data_source"], row["ability"], row["prompt"]) == (
        DATA_SOURCES["ifeval"], "instruction_following", user(IFEVAL_ROWS[0]["prompt"]))
    assert row["extra_info"] == {"split": "train", "index": 0, "key": 1000,
                                 "instruction_id_list": IFEVAL_ROWS[0]["instruction_id_list"]}
    truth = row["reward_model"]["ground_truth"]
    assert json.loads(truth)["kwargs"] == [{}, {"keywords": ["apple"]}]  # nulls dropped, as lm-eval drops them
    assert compute_score(row["data_source"], "An apple a day keeps the doctor away.", truth) == 1.0
    assert compute_score(row["data_source"], "An apple, a day.", truth) == 0.0
