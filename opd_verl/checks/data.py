"""Checks of the train/val parquet files before Ray starts: readable, the columns verl needs, non-empty prompts,
and (opd.multi_teacher_mode=route) a teacher for every data_source.

Reads only the parquet schema, the row count, the prompt column and (route) the data_source column.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from opd_verl.checks.errors import OPDConfigError
from opd_verl.checks.routing import route_table, route_teacher_indices
from opd_verl.checks.teachers import teacher_entries

REQUIRED_COLUMNS = ("prompt",)
REWARD_COLUMNS = ("data_source", "reward_model")


def _files(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


def _is_remote_uri(path: str) -> bool:
    """hdfs://, s3://, ...: verl copies these itself; only local files are checked here."""
    return "://" in path


def check_parquet(path: str, key: str, prompt_key: str = "prompt", need_reward_columns: bool = True) -> int:
    """Validate one parquet file; returns its row count."""
    import pyarrow.parquet as pq

    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise OPDConfigError(f"{key}: {path} does not exist; run a data_preprocess/ script or fix the path")
    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for unreadable files
        raise OPDConfigError(f"{key}: {path} is not a readable parquet file ({type(err).__name__}); regenerate it") from None
    columns = set(parquet.schema_arrow.names)
    required = [prompt_key] + (list(REWARD_COLUMNS) if need_reward_columns else [])
    missing = [c for c in required if c not in columns]
    if missing:
        raise OPDConfigError(
            f"{key}: {path} has no column(s) {missing} (has {sorted(columns)}); write it with a data_preprocess/ "
            f"script or set data.prompt_key"
        )
    rows = parquet.metadata.num_rows
    if rows == 0:
        raise OPDConfigError(f"{key}: {path} has no rows; point it at a non-empty dataset")
    prompts = parquet.read(columns=[prompt_key]).column(prompt_key).to_pylist()
    for index, prompt in enumerate(prompts):
        if prompt is None or len(prompt) == 0:
            raise OPDConfigError(
                f"{key}: {path} row {index} has an empty {prompt_key!r} (no chat messages); drop or fix that row"
            )
    return rows


def check_routes(path: str, key: str, table: Mapping[str, int]) -> None:
    """Every data_source of the file has a teacher under multi_teacher_mode=route."""
    import pyarrow.parquet as pq

    sources = pq.read_table(os.path.expanduser(path), columns=["data_source"]).column("data_source").unique()
    try:
        route_teacher_indices(sorted(str(s) for s in sources.to_pylist()), table)
    except OPDConfigError as err:
        raise OPDConfigError(f"{key}: {path}: {err}") from None


def check_data(config: Mapping) -> None:
    """All local train/val files of a composed config (plain dict; `opd` is optional)."""
    data = config["data"]
    prompt_key = data.get("prompt_key", "prompt")
    opd = config.get("opd") or {}
    entries = teacher_entries(opd) if opd else []
    table = route_table(entries) if opd.get("multi_teacher_mode") == "route" and len(entries) > 1 else None
    for key in ("train_files", "val_files"):
        for path in _files(data.get(key)):
            if not _is_remote_uri(path):
                check_parquet(path, f"data.{key}", prompt_key)
                if table is not None:
                    check_routes(path, f"data.{key}", table)
