"""Writing verl's parquet files, with pyarrow only (no verl import).

`write_parquet(rows, path)` writes a whole list at once; `ParquetStream(path)` takes rows one by one and
writes them in row groups of `CHUNK_ROWS`, its schema taken from the first group. Both write `<path>.tmp`
and rename it over `path` only once the file is complete, so a failed or interrupted write never leaves a
partial file under the final name (and never removes an older complete one).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["CHUNK_ROWS", "ParquetStream", "write_parquet"]

#: Rows per row group (and per write) of a ParquetStream.
CHUNK_ROWS = 2048


def _tmp_path(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def write_parquet(rows: Sequence[dict] | Iterable[dict], path: str | os.PathLike) -> str:
    """Write `rows` (dicts with the same keys) to `path` as one table, atomically; returns the path as text."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        pq.write_table(pa.Table.from_pylist(list(rows)), tmp)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    return str(path)


class ParquetStream:
    """Rows to `path` in row groups of `chunk_rows`, atomically.

    `add(row)` buffers a row and writes a full group; `close()` writes the rest, renames the tmp file to
    `path` and returns the number of rows written (0, and no file, if no row was added); `abort()` drops
    the tmp file. As a context manager it closes on success and aborts on any exception.
    """

    def __init__(self, path: str | os.PathLike, chunk_rows: int = CHUNK_ROWS):
        self.path = Path(path)
        self.tmp = _tmp_path(self.path)
        self.chunk_rows = chunk_rows
        self.written = 0
        self._rows: list[dict] = []
        self._writer: pq.ParquetWriter | None = None

    @property
    def count(self) -> int:
        """Rows added so far (written or still buffered)."""
        return self.written + len(self._rows)

    def add(self, row: dict) -> None:
        self._rows.append(row)
        if len(self._rows) >= self.chunk_rows:
            self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        if self._writer is None:
            table = pa.Table.from_pylist(self._rows)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = pq.ParquetWriter(self.tmp, table.schema)
        else:
            table = pa.Table.from_pylist(self._rows, schema=self._writer.schema)
        self._writer.write_table(table)
        self.written += len(self._rows)
        self._rows = []

    def close(self) -> int:
        try:
            self._flush()
            if self._writer is not None:
                self._writer.close()
                self._writer = None
                os.replace(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise
        return self.written

    def abort(self) -> None:
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception:  # noqa: BLE001 - the file is dropped anyway
                pass
            self._writer = None
        self._rows = []
        _remove(self.tmp)

    def __enter__(self) -> ParquetStream:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
