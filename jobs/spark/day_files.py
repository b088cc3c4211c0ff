"""Worker side of the Spark jobs' writes: a task writes its rows of each day straight into that day's attempt.

The last pass of the clean and features jobs runs inside ``mapInArrow``; instead of handing its
rows back to the JVM for Spark's Parquet writer, each task cuts its rows at day boundaries and
writes one Parquet file per day with pyarrow, through the lake's own file system (``pyarrow.fs``:
the same code for ``file://`` and ``s3://``, and no rename, which S3 does not have). The task
returns one record per file (day, path, rows, bytes, sha256); the driver hands them to
``Lake.publish``, which checks the attempt folder holds exactly those files, so nothing written
here is visible before that. Spark's commit protocol is not needed: the lake's attempt folders and
manifests are the commit protocol, and a retried task rewrites the same file names with the same
rows. pyarrow writes the same bytes for the same rows, so an identical recompute keeps the
partition's digest (Spark's own writer does not: the order of a column's encodings in its footer
varies between runs).

Like ``jobs.spark.windows`` this module needs only numpy and pyarrow on the workers and travels
to them by value.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from jobs.common.calendar import MICROS_PER_DAY

RECORD_SCHEMA = pa.schema(
    [
        pa.field("day", pa.int32(), False),
        pa.field("path", pa.string(), False),
        pa.field("rows", pa.int64(), False),
        pa.field("bytes", pa.int64(), False),
        pa.field("sha256", pa.string(), False),
    ]
)


def file_name(part: int) -> str:
    """The file a task writes in each day's attempt folder: a function of its partition only."""
    return f"part-{part:05d}.parquet"


def _write_runs(table: pa.Table, day_of_row: np.ndarray, *, folders: dict[int, str], filesystem: pafs.FileSystem,
                part: int) -> pa.RecordBatch:
    """Write each run of equal ``day_of_row`` (rows grouped by day) as one file in that day's folder."""
    starts = (
        np.flatnonzero(np.r_[True, day_of_row[1:] != day_of_row[:-1]]) if len(day_of_row) else np.zeros(0, int)
    )
    stops = np.r_[starts[1:], len(day_of_row)]
    out: dict[str, list] = {name: [] for name in RECORD_SCHEMA.names}
    if hasattr(filesystem, "open") and not isinstance(filesystem, pafs.FileSystem):
        filesystem = filesystem.open()  # a WorkerFilesystem: the task's own client, its own credentials
    for start, stop in zip(starts.tolist(), stops.tolist(), strict=True):
        day = int(day_of_row[start])
        if day not in folders:
            raise ValueError(
                f"rows of day {np.datetime64(day, 'D')} have no attempt folder (days {sorted(folders)})"
            )
        path = posixpath.join(folders[day], file_name(part))
        buf = io.BytesIO()
        pq.write_table(table.slice(start, stop - start).combine_chunks(), buf)  # same bytes however it was batched
        data = buf.getvalue()
        with filesystem.open_output_stream(path, compression=None) as f:
            f.write(data)
        for name, value in zip(RECORD_SCHEMA.names, (day, path, stop - start, len(data),
                                                     hashlib.sha256(data).hexdigest()), strict=True):
            out[name].append(value)
    return pa.RecordBatch.from_pydict(out, schema=RECORD_SCHEMA)


def write_days(
    table: pa.Table,
    *,
    schema: pa.Schema,
    folders: dict[int, str],
    filesystem: pafs.FileSystem,
    part: int,
    time: str = "TX_DATETIME",
    tiebreak: str = "TRANSACTION_ID",
) -> pa.RecordBatch:
    """Write ``table`` (any column order, types castable to ``schema``) as one file per day of
    ``time``, each sorted by ``(time, tiebreak)``.

    ``folders`` maps a day (days since 1970-01-01) to its attempt folder; a row of any other day
    is an error (it would be lost).
    """
    table = table.select(schema.names).cast(schema)
    micros = table.column(time).cast(pa.int64()).to_numpy()
    order = np.lexsort((table.column(tiebreak).to_numpy(), micros))
    table = table.take(pa.array(order))
    return _write_runs(table, np.floor_divide(micros[order], MICROS_PER_DAY), folders=folders,
                       filesystem=filesystem, part=part)


def write_grouped_days(
    batches: Iterator[pa.RecordBatch],
    *,
    schema: pa.Schema,
    day_column: str,
    folders: dict[int, str],
    filesystem: pafs.FileSystem,
) -> Iterator[pa.RecordBatch]:
    """mapInArrow body: rows already sorted by ``day_column`` (a date) and then in the order to keep;
    one file per day with ``schema``'s columns."""
    from pyspark import TaskContext

    batches = list(batches)
    if not batches:
        return
    table = pa.Table.from_batches(batches)
    days = table.column(day_column).cast(pa.int32()).to_numpy()
    data = table.select(schema.names).cast(schema)
    yield _write_runs(data, days, folders=folders, filesystem=filesystem, part=TaskContext.get().partitionId())


def compute_then_write(
    batches: Iterator[pa.RecordBatch],
    *,
    compute: Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]],
    **write_args,
) -> Iterator[pa.RecordBatch]:
    """mapInArrow body: run ``compute`` on the partition, then :func:`write_days` its output."""
    from pyspark import TaskContext

    out = list(compute(batches))
    if out:
        yield write_days(pa.Table.from_batches(out), part=TaskContext.get().partitionId(), **write_args)
