"""Reading a source's landing files as strings, typing them, and writing day partitions: what the
clean step's two halves (transactions, ``jobs.spark.clean``; label events, ``jobs.spark.labels``)
share.

A landing day is inspected on the driver first (``_SUCCESS``, CSV headers, Parquet footers,
required columns), so a range run knows its bad day before any Spark job. Its rows are then read
as strings, one scan per file layout whatever the day, with the file each row came from and its
landing day; a rejected row keeps its original values. Typing uses Spark built-ins only
(``try_cast``: a bad value becomes null, never a failure).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from functools import partial, reduce

import pyarrow as pa
import pyarrow.parquet as pq
from pyspark import cloudpickle
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from jobs.common.calendar import epoch_day, from_epoch_day
from jobs.common.cli import error_summary
from jobs.common.lake import Attempt, Lake
from jobs.common.provenance import input_record
from jobs.spark import day_files
from jobs.spark.session import spark_schema

cloudpickle.register_pickle_by_value(day_files)  # the workers write the files: no repository needed there

SOURCE_FILE = "source_file"
REASON = "reason"
RAW = "raw"  # struct of the original string values
DAY = "date"  # the landing day of a row
# ISO-8601 date and time (seconds, fraction and zone optional); Spark's cast alone would also take
# "2018" or a bare date and make a midnight of it.
ISO_TIMESTAMP = r"^\d{4}-\d{2}-\d{2}[T ]\d{1,2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}(:?\d{2})?)?$"
# Numbers in decimal notation only: Spark's cast alone would also take Java's "12d", "1.5f" or "0x1p3".
DECIMAL_NUMBER = r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$"
NON_FINITE_NUMBER = r"(?i)^[+-]?(nan|inf|infinity)$"  # parsed, then quarantined as non_finite_amount
EXACT_FLOAT_INTEGER = 2**53  # above it a float-typed id may have lost digits: refused
CSV_HEADER_BYTES = 1 << 16
RAGGED = "ragged"  # a CSV line with more or fewer fields than its header (an unquoted comma…)
CORRUPT = "_corrupt_line"  # Spark's copy of such a line
# What a landing folder may hold besides hidden files: anything else refuses the day, by name.
FORMATS = {".parquet": "parquet", ".csv": "csv", ".csv.gz": "csv"}


class CleanError(RuntimeError):
    """The day cannot be cleaned as delivered; nothing was published for it."""


@dataclass(frozen=True)
class Source:
    """What a landing dataset's files must hold: the columns read (others are ignored) and the
    required ones (a file without one is refused whole)."""

    dataset: str
    columns: tuple[str, ...]
    required: tuple[str, ...]

    @property
    def string_schema(self) -> T.StructType:
        return T.StructType(
            [T.StructField(name, T.StringType(), True) for name in self.columns]
            + [T.StructField(SOURCE_FILE, T.StringType(), True)]
        )


@dataclass(frozen=True)
class LandingFile:
    """One data file of a landing day, as inspected on the driver before Spark reads it."""

    path: str  # file-system path (what ``lake.fs`` takes)
    uri: str  # file:// or s3:// (what ``source_file`` holds)
    spark_uri: str  # file:// or s3a:// (what Spark reads)
    fmt: str  # "csv" or "parquet"
    names: tuple[str, ...]  # header / column names; () for a 0-byte CSV (no header, no rows)
    layout: tuple[str, ...]  # names and types: files with equal layouts are read by one scan
    rows: int | None = None  # data rows when known without a scan (a Parquet footer; 0 for a 0-byte CSV)


@dataclass(frozen=True)
class LandingDay:
    day: date
    files: tuple[LandingFile, ...]
    source: dict  # the landing day as lineage names it (its digest: the delivered files)

    @property
    def known_empty(self) -> bool:
        """True when the day's files hold no row, as known from their footers (or it has no file)."""
        return all(f.rows == 0 for f in self.files)


