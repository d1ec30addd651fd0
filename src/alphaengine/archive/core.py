"""Archiving old day partitions: Parquet in the object store, verified, recorded, and only then dropped.

:class:`Archive` does the work for the ``archiver`` module, the engine's admin commands and
``alphaengine archive``. One (table, day) goes through five steps, each idempotent, so a process killed
at any point leaves a state from which the next run finishes the job (docs/archive.md walks through every
point):

1. export the day's unique rows (``FINAL``), one ``(venue, symbol)`` at a time, sorted by the table key,
   into one local Parquet file (zstd, a row group per chunk), with their :mod:`content checksum
   <alphaengine.archive.checksum>` and the file's SHA-256;
2. upload it to ``<table>/date=YYYY-MM-DD/part-<generation>.parquet`` (atomic for readers);
3. read it back from the object store: same file SHA-256, same row count, same content checksum;
4. record a row in ``archive_manifest``;
5. drop the partition, unless rows arrived while the day was archived (then the next run takes them in).

A day whose partition reappears after it was archived (late rows, a replay of old recordings, a restore)
is merged: when the store's rows differ from the manifest's, the archived rows are inserted back (the
tables are idempotent by key) and the whole day is written as the next generation, whose manifest row
replaces the old one; the old object is deleted only after that. An archive is therefore never replaced
by one that holds fewer rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import shutil
import tempfile
import time
import weakref
from collections import Counter
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any, ClassVar

import msgspec
import pyarrow as pa
import pyarrow.parquet as pq

from alphaengine.archive.checksum import ALGORITHM, ContentChecksum, file_sha256
from alphaengine.clock import Clock
from alphaengine.errors import AlphaEngineError, ObjectNotFoundError
from alphaengine.metrics import ARCHIVE_PARTITIONS_PENDING, ARCHIVED_ROWS
from alphaengine.objectstore.base import ObjectStore
from alphaengine.store.base import Store, TableSpec
from alphaengine.store.schema import ARCHIVE_MANIFEST, TABLES

log = logging.getLogger("alphaengine.archive")

ARCHIVED_TABLES = ("ticks", "bars")
"""Tables the archiver handles: partitioned by day and keyed by ``(venue, symbol, ...)``."""

SCRATCH_DIR = "archive-scratch"
"""The directory under the engine's data directory that holds files while a day is archived or restored."""

_CHUNK_COLUMNS = ("venue", "symbol")
"""A day is exported one value of these (the leading key columns) at a time, to bound memory."""

_PART = re.compile(r"part-(?P<generation>[0-9]+)\.parquet")
_EPOCH = date(1970, 1, 1)
_DAY_NS = 86_400 * 1_000_000_000


class ArchiveError(AlphaEngineError):
    """One day could not be archived or restored as it is; nothing of it was dropped.

    A verification failed, rows arrived meanwhile, or its archive is missing or altered. Other days are
    not affected.
    """

    retriable: ClassVar[bool] = True


class PendingPartition(msgspec.Struct, frozen=True, kw_only=True):
    """A day partition of a table that is older than its cutoff and still in the store."""

    table: str
    day: date


class ManifestEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One archived day: a row of ``archive_manifest``."""

    table: str
    day: date
    object_key: str
    rows: int
    content_checksum: str
    """``<algorithm>:<hex>``, see :mod:`alphaengine.archive.checksum`."""
    file_sha256: str
    bytes: int
    archived_ns: int

    @property
    def generation(self) -> int:
        """0 for a first archive; one more each time late rows were merged into it."""
        match = _PART.fullmatch(self.object_key.rpartition("/")[2])
        return int(match["generation"]) if match else 0


class DayReport(msgspec.Struct, frozen=True, kw_only=True):
    """What archiving one day did."""

    table: str
    day: date
    rows: int
    bytes: int
    seconds: float
    object_key: str
    merged: bool = False
    """Whether rows of an earlier archive of the day were merged in (see the module docstring)."""


def object_key(table: str, day: date, generation: int = 0) -> str:
    """Where a day's archive lives: ``<table>/date=YYYY-MM-DD/part-<generation>.parquet``."""
    return f"{_day_prefix(table, day)}part-{generation}.parquet"


def _day_prefix(table: str, day: date) -> str:
    return f"{table}/date={day.isoformat()}/"


