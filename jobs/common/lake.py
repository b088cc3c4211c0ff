"""The lake: the only code that knows paths, markers and atomic publish, for file:// and s3://.

Layout (SPEC §2), under one root URI::

    landing/transactions/date=D/*.parquet|*.csv + _SUCCESS      written by the source
    <dataset>/date=D/_MANIFEST.json                                 what is published for D
    <dataset>/date=D/attempt=<id>/part-*.parquet                    the files it names

How a partition is published. A writer puts its files under a fresh ``attempt=<id>/`` folder
of the partition, then writes ``_MANIFEST.json`` naming that attempt and its files. The manifest
is one small object written in one step (a rename on a file system, a single PUT on S3), so a
reader that goes through the manifest sees either the previous complete partition or the new
complete one, never a mixture. Two writers of one partition cannot interleave: the last manifest
written wins whole. After publishing, the writer removes the attempt it superseded and any other
attempt folder older than ``STALE_ATTEMPT_SECONDS`` (leftovers of crashed runs); younger unnamed
folders may belong to a writer still at work and are left alone. Readers never list attempt
folders themselves: they ask for :meth:`Lake.partition_files`.

A published partition may hold zero rows ("the source had no data"); an unpublished one
("not yet written") raises :class:`NotPublished`. Run facts that vary between attempts
(timestamps, durations) go to ``_runs/<step>/date=D/<attempt>.json``, never into the data.
"""

from __future__ import annotations

import io
import json
import posixpath
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from jobs.common.config import S3Settings, settings

MANIFEST = "_MANIFEST.json"
SUCCESS = "_SUCCESS"
ATTEMPT_PREFIX = "attempt="
STALE_ATTEMPT_SECONDS = 6 * 3600


class Dataset:
    """Dataset folders under the root (SPEC §2). Use these names, never literal paths."""

    LANDING = "landing/transactions"
    CLEAN = "clean/transactions"
    QUARANTINE = "quarantine/transactions"
    FEATURES = "features/transactions"
    SCORES = "scores/transactions"
    ALERTS = "alerts/cards"
    REPORTS = "reports"

    PUBLISHED = (CLEAN, QUARANTINE, FEATURES, SCORES, ALERTS, REPORTS)


MODELS = "models"
RUNS = "_runs"


class LakeError(RuntimeError):
    """A lake operation that cannot go on; the message says what and where."""


class NotPublished(LakeError):
    """The partition has not been published (it is not the same as an empty partition)."""


def day_range(start: date, end: date) -> list[date]:
    """Inclusive list of days from start to end."""
    if end < start:
        raise ValueError(f"end {end} is before start {start}")
    return [start + timedelta(days=i) for i in range((end - start).days + 1)]


def parse_day(text: str | date) -> date:
    if isinstance(text, date):
        return text
    try:
        return date.fromisoformat(text)
    except ValueError as exc:
        raise ValueError(f"not a date (YYYY-MM-DD): {text!r}") from exc


@dataclass(frozen=True)
class Attempt:
    """A staging folder for one write of one partition."""

    dataset: str
    day: date
    attempt_id: str
    path: str  # file-system path of the attempt folder
    uri: str  # the same folder as a URI (file:// or s3://)
    spark_uri: str  # the same folder as Spark names it (file:// or s3a://)


def _s3_filesystem(s3: S3Settings) -> pafs.S3FileSystem:
    kwargs: dict[str, Any] = {"region": s3.region}
    if s3.access_key and s3.secret_key:
        kwargs.update(access_key=s3.access_key, secret_key=s3.secret_key, session_token=s3.session_token)
    if s3.endpoint_url:
        parsed = urlparse(s3.endpoint_url)
        if parsed.scheme:
            kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme)
        else:
            kwargs.update(endpoint_override=s3.endpoint_url)
    return pafs.S3FileSystem(**kwargs)