def inspect_landing(lake: Lake, day: date, source: Source) -> LandingDay:
    """Check landing day D on the driver: marker, readable headers / footers, required columns.

    Everything that makes a day bad as delivered is found here, before any Spark job, so a range
    run knows its bad day up front. Raises :class:`CleanError`.
    """
    folder = lake.to_uri(lake.partition_path(source.dataset, day))
    if not lake.landing_ready(day, source.dataset):
        raise CleanError(f"landing day {day} is not complete: no _SUCCESS marker in {folder}")
    files = []
    for info in lake.landing_files(day, source.dataset):
        uri = lake.to_uri(info.path)
        fmt = file_format(info.base_name)
        if fmt is None:
            kinds = ", ".join(f"*{suffix}" for suffix in FORMATS)
            raise CleanError(f"cannot read landing file {uri}: landing files are {kinds} (or hidden: _name, .name)")
        if fmt == "csv":
            names = tuple(_csv_header(lake, info.path))
            layout = names
            rows = None if names else 0
        else:
            try:
                footer = pq.ParquetFile(info.path, filesystem=lake.fs)
                schema, rows = footer.schema_arrow, footer.metadata.num_rows
            except Exception as exc:
                raise CleanError(f"cannot read Parquet file {uri}: {error_summary(exc)}") from exc
            names = tuple(schema.names)
            layout = tuple(f"{f.name}:{f.type}" for f in schema)
        if names:
            _match_columns(names, uri, source)
        files.append(LandingFile(info.path, uri, lake.to_spark_uri(info.path), fmt, names, layout, rows))
    return LandingDay(day, tuple(files), input_record(lake, source.dataset, day))


def file_format(name: str) -> str | None:
    """"csv" or "parquet" for a landing file name the clean step reads, None for any other."""
    lowered = name.lower()
    return next((fmt for suffix, fmt in FORMATS.items() if lowered.endswith(suffix)), None)


def read_landing(spark: SparkSession, days: Sequence[LandingDay], source: Source) -> DataFrame:
    """All rows of the landing days as strings (the source's columns + ``source_file``) plus their ``date``.

    Files of the same format and layout are read by one scan whatever their day (Spark names the
    file each row comes from, which gives back its day and URI), so a range of days costs a
    handful of scans, not one per file.
    """
    groups: dict[tuple[str, tuple[str, ...]], list[tuple[date, LandingFile]]] = {}
    for landing in days:
        for f in landing.files:
            if f.names:  # a 0-byte CSV has no rows
                groups.setdefault((f.fmt, f.layout), []).append((landing.day, f))
    empty = spark.createDataFrame([], source.string_schema).withColumns(
        {RAGGED: F.lit(False), DAY: F.lit(None).cast(T.DateType())})
    frames = [_read_group(spark, members, source) for members in groups.values()]
    return reduce(DataFrame.unionByName, frames) if frames else empty


def _read_group(spark: SparkSession, members: list[tuple[date, LandingFile]], source: Source) -> DataFrame:
    first = members[0][1]
    paths = [f.spark_uri for _, f in members]
    if first.fmt == "csv":
        positional = T.StructType(
            [T.StructField(f"_c{i}", T.StringType(), True) for i in range(len(first.names))]
            + [T.StructField(CORRUPT, T.StringType(), True)]
        )
        frame = (
            spark.read.schema(positional)
            .option("header", True)  # every file's own first line is its header (blank lines skipped)
            .option("enforceSchema", True)  # the schema *is* the header, by position
            .option("mode", "PERMISSIVE")  # a line with too many or too few fields is kept, and marked
            .option("columnNameOfCorruptRecord", CORRUPT)
            .csv(paths)
        )
        values = {name: F.col(f"_c{i}") for i, name in enumerate(first.names)}
        ragged = F.col(CORRUPT).isNotNull()
    else:
        try:
            frame = spark.read.parquet(*paths)
        except Exception as exc:
            raise CleanError(f"cannot read Parquet file {first.uri}: {error_summary(exc)}") from exc
        types = dict(zip(first.names, (kind.split(":", 1)[1] for kind in first.layout), strict=True))
        values = {name: _parquet_value(name, types[name]) for name in first.names}
        ragged = F.lit(False)
    position = _match_columns(first.names, first.uri, source)
    source_file, day = _file_of_row(members)
    return frame.select(
        *[
            values[first.names[position[name]]].cast("string").alias(name)
            if name in position
            else F.lit(None).cast("string").alias(name)
            for name in source.columns
        ],
        source_file.alias(SOURCE_FILE),
        ragged.alias(RAGGED),
        day.alias(DAY),
    )


