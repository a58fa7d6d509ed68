"""Shared plumbing of the data_preprocess/ scripts: the CLI, reading the source rows through `datasets` (a hub
data set, or a local parquet / JSON-lines / JSON-array file in the data set's original schema), the bad-row
report, the verl row of a math problem, and writing verl's parquet (opd_verl/parquet.py).

A script supplies the source's columns and a `convert(record, index, split)` that returns the output row,
raises `BadRow(reason)` for a row that cannot be used (counted and reported, or an error under --strict) or
`Skip(reason)` for a row left out on purpose (e.g. another domain; counted and reported, never an error).
Every user-facing failure is one line on stderr starting with "error:" and a non-zero exit.

The data_source strings and prompt instructions come from opd_verl.rewards (opd_verl/rewards/sources.py), so the
rows and the reward function agree.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from opd_verl.parquet import ParquetStream  # noqa: E402
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
    "require_code",
    "with_instruction",
    "math_row",
    "rule_row",
    "build_parser",
    "run",
    "main_guard",
]

#: How many bad rows the report lists one by one.
REPORT_FIRST = 5


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


def require_code(record: dict, names: str | Sequence[str]) -> str:
    """Like `require_text`, but the text as it is (code keeps its leading indentation and newlines)."""
    require_text(record, names)
    return str(get_field(record, names))


def with_instruction(question: str, style: str) -> str:
    """`question` followed by the answer-format instruction of `style` ("gsm8k" or "boxed"), unless the
    question already asks for that format."""
    marker = "####" if style == "gsm8k" else "\\boxed"
    if marker in question:
        return question
    return question + " " + INSTRUCTIONS[style]


def math_row(data_source: str, question: str, ground_truth: str, split: str, index: int, **extra_info: Any) -> dict:
    """The verl row of a math problem: the question plus its data source's answer instruction as the user
    prompt, `ground_truth` for the rule reward, and extra_info {split, index, question, answer: ground_truth,
    **extra_info} (an `answer=` in `extra_info` replaces the ground truth there)."""
    return {
        "data_source": data_source,
        "prompt": [{"role": "user", "content": with_instruction(question, ANSWER_STYLE[data_source])}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": ground_truth},
        "extra_info": {"split": split, "index": index, "question": question, "answer": ground_truth, **extra_info},
    }


def rule_row(data_source: str, ability: str, content: str, ground_truth: str, split: str, index: int,
             **extra_info: Any) -> dict:
    """The verl row of a code or instruction-following problem: `content` as the user prompt, `ground_truth`
    (the JSON its reward reads) for the rule reward, and extra_info {split, index, **extra_info}."""
    return {
        "data_source": data_source,
        "prompt": [{"role": "user", "content": content}],
        "ability": ability,
        "reward_model": {"style": "rule", "ground_truth": ground_truth},
        "extra_info": {"split": split, "index": index, **extra_info},
    }


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
        default=None,
        help=f"output directory; each split is written to LOCAL_DIR/<split>.parquet (default: ~/data/{name})",
    )
    parser.add_argument("--local_save_dir", default=None, help="verl's name for --local_dir")
    parser.add_argument(
        "--local_path",
        nargs="+",
        metavar="FILE",
        help="read these local files (.parquet, or .jsonl/.json with JSON lines or one array of records, in the "
        "data set's original schema) instead of the hub data set; one file per --split name, in order",
    )
    parser.add_argument(
        "--local_dataset_path",
        metavar="DIR",
        help="verl's flag: a local copy of the data set (a directory datasets.load_dataset reads with --dataset_config, "
        "e.g. one `hf download` wrote), read instead of the hub data set --dataset",
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
    parser.set_defaults(_name=name, _default_splits=list(splits), _default_dataset=dataset)
    return parser


def resolve_verl_flags(args: argparse.Namespace) -> argparse.Namespace:
    """verl's --local_save_dir / --local_dataset_path as our --local_dir / --dataset (each pair given once)."""
    if args.local_dir and args.local_save_dir and args.local_dir != args.local_save_dir:
        raise PreprocessError(f"--local_dir {args.local_dir} and --local_save_dir {args.local_save_dir} name two "
                              "output directories; give one")
    args.local_dir = args.local_dir or args.local_save_dir or f"~/data/{args._name}"
    if args.local_dataset_path:
        if args.local_path:
            raise PreprocessError("--local_dataset_path (a local copy of the data set) and --local_path (one file per "
                                  "split) both name the input; give one")
        if args.dataset != args._default_dataset:
            raise PreprocessError(f"--local_dataset_path {args.local_dataset_path} and --dataset {args.dataset} both "
                                  "name the data set; give one")
        path = Path(args.local_dataset_path).expanduser()
        if not path.is_dir():
            raise PreprocessError(f"--local_dataset_path {args.local_dataset_path}: no such directory; give a local "
                                  f"copy of {args.dataset} (a directory datasets.load_dataset reads), or one file "
                                  "per split with --local_path")
        args.dataset = str(path)
    return args


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
# Reading: every source, hub or local file, goes through datasets.load_dataset
# ----------------------------------------------------------------------------------------------------------------