class Lake:
    """One lake root. Build it with :meth:`from_uri` (or :meth:`from_settings`)."""

    def __init__(self, uri: str, fs: pafs.FileSystem, base: str, scheme: str, s3: S3Settings | None):
        self.uri = uri.rstrip("/")
        self.fs = fs
        self.base = base.rstrip("/")
        self.scheme = scheme
        self._s3 = s3

    # --- construction ------------------------------------------------------------------------
    @classmethod
    def from_uri(cls, uri: str, s3: S3Settings | None = None) -> Lake:
        parsed = urlparse(uri)
        if parsed.scheme == "file":
            if parsed.netloc not in ("", "localhost"):
                raise ValueError(f"file URI must be absolute (file:///path): {uri}")
            return cls(uri, pafs.LocalFileSystem(), parsed.path, "file", None)
        if parsed.scheme in ("s3", "s3a"):
            if not parsed.netloc:
                raise ValueError(f"S3 URI needs a bucket (s3://bucket/prefix): {uri}")
            s3 = s3 or settings().s3
            base = posixpath.join(parsed.netloc, parsed.path.lstrip("/"))
            return cls(f"s3://{base}", _s3_filesystem(s3), base, "s3", s3)
        raise ValueError(f"lake URI must start with file:/// or s3://, got {uri!r}")

    @classmethod
    def from_settings(cls) -> Lake:
        cfg = settings()
        return cls.from_uri(cfg.lake_uri, cfg.s3)

    # --- paths ---------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        """File-system path (what ``self.fs`` takes) of a location under the root."""
        return posixpath.join(self.base, *[p.strip("/") for p in parts if p])

    def to_uri(self, fs_path: str) -> str:
        return f"file://{fs_path}" if self.scheme == "file" else f"s3://{fs_path}"

    def to_spark_uri(self, fs_path: str) -> str:
        return f"file://{fs_path}" if self.scheme == "file" else f"s3a://{fs_path}"

    def partition_path(self, dataset: str, day: date) -> str:
        return self.path(dataset, f"date={parse_day(day).isoformat()}")

    def run_record_path(self, step: str, day: date, attempt_id: str) -> str:
        return self.path(RUNS, step, f"date={parse_day(day).isoformat()}", f"{attempt_id}.json")

    # --- small objects -------------------------------------------------------------------------
    def exists(self, fs_path: str) -> bool:
        return self.fs.get_file_info(fs_path).type != pafs.FileType.NotFound

    def read_bytes(self, fs_path: str) -> bytes:
        try:
            with self.fs.open_input_stream(fs_path) as f:
                return f.read()
        except FileNotFoundError as exc:
            raise LakeError(f"not found: {self.to_uri(fs_path)}") from exc

    def write_bytes(self, fs_path: str, data: bytes) -> None:
        """Write one object so that readers see the old or the new content, never a part."""
        parent = posixpath.dirname(fs_path)
        if self.scheme == "file":
            self.fs.create_dir(parent, recursive=True)
            tmp = posixpath.join(parent, f".tmp-{uuid.uuid4().hex}-{posixpath.basename(fs_path)}")
            with self.fs.open_output_stream(tmp) as f:
                f.write(data)
            self.fs.move(tmp, fs_path)  # rename(2): atomic replace
        else:
            with self.fs.open_output_stream(fs_path) as f:  # one PUT: atomic on S3
                f.write(data)

    def put_if_absent(self, fs_path: str, data: bytes) -> bool:
        """Create an object only if nothing is there yet; return False if it already existed.

        Local: the content is written aside and hard-linked into place (link(2) fails if the
        name exists). S3: a conditional PUT (``If-None-Match: *``), which the store enforces.
        """
        if self.scheme == "file":
            import os

            parent = posixpath.dirname(fs_path)
            os.makedirs(parent, exist_ok=True)
            tmp = posixpath.join(parent, f".tmp-{uuid.uuid4().hex}")
            with open(tmp, "wb") as f:
                f.write(data)
            try:
                os.link(tmp, fs_path)
                return True
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
        bucket, _, key = fs_path.partition("/")
        client = self.boto3_client()
        try:
            client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
            return True
        except client.exceptions.ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                return False
            raise

    def boto3_client(self):
        """A boto3 S3 client with this lake's settings (for what pyarrow's S3 cannot do)."""
        import boto3

        s3 = self._s3 or settings().s3
        return boto3.client(
            "s3",
            endpoint_url=s3.endpoint_url,
            region_name=s3.region,
            aws_access_key_id=s3.access_key,
            aws_secret_access_key=s3.secret_key,
            aws_session_token=s3.session_token,
        )

    def read_json(self, fs_path: str) -> Any:
        return json.loads(self.read_bytes(fs_path))

    def write_json(self, fs_path: str, obj: Any) -> None:
        self.write_bytes(fs_path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())

    def list_dir(self, fs_path: str) -> list[pafs.FileInfo]:
        """Direct children of a folder (empty if it does not exist)."""
        return sorted(self._list(fs_path, recursive=False), key=lambda i: i.path)

    def list_files(self, fs_path: str) -> list[pafs.FileInfo]:
        """All files below a folder, recursively (empty if it does not exist)."""
        infos = self._list(fs_path, recursive=True)
        return sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path)

    def _list(self, fs_path: str, recursive: bool) -> list[pafs.FileInfo]:
        # allow_not_found covers a folder that is absent, but on a directory pyarrow can still raise
        # FileNotFoundError while another writer is creating it (seen with concurrent registry
        # writers): look again, and an absent folder is an empty listing.
        for _ in range(3):
            try:
                return self.fs.get_file_info(pafs.FileSelector(fs_path, allow_not_found=True, recursive=recursive))
            except FileNotFoundError:
                if not self.exists(fs_path):
                    return []
        return self.fs.get_file_info(pafs.FileSelector(fs_path, allow_not_found=True, recursive=recursive))

    def delete_dir(self, fs_path: str) -> None:
        """Remove a folder and what is in it; one that is already gone is not an error.

        Two writers that both superseded one attempt both remove it; whichever comes second finds
        some or all of it gone (pyarrow raises FileNotFoundError, on S3 and on a local disk).
        """
        for attempt in range(3):
            if not self.exists(fs_path):
                return
            try:
                self.fs.delete_dir(fs_path)
                return
            except FileNotFoundError:  # removed under us, wholly or in part: look again
                if attempt == 2:
                    raise

    # --- landing (written by the source) -------------------------------------------------------
    def landing_ready(self, day: date) -> bool:
        """The source has finished day D: its ``_SUCCESS`` marker exists."""
        return self.exists(posixpath.join(self.partition_path(Dataset.LANDING, day), SUCCESS))

    def landing_files(self, day: date) -> list[pafs.FileInfo]:
        """Data files of landing day D (``*.parquet`` / ``*.csv``), hidden names skipped."""
        folder = self.partition_path(Dataset.LANDING, day)
        return [
            info
            for info in self.list_dir(folder)
            if info.type == pafs.FileType.File
            and not info.base_name.startswith(("_", "."))
            and info.base_name.lower().endswith((".parquet", ".csv"))
        ]

    def write_landing(self, day: date, table: pa.Table, fmt: str = "parquet", name: str = "part-00000") -> str:
        """Write one landing file for day D (as a source system would). Does not mark it done."""
        folder = self.partition_path(Dataset.LANDING, day)
        self.fs.create_dir(folder, recursive=True)
        if fmt == "parquet":
            target = posixpath.join(folder, f"{name}.parquet")
            buf = io.BytesIO()
            pq.write_table(table, buf)
        elif fmt == "csv":
            target = posixpath.join(folder, f"{name}.csv")
            buf = io.BytesIO()
            pacsv.write_csv(table, buf, pacsv.WriteOptions(include_header=True))
        else:
            raise ValueError(f"landing format must be parquet or csv, got {fmt!r}")
        self.write_bytes(target, buf.getvalue())
        return target

    def unmark_landing_done(self, day: date) -> None:
        """Withdraw day D's ``_SUCCESS`` before its landing files are rewritten."""
        path = posixpath.join(self.partition_path(Dataset.LANDING, day), SUCCESS)
        if self.exists(path):
            self.fs.delete_file(path)

    def mark_landing_done(self, day: date) -> None:
        self.write_bytes(posixpath.join(self.partition_path(Dataset.LANDING, day), SUCCESS), b"")

    # --- published partitions ------------------------------------------------------------------
    def manifest(self, dataset: str, day: date) -> dict | None:
        path = posixpath.join(self.partition_path(dataset, day), MANIFEST)
        try:
            with self.fs.open_input_stream(path) as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None

    def is_published(self, dataset: str, day: date) -> bool:
        return self.manifest(dataset, day) is not None

    def published_dates(self, dataset: str) -> list[date]:
        days = []
        for info in self.list_dir(self.path(dataset)):
            if info.type == pafs.FileType.Directory and info.base_name.startswith("date="):
                day = parse_day(info.base_name[len("date=") :])
                if self.is_published(dataset, day):
                    days.append(day)
        return days

    def partition_files(self, dataset: str, day: date) -> list[str]:
        """File-system paths of the published files of a partition (may be empty)."""
        manifest = self.manifest(dataset, day)
        if manifest is None:
            raise NotPublished(f"{dataset} date={parse_day(day)} is not published in {self.uri}")
        folder = posixpath.join(self.partition_path(dataset, day), f"{ATTEMPT_PREFIX}{manifest['attempt']}")
        return [posixpath.join(folder, f["name"]) for f in manifest["files"]]

    def new_attempt(self, dataset: str, day: date) -> Attempt:
        """A fresh staging folder inside the partition; nothing reads it until :meth:`publish`."""
        attempt_id = uuid.uuid4().hex[:16]
        path = posixpath.join(self.partition_path(dataset, day), f"{ATTEMPT_PREFIX}{attempt_id}")
        if self.scheme == "file":
            self.fs.create_dir(path, recursive=True)
        return Attempt(dataset, parse_day(day), attempt_id, path, self.to_uri(path), self.to_spark_uri(path))

    def publish(self, attempt: Attempt, stats: dict | None = None) -> dict:
        """Make an attempt's Parquet files the partition's content, atomically; return the manifest."""
        files = []
        total = 0
        for info in self.list_files(attempt.path):
            name = posixpath.relpath(info.path, attempt.path)
            if not name.endswith(".parquet") or posixpath.basename(name).startswith(("_", ".")):
                continue
            rows = pq.ParquetFile(info.path, filesystem=self.fs).metadata.num_rows
            files.append({"name": name, "rows": rows, "bytes": info.size})
            total += rows
        previous = self.manifest(attempt.dataset, attempt.day)
        manifest = {
            "dataset": attempt.dataset,
            "date": attempt.day.isoformat(),
            "attempt": attempt.attempt_id,
            "rows": total,
            "files": files,
            "stats": stats or {},
        }
        self.write_json(posixpath.join(self.partition_path(attempt.dataset, attempt.day), MANIFEST), manifest)
        self._collect_garbage(attempt, previous)
        return manifest

    def _collect_garbage(self, current: Attempt, previous: dict | None) -> None:
        folder = self.partition_path(current.dataset, current.day)
        superseded = f"{ATTEMPT_PREFIX}{previous['attempt']}" if previous else None
        now = time.time()
        for info in self.list_dir(folder):
            name = info.base_name
            if info.type != pafs.FileType.Directory or not name.startswith(ATTEMPT_PREFIX):
                continue
            if name == f"{ATTEMPT_PREFIX}{current.attempt_id}":
                continue
            if name == superseded or self._newest_mtime(info.path, default=now) < now - STALE_ATTEMPT_SECONDS:
                self.delete_dir(info.path)

    def _newest_mtime(self, fs_path: str, default: float) -> float:
        times = [i.mtime.timestamp() for i in self.list_files(fs_path) if i.mtime is not None]
        return max(times) if times else default

    def write_table(self, dataset: str, day: date, table: pa.Table, stats: dict | None = None) -> dict:
        """Publish an Arrow table as partition D of a dataset (replacing what was there whole)."""
        attempt = self.new_attempt(dataset, day)
        with self.fs.open_output_stream(posixpath.join(attempt.path, "part-00000.parquet")) as f:
            pq.write_table(table, f)
        return self.publish(attempt, stats)

    def read_table(
        self, dataset: str, day: date, schema: pa.Schema | None = None, columns: Sequence[str] | None = None
    ) -> pa.Table:
        """Read a published partition (raises :class:`NotPublished` if it is not)."""
        return self.read_days(dataset, [day], schema=schema, columns=columns)

    def read_days(
        self,
        dataset: str,
        days: Iterable[date],
        schema: pa.Schema | None = None,
        columns: Sequence[str] | None = None,
        missing_ok: bool = False,
    ) -> pa.Table:
        """Read several published partitions into one table.

        With ``missing_ok`` unpublished days are skipped (for history that may not exist);
        otherwise an unpublished day raises :class:`NotPublished`.
        """
        tables = []
        for day in days:
            try:
                paths = self.partition_files(dataset, day)
            except NotPublished:
                if missing_ok:
                    continue
                raise
            for p in paths:
                t = pq.read_table(
                    p, filesystem=self.fs, columns=list(columns) if columns else None, partitioning=None
                )
                tables.append(t)
        if schema is not None:
            target = pa.schema([schema.field(c) for c in columns]) if columns else schema
            tables = [t.select(target.names).cast(target) for t in tables]
            if not tables:
                return target.empty_table()
        elif not tables:
            return pa.table({})
        return pa.concat_tables(tables) if len(tables) > 1 else tables[0]

    def write_run_record(self, step: str, day: date, attempt_id: str, record: dict) -> None:
        self.write_json(self.run_record_path(step, day, attempt_id), record)
