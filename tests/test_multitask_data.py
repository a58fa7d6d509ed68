"""data_preprocess/multitask.py: several verl parquet files of other schemas merged into one, row by row."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "data_preprocess" / "multitask.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def rows(source: str, n: int, extra: dict) -> list[dict]:
    return [{"data_source": source, "prompt": [{"role": "user", "content": f"{source} {i}"}], "ability": source,
             "reward_model": {"style": "rule", "ground_truth": str(i)}, "extra_info": {"index": i, **extra}}
            for i in range(n)]


def write(path: Path, table_rows: list[dict]) -> str:
    pq.write_table(pa.Table.from_pylist(table_rows), path)
    return str(path)


def test_merges_files_of_other_extra_info_schemas_row_by_row(tmp_path):
    math = rows("openai/gsm8k", 5, {"answer": "x"})
    code = rows("mbpp", 3, {"test_list": ["assert f() == 1"], "entry_point": "f"})
    chat = rows("google/IFEval", 4, {"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{"num_words": 3}]})
    files = [write(tmp_path / f"{n}.parquet", r) for n, r in (("m", math), ("c", code), ("i", chat))]
    out = tmp_path / "out"
    result = run("--local_dir", str(out), "--train", *files, "--test", files[1])
    assert result.returncode == 0, result.stderr
    assert "12 rows (openai/gsm8k: 5, mbpp: 3, google/IFEval: 4)" in result.stdout
    merged = pq.read_table(out / "train.parquet").to_pylist()
    fields = {"index", "answer", "test_list", "entry_point", "instruction_id_list", "kwargs"}
    for got, want in zip(merged, math + code + chat, strict=True):
        assert set(got["extra_info"]) == fields
        assert {k: v for k, v in got["extra_info"].items() if v is not None} == want["extra_info"]
        assert {k: v for k, v in got.items() if k != "extra_info"} == {k: v for k, v in want.items() if k != "extra_info"}
    assert [r["data_source"] for r in pq.read_table(out / "test.parquet").to_pylist()] == ["mbpp"] * 3


def test_max_per_source_samples_each_source(tmp_path):
    files = [write(tmp_path / "a.parquet", rows("a", 10, {}) + rows("b", 2, {}))]
    out = tmp_path / "out"
    result = run("--local_dir", str(out), "--train", *files, "--max_per_source", "3", "--seed", "1")
    assert result.returncode == 0, result.stderr
    merged = pq.read_table(out / "train.parquet").to_pylist()
    assert [r["data_source"] for r in merged] == ["a"] * 3 + ["b"] * 2
    indices = [r["extra_info"]["index"] for r in merged[:3]]
    assert indices == sorted(indices) and len(set(indices)) == 3  # a sample, in file order


def test_one_line_errors(tmp_path):
    bad = write(tmp_path / "bad.parquet", [{"prompt": "x", "reward_model": {"ground_truth": "1"}}])
    for args, message in (
        (["--train", str(tmp_path / "none.parquet")], "none.parquet: no such file"),
        (["--train", bad], "bad.parquet: missing column(s) ['data_source']"),
        (["--train", bad, "--max_per_source", "0"], "--max_per_source 0: give a positive number"),
    ):
        result = run("--local_dir", str(tmp_path / "out"), *args)
        assert result.returncode == 1 and result.stderr.startswith("error: ") and message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
