"""The lake: the only code that knows paths, markers and atomic publish, for file:// and s3://.

Layout (docs/contract.md, "The lake"), under one root URI::

    landing/transactions/date=D/*.parquet|*.csv + _SUCCESS      written by the source
    <dataset>/date=D/_MANIFEST.json                                 what is published for D
    <dataset>/date=D/attempt=<id>/part-*.parquet                    the files it names

How a partition is published. A writer puts its files under a fresh ``attempt=<id>/`` folder
of the partition, then writes ``_MANIFEST.json`` naming that attempt and its files. The manifest
is one small object written in one step (a rename on a file system, a single PUT on S3), so a
reader that goes through the manifest sees either the previous complete partition or the new
complete one, never a mixture. Two writers of one partition cannot interleave: the last manifest
written wins whole. After publishing, the writer marks the attempt it superseded and removes the
ones whose time has come (:meth:`Lake.collect_garbage`): superseded attempts after a grace period
(a reader may be in the middle of one), unnamed ones older than ``STALE_ATTEMPT_SECONDS``
(leftovers of crashed runs; younger unnamed folders may belong to a writer still at work), and
never the attempt the manifest names at that moment. Readers never list attempt
folders themselves: they ask for :meth:`Lake.partition_files`.

A published partition may hold zero rows ("the source had no data"); an unpublished one
("not yet written") raises :class:`NotPublished`. Run facts that vary between attempts
(timestamps, durations) go to ``_runs/<step>/date=D/<attempt>.json``, never into the data.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import posixpath
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from jobs.common.calendar import day_range, parse_day  # noqa: F401 - re-exported for callers
from jobs.common.config import S3Settings, settings
from jobs.common.datasets import COMMITTED_BY, Dataset

log = logging.getLogger(__name__)

MANIFEST = "_MANIFEST.json"
MANIFEST_FORMAT = 2  # 2: files carry sha256, the manifest a content digest and the partition's lineage
SUCCESS = "_SUCCESS"
ATTEMPT_PREFIX = "attempt="
STALE_ATTEMPT_SECONDS = 6 * 3600
SUPERSEDED_GRACE_SECONDS = 15 * 60  # a reader of the previous manifest has this long to finish
SUPERSEDED = "_SUPERSEDED"
ABANDONED = "_ABANDONED.json"  # an operator's record that a partition will never be published


MODELS = Dataset.MODELS
RUNS = "_runs"


def file_record(name: str, data: bytes, rows: int | None) -> dict:
    """What a manifest says of one file: its name in the attempt, rows, size and content hash."""
    return {"name": name, "rows": rows, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def content_digest(files: Sequence[dict]) -> str:
    """A partition's digest: its files' contents and row counts, in manifest order (not their names,
    not the attempt), so the same rows written again give the same digest."""
    parts = [[f["sha256"], f["rows"]] for f in files]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


class LakeError(RuntimeError):
    """A lake operation that cannot go on; the message says what and where."""


class NotPublished(LakeError):
    """The partition has not been published (it is not the same as an empty partition)."""


@dataclass(frozen=True)
class Attempt:
    """A staging folder for one write of one partition."""

    dataset: str
    day: date
    attempt_id: str
    path: str  # file-system path of the attempt folder
    uri: str  # the same folder as a URI (file:// or s3://)
    spark_uri: str  # the same folder as Spark names it (file:// or s3a://)


# Every S3 call has a deadline and a bounded number of attempts: a store that stops answering makes a
# step fail with a clear error in about a minute, never hang.
S3_CONNECT_TIMEOUT_S = 5
S3_REQUEST_TIMEOUT_S = 30
S3_MAX_ATTEMPTS = 4
_S3_CLIENTS: dict[tuple, Any] = {}  # one pyarrow file system and one boto3 client per process and store


def _endpoint(s3: S3Settings) -> dict[str, str]:
    if not s3.endpoint_url:
        return {}
    parsed = urlparse(s3.endpoint_url)
    if parsed.scheme:
        return {"endpoint_override": parsed.netloc, "scheme": parsed.scheme}
    return {"endpoint_override": s3.endpoint_url}


def _s3_key(s3: S3Settings, kind: str) -> tuple:
    return (kind, s3.endpoint_url, s3.region, s3.access_key, s3.secret_key, s3.session_token)


def _s3_filesystem(s3: S3Settings) -> pafs.S3FileSystem:
    key = _s3_key(s3, "pyarrow")
    if key not in _S3_CLIENTS:
        kwargs: dict[str, Any] = {"region": s3.region, **_endpoint(s3), "connect_timeout": S3_CONNECT_TIMEOUT_S,
                                  "request_timeout": S3_REQUEST_TIMEOUT_S,
                                  "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS)}
        if s3.access_key and s3.secret_key:
            kwargs.update(access_key=s3.access_key, secret_key=s3.secret_key, session_token=s3.session_token)
        _S3_CLIENTS[key] = pafs.S3FileSystem(**kwargs)
    return _S3_CLIENTS[key]


@dataclass(frozen=True)
class WorkerFilesystem:
    """How a Spark task opens the lake's file system: the store's address, never its credentials
    (an executor takes those from its own environment, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY,
    as any AWS client does). What Spark pickles into its tasks is this, not an authenticated client."""

    scheme: str  # "file" or "s3"
    region: str = ""
    endpoint: tuple[tuple[str, str], ...] = ()

    def open(self) -> pafs.FileSystem:
        if self.scheme == "file":
            return pafs.LocalFileSystem()
        return pafs.S3FileSystem(region=self.region, connect_timeout=S3_CONNECT_TIMEOUT_S,
                                 request_timeout=S3_REQUEST_TIMEOUT_S,
                                 retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS),
                                 **dict(self.endpoint))


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
            with self.fs.open_input_stream(fs_path, compression=None) as f:
                return f.read()
        except FileNotFoundError as exc:
            raise LakeError(f"not found: {self.to_uri(fs_path)}") from exc

    def write_bytes(self, fs_path: str, data: bytes) -> None:
        """Write one object so that readers see the old or the new content, never a part."""
        parent = posixpath.dirname(fs_path)
        if self.scheme == "file":
            self.fs.create_dir(parent, recursive=True)
            tmp = posixpath.join(parent, f".tmp-{uuid.uuid4().hex}-{posixpath.basename(fs_path)}")
            with self.fs.open_output_stream(tmp, compression=None) as f:
                f.write(data)
            self.fs.move(tmp, fs_path)  # rename(2): atomic replace
        else:
            with self.fs.open_output_stream(fs_path, compression=None) as f:  # one PUT: atomic on S3
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
                return self.read_bytes(fs_path) == data  # as on S3: the same bytes there count as ours
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
                # The client retries a PUT whose answer was lost: the object may be this very write.
                # The same bytes there count as ours, so a lost answer never records a thing twice.
                return self.read_bytes(fs_path) == data
            raise

    def boto3_client(self):
        """The process's boto3 S3 client for this store (for what pyarrow's S3 cannot do), with the
        same deadlines and bounded retries as the file system."""
        import boto3
        from botocore.config import Config

        s3 = self._s3 or settings().s3
        key = _s3_key(s3, "boto3")
        if key not in _S3_CLIENTS:
            _S3_CLIENTS[key] = boto3.client(
                "s3",
                endpoint_url=s3.endpoint_url,
                region_name=s3.region,
                aws_access_key_id=s3.access_key,
                aws_secret_access_key=s3.secret_key,
                aws_session_token=s3.session_token,
                config=Config(connect_timeout=S3_CONNECT_TIMEOUT_S, read_timeout=S3_REQUEST_TIMEOUT_S,
                              retries={"max_attempts": S3_MAX_ATTEMPTS, "mode": "standard"}),
            )
        return _S3_CLIENTS[key]

    def worker_filesystem(self) -> WorkerFilesystem:
        if self.scheme == "file":
            return WorkerFilesystem("file")
        s3 = self._s3 or settings().s3
        return WorkerFilesystem("s3", s3.region, tuple(sorted(_endpoint(s3).items())))

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

    def discard(self, attempts: Iterable[Attempt]) -> None:
        """Remove the attempts of a write that failed, as far as the store lets it. The write's own
        error is the one to report: an attempt left behind (the store went away meanwhile) is named
        by no manifest, so no reader sees it, and the partition's next publish collects it."""
        for attempt in attempts:
            try:
                self.delete_dir(attempt.path)
            except OSError as exc:
                from jobs.common.cli import error_summary

                log.warning("left the unpublished attempt %s for garbage collection: %s", attempt.path,
                            error_summary(exc))

    # --- landing (written by the source) -------------------------------------------------------
    # ``dataset`` is landing/transactions (the default) or landing/labels; both follow the same rules.
    def landing_ready(self, day: date, dataset: str = Dataset.LANDING) -> bool:
        """The source has finished day D: its ``_SUCCESS`` marker exists."""
        return self.exists(posixpath.join(self.partition_path(dataset, day), SUCCESS))

    def landing_files(self, day: date, dataset: str = Dataset.LANDING) -> list[pafs.FileInfo]:
        """Every file of landing day D but the hidden ones (``_SUCCESS``, ``.tmp``…), sorted by name.

        Files of a kind the clean step cannot read are listed too: it refuses the day naming them
        rather than ignore rows it was sent (``LANDING_SUFFIXES``)."""
        folder = self.partition_path(dataset, day)
        return sorted(
            (
                info
                for info in self.list_dir(folder)
                if info.type == pafs.FileType.File and not info.base_name.startswith(("_", "."))
            ),
            key=lambda info: info.base_name,
        )

    def write_landing(self, day: date, table: pa.Table, fmt: str = "parquet", name: str = "part-00000",
                      dataset: str = Dataset.LANDING) -> str:
        """Write one landing file for day D (as a source system would). Does not mark it done."""
        folder = self.partition_path(dataset, day)
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

    def unmark_landing_done(self, day: date, dataset: str = Dataset.LANDING) -> None:
        """Withdraw day D's ``_SUCCESS`` before its landing files are rewritten."""
        path = posixpath.join(self.partition_path(dataset, day), SUCCESS)
        if self.exists(path):
            self.fs.delete_file(path)

    def mark_landing_done(self, day: date, dataset: str = Dataset.LANDING) -> None:
        self.write_bytes(posixpath.join(self.partition_path(dataset, day), SUCCESS), b"")

    # --- published partitions ------------------------------------------------------------------
    def manifest(self, dataset: str, day: date) -> dict | None:
        """The published manifest of a partition (None if unpublished).

        A dataset written in a pair (``COMMITTED_BY``) is published by its partner's manifest, which
        embeds this one's: where the two differ (the writer stopped between them) the embedded one
        is the truth, so a reader sees both of a pair from the same run.
        """
        own = self._own_manifest(dataset, day)
        primary = COMMITTED_BY.get(dataset)
        if primary is None:
            return own
        embedded = ((self._own_manifest(primary, day) or {}).get("companions") or {}).get(dataset)
        if embedded is not None and (own is None or own.get("attempt") != embedded.get("attempt")):
            return embedded
        return own

    def _own_manifest(self, dataset: str, day: date) -> dict | None:
        path = posixpath.join(self.partition_path(dataset, day), MANIFEST)
        try:
            with self.fs.open_input_stream(path, compression=None) as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None

    def is_published(self, dataset: str, day: date) -> bool:
        return self.manifest(dataset, day) is not None

    # --- abandoned partitions ------------------------------------------------------------------
    def abandon(self, dataset: str, day: date, reason: str, by: str = "operator") -> tuple[dict, bool]:
        """Record that partition D of ``dataset`` will never be published (a day nobody will fix), so
        the steps that read it as history go on without it and name it in their lineage. Once only:
        returns (the record, whether this call created it). A day published later simply is
        published again (what skipped it shows as stale)."""
        if not reason.strip():
            raise ValueError("abandoning a day needs a reason")
        day = parse_day(day)
        if self.is_published(dataset, day):
            raise LakeError(f"{dataset} date={day} is published: there is nothing to abandon")
        record = {"dataset": dataset, "date": day.isoformat(), "reason": reason, "by": by,
                  "recorded_at": datetime.now(UTC).isoformat(timespec="seconds")}
        path = posixpath.join(self.partition_path(dataset, day), ABANDONED)
        created = self.put_if_absent(path, json.dumps(record, sort_keys=True).encode())
        return (record if created else self.read_json(path)), created

    def abandoned(self, dataset: str, day: date) -> dict | None:
        """The abandonment record of an unpublished partition (None if it is published or not abandoned)."""
        path = posixpath.join(self.partition_path(dataset, day), ABANDONED)
        try:
            record = json.loads(self.read_bytes(path))
        except LakeError:
            return None
        return None if self.is_published(dataset, day) else record

    def awaited(self, dataset: str, days: Iterable[date]) -> list[date]:
        """Those of ``days`` a reader still waits for: not published and not abandoned."""
        return [d for d in days if not self.is_published(dataset, d) and self.abandoned(dataset, d) is None]

    def readable(self, dataset: str, days: Iterable[date]) -> list[date]:
        """``days`` without the abandoned ones (what a reader of history reads; a day neither
        published nor abandoned still raises when read)."""
        return [d for d in days if self.is_published(dataset, d) or self.abandoned(dataset, d) is None]

    def partition_dates(self, dataset: str) -> list[date]:
        """Days that have a ``date=D`` folder (published or not), in date order."""
        days = []
        for info in self.list_dir(self.path(dataset)):
            if info.type == pafs.FileType.Directory and info.base_name.startswith("date="):
                try:
                    days.append(parse_day(info.base_name[len("date=") :]))
                except ValueError:
                    continue  # not a partition of ours
        return sorted(days)

    def published_dates(self, dataset: str) -> list[date]:
        return [d for d in self.partition_dates(dataset) if self.is_published(dataset, d)]

    def partition_files(self, dataset: str, day: date, manifest: dict | None = None) -> list[str]:
        """File-system paths of the published files of a partition (may be empty)."""
        manifest = manifest or self.manifest(dataset, day)
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

    def write_file(self, attempt: Attempt, name: str, data: bytes, rows: int | None = None) -> dict:
        """Put one file into an attempt folder; return its record for :meth:`publish`."""
        self.write_bytes(posixpath.join(attempt.path, name), data)
        return file_record(name, data, rows)

    def write_parquet(self, attempt: Attempt, table: pa.Table, name: str = "part-00000.parquet", **options) -> dict:
        """Write an Arrow table as one Parquet file of an attempt (hashed as it is written)."""
        buf = io.BytesIO()
        pq.write_table(table, buf, **options)
        return self.write_file(attempt, name, buf.getvalue(), table.num_rows)

    def publish(
        self, attempt: Attempt, stats: dict | None = None, lineage: dict | None = None, files: list[dict] | None = None,
        companions: Sequence[dict] = (),
    ) -> dict:
        """Make an attempt's files the partition's content, atomically; return the manifest.

        ``companions`` are :meth:`prepare`'d manifests of the datasets this one commits
        (``COMMITTED_BY``): this manifest embeds them and is written first, so its one write
        publishes the pair; their own manifests follow.

        ``files`` are the records of what the writer wrote (:meth:`write_file`, or the
        ``(name, rows, bytes, sha256)`` a Spark task reports); the attempt folder must hold exactly
        those files with those sizes, or nothing is published. Without them (a writer that cannot
        know, such as Spark's own Parquet writer) every data file in the folder is named, its rows
        read from its footer and its bytes hashed. The manifest's ``digest`` covers the files'
        contents and row counts, never the attempt id: an identical recompute keeps it.
        """
        for companion in companions:
            if COMMITTED_BY.get(companion["dataset"]) != attempt.dataset or companion["date"] != attempt.day.isoformat():
                raise LakeError(f"{attempt.dataset} date={attempt.day} does not commit {companion['dataset']} "
                                f"date={companion['date']}")
        previous = {c["dataset"]: self.manifest(c["dataset"], attempt.day) for c in companions}
        manifest = self.prepare(attempt, stats, lineage, files)
        if companions:
            manifest["companions"] = {c["dataset"]: c for c in companions}
        own_previous = self._own_manifest(attempt.dataset, attempt.day)
        self.write_json(posixpath.join(self.partition_path(attempt.dataset, attempt.day), MANIFEST), manifest)
        for companion in companions:  # the pair is published; these make each readable on its own
            self.write_json(posixpath.join(self.partition_path(companion["dataset"], attempt.day), MANIFEST), companion)
        self._collect_garbage(attempt, own_previous)
        for companion in companions:
            gone = previous[companion["dataset"]]
            self._collect_garbage(self.attempt_of(companion), gone)
        return manifest

    def attempt_of(self, manifest: dict) -> Attempt:
        """The attempt folder a manifest names."""
        day = parse_day(manifest["date"])
        path = posixpath.join(self.partition_path(manifest["dataset"], day), f"{ATTEMPT_PREFIX}{manifest['attempt']}")
        return Attempt(manifest["dataset"], day, manifest["attempt"], path, self.to_uri(path), self.to_spark_uri(path))

    def prepare(
        self, attempt: Attempt, stats: dict | None = None, lineage: dict | None = None, files: list[dict] | None = None
    ) -> dict:
        """The manifest that would publish an attempt, after checking its folder holds what was written;
        nothing is written (:meth:`publish` writes it, or embeds it as a companion)."""
        listed = {
            posixpath.relpath(i.path, attempt.path): i.size
            for i in self.list_files(attempt.path)
            if not posixpath.basename(i.path).startswith(("_", "."))
            and not posixpath.basename(i.path).endswith(".crc")
        }
        if files is None:
            files = [self._record_of(attempt, name, size) for name, size in sorted(listed.items())]
        else:
            written = {f["name"]: f["bytes"] for f in files}
            if written != listed:
                missing = sorted(set(written) - set(listed))
                extra = sorted(set(listed) - set(written))
                resized = sorted(n for n in set(written) & set(listed) if written[n] != listed[n])
                raise LakeError(
                    f"{self.to_uri(attempt.path)} does not hold what was written (missing {missing}, "
                    f"unexpected {extra}, other size {resized}); nothing published"
                )
            files = sorted(files, key=lambda f: f["name"])
        return {
            "format": MANIFEST_FORMAT,
            "dataset": attempt.dataset,
            "date": attempt.day.isoformat(),
            "attempt": attempt.attempt_id,
            "rows": sum(f["rows"] or 0 for f in files),
            "files": files,
            "digest": content_digest(files),
            "stats": stats or {},
            "lineage": lineage,
        }

    def _record_of(self, attempt: Attempt, name: str, size: int) -> dict:
        path = posixpath.join(attempt.path, name)
        data = self.read_bytes(path)
        rows = pq.ParquetFile(io.BytesIO(data)).metadata.num_rows if name.endswith(".parquet") else None
        record = file_record(name, data, rows)
        if record["bytes"] != size:
            raise LakeError(f"{self.to_uri(path)} changed while it was being published")
        return record

    def digest(self, dataset: str, day: date, manifest: dict | None = None) -> str | None:
        """The content digest of a published partition (None if unpublished).

        Manifests written before digests existed get theirs computed from the files
        (``python -m jobs.lineage migrate`` stores them).
        """
        manifest = manifest or self.manifest(dataset, day)
        if manifest is None:
            return None
        if manifest.get("digest"):
            return manifest["digest"]
        return content_digest(self.file_records(dataset, day, manifest))

    def file_records(self, dataset: str, day: date, manifest: dict) -> list[dict]:
        """(name, rows, bytes, sha256) of every file a manifest names, hashing those that lack one."""
        folder = posixpath.join(self.partition_path(dataset, day), f"{ATTEMPT_PREFIX}{manifest['attempt']}")
        out = []
        for f in manifest["files"]:
            if f.get("sha256"):
                out.append(f)
                continue
            data = self.read_bytes(posixpath.join(folder, f["name"]))
            out.append(file_record(f["name"], data, f.get("rows")))
        return out

    def landing_digest(self, day: date, dataset: str = Dataset.LANDING) -> str | None:
        """What identifies a landing day as delivered: its data files' names, sizes and modification
        times, once ``_SUCCESS`` is there (None before). A re-delivered file changes it."""
        if not self.landing_ready(day, dataset):
            return None
        listing = [
            [i.base_name, i.size, int(i.mtime.timestamp() * 1e6) if i.mtime else None]
            for i in self.landing_files(day, dataset)
        ]
        return hashlib.sha256(json.dumps(listing).encode()).hexdigest()

    def _collect_garbage(self, current: Attempt, previous: dict | None) -> None:
        """After a publish: mark the attempt it superseded, and remove the attempts nothing needs.

        Never fails the publish (an error here is logged): the partition is already published.
        """
        try:
            self.collect_garbage(current.dataset, current.day, superseded=previous and previous["attempt"])
        except Exception as exc:  # noqa: BLE001 - the data is published; leftovers are collected next time
            log.warning("could not collect old attempts of %s date=%s: %s", current.dataset, current.day, exc)

    def collect_garbage(self, dataset: str, day: date, superseded: str | None = None) -> list[str]:
        """Remove the attempt folders of a partition that no reader can need; return their names.

        The attempt the manifest names *now* (read again here: another writer may have published
        since) is never touched. A superseded attempt is first marked ``_SUPERSEDED`` and removed once
        the mark is ``SUPERSEDED_GRACE_SECONDS`` old, so a reader that has just read the previous
        manifest can finish. An attempt no manifest ever named is removed once its newest file is
        ``STALE_ATTEMPT_SECONDS`` old (a crashed writer's; a younger one may be a writer at work).
        Ages are measured against the store's own clock (the manifest's modification time), not
        this host's, so a skewed clock cannot make a live attempt look old.
        """
        folder = self.partition_path(dataset, day)
        manifest_info = self.fs.get_file_info(posixpath.join(folder, MANIFEST))
        current = (self.manifest(dataset, day) or {}).get("attempt")
        if manifest_info.type == pafs.FileType.NotFound or current is None:
            return []
        now = manifest_info.mtime.timestamp() if manifest_info.mtime else time.time()
        removed = []
        for info in self.list_dir(folder):
            name = info.base_name
            if info.type != pafs.FileType.Directory or not name.startswith(ATTEMPT_PREFIX):
                continue
            attempt = name[len(ATTEMPT_PREFIX):]
            if attempt == current:
                continue
            mark = posixpath.join(info.path, SUPERSEDED)
            mark_info = self.fs.get_file_info(mark)
            if attempt == superseded and mark_info.type == pafs.FileType.NotFound:
                self.write_bytes(mark, b"")
                continue
            if mark_info.type != pafs.FileType.NotFound:
                expired = mark_info.mtime is not None and mark_info.mtime.timestamp() < now - SUPERSEDED_GRACE_SECONDS
            else:
                expired = self._newest_mtime(info.path, default=now) < now - STALE_ATTEMPT_SECONDS
            if expired and (self.manifest(dataset, day) or {}).get("attempt") != attempt:
                self.delete_dir(info.path)
                removed.append(name)
        return removed

    def _newest_mtime(self, fs_path: str, default: float) -> float:
        times = [i.mtime.timestamp() for i in self.list_files(fs_path) if i.mtime is not None]
        return max(times) if times else default

    def write_table(
        self, dataset: str, day: date, table: pa.Table, stats: dict | None = None, lineage: dict | None = None,
        **options,
    ) -> dict:
        """Publish an Arrow table as partition D of a dataset (replacing what was there whole)."""
        attempt = self.new_attempt(dataset, day)
        record = self.write_parquet(attempt, table, **options)
        return self.publish(attempt, stats, lineage, files=[record])

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
                if not p.endswith(".parquet"):
                    continue
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
        """Record one run of a step for D (what it did, or why it did not), stamped with the time."""
        stamped = {**record, "recorded_at": datetime.now(UTC).isoformat(timespec="microseconds")}
        self.write_json(self.run_record_path(step, day, attempt_id), stamped)

    def latest_run_record(self, step: str, day: date) -> dict | None:
        """The most recent run record of a step for D (by its ``recorded_at``, then the store's
        modification time); temporary and hidden files are not records."""
        folder = posixpath.dirname(self.run_record_path(step, day, "x"))
        found = []
        for info in self.list_dir(folder):
            if info.type != pafs.FileType.File or info.base_name.startswith((".", "_")) or \
                    not info.base_name.endswith(".json"):
                continue
            try:
                record = json.loads(self.read_bytes(info.path))
            except (LakeError, ValueError):
                continue  # removed since the listing, or not a record
            mtime = info.mtime.timestamp() if info.mtime else 0.0
            found.append((str(record.get("recorded_at") or ""), mtime, info.base_name, record))
        return max(found, key=lambda f: f[:3])[3] if found else None