def today_utc(clock: Clock) -> date:
    """The clock's current date in UTC (day partitions are UTC days)."""
    return _EPOCH + timedelta(days=clock.now_ns() // _DAY_NS)


def archived_table(table: str) -> TableSpec:
    """The spec of a table the archiver handles; ArchiveError naming them for any other."""
    if table not in ARCHIVED_TABLES:
        raise ArchiveError(f"table {table!r} is not archived (archived tables: {', '.join(ARCHIVED_TABLES)})")
    return TABLES[table]


def _file_schema(spec: TableSpec) -> pa.Schema:
    """Every column of the table, derived ``ts`` included, so that a file is complete for any reader."""
    return pa.schema([pa.field(c.name, c.arrow_type, nullable=False) for c in spec.columns])


def _partition_day(partition: str) -> date:
    return date(int(partition[:4]), int(partition[4:6]), int(partition[6:]))


def _day_filter(day: date) -> str:
    """The rows of one UTC day: the same rows as ``toYYYYMMDD(ts) = YYYYMMDD``.

    ``ts`` is a ``DateTime('UTC')`` and ClickHouse reads the literals in the column's time zone. A range on
    the partition column still lets ClickHouse skip every other partition, and unlike ``toYYYYMMDD`` the
    in-memory store's SQL can run it.
    """
    return f"ts >= '{day.isoformat()} 00:00:00' AND ts < '{(day + timedelta(days=1)).isoformat()} 00:00:00'"


def _literal(value: str) -> str:
    """A ClickHouse string literal."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


@dataclass(frozen=True, slots=True)
class _Export:
    """A day written to a local Parquet file."""

    path: Path
    rows: int
    content_checksum: str
    file_sha256: str
    bytes: int


_LOCKS: weakref.WeakKeyDictionary[Store, asyncio.Lock] = weakref.WeakKeyDictionary()


class Archive:
    """Archives day partitions of ``store`` into ``objects``, and restores them.

    ``scratch_dir`` holds the local Parquet files while a day is archived or restored (they are removed
    afterwards); ``clock`` stamps manifest rows. Every Archive over the same store object shares one lock,
    so the archiver module and commands sent to the engine never work on a day at the same time.
    """

    def __init__(self, store: Store, objects: ObjectStore, scratch_dir: Path, clock: Clock) -> None:
        self.store = store
        self.objects = objects
        self.scratch_dir = scratch_dir
        self.clock = clock
        self._lock = _LOCKS.setdefault(store, asyncio.Lock())

    # -- planning ---------------------------------------------------------------------------------

    async def pending(self, cutoffs: Mapping[str, date]) -> list[PendingPartition]:
        """Day partitions strictly older than their table's cutoff, oldest first per table.

        Also sets ``alphaengine_archive_partitions_pending`` for each table.
        """
        found: list[PendingPartition] = []
        for table, cutoff in cutoffs.items():
            archived_table(table)
            days = sorted(d for d in map(_partition_day, await self.store.partitions(table)) if d < cutoff)
            ARCHIVE_PARTITIONS_PENDING.labels(table).set(len(days))
            found.extend(PendingPartition(table=table, day=d) for d in days)
        return found

    async def run(self, cutoffs: Mapping[str, date]) -> list[DayReport]:
        """Archive every pending partition; returns what was archived.

        A day that fails on its own (:class:`ArchiveError`: a verification, rows arriving meanwhile) is
        logged and skipped, and the others go on; the run then raises ArchiveError naming every failed
        day. Any other error (the store or the object store unreachable) ends the run at once: the next
        days would fail the same way.
        """
        plan = await self.pending(cutoffs)
        remaining = Counter(p.table for p in plan)
        reports: list[DayReport] = []
        failures: list[str] = []
        try:
            for partition in plan:
                try:
                    report = await self.archive_day(partition.table, partition.day)
                except ArchiveError as exc:
                    log.error("archiving %s %s failed: %s", partition.table, partition.day, exc)
                    failures.append(f"{partition.table} {partition.day}: {exc}")
                    continue
                remaining[partition.table] -= 1
                if report is not None:
                    reports.append(report)
        finally:
            for table in cutoffs:
                ARCHIVE_PARTITIONS_PENDING.labels(table).set(remaining[table])
        if failures:
            raise ArchiveError(f"{len(failures)} of {len(plan)} partition(s) failed: " + "; ".join(failures))
        return reports

    # -- one day ----------------------------------------------------------------------------------

    async def archive_day(self, table: str, day: date) -> DayReport | None:
        """Export, upload, verify, record and drop one day; None if the store holds no rows of it."""
        spec = archived_table(table)
        async with self._lock:
            started = time.perf_counter()
            previous = await self._manifest_entry(table, day)
            with self._scratch() as scratch:
                export = await self._export(spec, day, scratch / "export.parquet")
                if export.rows == 0:
                    return None
                generation, merged = 0, False
                if previous is not None:
                    if not _same_rows(previous, export):
                        log.info("%s %s changed since it was archived: merging the archive in", table, day)
                        await self._insert_archive(spec, previous, scratch / "previous.parquet")
                        export = await self._export(spec, day, scratch / "export.parquet")
                        merged = not _same_rows(previous, export)  # not after a restore killed midway
                    # The same rows as archived (a run killed after its manifest row, a restored day)
                    # go to the same object again; more rows go to the next generation.
                    generation = previous.generation + 1 if merged else previous.generation
                key = object_key(table, day, generation)
                await self.objects.put_file(key, export.path)
                await self._verify(spec, key, export, scratch / "verify.parquet")
            await self._record(table, day, key, export)
            await self._remove_other_objects(table, day, key)
            # Rows inserted into the day while it was exported are in no archive: keep them for the next
            # run (which merges) rather than drop them. Only an insert between this count and the drop
            # could still be lost; ClickHouse has no conditional drop.
            now = await self._count(spec, day)
            if now != export.rows:
                raise ArchiveError(
                    f"{table} {day}: {now - export.rows:+d} row(s) arrived while it was archived; "
                    "not dropped, the next run takes them in"
                )
            await self.store.drop_partition(table, day.strftime("%Y%m%d"))
            seconds = time.perf_counter() - started
        ARCHIVED_ROWS.labels(table).inc(export.rows)
        log.info(
            "archived %s %s: %d rows, %d bytes in %.2f s -> %s%s",
            table,
            day,
            export.rows,
            export.bytes,
            seconds,
            key,
            " (merged with the earlier archive)" if merged else "",
        )
        return DayReport(
            table=table,
            day=day,
            rows=export.rows,
            bytes=export.bytes,
            seconds=seconds,
            object_key=key,
            merged=merged,
        )

    async def _export(self, spec: TableSpec, day: date, path: Path) -> _Export:
        """Step 1: the day's unique rows, sorted by the table key, into one Parquet file."""
        schema = _file_schema(spec)
        where = _day_filter(day)
        chunk_columns = ", ".join(_CHUNK_COLUMNS)
        chunks = await self.store.query(
            f"SELECT {chunk_columns} FROM {spec.name} WHERE {where} "
            f"GROUP BY {chunk_columns} ORDER BY {chunk_columns}"
        )
        select = ", ".join(schema.names)
        order = ", ".join(spec.key)
        checksum = ContentChecksum(schema)
        options = _writer_options(spec, schema)
        metadata = {"alphaengine.table": spec.name, "alphaengine.day": day.isoformat()}
        # pyarrow's writer is not thread-safe: it lives on one thread of its own, so that closing it after
        # a failure or a cancellation queues behind a write still running there instead of racing it.
        thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="archive-export")
        loop = asyncio.get_running_loop()
        try:
            writer = await loop.run_in_executor(
                thread, functools.partial(pq.ParquetWriter, path, schema, **options)
            )
            try:
                for chunk in chunks.to_pylist():
                    match = " AND ".join(f"{c} = {_literal(chunk[c])}" for c in _CHUNK_COLUMNS)
                    rows = await self.store.query(
                        f"SELECT {select} FROM {spec.name} FINAL WHERE {where} AND {match} ORDER BY {order}"
                    )
                    await loop.run_in_executor(thread, _write_chunk, writer, checksum, rows.cast(schema))
                await loop.run_in_executor(thread, _finish, writer, checksum, metadata)
            except BaseException:
                thread.submit(writer.close)
                raise
        finally:
            thread.shutdown(wait=False)
        sha, size = await asyncio.to_thread(_sha256_and_size, path)
        return _Export(path, checksum.rows, f"{ALGORITHM}:{checksum.hexdigest()}", sha, size)

    async def _verify(self, spec: TableSpec, key: str, export: _Export, path: Path) -> None:
        """Step 3: what the object store gives back is the file, and the file holds the store's rows."""
        await self.objects.get_file(key, path)
        sha = await asyncio.to_thread(file_sha256, path)
        if sha != export.file_sha256:
            raise ArchiveError(f"{key}: the uploaded object differs from the file written (SHA-256 {sha})")
        rows, checksum = await asyncio.to_thread(_file_content, path, _file_schema(spec))
        if (rows, checksum) != (export.rows, export.content_checksum):
            raise ArchiveError(
                f"{key}: the file holds {rows} rows with checksum {checksum}, "
                f"the store {export.rows} rows with checksum {export.content_checksum}"
            )

    async def _record(self, table: str, day: date, key: str, export: _Export) -> None:
        """Step 4: the manifest row (replacing an earlier one of the same day)."""
        row = {
            "table": [table],
            "day": [int(day.strftime("%Y%m%d"))],
            "object_key": [key],
            "rows": [export.rows],
            "content_checksum": [export.content_checksum],
            "file_sha256": [export.file_sha256],
            "bytes": [export.bytes],
            "archived_ns": [self.clock.now_ns()],
        }
        await self.store.insert(
            ARCHIVE_MANIFEST.name, pa.Table.from_pydict(row, schema=ARCHIVE_MANIFEST.input_schema)
        )

    async def _remove_other_objects(self, table: str, day: date, keep: str) -> None:
        """Delete earlier generations of the day (their rows are in ``keep``, which the manifest names)."""
        for info in await self.objects.list(_day_prefix(table, day)):
            if info.key != keep:
                await self.objects.delete(info.key)

    async def _count(self, spec: TableSpec, day: date) -> int:
        result = await self.store.query(
            f"SELECT count() AS n FROM {spec.name} FINAL WHERE {_day_filter(day)}"
        )
        return int(result.column("n")[0].as_py())

    # -- manifest and restore ---------------------------------------------------------------------

    async def manifest(self) -> list[ManifestEntry]:
        """Every archived day, by table and day."""
        return await self._manifest_entries("")

    async def _manifest_entry(self, table: str, day: date) -> ManifestEntry | None:
        entries = await self._manifest_entries(
            f'WHERE "table" = {_literal(table)} AND day = {day.strftime("%Y%m%d")}'
        )
        return entries[0] if entries else None

    async def _manifest_entries(self, where: str) -> list[ManifestEntry]:
        # "table" is quoted: a keyword in the in-memory store's SQL, a plain name in ClickHouse.
        columns = ", ".join(f'"{c.name}"' for c in ARCHIVE_MANIFEST.columns)
        result = await self.store.query(
            f'SELECT {columns} FROM {ARCHIVE_MANIFEST.name} FINAL {where} ORDER BY "table", day'
        )
        return [
            ManifestEntry(**{**row, "day": _partition_day(str(row["day"]))}) for row in result.to_pylist()
        ]

    async def restore(self, table: str, day: date) -> tuple[ManifestEntry, int]:
        """Insert an archived day back into the store (idempotent by key); returns its entry and rows.

        The downloaded file must match the manifest's SHA-256. The day is then a partition older than the
        cutoff again: the archiver's next run archives it again (same rows, same object) and drops it.
        """
        spec = archived_table(table)
        async with self._lock:
            entry = await self._manifest_entry(table, day)
            if entry is None:
                raise ArchiveError(f"no archive of {table} for {day} in the manifest")
            with self._scratch() as scratch:
                rows = await self._insert_archive(spec, entry, scratch / "restore.parquet")
        log.info("restored %d rows of %s %s from %s", rows, table, day, entry.object_key)
        return entry, rows

    async def _insert_archive(self, spec: TableSpec, entry: ManifestEntry, path: Path) -> int:
        """Download an archive, check it against its manifest row, insert its rows; returns how many."""
        try:
            await self.objects.get_file(entry.object_key, path)
        except ObjectNotFoundError as exc:
            raise ArchiveError(f"the archive {entry.object_key} named by the manifest is missing") from exc
        sha = await asyncio.to_thread(file_sha256, path)
        if sha != entry.file_sha256:
            raise ArchiveError(
                f"{entry.object_key} does not match the manifest: SHA-256 {sha}, manifest {entry.file_sha256}"
            )
        names = [c.name for c in spec.input_columns]
        inserted = 0
        groups = (await asyncio.to_thread(pq.read_metadata, path)).num_row_groups
        for group in range(groups):
            # Each read opens the file in its worker thread, so a cancellation never closes it under one.
            rows = await asyncio.to_thread(_read_row_group, path, group, names)
            inserted += await self.store.insert(spec.name, rows)
        return inserted

    # -- scratch files ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _scratch(self) -> Iterator[Path]:
        """A private directory under ``scratch_dir``, removed afterwards (also on error or cancel)."""
        self.scratch_dir.mkdir(parents=True, exist_ok=True)
        # Cleanup errors are ignored: after a cancellation a worker thread may still be writing here; what
        # it leaves is removed when the archiver next starts.
        with tempfile.TemporaryDirectory(
            dir=self.scratch_dir, prefix="day-", ignore_cleanup_errors=True
        ) as name:
            yield Path(name)

    async def clear_scratch(self) -> None:
        """Remove files left behind by a process that was killed while archiving."""
        async with self._lock:  # not from under a day being archived by another Archive of this store
            await asyncio.to_thread(shutil.rmtree, self.scratch_dir, ignore_errors=True)


