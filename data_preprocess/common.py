"""Shared plumbing of the data_preprocess/ scripts: the CLI, reading the source rows (a hub data set through
`datasets`, or a local parquet / jsonl / json file in the data set's original schema), the bad-row report,
and writing verl's parquet.

A script supplies the source's columns and a `convert(record, index, split)` that returns the output row,
raises `BadRow(reason)` for a row that cannot be used (counted and reported, or an error under --strict) or
`Skip(reason)` for a row left out on purpose (e.g. another domain; counted and reported, never an error).
Every user-facing failure is one line on stderr starting with "error:" and a non-zero exit.

The data_source strings and prompt instructions come from opd_verl/rewards.py, so the rows and the reward
function agree.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from opd_verl.rewards import ANSWER_STYLE, DATA_SOURCES, INSTRUCTIONS  # noqa: E402

__all__ = [
    "ANSWER_STYLE",
    "DATA_SOURCES",
    "INSTRUCTIONS",
    "BadRow",
    "Skip",
    "PreprocessError",
    "Column",
    "get_field",
    "require_text",
    "with_instruction",
    "build_parser",
    "run",
    "main_guard",
]

#: Rows per parquet row group / write.
CHUNK_ROWS = 2048
#: How many bad rows the report lists one by one.
REPORT_FIRST = 5
#: How many leading JSON records are scanned for the column check.
JSON_COLUMN_SCAN = 1000


class BadRow(Exception):
    """A source row that cannot be converted (missing field, no extractable answer, ...)."""


class Skip(Exception):
    """A source row left out on purpose (e.g. not in the selected domain)."""


class PreprocessError(Exception):
    """A one-line, user-facing error: printed as "error: <message>" and exit status 1."""


@dataclass(frozen=True)
class Column:
    """A required source column, under any of its spellings (e.g. ("problem", "Problem"))."""

    names: tuple[str, ...]

    @classmethod
    def of(cls, spec: str | Sequence[str]) -> Column:
        return cls((spec,) if isinstance(spec, str) else tuple(spec))

    def __str__(self) -> str:
        return self.names[0] if len(self.names) == 1 else "/".join(self.names)


def get_field(record: dict, names: str | Sequence[str], default: Any = None) -> Any:
    """The first of `names` present (and not None) in `record`, else `default`."""
    for name in (names,) if isinstance(names, str) else names:
        value = record.get(name)
        if value is not None:
            return value
    return default


def require_text(record: dict, names: str | Sequence[str]) -> str:
    """The field as a non-empty stripped string; BadRow if missing, not text-like or empty."""
    value = get_field(record, names)
    label = names if isinstance(names, str) else names[0]
    if value is None:
        raise BadRow(f"missing field '{label}'")
    if isinstance(value, float) and value != value:  # NaN from pandas-written files
        raise BadRow(f"missing field '{label}'")
    if isinstance(value, (dict, list)):
        raise BadRow(f"field '{label}' is not text")
    text = str(value).strip()
    if not text:
        raise BadRow(f"empty field '{label}'")
    return text


def with_instruction(question: str, style: str) -> str:
    """`question` followed by the answer-format instruction of `style` ("gsm8k" or "boxed"), unless the
    question already asks for that format."""
    marker = "####" if style == "gsm8k" else "\\boxed"
    if marker in question:
        return question
    return question + " " + INSTRUCTIONS[style]


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------


def build_parser(
    name: str, description: str, dataset: str, splits: Sequence[str], dataset_config: str | None = None
) -> argparse.ArgumentParser:
    """The options every script shares (`description`: the script's docstring, shown by --help); a script may
    add its own before calling `run`."""
    parser = argparse.ArgumentParser(
        prog=f"{name}.py", description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--local_dir",
        default=f"~/data/{name}",
        help="output directory; each split is written to LOCAL_DIR/<split>.parquet (default: %(default)s)",
    )
    parser.add_argument(
        "--local_path",
        nargs="+",
        metavar="FILE",
        help="read these local files (.parquet, .jsonl or .json, in the data set's original schema) instead of "
        "loading the data set with `datasets`; one file per --split name, in order",
    )
    parser.add_argument(
        "--split",
        default=None,
        help=f"comma-separated split names (default: {','.join(splits)}; with one --local_path: {splits[0]})",
    )
    parser.add_argument(
        "--dataset", default=dataset, help="data set name for datasets.load_dataset (default: %(default)s)"
    )
    parser.add_argument(
        "--dataset_config", default=dataset_config, help="data set configuration name (default: %(default)s)"
    )
    parser.add_argument("--max_samples", type=int, default=None, help="read at most this many source rows per split")
    parser.add_argument("--strict", action="store_true", help="any bad row is an error (default: count, report, skip)")
    parser.add_argument(
        "--progress_every", type=int, default=10000, help="print a progress line every N rows (default: %(default)s)"
    )
    parser.set_defaults(_name=name, _default_splits=list(splits))
    return parser


def _splits_and_sources(args: argparse.Namespace) -> list[tuple[str, str | None]]:
    """[(split, local file or None)] from --split / --local_path."""
    explicit = [s.strip() for s in args.split.split(",") if s.strip()] if args.split else None
    if explicit is not None and not explicit:
        raise PreprocessError("--split is empty; give one or more comma-separated split names")
    if not args.local_path:
        return [(split, None) for split in (explicit or args._default_splits)]
    paths = list(args.local_path)
    if explicit is None:
        if len(paths) == 1:
            explicit = [args._default_splits[0]]
        elif len(paths) == len(args._default_splits):
            explicit = list(args._default_splits)
        else:
            raise PreprocessError(
                f"{len(paths)} --local_path files but no --split; give --split with one name per file"
            )
    if len(explicit) != len(paths):
        raise PreprocessError(
            f"{len(paths)} --local_path file(s) but {len(explicit)} --split name(s) ({','.join(explicit)}); "
            "give one split name per file, in the same order"
        )
    if len(set(explicit)) != len(explicit):
        raise PreprocessError(f"--split names repeat ({','.join(explicit)}); each split is written to its own file")
    return list(zip(explicit, paths))


# ----------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------


class _Unreadable:
    """Placeholder record for a source line that could not be decoded (a bad row, not a file error)."""

    def __init__(self, reason: str):
        self.reason = reason


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _missing_columns(present: Iterable[str], columns: Sequence[Column]) -> list[Column]:
    present = set(present)
    return [col for col in columns if not any(n in present for n in col.names)]


def _column_error(source: str, missing: Column, columns: Sequence[Column], dataset: str) -> PreprocessError:
    needed = ", ".join(str(c) for c in columns)
    return PreprocessError(
        f"{source}: missing column '{missing}' (the {dataset} schema needs columns: {needed}); "
        f"pass a file in {dataset}'s original schema, e.g. one written by datasets' to_parquet()/to_json()"
    )


def _json_records(path: Path) -> Iterator[Any]:
    """Records of a .json file: a JSON array, an object of column lists, an object wrapping a record list, or
    JSON lines (what datasets' to_json() writes)."""
    with path.open("r", encoding="utf-8") as handle:
        head = handle.read(4096).lstrip()
    if head.startswith("["):
        with path.open("r", encoding="utf-8") as handle:
            data = json.load(handle)
        yield from data
        return
    try:
        with path.open("r", encoding="utf-8") as handle:
            data = json.load(handle)
    except json.JSONDecodeError:
        yield from _jsonl_records(path)
        return
    if isinstance(data, dict):
        lists = {k: v for k, v in data.items() if isinstance(v, list)}
        if len(lists) == 1 and all(isinstance(r, dict) for r in next(iter(lists.values()))):
            yield from next(iter(lists.values()))
            return
        if data and all(isinstance(v, (list, dict)) for v in data.values()):
            cols = {k: (list(v.values()) if isinstance(v, dict) else v) for k, v in data.items()}
            lengths = {len(v) for v in cols.values()}
            if len(lengths) == 1:
                keys = list(cols)
                for values in zip(*cols.values()):
                    yield dict(zip(keys, values))
                return
        yield data
        return
    raise ValueError("top-level JSON value is neither a list of records nor an object")


def _jsonl_records(path: Path) -> Iterator[Any]:
    with path.open("r", encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                yield _Unreadable(f"line {lineno} is not valid JSON ({exc.msg})")


def _open_local(path_str: str, columns: Sequence[Column], dataset: str) -> tuple[Iterator[Any], int | None]:
    """(records, row count if known) of a local file, after checking it exists, reads and has the columns."""
    path = Path(path_str).expanduser()
    label = f"--local_path {path_str}"
    if not path.exists():
        raise PreprocessError(
            f"{label}: file not found; give the path of a .parquet/.jsonl/.json file of {dataset}, "
            "or omit --local_path to load it with `datasets`"
        )
    if not path.is_file():
        raise PreprocessError(f"{label}: not a file; give the path of a .parquet, .jsonl or .json file")
    if not os.access(path, os.R_OK):
        raise PreprocessError(f"{label}: file is not readable (check its permissions)")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            parquet = pq.ParquetFile(path)
            missing = _missing_columns(parquet.schema_arrow.names, columns)
            if missing:
                raise _column_error(str(path), missing[0], columns, dataset)

            def batches() -> Iterator[dict]:
                for batch in parquet.iter_batches(batch_size=1024):
                    yield from batch.to_pylist()

            return batches(), parquet.metadata.num_rows
        if suffix in (".jsonl", ".json"):
            records = _jsonl_records(path) if suffix == ".jsonl" else _json_records(path)
            head: list[Any] = []
            for record in records:
                head.append(record)
                if len(head) >= JSON_COLUMN_SCAN:
                    break
            keys: set[str] = set()
            for record in head:
                if isinstance(record, dict):
                    keys.update(record)
            if not keys and head:
                raise PreprocessError(f"{path}: no JSON object records found; expected one object per row")
            if not head:
                raise PreprocessError(f"{path}: the file holds no rows")
            missing = _missing_columns(keys, columns)
            if missing:
                raise _column_error(str(path), missing[0], columns, dataset)

            def chained() -> Iterator[Any]:
                yield from head
                yield from records

            return chained(), None
    except PreprocessError:
        raise
    except Exception as exc:  # noqa: BLE001 - corrupt / unreadable files
        raise PreprocessError(f"{label}: cannot read the file ({_first_line(exc)})") from exc
    raise PreprocessError(
        f"{label}: unsupported file type '{suffix or path.name}'; use a .parquet, .jsonl or .json file"
    )


def _open_hub(
    dataset: str, config: str | None, split: str, columns: Sequence[Column], max_samples: int | None
) -> tuple[Iterator[Any], int | None]:
    try:
        import datasets
    except ImportError as exc:
        raise PreprocessError(
            f"cannot import `datasets` ({exc}); install it, or pass --local_path FILE"
        ) from exc
    what = f"'{dataset}'" + (f" (config {config})" if config else "") + f" split '{split}'"
    try:
        if max_samples is not None:
            ds = datasets.load_dataset(dataset, config, split=split, streaming=True)
            total = None
        else:
            ds = datasets.load_dataset(dataset, config, split=split)
            total = len(ds)
    except Exception as exc:  # noqa: BLE001 - offline, unknown name or split, ...
        raise PreprocessError(
            f"cannot load {what} with datasets.load_dataset ({_first_line(exc)}); without network access, "
            "pass --local_path FILE with the split in the data set's original schema"
        ) from exc
    names = getattr(ds, "column_names", None)
    if names:
        missing = _missing_columns(names, columns)
        if missing:
            raise _column_error(what, missing[0], columns, dataset)
    return iter(ds), total


# ----------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------


class _ParquetSink:
    """Writes rows in chunks to `<path>.tmp`, renamed to `path` by `close()`; `abort()` removes the tmp file."""

    def __init__(self, path: Path):
        self.path = path
        self.tmp = path.with_name(path.name + ".tmp")
        self.rows: list[dict] = []
        self.written = 0
        self.writer = None
        self.schema = None

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if len(self.rows) >= CHUNK_ROWS:
            self._flush()

    def _flush(self) -> None:
        if not self.rows:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self.writer is None:
            table = pa.Table.from_pylist(self.rows)
            self.schema = table.schema
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.writer = pq.ParquetWriter(self.tmp, self.schema)
        else:
            table = pa.Table.from_pylist(self.rows, schema=self.schema)
        self.writer.write_table(table)
        self.written += len(self.rows)
        self.rows = []

    def close(self) -> int:
        self._flush()
        if self.writer is not None:
            self.writer.close()
            os.replace(self.tmp, self.path)
        return self.written

    def abort(self) -> None:
        if self.writer is not None:
            try:
                self.writer.close()
            except Exception:  # noqa: BLE001
                pass
        if self.tmp.exists():
            self.tmp.unlink()


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class _Report:
    bad: list[tuple[int, str]] = field(default_factory=list)
    bad_count: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def add_bad(self, index: int, reason: str) -> None:
        self.bad_count += 1
        if len(self.bad) < REPORT_FIRST:
            self.bad.append((index, reason))


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


Convert = Callable[[dict, int, str], dict]


def run(args: argparse.Namespace, columns: Sequence[str | Sequence[str]], convert: Convert) -> int:
    """Convert every split named by `args` and write LOCAL_DIR/<split>.parquet.

    `columns` are the source columns the data set must have (each a name or a tuple of alternative spellings).
    Returns the number of rows written; raises PreprocessError for any user-facing failure.
    """
    name = args._name
    cols = [Column.of(c) for c in columns]
    out_dir = Path(args.local_dir).expanduser()
    if args.max_samples is not None and args.max_samples < 1:
        raise PreprocessError(f"--max_samples must be >= 1, got {args.max_samples}")
    total_written = 0
    for split, local in _splits_and_sources(args):
        tag = f"{name}[{split}]"
        if local is not None:
            records, total = _open_local(local, cols, args.dataset)
            source = str(Path(local).expanduser())
        else:
            records, total = _open_hub(args.dataset, args.dataset_config, split, cols, args.max_samples)
            source = f"{args.dataset}[{split}]"
        if args.max_samples is not None and total is not None:
            total = min(total, args.max_samples)
        out_path = out_dir / f"{split}.parquet"
        _log(f"{tag}: reading {source}" + (f" ({total} rows)" if total is not None else ""))
        sink = _ParquetSink(out_path)
        report = _Report()
        read = 0
        try:
            for index, record in enumerate(records):
                if args.max_samples is not None and index >= args.max_samples:
                    break
                read += 1
                try:
                    if isinstance(record, _Unreadable):
                        raise BadRow(record.reason)
                    if not isinstance(record, dict):
                        raise BadRow(f"record is a {type(record).__name__}, not an object")
                    sink.add(convert(record, index, split))
                except BadRow as exc:
                    if args.strict:
                        raise PreprocessError(
                            f"{source}: row {index}: {exc} (--strict; drop --strict to count and skip bad rows)"
                        ) from None
                    report.add_bad(index, str(exc))
                except Skip as exc:
                    report.skipped[str(exc)] = report.skipped.get(str(exc), 0) + 1
                if args.progress_every > 0 and read % args.progress_every == 0:
                    of = f"/{total}" if total is not None else ""
                    _log(f"{tag}: {read}{of} rows read, {sink.written + len(sink.rows)} kept, {report.bad_count} bad")
            if report.bad_count:
                firsts = ", ".join(str(i) for i, _ in report.bad)
                _log(
                    f"{tag}: {report.bad_count} bad row(s) of {read} left out of {out_path.name} "
                    f"(first indices: {firsts})"
                )
                for index, reason in report.bad:
                    _log(f"{tag}:   row {index}: {reason}")
            for reason, count in report.skipped.items():
                _log(f"{tag}: {count} row(s) of {read} skipped: {reason}")
            written = sink.close() if (sink.rows or sink.writer is not None) else 0
            if written == 0:
                raise PreprocessError(
                    f"{source}: no usable rows ({read} read, {report.bad_count} bad, "
                    f"{sum(report.skipped.values())} skipped); nothing written to {out_path}"
                )
        except BaseException:
            sink.abort()
            raise
        total_written += written
        print(f"{tag}: wrote {written} rows to {out_path}", flush=True)
    return total_written


def main_guard(main: Callable[[], Any]) -> None:
    """Run `main`, turning PreprocessError into a one-line "error: ..." on stderr and exit status 1."""
    try:
        main()
    except PreprocessError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