#: The `datasets` builder that reads each supported local file type (the json one reads JSON lines and arrays).
LOCAL_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}


def _first_line(exc: BaseException) -> str:
    """`Type: first line` of the error (of its cause, for datasets' generic DatasetGenerationError)."""
    if type(exc).__name__ == "DatasetGenerationError" and (exc.__cause__ or exc.__context__):
        exc = exc.__cause__ or exc.__context__
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _import_datasets():
    try:
        import datasets
    except ImportError as exc:
        raise PreprocessError(f"cannot import `datasets` ({exc}); install it: pip install datasets") from exc
    return datasets


def _column_error(source: str, missing: Column, columns: Sequence[Column], dataset: str) -> PreprocessError:
    needed = ", ".join(str(c) for c in columns)
    return PreprocessError(
        f"{source}: missing column '{missing}' (the {dataset} schema needs columns: {needed}); "
        f"pass a file in {dataset}'s original schema, e.g. one written by datasets' to_parquet()/to_json()"
    )


def _records(
    load: Callable[[], Any], source: str, columns: Sequence[Column], dataset: str,
    failure: Callable[[Exception], PreprocessError],
) -> tuple[Iterator[dict], int | None]:
    """(records, row count if known) of the data set `load()` returns, after checking it has the columns.
    Any error while loading or iterating becomes `failure(exc)`."""
    try:
        ds = load()
        rows = iter(ds)
        first = next(rows, None)
    except StopIteration:  # raised by datasets' schema inference on an empty file
        first = None
    except Exception as exc:  # noqa: BLE001 - offline, unknown name or split, corrupt file, ...
        raise failure(exc) from exc
    if first is None:
        raise PreprocessError(f"{source}: no rows to convert")
    present = set(getattr(ds, "column_names", None) or first)
    missing = [col for col in columns if not any(n in present for n in col.names)]
    if missing:
        raise _column_error(source, missing[0], columns, dataset)

    def chained() -> Iterator[dict]:
        yield first
        try:
            yield from rows
        except Exception as exc:  # noqa: BLE001 - e.g. a corrupt row group or JSON block further on
            raise failure(exc) from exc

    return chained(), (len(ds) if hasattr(ds, "__len__") else None)


def _load_kwargs(max_samples: int | None) -> dict:
    """Stream when only the first --max_samples rows are read; otherwise datasets builds its Arrow cache."""
    return {"streaming": True} if max_samples is not None else {}


def _open_local(
    path_str: str, columns: Sequence[Column], dataset: str, max_samples: int | None
) -> tuple[Iterator[dict], int | None]:
    """A local file, read by datasets' parquet or json builder."""
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
    if suffix not in LOCAL_BUILDERS:
        raise PreprocessError(
            f"{label}: unsupported file type '{suffix or path.name}'; use a .parquet, .jsonl or .json file"
        )
    datasets = _import_datasets()
    datasets.logging.set_verbosity(logging.CRITICAL)  # its read errors are reported in our one error line
    datasets.disable_progress_bars()  # stderr holds our report and progress lines only

    def load():
        return datasets.load_dataset(
            LOCAL_BUILDERS[suffix], data_files=str(path), split="train", **_load_kwargs(max_samples)
        )

    def failure(exc: Exception) -> PreprocessError:
        return PreprocessError(f"{label}: cannot read the file ({_first_line(exc)}); pass a valid {suffix} file")

    return _records(load, str(path), columns, dataset, failure)