def _encodings(schema: pa.Schema) -> dict[str, Any]:
    """Parquet encodings by column type, chosen for tick data sorted by key.

    Dictionaries for the strings, which take few distinct values (venue, symbol); deltas for integers
    and times, which rise steadily within a chunk sorted by key (trade ids, nanosecond times).
    On a day of 1,000,000 synthetic ticks this writes a file 45 % smaller than pyarrow's defaults
    (dictionaries everywhere), three times faster, and reads it back three times faster. Every current
    Parquet reader (pyarrow, polars, DuckDB, Spark) decodes both encodings.
    """
    return {
        "use_dictionary": [f.name for f in schema if pa.types.is_string(f.type)],
        "column_encoding": {
            f.name: "DELTA_BINARY_PACKED"
            for f in schema
            if pa.types.is_integer(f.type) or pa.types.is_timestamp(f.type)
        },
    }


def _same_rows(entry: ManifestEntry, export: _Export) -> bool:
    return (entry.rows, entry.content_checksum) == (export.rows, export.content_checksum)


def _writer_options(spec: TableSpec, schema: pa.Schema) -> dict[str, Any]:
    return {
        "compression": "zstd",
        "sorting_columns": pq.SortingColumn.from_ordering(schema, [(k, "ascending") for k in spec.key]),
        **_encodings(schema),
    }


