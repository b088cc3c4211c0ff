"""Worker side of the features write: a task writes its rows of each day straight into that day's attempt.

The last pass of the features job runs inside ``mapInArrow``; instead of handing its rows back to
the JVM for Spark's sort and Parquet writer, each task sorts its rows by ``(TX_DATETIME,
TRANSACTION_ID)`` with numpy, cuts them at day boundaries and writes one Parquet file per day
with pyarrow, through the lake's own file system (``pyarrow.fs``: the same code for ``file://``
and ``s3://``). The task returns one record per file; the driver publishes the days in order
(``Lake.publish`` lists and checks the attempt folders), so nothing written here is visible before
that. Spark's commit protocol is not needed: the lake's attempt folders and manifests are the
commit protocol, and a retried task rewrites the same file names with the same rows.

Like ``jobs.spark.windows`` this module imports only numpy and pyarrow and travels to the Python
workers by value.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

US_PER_DAY = 86_400_000_000
RECORD_SCHEMA = pa.schema(
    [
        pa.field("day", pa.int32(), False),
        pa.field("path", pa.string(), False),
        pa.field("rows", pa.int64(), False),
    ]
)


def file_name(part: int) -> str:
    """The file a task writes in each day's attempt folder: a function of its partition only."""
    return f"part-{part:05d}.parquet"


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
    """Write ``table`` (any column order, types castable to ``schema``) as one file per day.

    ``folders`` maps a day (days since 1970-01-01) to its attempt folder; a row of any other day
    is an error (it would be lost). Returns (day, path, rows) per file written.
    """
    table = table.select(schema.names).cast(schema)
    micros = table.column(time).cast(pa.int64()).to_numpy()
    order = np.lexsort((table.column(tiebreak).to_numpy(), micros))
    micros = micros[order]
    table = table.take(pa.array(order))
    day_of_row = np.floor_divide(micros, US_PER_DAY)
    starts = (
        np.flatnonzero(np.r_[True, day_of_row[1:] != day_of_row[:-1]]) if len(micros) else np.zeros(0, int)
    )
    stops = np.r_[starts[1:], len(micros)]
    days, paths, rows = [], [], []
    for start, stop in zip(starts.tolist(), stops.tolist(), strict=True):
        day = int(day_of_row[start])
        if day not in folders:
            raise ValueError(
                f"rows of day {np.datetime64(day, 'D')} have no attempt folder (days {sorted(folders)})"
            )
        path = posixpath.join(folders[day], file_name(part))
        pq.write_table(table.slice(start, stop - start), path, filesystem=filesystem)
        days.append(day)
        paths.append(path)
        rows.append(stop - start)
    return pa.RecordBatch.from_arrays(
        [pa.array(days, pa.int32()), pa.array(paths, pa.string()), pa.array(rows, pa.int64())],
        schema=RECORD_SCHEMA,
    )


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
