"""Several verl parquet files -> one multi-task data set (e.g. math + code + instruction following).

    python data_preprocess/multitask.py --local_dir ~/data/multitask \
        --train ~/data/gsm8k/train.parquet ~/data/mbpp/train.parquet ~/data/ifeval/train.parquet \
        --test ~/data/gsm8k/test.parquet ~/data/humaneval/test.parquet [--max_per_source N] [--seed 0]

Writes <local_dir>/train.parquet (and test.parquet with --test): the input files' rows, one after the other (the
trainer shuffles with data.shuffle), each unchanged: its data_source picks its reward (opd_verl.rewards) and, under
opd.multi_teacher_mode=route, its teacher. The files' columns are merged: a column or an extra_info /
reward_model field that one file lacks is null in its rows (each task's reward reads only its own fields).
--max_per_source N keeps at most N rows of each data_source in each split (a random sample, --seed), so that a
large set (GSM8K's 7473 rows) does not drown a small one (IFEval's 541).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import common  # noqa: E402
from common import PreprocessError  # noqa: E402

#: Columns every input needs: the prompt, and what routes and scores a row.
REQUIRED = ("prompt", "data_source", "reward_model")


def read_table(path: str):
    import pyarrow.parquet as pq

    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise PreprocessError(f"{path}: no such file (write it with its data_preprocess/ script first)")
    try:
        table = pq.read_table(path)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one line
        raise PreprocessError(f"{path}: not a readable parquet file ({exc})") from exc
    missing = [c for c in REQUIRED if c not in table.column_names]
    if missing:
        raise PreprocessError(f"{path}: missing column(s) {missing}; expected verl's RL parquet (data_preprocess/)")
    return table


def cap_per_source(table, max_per_source: int | None, rng: random.Random):
    """At most ``max_per_source`` rows of each data_source (a random sample, kept in file order)."""
    if max_per_source is None:
        return table
    sources = table.column("data_source").to_pylist()
    keep: list[int] = []
    for source in dict.fromkeys(sources):
        rows = [i for i, x in enumerate(sources) if x == source]
        keep += rows if len(rows) <= max_per_source else rng.sample(rows, max_per_source)
    return table.take(sorted(keep))


def merge(paths: Sequence[str], max_per_source: int | None = None, seed: int = 0):
    """One table of the files' rows (columns and struct fields merged; see the module docstring)."""
    import pyarrow as pa

    rng = random.Random(seed)
    tables = [cap_per_source(read_table(p), max_per_source, rng) for p in paths]
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise PreprocessError(f"{', '.join(paths)}: a column has incompatible types across the files ({exc})") from exc


def write(table, path: Path) -> None:
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def summary(table) -> str:
    counts: dict[str, int] = {}
    for source in table.column("data_source").to_pylist():
        counts[source] = counts.get(source, 0) + 1
    return ", ".join(f"{source}: {n}" for source, n in counts.items())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--local_dir", required=True, help="output directory (train.parquet, test.parquet)")
    parser.add_argument("--train", nargs="+", required=True, metavar="PARQUET", help="the training files to merge")
    parser.add_argument("--test", nargs="+", default=[], metavar="PARQUET", help="the validation files to merge")
    parser.add_argument("--max_per_source", type=int, default=None, help="at most N rows of each data_source per split")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --max_per_source sample")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.max_per_source is not None and args.max_per_source < 1:
        raise PreprocessError(f"--max_per_source {args.max_per_source}: give a positive number of rows")
    out = Path(os.path.expanduser(args.local_dir))
    for split, paths in (("train", args.train), ("test", args.test)):
        if not paths:
            continue
        table = merge(paths, args.max_per_source, args.seed)
        write(table, out / f"{split}.parquet")
        print(f"{out / f'{split}.parquet'}: {table.num_rows} rows ({summary(table)})")


if __name__ == "__main__":
    common.main_guard(main)
