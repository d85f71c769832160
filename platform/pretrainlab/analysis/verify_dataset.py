"""Check a prepared dataset row by row: shards against the manifest, every row against its schema, every image decoded.

    python -m pretrainlab.analysis.verify_dataset data/fmnist [--split train] [--out problems.csv]

Every shard of every split (or of ``--split``) is checked as training checks it before it
starts (present, sha256 and row count as in ``manifest.json``), then read in batches: each
row must pass the checks ``prepare_data`` applies when it writes a dataset (fields,
``split``, label range, captions, questions, boxes, raw image size) and its image must
decode to its height, width and channels. Every problem is listed (split, shard, row in
the shard, row in the split, ``source_id``, reason) in a CSV written to ``--out``. Exit
code 0: no problem; 1: problems found; 2: the dataset cannot be checked at all (no
folder, no readable manifest, unknown split).
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pretrainlab.analysis.outputs import add_output_arguments, publish, write_csv
from pretrainlab.data import shards
from pretrainlab.data.dataset import decode_images
from pretrainlab.data.errors import DatasetError

BATCH_ROWS = 1024
_ROW_PROBLEM = re.compile(r"^split '[^']*' row \d+ \(source_id .*?\): (?P<reason>.*) \(\d+ rows in all\)$", re.S)


@dataclass
class Problem:
    """One unreadable or inconsistent entry; ``row`` is None for a problem with the whole shard."""

    split: str
    shard: str
    row: int | None
    split_row: int | None
    source_id: str | None
    reason: str


COLUMNS = list(Problem.__dataclass_fields__)


@dataclass
class Report:
    manifest: dict
    splits: list[str]
    shards: int
    rows: int
    problems: list[Problem]


def _rows_failing_schema(table: pa.Table, schema: pa.Schema, split: str, num_classes: int) -> dict[int, str]:
    """Row -> reason for the rows of ``table`` that the dataset writer's checks reject (none when all pass)."""
    try:
        shards.check_table(table, schema, split, num_classes)
        return {}
    except DatasetError as err:
        if not _ROW_PROBLEM.match(str(err)):
            raise  # a problem with a whole column: the caller reports the shard
    failing = {}
    for i in range(table.num_rows):
        try:
            shards.check_table(table.slice(i, 1), schema, split, num_classes)
        except DatasetError as err:
            match = _ROW_PROBLEM.match(str(err))
            failing[i] = match["reason"] if match else str(err)
    return failing


def _rows_failing_decode(columns: dict[str, np.ndarray], rows: np.ndarray) -> dict[int, str]:
    """Row -> reason for the rows (of ``rows``) whose image does not decode to its height, width and channels."""
    if rows.size == 0:
        return {}
    try:
        decode_images({name: values[rows] for name, values in columns.items()})
        return {}
    except DatasetError:
        pass  # find which rows (images of several sizes also land here, and decode one by one)
    failing = {}
    for i in rows.tolist():
        try:
            decode_images({name: values[i : i + 1] for name, values in columns.items()})
        except DatasetError as err:
            failing[i] = str(err).removeprefix("row 0 of the batch: ")
    return failing


def check_shard(folder: Path, split: str, entry: dict, manifest: dict, offset: int) -> tuple[int, list[Problem]]:
    """Rows read and problems found in one shard; ``offset`` is its first row's index in the split."""
    path = folder / entry["file"]
    problems: list[Problem] = []

    def shard_problem(reason: str) -> None:
        problems.append(Problem(split, entry["file"], None, None, None, reason))

    try:
        shards.verify_shard(path, entry)
    except DatasetError as err:
        shard_problem(str(err))
    if not path.is_file():
        return 0, problems
    schema = shards.SCHEMAS[manifest["task"]]
    num_classes = len(manifest["class_names"])
    image_columns = ["image", "image_format", "height", "width", "channels"]
    read = 0
    try:
        parquet = pq.ParquetFile(path)
        missing = [name for name in schema.names if name not in parquet.schema_arrow.names]
        if missing:
            shard_problem(f"shard {path}: missing fields {missing}")
            return 0, problems
        for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=schema.names):
            table = pa.Table.from_batches([batch])
            sources = table.column("source_id").to_pylist()
            try:
                failing = _rows_failing_schema(table, schema, split, num_classes)
            except DatasetError as err:
                shard_problem(str(err))
                return read, problems
            columns = {name: table.column(name).to_numpy(zero_copy_only=False) for name in image_columns}
            unflagged = np.setdiff1d(np.arange(table.num_rows), np.fromiter(failing, int, len(failing)))
            failing.update(_rows_failing_decode(columns, unflagged))
            for i in sorted(failing):
                problems.append(Problem(split, entry["file"], i, offset + read + i, sources[i], failing[i]))
            read += table.num_rows
    except (pa.ArrowException, OSError) as err:
        shard_problem(f"shard {path}: cannot read rows from row {read} on: {err}")
        return read, problems
    if read != entry["rows"] and not any("the manifest says" in p.reason for p in problems):
        shard_problem(f"shard {path}: holds {read} rows, the manifest says {entry['rows']}")
    return read, problems


def verify(folder: str | Path, split: str | None = None) -> Report:
    """Check every shard and row of ``folder`` (one split, or all).

    Raises:
        DatasetError: no readable manifest, or an unknown split.
    """
    folder = Path(folder)
    manifest = shards.load_manifest(folder)
    if split is not None and split not in manifest["splits"]:
        raise DatasetError(f"{folder}: no split {split!r}; known splits: {', '.join(manifest['splits'])}")
    names = [split] if split is not None else list(manifest["splits"])
    problems: list[Problem] = []
    rows = count = 0
    for name in names:
        offset = 0
        for entry in manifest["splits"][name]["shards"]:
            read, found = check_shard(folder, name, entry, manifest, offset)
            problems += found
            offset += entry["rows"]
            rows += read
            count += 1
    return Report(manifest, names, count, rows, problems)


def write(problems: list[Problem], out: Path) -> None:
    write_csv((asdict(problem) for problem in problems), COLUMNS, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="a prepared dataset folder (with manifest.json)")
    parser.add_argument("--split", help="check only this split (default: all)")
    add_output_arguments(parser, "verify_dataset.csv")
    args = parser.parse_args(argv)
    if not Path(args.folder).is_dir():
        print(f"error: {args.folder}: no such folder", file=sys.stderr)
        return 2
    try:
        report = verify(args.folder, args.split)
    except DatasetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"{report.manifest['name']} ({report.manifest['task']}): {report.shards} shards, {report.rows} rows "
        f"in {', '.join(report.splits)}: {len(report.problems) or 'no'} problem(s)"
    )
    for problem in report.problems[:20]:
        where = (
            "" if problem.row is None else f" row {problem.row} ({problem.source_id}, split row {problem.split_row})"
        )
        print(f"  {problem.split} {problem.shard}{where}: {problem.reason}")
    if len(report.problems) > 20:
        print(f"  ... {len(report.problems) - 20} more in {args.out}")
    write(report.problems, Path(args.out))
    publish(args.out, args, "verify_dataset")
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
