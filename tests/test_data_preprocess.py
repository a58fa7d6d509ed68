"""data_preprocess/*.py: each script run as a subprocess on a small file in its data set's original schema (read
by the real `datasets` parquet / json builders, into a per-test cache), the output parquet read back with pandas
and checked value by value; bad rows counted on stderr and left out; one-line errors for a missing file, a
missing column and the other usage mistakes. Nothing is downloaded: the hub path is exercised in-process with a
stand-in `datasets` module. Also opd_verl/parquet.py, the writer of those files."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from opd_verl.parquet import ParquetStream, write_parquet
from opd_verl.rewards import DATA_SOURCES, INSTRUCTIONS

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "data_preprocess"
GSM8K_SUFFIX = " " + INSTRUCTIONS["gsm8k"]
BOXED_SUFFIX = " " + INSTRUCTIONS["boxed"]
VERL_COLUMNS = ["data_source", "prompt", "ability", "reward_model", "extra_info"]


def run_script(name: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPTS / f"{name}.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(cwd or REPO),
    )


def plain(value):
    """pandas/pyarrow values (numpy arrays, numpy scalars) as plain Python values, recursively."""
    if isinstance(value, np.ndarray):
        return [plain(v) for v in value.tolist()]
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_rows(path: Path) -> tuple[list[str], list[dict]]:
    frame = pd.read_parquet(path)
    return list(frame.columns), [plain(row) for row in frame.to_dict("records")]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def assert_bad_rows_reported(stderr: str, tag: str, count: int, of: int, indices: list[int]):
    lines = [line for line in stderr.splitlines() if f"bad row(s) of {of}" in line]
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"{tag}: {count} bad row(s) of {of} "), stderr
    assert lines[0].endswith(f"(first indices: {', '.join(map(str, indices))})"), stderr
    for index in indices:
        assert f"{tag}:   row {index}: " in stderr, stderr


def user(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


# ---------------------------------------------------------------------------------------------------------------
# gsm8k
# ---------------------------------------------------------------------------------------------------------------

GSM8K_ROWS = [
    {"question": "Tom has 2 apples and buys 2 more. How many?", "answer": "2 + 2 = <<2+2=4>>4\n#### 4"},
    {"question": "A question whose answer lost its marker.", "answer": "The total is 7."},
    {"question": "How much is 1000 + 234?", "answer": "1000 + 234 = 1234\n#### 1,234"},
    {"question": None, "answer": "#### 3"},
]


def test_gsm8k(tmp_path):
    src = tmp_path / "gsm8k_train.parquet"
    pd.DataFrame(GSM8K_ROWS).to_parquet(src)
    out = tmp_path / "out"
    proc = run_script("gsm8k", "--local_dir", str(out), "--local_path", str(src))
    assert proc.returncode == 0, proc.stderr
    assert f"gsm8k[train]: wrote 2 rows to {out / 'train.parquet'}" in proc.stdout
    assert_bad_rows_reported(proc.stderr, "gsm8k[train]", 2, 4, [1, 3])
    assert "no '####' in field 'answer'" in proc.stderr
    assert "missing field 'question'" in proc.stderr

    columns, rows = read_rows(out / "train.parquet")
    assert columns == VERL_COLUMNS
    assert rows == [
        {
            "data_source": "openai/gsm8k",
            "prompt": user(GSM8K_ROWS[0]["question"] + GSM8K_SUFFIX),
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": "4"},
            "extra_info": {"split": "train", "index": 0, **GSM8K_ROWS[0]},
        },
        {
            "data_source": "openai/gsm8k",
            "prompt": user(GSM8K_ROWS[2]["question"] + GSM8K_SUFFIX),
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": "1234"},
            "extra_info": {"split": "train", "index": 2, **GSM8K_ROWS[2]},
        },
    ]
    assert rows[0]["data_source"] == DATA_SOURCES["gsm8k"]
    assert not list(out.glob("*.tmp"))


def test_gsm8k_two_files_two_splits(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [GSM8K_ROWS[0]])
    test = write_jsonl(tmp_path / "test.jsonl", [GSM8K_ROWS[2]])
    out = tmp_path / "out"
    proc = run_script("gsm8k", "--local_dir", str(out), "--local_path", str(train), str(test), "--split", "train,test")
    assert proc.returncode == 0, proc.stderr
    assert "bad row" not in proc.stderr
    _, train_rows = read_rows(out / "train.parquet")
    _, test_rows = read_rows(out / "test.parquet")
    assert [(r["extra_info"]["split"], r["reward_model"]["ground_truth"]) for r in train_rows] == [("train", "4")]
    assert [(r["extra_info"]["split"], r["reward_model"]["ground_truth"]) for r in test_rows] == [("test", "1234")]


def test_gsm8k_strict_fails_on_first_bad_row_and_writes_nothing(tmp_path):
    src = tmp_path / "gsm8k.parquet"
    pd.DataFrame(GSM8K_ROWS).to_parquet(src)
    out = tmp_path / "out"
    proc = run_script("gsm8k", "--local_dir", str(out), "--local_path", str(src), "--strict")
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last == (
        f"error: {src}: row 1: no '####' in field 'answer' (--strict; drop --strict to count and skip bad rows)"
    )
    assert not (out / "train.parquet").exists()
    assert not list(tmp_path.rglob("*.tmp"))


# ---------------------------------------------------------------------------------------------------------------
# deepmath
# ---------------------------------------------------------------------------------------------------------------

DEEPMATH_ROWS = [
    {
        "question": "Evaluate $\\lim_{x\\to 0} \\frac{\\sin x}{x}$.",
        "final_answer": "1",
        "difficulty": 4.5,
        "topic": "Mathematics -> Calculus",
        "r1_solution_1": "... \\boxed{1}",
        "r1_solution_2": "...",
        "r1_solution_3": "...",
    },
    {"question": "A row without its final answer.", "final_answer": None, "difficulty": 3.0, "topic": "x",
     "r1_solution_1": "", "r1_solution_2": "", "r1_solution_3": ""},
    {
        "question": "Find $\\cos(\\pi/3)$.",
        "final_answer": "\\dfrac{1}{2}",
        "difficulty": 2.0,
        "topic": "Mathematics -> Precalculus",
        "r1_solution_1": "",
        "r1_solution_2": "",
        "r1_solution_3": "",
    },
]


def test_deepmath(tmp_path):
    src = write_jsonl(tmp_path / "deepmath.jsonl", DEEPMATH_ROWS)
    out = tmp_path / "out"
    proc = run_script("deepmath", "--local_dir", str(out), "--local_path", str(src))
    assert proc.returncode == 0, proc.stderr
    assert_bad_rows_reported(proc.stderr, "deepmath[train]", 1, 3, [1])
    assert "missing field 'final_answer'" in proc.stderr

    columns, rows = read_rows(out / "train.parquet")
    assert columns == VERL_COLUMNS
    expected = []
    for index in (0, 2):
        src_row = DEEPMATH_ROWS[index]
        expected.append(
            {
                "data_source": "zwhe99/DeepMath-103K",
                "prompt": user(src_row["question"] + BOXED_SUFFIX),
                "ability": "math",
                "reward_model": {"style": "rule", "ground_truth": src_row["final_answer"]},
                "extra_info": {
                    "split": "train",
                    "index": index,
                    "question": src_row["question"],
                    "answer": src_row["final_answer"],
                    "difficulty": src_row["difficulty"],
                    "topic": src_row["topic"],
                },
            }
        )
    assert rows == expected
    assert rows[0]["data_source"] == DATA_SOURCES["deepmath"]


def test_deepmath_max_samples(tmp_path):
    src = write_jsonl(tmp_path / "deepmath.jsonl", DEEPMATH_ROWS)
    out = tmp_path / "out"
    proc = run_script("deepmath", "--local_dir", str(out), "--local_path", str(src), "--max_samples", "1")
    assert proc.returncode == 0, proc.stderr
    _, rows = read_rows(out / "train.parquet")
    assert [r["extra_info"]["index"] for r in rows] == [0]


# ---------------------------------------------------------------------------------------------------------------
# openthoughts3
# ---------------------------------------------------------------------------------------------------------------


def conv(question, answer=None):
    turns = [{"from": "human", "value": question}]
    if answer is not None:
        turns.append({"from": "gpt", "value": answer})
    return turns


OT3_ROWS = [
    {"difficulty": 3, "source": "ai2-adapt-dev/openmath-2-math", "domain": "math",
     "conversations": conv("What is $1+1$?", "<think>\nEasy.\n</think>\n\nThe sum is $\\boxed{2}$.")},
    {"difficulty": 5, "source": "nvidia/OpenCodeReasoning", "domain": "code",
     "conversations": conv("Write a function.", "```python\ndef f(): pass\n```")},
    {"difficulty": 4, "source": "ai2-adapt-dev/openmath-2-math", "domain": "math",
     "conversations": conv("Prove that it holds.", "<think>\n...\n</think>\n\nHence proved.")},
    {"difficulty": 2, "source": "ai2-adapt-dev/openmath-2-math", "domain": "math",
     "conversations": conv("A question without a reply.")},
    {"difficulty": 6, "source": "ai2-adapt-dev/openmath-2-math", "domain": "math",
     "conversations": conv("Put the answer in \\boxed{}: what is $\\frac{1}{2}+\\frac{1}{4}$?",
                           "<think>\nadd\n</think>\n\n$\\boxed{\\frac{3}{4}}$")},
]


def ot3_fixture(tmp_path) -> Path:
    src = tmp_path / "ot3.parquet"
    pd.DataFrame(OT3_ROWS).to_parquet(src)
    return src


def test_openthoughts3_opd(tmp_path):
    src = ot3_fixture(tmp_path)
    out = tmp_path / "out"
    proc = run_script("openthoughts3", "--local_dir", str(out), "--local_path", str(src))
    assert proc.returncode == 0, proc.stderr
    assert_bad_rows_reported(proc.stderr, "openthoughts3[train]", 2, 5, [2, 3])
    assert "no \\boxed{} answer in the reference solution" in proc.stderr
    assert "no assistant ('gpt') turn" in proc.stderr
    assert "openthoughts3[train]: 1 row(s) of 5 skipped: domain not in --domain math" in proc.stderr

    columns, rows = read_rows(out / "train.parquet")
    assert columns == VERL_COLUMNS
    q0 = "What is $1+1$?" + BOXED_SUFFIX
    q4 = "Put the answer in \\boxed{}: what is $\\frac{1}{2}+\\frac{1}{4}$?"  # already asks for \boxed: unchanged
    assert rows == [
        {
            "data_source": "open-thoughts/OpenThoughts3-1.2M",
            "prompt": user(q0),
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": "2"},
            "extra_info": {"split": "train", "index": 0, "domain": "math",
                           "source": "ai2-adapt-dev/openmath-2-math", "question": q0, "answer": "2"},
        },
        {
            "data_source": "open-thoughts/OpenThoughts3-1.2M",
            "prompt": user(q4),
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": "\\frac{3}{4}"},
            "extra_info": {"split": "train", "index": 4, "domain": "math",
                           "source": "ai2-adapt-dev/openmath-2-math", "question": q4, "answer": "\\frac{3}{4}"},
        },
    ]
    assert rows[0]["data_source"] == DATA_SOURCES["openthoughts3"]


def test_openthoughts3_sft(tmp_path):
    src = ot3_fixture(tmp_path)
    out = tmp_path / "sft"
    proc = run_script(
        "openthoughts3", "--mode", "sft", "--domain", "all", "--local_dir", str(out), "--local_path", str(src)
    )
    assert proc.returncode == 0, proc.stderr
    # only the row without a reply is bad for SFT; with --domain all nothing is skipped
    assert_bad_rows_reported(proc.stderr, "openthoughts3[train]", 1, 5, [3])
    assert "skipped" not in proc.stderr

    columns, rows = read_rows(out / "train.parquet")
    assert columns == ["data_source", "messages", "ability", "extra_info"]
    assert [r["extra_info"]["index"] for r in rows] == [0, 1, 2, 4]
    first, code = rows[0], rows[1]
    assert first == {
        "data_source": "open-thoughts/OpenThoughts3-1.2M",
        "messages": [
            {"role": "user", "content": "What is $1+1$?" + BOXED_SUFFIX},
            {"role": "assistant", "content": OT3_ROWS[0]["conversations"][1]["value"]},
        ],
        "ability": "math",
        "extra_info": {"split": "train", "index": 0, "domain": "math", "source": "ai2-adapt-dev/openmath-2-math"},
    }
    # non-math rows keep their question as it is
    assert code["messages"][0] == {"role": "user", "content": "Write a function."}
    assert code["ability"] == "code"


def test_openthoughts3_role_content_turns_jsonl(tmp_path):
    rows = [{"conversations": [{"role": "user", "content": "What is 3*3?"},
                               {"role": "assistant", "content": "\\boxed{9}"}]}]
    src = write_jsonl(tmp_path / "ot3.jsonl", rows)
    out = tmp_path / "out"
    proc = run_script("openthoughts3", "--local_dir", str(out), "--local_path", str(src))
    assert proc.returncode == 0, proc.stderr
    _, got = read_rows(out / "train.parquet")
    assert got[0]["reward_model"]["ground_truth"] == "9"
    assert got[0]["ability"] == "math"  # no domain column: kept, treated as math


# ---------------------------------------------------------------------------------------------------------------
# aime2024
# ---------------------------------------------------------------------------------------------------------------


def test_aime2024_h4_schema_parquet(tmp_path):
    src_rows = [
        {"id": 60, "problem": "Find $x$ such that ...", "solution": "...", "answer": "204", "url": "u", "year": "2024"},
        {"id": 61, "problem": "  ", "solution": "...", "answer": "25", "url": "u", "year": "2024"},
        {"id": 62, "problem": "Compute the number of ...", "solution": "...", "answer": "023", "url": "u",
         "year": "2024"},
    ]
    src = tmp_path / "aime.parquet"
    pd.DataFrame(src_rows).to_parquet(src)
    out = tmp_path / "out"
    proc = run_script("aime2024", "--local_dir", str(out), "--local_path", str(src))
    assert proc.returncode == 0, proc.stderr
    assert_bad_rows_reported(proc.stderr, "aime2024[train]", 1, 3, [1])
    assert "empty field 'problem'" in proc.stderr

    columns, rows = read_rows(out / "train.parquet")
    assert columns == VERL_COLUMNS
    assert rows == [
        {
            "data_source": "aime2024",
            "prompt": user(src_rows[i]["problem"] + BOXED_SUFFIX),
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": src_rows[i]["answer"]},
            "extra_info": {"split": "train", "index": i, "question": src_rows[i]["problem"],
                           "answer": src_rows[i]["answer"], "id": str(src_rows[i]["id"])},
        }
        for i in (0, 2)
    ]
    assert rows[0]["data_source"] == DATA_SOURCES["aime2024"]


def test_aime2024_maxwell_jia_schema_jsonl(tmp_path):
    src = write_jsonl(
        tmp_path / "aime.jsonl",
        [
            {"ID": "2024-I-1", "Problem": "Every morning Aya ...", "Solution": "...", "Answer": 204},
            {"ID": "2024-I-2", "Problem": "There exist real numbers ...", "Solution": "...", "Answer": None},
        ],
    )
    out = tmp_path / "out"
    proc = run_script("aime2024", "--local_dir", str(out), "--local_path", str(src), "--split", "test")
    assert proc.returncode == 0, proc.stderr
    assert_bad_rows_reported(proc.stderr, "aime2024[test]", 1, 2, [1])
    _, rows = read_rows(out / "test.parquet")
    assert len(rows) == 1
    assert rows[0]["reward_model"] == {"style": "rule", "ground_truth": "204"}
    assert rows[0]["extra_info"] == {"split": "test", "index": 0, "question": "Every morning Aya ...",
                                     "answer": "204", "id": "2024-I-1"}


# ---------------------------------------------------------------------------------------------------------------
# math500
# ---------------------------------------------------------------------------------------------------------------

MATH500_ROWS = [
    {"problem": "Convert the point $(0,3)$ to polar coordinates.", "solution": "... $\\boxed{(3,\\frac{\\pi}{2})}$",
     "answer": "\\left( 3, \\frac{\\pi}{2} \\right)", "subject": "Precalculus", "level": 2,
     "unique_id": "test/precalculus/807.json"},
    {"problem": "A problem with an empty answer.", "solution": "...", "answer": "", "subject": "Algebra", "level": 1,
     "unique_id": "test/algebra/1.json"},
]


def test_math500_json_array(tmp_path):
    src = tmp_path / "math500.json"
    src.write_text(json.dumps(MATH500_ROWS))
    out = tmp_path / "out"
    proc = run_script("math500", "--local_dir", str(out), "--local_path", str(src))
    assert proc.returncode == 0, proc.stderr
    assert_bad_rows_reported(proc.stderr, "math500[test]", 1, 2, [1])
    assert "empty field 'answer'" in proc.stderr

    columns, rows = read_rows(out / "test.parquet")
    assert columns == VERL_COLUMNS
    row = MATH500_ROWS[0]
    assert rows == [
        {
            "data_source": "HuggingFaceH4/MATH-500",
            "prompt": user(row["problem"] + BOXED_SUFFIX),
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": row["answer"]},
            "extra_info": {"split": "test", "index": 0, "question": row["problem"], "answer": row["answer"],
                           "subject": "Precalculus", "level": "2", "unique_id": "test/precalculus/807.json"},
        }
    ]
    assert rows[0]["data_source"] == DATA_SOURCES["math500"]


# ---------------------------------------------------------------------------------------------------------------
# errors: one line, naming the file / column / fix, non-zero exit
# ---------------------------------------------------------------------------------------------------------------

ALL_SCRIPTS = ["gsm8k", "deepmath", "openthoughts3", "aime2024", "math500", "humaneval", "mbpp", "kodcode", "ifeval"]
FIRST_REQUIRED = {"gsm8k": "question", "deepmath": "question", "openthoughts3": "conversations",
                  "aime2024": "problem/Problem", "math500": "problem", "humaneval": "task_id", "mbpp": "task_id",
                  "kodcode": "question", "ifeval": "prompt"}


def single_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


@pytest.mark.parametrize("name", ALL_SCRIPTS)
def test_missing_local_file(tmp_path, name):
    missing = tmp_path / "nowhere" / "data.parquet"
    out = tmp_path / "out"
    line = single_error_line(run_script(name, "--local_dir", str(out), "--local_path", str(missing)))
    assert str(missing) in line
    assert "file not found" in line
    assert "omit --local_path" in line
    assert not out.exists()


@pytest.mark.parametrize("name", ALL_SCRIPTS)
def test_missing_column(tmp_path, name):
    src = tmp_path / "wrong.parquet"
    pd.DataFrame([{"text": "a row in some other schema", "label": 1}]).to_parquet(src)
    line = single_error_line(run_script(name, "--local_dir", str(tmp_path / "out"), "--local_path", str(src)))
    assert str(src) in line
    assert f"missing column '{FIRST_REQUIRED[name]}'" in line
    assert "original schema" in line


def test_missing_column_jsonl_names_the_second_column(tmp_path):
    src = write_jsonl(tmp_path / "gsm8k.jsonl", [{"question": "q", "solution": "#### 1"}])
    line = single_error_line(run_script("gsm8k", "--local_dir", str(tmp_path / "out"), "--local_path", str(src)))
    assert line.startswith(f"error: {src}: missing column 'answer' ")


def test_unsupported_extension(tmp_path):
    src = tmp_path / "gsm8k.csv"
    src.write_text("question,answer\nq,#### 1\n")
    line = single_error_line(run_script("gsm8k", "--local_dir", str(tmp_path / "out"), "--local_path", str(src)))
    assert str(src) in line and "'.csv'" in line and ".parquet, .jsonl or .json" in line


def test_unreadable_parquet(tmp_path):
    src = tmp_path / "broken.parquet"
    src.write_bytes(b"this is not parquet")
    line = single_error_line(run_script("math500", "--local_dir", str(tmp_path / "out"), "--local_path", str(src)))
    assert str(src) in line and "cannot read the file" in line


def test_directory_as_local_path(tmp_path):
    line = single_error_line(run_script("math500", "--local_dir", str(tmp_path / "out"), "--local_path", str(tmp_path)))
    assert str(tmp_path) in line and "not a file" in line


def test_split_count_must_match_files(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", [GSM8K_ROWS[0]])
    line = single_error_line(
        run_script("gsm8k", "--local_dir", str(tmp_path / "out"), "--local_path", str(src), "--split", "train,test")
    )
    assert "1 --local_path file(s) but 2 --split name(s)" in line


def test_all_rows_bad_is_an_error(tmp_path):
    src = write_jsonl(tmp_path / "bad.jsonl", [GSM8K_ROWS[1]])
    out = tmp_path / "out"
    proc = run_script("gsm8k", "--local_dir", str(out), "--local_path", str(src))
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {src}: no usable rows (1 read, 1 bad")
    assert not (out / "train.parquet").exists()


def test_invalid_json_line_is_a_file_error(tmp_path):
    """datasets' json builder reads a file whole or not at all: a line that is not JSON fails the file, in one
    line naming the file and the parse error, and nothing is written."""
    src = tmp_path / "math500.jsonl"
    src.write_text(json.dumps(MATH500_ROWS[0]) + "\n{not json\n")
    out = tmp_path / "out"
    line = single_error_line(run_script("math500", "--local_dir", str(out), "--local_path", str(src)))
    assert line.startswith(f"error: --local_path {src}: cannot read the file (ArrowInvalid: JSON parse error: ")
    assert line.endswith("; pass a valid .jsonl file")
    assert not out.exists()


def test_empty_file(tmp_path):
    src = tmp_path / "gsm8k.jsonl"
    src.write_text("")
    line = single_error_line(run_script("gsm8k", "--local_dir", str(tmp_path / "out"), "--local_path", str(src)))
    assert line == f"error: {src}: no rows to convert"


def test_progress_lines(tmp_path):
    src = write_jsonl(tmp_path / "g.jsonl", [GSM8K_ROWS[0]] * 5)
    proc = run_script("gsm8k", "--local_dir", str(tmp_path / "out"), "--local_path", str(src), "--progress_every", "2")
    assert proc.returncode == 0, proc.stderr
    assert "gsm8k[train]: reading " + str(src) + " (5 rows)" in proc.stderr
    assert "gsm8k[train]: 2/5 rows read, 2 kept, 0 bad" in proc.stderr
    assert "gsm8k[train]: 4/5 rows read, 4 kept, 0 bad" in proc.stderr


# ---------------------------------------------------------------------------------------------------------------
# the `datasets` path, with a stand-in module (no network)
# ---------------------------------------------------------------------------------------------------------------


class FakeDataset(list):
    def __init__(self, rows):
        super().__init__(rows)
        self.column_names = list(rows[0]) if rows else []


def run_in_process(monkeypatch, name: str, argv: list[str], load_dataset) -> None:
    fake = types.ModuleType("datasets")
    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.syspath_prepend(str(SCRIPTS))
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *argv])
    runpy.run_path(str(SCRIPTS / f"{name}.py"), run_name="__main__")


def test_hub_path_uses_load_dataset(tmp_path, monkeypatch, capsys):
    calls = []

    def load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split, kwargs))
        return FakeDataset([GSM8K_ROWS[0]] if split == "train" else [GSM8K_ROWS[2]])

    out = tmp_path / "out"
    run_in_process(monkeypatch, "gsm8k", ["--local_dir", str(out)], load_dataset)
    assert calls == [("openai/gsm8k", "main", "train", {}), ("openai/gsm8k", "main", "test", {})]
    _, train = read_rows(out / "train.parquet")
    _, test = read_rows(out / "test.parquet")
    assert train[0]["reward_model"]["ground_truth"] == "4"
    assert test[0]["extra_info"]["split"] == "test"
    assert "gsm8k[test]: wrote 1 rows" in capsys.readouterr().out


def test_hub_path_missing_column_and_load_failure(tmp_path, monkeypatch, capsys):
    def wrong_schema(path, name=None, split=None, **kwargs):
        return FakeDataset([{"problem": "p", "solution": "s"}])

    with pytest.raises(SystemExit) as exc:
        run_in_process(monkeypatch, "math500", ["--local_dir", str(tmp_path / "a")], wrong_schema)
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("error: 'HuggingFaceH4/MATH-500' split 'test': missing column 'answer'")

    def offline(path, name=None, split=None, **kwargs):
        raise ConnectionError("Couldn't reach the data set\nsecond line")

    with pytest.raises(SystemExit):
        run_in_process(monkeypatch, "math500", ["--local_dir", str(tmp_path / "b")], offline)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "cannot load 'HuggingFaceH4/MATH-500' split 'test'" in err[0]
    assert "ConnectionError: Couldn't reach the data set" in err[0]
    assert "pass --local_path FILE" in err[0]


def test_hub_streaming_when_max_samples(tmp_path, monkeypatch):
    calls = []

    def load_dataset(path, name=None, split=None, **kwargs):
        calls.append(kwargs)
        return iter(DEEPMATH_ROWS)  # an IterableDataset has no len()

    out = tmp_path / "out"
    run_in_process(monkeypatch, "deepmath", ["--local_dir", str(out), "--max_samples", "1"], load_dataset)
    assert calls == [{"streaming": True}]
    _, rows = read_rows(out / "train.parquet")
    assert len(rows) == 1


# ---------------------------------------------------------------------------------------------------------------
# opd_verl/parquet.py: the one writer of verl parquet files (these scripts and the demo)
# ---------------------------------------------------------------------------------------------------------------

ROWS = [{"data_source": "x", "prompt": user(f"q{i}"), "extra_info": {"index": i}} for i in range(7)]


def test_write_parquet_whole_list_atomic(tmp_path):
    path = tmp_path / "sub" / "train.parquet"
    assert write_parquet(ROWS, path) == str(path)
    assert pq.read_table(path).to_pylist() == ROWS
    with pytest.raises(Exception):  # noqa: B017 - pyarrow's conversion error; the old file must survive it
        write_parquet([{"a": 1}, {"a": "not an int"}], path)
    assert pq.read_table(path).to_pylist() == ROWS
    assert sorted(p.name for p in path.parent.iterdir()) == ["train.parquet"]


def test_parquet_stream_row_groups_and_rename_on_close(tmp_path):
    path = tmp_path / "out" / "train.parquet"
    stream = ParquetStream(path, chunk_rows=3)
    for row in ROWS:
        stream.add(row)
    assert stream.count == 7 and stream.written == 6
    assert not path.exists() and stream.tmp.exists()  # nothing under the final name until complete
    assert stream.close() == 7
    assert not stream.tmp.exists()
    meta = pq.ParquetFile(path).metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [3, 3, 1]
    whole = pq.read_table(write_parquet(ROWS, tmp_path / "whole.parquet"))
    assert pq.read_table(path).to_pylist() == ROWS == whole.to_pylist()


def test_parquet_stream_aborts_on_error_and_writes_nothing_without_rows(tmp_path):
    path = tmp_path / "train.parquet"
    write_parquet(ROWS[:1], path)
    with pytest.raises(RuntimeError), ParquetStream(path, chunk_rows=2) as stream:
        for row in ROWS:
            stream.add(row)
        raise RuntimeError("failed mid-way")
    assert pq.read_table(path).to_pylist() == ROWS[:1]  # the older complete file is untouched
    assert not stream.tmp.exists()
    empty = tmp_path / "empty.parquet"
    with ParquetStream(empty) as stream:
        pass
    assert stream.written == 0 and not empty.exists() and not stream.tmp.exists()


# ---------------------------------------------------------------------------------------------------------------
# verl's flags (examples/data_preprocess/*.py of verl): --local_save_dir, --local_dataset_path
# ---------------------------------------------------------------------------------------------------------------


def _gsm8k_snapshot(root: Path) -> Path:
    """A local copy of openai/gsm8k as the hub holds it (README.md declaring config "main", its split files)."""
    (root / "main").mkdir(parents=True)
    pd.DataFrame([GSM8K_ROWS[0]]).to_parquet(root / "main" / "train-00000-of-00001.parquet")
    pd.DataFrame([GSM8K_ROWS[2]]).to_parquet(root / "main" / "test-00000-of-00001.parquet")
    (root / "README.md").write_text(
        "---\nconfigs:\n- config_name: main\n  data_files:\n  - split: train\n    path: main/train-*\n"
        "  - split: test\n    path: main/test-*\n---\n"
    )
    return root


def test_verls_local_save_dir_and_local_dataset_path(tmp_path):
    """`gsm8k.py --local_dataset_path DIR --local_save_dir OUT`, as verl's own script is called: DIR is read with
    datasets.load_dataset(DIR, "main"), every split written under OUT."""
    snapshot = _gsm8k_snapshot(tmp_path / "gsm8k_copy")
    out = tmp_path / "out"
    proc = run_script("gsm8k", "--local_dataset_path", str(snapshot), "--local_save_dir", str(out))
    assert proc.returncode == 0, proc.stderr
    assert f"gsm8k[train]: wrote 1 rows to {out / 'train.parquet'}" in proc.stdout
    assert f"gsm8k[test]: wrote 1 rows to {out / 'test.parquet'}" in proc.stdout
    _, train = read_rows(out / "train.parquet")
    _, test = read_rows(out / "test.parquet")
    assert train[0]["reward_model"]["ground_truth"] == "4" and test[0]["reward_model"]["ground_truth"] == "1234"
    assert train[0]["data_source"] == "openai/gsm8k"  # the reward is chosen by data_source, not by the input path
    src = tmp_path / "train.parquet"
    pd.DataFrame(GSM8K_ROWS[:1]).to_parquet(src)
    proc = run_script("gsm8k", "--local_save_dir", str(tmp_path / "out2"), "--local_path", str(src))
    assert proc.returncode == 0 and (tmp_path / "out2" / "train.parquet").is_file(), proc.stderr


def test_verls_flags_conflicting_with_ours_are_one_error_line(tmp_path):
    src = tmp_path / "train.parquet"
    pd.DataFrame(GSM8K_ROWS[:1]).to_parquet(src)
    cases = [
        (["--local_dir", str(tmp_path / "a"), "--local_save_dir", str(tmp_path / "b"), "--local_path", str(src)],
         "name two output directories; give one"),
        (["--local_dataset_path", str(tmp_path), "--local_path", str(src)], "both name the input; give one"),
        (["--local_dataset_path", str(tmp_path), "--dataset", "other/gsm8k"], "both name the data set; give one"),
        (["--local_dataset_path", str(tmp_path / "missing")], "missing: no such directory"),
    ]
    for args, message in cases:
        proc = run_script("gsm8k", *args)
        assert proc.returncode != 0 and message in single_error_line(proc), (args, proc.stderr)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