def _parquet_value(name: str, arrow_type: str) -> Column:
    """A Parquet column as Spark reads it; nanosecond timestamps (pandas' default) come as a count of
    nanoseconds (``spark.sql.legacy.parquet.nanosAsLong``, jobs.spark.session) and are made
    timestamps again here, to the microsecond."""
    column = F.col(_quoted(name))
    if arrow_type.startswith("timestamp[ns"):
        micros = F.expr(f"({_quoted(name)} - pmod({_quoted(name)}, 1000)) div 1000")  # exact: no double
        return F.timestamp_micros(micros).cast(T.TimestampNTZType())
    return column


def _file_of_row(members: list[tuple[date, LandingFile]]) -> tuple[Column, Column]:
    """The landing URI and day of the file a row was read from (a failing job if Spark names another)."""
    by_path = F.create_map(
        *[
            x
            for day, f in members
            for x in (F.lit(f.path.lstrip("/")), F.struct(F.lit(f.uri).alias("uri"), F.lit(day).alias("day")))
        ]
    )
    spark_path = F.col("_metadata.file_path")
    # Spark names files as URIs (file:/p, file:///p, s3a://bucket/key), possibly %-encoded.
    found = F.coalesce(by_path[_strip_scheme(spark_path)], by_path[_strip_scheme(F.url_decode(spark_path))])
    unknown = F.raise_error(F.concat(F.lit("clean: Spark read a file it was not given: "), spark_path))
    return F.coalesce(found["uri"], unknown), found["day"]


def _strip_scheme(path: Column) -> Column:
    return F.regexp_replace(path, r"^[A-Za-z][A-Za-z0-9+.\-]*:/*", "")