def _open_hub(
    dataset: str, config: str | None, split: str, columns: Sequence[Column], max_samples: int | None
) -> tuple[Iterator[dict], int | None]:
    """A data set of the hub (or of datasets' cache)."""
    datasets = _import_datasets()
    what = f"'{dataset}'" + (f" (config {config})" if config else "") + f" split '{split}'"

    def load():
        return datasets.load_dataset(dataset, config, split=split, **_load_kwargs(max_samples))

    def failure(exc: Exception) -> PreprocessError:
        return PreprocessError(
            f"cannot load {what} with datasets.load_dataset ({_first_line(exc)}); without network access, "
            "pass --local_path FILE with the split in the data set's original schema"
        )

    return _records(load, what, columns, dataset, failure)


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


def _convert_rows(
    args: argparse.Namespace, records: Iterator[dict], convert: Convert, split: str, sink: ParquetStream,
    report: _Report, source: str, total: int | None,
) -> int:
    """Convert up to --max_samples `records` into `sink`, counting bad and skipped rows; returns the rows read."""
    tag = f"{args._name}[{split}]"
    read = 0
    for index, record in enumerate(records):
        if args.max_samples is not None and index >= args.max_samples:
            break
        read += 1
        try:
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
            _log(f"{tag}: {read}{of} rows read, {sink.count} kept, {report.bad_count} bad")
    return read


def _log_report(tag: str, report: _Report, read: int, out_name: str) -> None:
    if report.bad_count:
        firsts = ", ".join(str(i) for i, _ in report.bad)
        _log(f"{tag}: {report.bad_count} bad row(s) of {read} left out of {out_name} (first indices: {firsts})")
        for index, reason in report.bad:
            _log(f"{tag}:   row {index}: {reason}")
    for reason, count in report.skipped.items():
        _log(f"{tag}: {count} row(s) of {read} skipped: {reason}")


def run(args: argparse.Namespace, columns: Sequence[str | Sequence[str]], convert: Convert) -> int:
    """Convert every split named by `args` and write LOCAL_DIR/<split>.parquet.

    `columns` are the source columns the data set must have (each a name or a tuple of alternative spellings).
    Returns the number of rows written; raises PreprocessError for any user-facing failure.
    """
    cols = [Column.of(c) for c in columns]
    args = resolve_verl_flags(args)
    out_dir = Path(args.local_dir).expanduser()
    if args.max_samples is not None and args.max_samples < 1:
        raise PreprocessError(f"--max_samples must be >= 1, got {args.max_samples}")
    total_written = 0
    for split, local in _splits_and_sources(args):
        tag = f"{args._name}[{split}]"
        if local is not None:
            records, total = _open_local(local, cols, args.dataset, args.max_samples)
            source = str(Path(local).expanduser())
        else:
            records, total = _open_hub(args.dataset, args.dataset_config, split, cols, args.max_samples)
            source = f"{args.dataset}[{split}]"
        if args.max_samples is not None and total is not None:
            total = min(total, args.max_samples)
        out_path = out_dir / f"{split}.parquet"
        _log(f"{tag}: reading {source}" + (f" ({total} rows)" if total is not None else ""))
        report = _Report()
        with ParquetStream(out_path) as sink:  # renamed into place only when complete; dropped on any error
            read = _convert_rows(args, records, convert, split, sink, report, source, total)
            _log_report(tag, report, read, out_path.name)
        if sink.written == 0:
            raise PreprocessError(
                f"{source}: no usable rows ({read} read, {report.bad_count} bad, "
                f"{sum(report.skipped.values())} skipped); nothing written to {out_path}"
            )
        total_written += sink.written
        print(f"{tag}: wrote {sink.written} rows to {out_path}", flush=True)
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