def _write_chunk(writer: pq.ParquetWriter, checksum: ContentChecksum, rows: pa.Table) -> None:
    checksum.update(rows)
    writer.write_table(rows, row_group_size=max(1, rows.num_rows))


def _finish(writer: pq.ParquetWriter, checksum: ContentChecksum, metadata: dict[str, str]) -> None:
    """Write the footer, with the row count and content checksum in the file's key-value metadata."""
    writer.add_key_value_metadata(
        {
            **metadata,
            "alphaengine.rows": str(checksum.rows),
            "alphaengine.content_checksum": f"{ALGORITHM}:{checksum.hexdigest()}",
        }
    )
    writer.close()


def _read_row_group(path: Path, group: int, columns: list[str]) -> pa.Table:
    with pq.ParquetFile(path) as parquet:
        return parquet.read_row_group(group, columns=columns)


def _sha256_and_size(path: Path) -> tuple[str, int]:
    return file_sha256(path), path.stat().st_size


def _file_content(path: Path, schema: pa.Schema) -> tuple[int, str]:
    """Row count and content checksum of a Parquet file, read one row group at a time."""
    checksum = ContentChecksum(schema)
    with pq.ParquetFile(path) as parquet:
        for group in range(parquet.num_row_groups):
            checksum.update(parquet.read_row_group(group))
    return checksum.rows, f"{ALGORITHM}:{checksum.hexdigest()}"