def _quoted(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def _csv_header(lake: Lake, fs_path: str) -> list[str]:
    """The names on a CSV file's first non-blank line, as Spark's reader takes them (it skips blank
    lines, a BOM, CR LF); [] for a file without one (no header, so no rows)."""
    with lake.fs.open_input_file(fs_path) as f:
        stream = gzip.GzipFile(fileobj=f) if fs_path.lower().endswith(".gz") else f
        head = stream.read(CSV_HEADER_BYTES).decode("utf-8-sig", errors="replace")
    rows = csv.reader(io.StringIO(head))
    return next(([name.strip() for name in row] for row in rows if row), [])


def _match_columns(names: Sequence[str], uri: str, source: Source) -> dict[str, int]:
    """Source column -> position of the file's column of that name (any case); others are ignored."""
    matched = {}
    for column in source.columns:
        found = [i for i, name in enumerate(names) if name.lower() == column.lower()]
        if len(found) > 1:
            spelled = ", ".join(names[i] for i in found)
            raise CleanError(f"column {column} appears more than once ({spelled}) in {uri}")
        if found:
            matched[column] = found[0]
        elif column in source.required:
            raise CleanError(f"required column {column} is missing from {uri} (columns: {', '.join(names)})")
    return matched


# --- typing -------------------------------------------------------------------------------------
def typed(field: T.StructField) -> Column:
    """The string column ``field.name`` cast to the field's type: null where it does not parse."""
    text = F.trim(F.col(field.name))
    if isinstance(field.dataType, T.TimestampNTZType):
        # Through a zoned timestamp so that an explicit offset is honoured; the session time zone is
        # UTC (jobs.spark.session), so a naive value keeps its wall-clock time.
        is_iso = text.rlike(ISO_TIMESTAMP)
        return F.when(is_iso, text.try_cast(T.TimestampType()).cast(T.TimestampNTZType()))
    if isinstance(field.dataType, T.LongType | T.IntegerType):
        # "12", or a whole number written as a decimal ("12.0", as pandas writes a column with gaps;
        # a float-typed Parquet column) where a double still holds it exactly (up to 2^53).
        as_decimal = text.try_cast(T.DecimalType(38, 9))
        is_whole = (as_decimal == F.floor(as_decimal)) & (F.abs(as_decimal) <= F.lit(EXACT_FLOAT_INTEGER))
        value = F.coalesce(text.try_cast(field.dataType), F.when(is_whole, as_decimal.try_cast(field.dataType)))
        return F.when(text.rlike(DECIMAL_NUMBER), value)
    if isinstance(field.dataType, T.DoubleType | T.FloatType):
        return F.when(text.rlike(DECIMAL_NUMBER) | text.rlike(NON_FINITE_NUMBER), text.try_cast(field.dataType))
    return text.try_cast(field.dataType)


def is_blank(name: str) -> Column:
    value = F.col(f"{RAW}.{name}")
    return value.isNull() | (F.trim(value) == "")


def is_unparsed(name: str) -> Column:
    return ~is_blank(name) & F.col(name).isNull()


# --- writing ------------------------------------------------------------------------------------
def write_partitions(
    lake: Lake, frame: DataFrame, attempts: dict[date, Attempt], order: Sequence[str], schema: pa.Schema
) -> dict[date, list[dict]]:
    """Write every day of ``frame`` (its ``date`` column) into its own attempt folder in one Spark job,
    one file a day.

    Rows are hash-partitioned by day and sorted within partitions by day, then ``order``; each task
    writes its days' files itself (``jobs.spark.day_files``, pyarrow through the lake's file
    system: no rename, so the same on S3). A day without rows gets an empty file with the schema.
    Returns each day's file records for ``Lake.publish``; nothing is visible until then.
    """
    folders = {epoch_day(day): attempt.path for day, attempt in attempts.items()}
    writer = partial(day_files.write_grouped_days, schema=schema, day_column=DAY, folders=folders,
                     filesystem=lake.worker_filesystem())
    records = (
        _one_partition_a_day(frame, len(attempts))
        .sortWithinPartitions(DAY, *order)
        .mapInArrow(writer, spark_schema(day_files.RECORD_SCHEMA))
        .collect()
    )
    written: dict[date, list[dict]] = {day: [] for day in attempts}
    for record in records:
        day = from_epoch_day(record["day"])
        written[day].append({"name": posixpath.basename(record["path"]), "rows": record["rows"],
                             "bytes": record["bytes"], "sha256": record["sha256"]})
    for day, attempt in attempts.items():
        if not written[day]:
            written[day] = [lake.write_parquet(attempt, schema.empty_table())]
    return written


def _one_partition_a_day(frame: DataFrame, days: int) -> DataFrame:
    """Every day's rows in one partition: no shuffle for one day, a hash shuffle by day for more."""
    return frame.coalesce(1) if days == 1 else frame.repartition(days, DAY)


def days_label(days: Sequence[LandingDay]) -> str:
    first, last = days[0].day, days[-1].day
    return first.isoformat() if first == last else f"{first}..{last}"


def publish_days(
    lake: Lake,
    step: str,
    days: Sequence[date],
    datasets: Sequence[str],
    attempts: dict[str, dict[date, Attempt]],
    files: dict[str, dict[date, list[dict]]],
    stats: dict[date, dict],
    provenance: dict[str, dict[date, dict]],
    seconds: float,
) -> tuple[int, Exception | None]:
    """Publish each day's written attempts in date order: the last of ``datasets`` commits the
    others with it in one manifest write (``Lake.publish``'s companions).

    Returns ``(days published, None)``, or the count published before a publish failed and its
    error; the attempts of the days not published are removed.
    """
    *companions, primary = datasets  # the last commits the others (COMMITTED_BY)
    for i, day in enumerate(days):
        try:
            prepared = [lake.prepare(attempts[d][day], stats=stats[day], lineage=provenance[d][day], files=files[d][day])
                        for d in companions]
            lake.publish(attempts[primary][day], stats=stats[day], lineage=provenance[primary][day],
                         files=files[primary][day], companions=prepared)
            record = {"date": day.isoformat(), "seconds": seconds, "batch": f"{days[0]}..{days[-1]}",
                      "stats": stats[day]}
            lake.write_run_record(step, day, attempts[datasets[-1]][day].attempt_id, record)
        except Exception as exc:  # noqa: BLE001 - the caller names the days not done
            try:
                unpublished = [attempts[dataset][later] for later in days[i:] for dataset in datasets
                               if (lake.manifest(dataset, later) or {}).get("attempt") != attempts[dataset][later].attempt_id]
            except OSError:  # the store is gone: nothing can be removed now, the next publish collects them
                unpublished = []
            lake.discard(unpublished)
            return i, exc
        print(json.dumps({"step": step, "dataset": datasets[-1], "date": day.isoformat(), **stats[day]},
                         sort_keys=True), flush=True)
    return len(days), None
