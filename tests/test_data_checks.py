"""Train/val parquet checks before Ray starts (opd_verl.checks.data)."""

import pandas as pd
import pytest

from conftest import run_main_opd
from opd_verl.checks.data import check_data, check_parquet
from opd_verl.checks.errors import OPDConfigError

ROW = {
    "data_source": "openai/gsm8k",
    "prompt": [{"role": "user", "content": "1+1?"}],
    "ability": "math",
    "reward_model": {"style": "rule", "ground_truth": "2"},
    "extra_info": {"split": "train", "index": 0},
}


def _write(path, rows):
    pd.DataFrame(rows).to_parquet(path)
    return str(path)


def test_good_file_passes(tmp_path):
    assert check_parquet(_write(tmp_path / "a.parquet", [ROW, ROW]), "data.train_files") == 2


def test_missing_column(tmp_path):
    path = _write(tmp_path / "a.parquet", [{k: v for k, v in ROW.items() if k != "reward_model"}])
    with pytest.raises(OPDConfigError, match=r"data.train_files: .*a.parquet has no column\(s\) \['reward_model'\]"):
        check_parquet(path, "data.train_files")


def test_empty_prompt_list(tmp_path):
    path = _write(tmp_path / "a.parquet", [ROW, {**ROW, "prompt": []}])
    with pytest.raises(OPDConfigError, match=r"row 1 has an empty 'prompt'"):
        check_parquet(path, "data.val_files")


def test_empty_dataset(tmp_path):
    path = _write(tmp_path / "a.parquet", [ROW])
    pd.read_parquet(path).iloc[:0].to_parquet(path)
    with pytest.raises(OPDConfigError, match="has no rows"):
        check_parquet(path, "data.train_files")


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(OPDConfigError, match="does not exist"):
        check_data({"data": {"train_files": str(tmp_path / "nope.parquet"), "val_files": None}})
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(OPDConfigError, match="is not a readable parquet file"):
        check_data({"data": {"train_files": [str(tmp_path / "bad.parquet")], "val_files": None}})


def test_main_opd_stops_on_bad_data_before_ray(tmp_path):
    path = _write(tmp_path / "train.parquet", [{k: v for k, v in ROW.items() if k != "prompt"}])
    result = run_main_opd(f"data.train_files={path}", f"data.val_files={path}", "trainer.device=cpu")
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("opd_verl: error:")]
    assert len(errors) == 1 and "has no column(s) ['prompt']" in errors[0], result.stderr
    assert "ray init" not in result.stdout


def test_route_needs_a_teacher_for_every_data_source(tmp_path):
    train = _write(tmp_path / "train.parquet", [ROW, {**ROW, "data_source": "math500"}])
    opd = {"multi_teacher_mode": "route", "teachers": [{"path": "/a", "data_source": "openai/gsm8k"},
                                                       {"path": "/b", "data_source": "aime"}]}
    config = {"data": {"train_files": train, "val_files": None}, "opd": opd}
    with pytest.raises(OPDConfigError, match=r"data.train_files: .*train.parquet: data_source 'math500' has no teacher"):
        check_data(config)
    opd["teachers"][1]["data_source"] = ["aime", "math500"]
    check_data(config)
    # the same data under mean_prob needs no routes
    opd["teachers"][1]["data_source"] = "aime"
    check_data({**config, "opd": {**opd, "multi_teacher_mode": "mean_prob"}})
