"""The embedded store: chDB, ClickHouse inside the process, keeping its data in a local directory.

chDB calls block, so every one of them runs on a single dedicated worker thread: the event loop never
waits on ClickHouse, and the session is never used from two threads. Only one process can open a data
directory; a second one gets :class:`~alphaengine.errors.StoreLockedError`.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar, TypeVarTuple

import pyarrow as pa
from chdb import session as chdb_session

from alphaengine.errors import ConfigError, StoreError, StoreLockedError
from alphaengine.store.base import TableSpec, counted_insert, find_table
from alphaengine.store.schema import MIGRATIONS, MIGRATIONS_TABLE, TABLES

log = logging.getLogger(__name__)

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# DateTime and DateTime('tz'), possibly Nullable; not DateTime64, which Arrow output already types.
_DATETIME = re.compile(r"(?:Nullable\()?DateTime(?:\('(?P<tz>[^']*)'\))?\)?")


def _directory_held_elsewhere(path: Path) -> bool:
    """Whether another process holds ClickHouse's lock on ``<path>/status``.

    chDB reports a held directory only as "Error initializing EmbeddedServer" (the "Cannot lock file"
    detail goes to stderr), so after a failed open the lock itself is asked.
    """
    try:
        fd = os.open(path / "status", os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing the descriptor also releases the probe's lock
    return False


class ChdbStore:
    """The Store port on chDB: a ClickHouse database in the local directory ``path``.

    ``start()`` opens the directory, creates ``database`` and applies pending migrations; unqualified
    table names in queries resolve in ``database``. One process per directory, and chDB allows one
    directory per process at a time.
    """

    def __init__(self, path: str | os.PathLike[str], database: str = "alphaengine") -> None:
        if not _IDENTIFIER.fullmatch(database):
            raise ConfigError([f"store.database: {database!r} is not a plain identifier"])
        self.path = Path(path)
        self.database = database
        self._executor: ThreadPoolExecutor | None = None
        self._session: chdb_session.Session | None = None  # used on the worker thread only

    async def start(self) -> None:
        """Open the directory, create the database, apply pending migrations (idempotent)."""
        if self._executor is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chdb")
        try:
            await self._run(self._open)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Close the session and stop the worker thread; releases the directory (idempotent)."""
        executor, self._executor = self._executor, None
        if executor is None:
            return
        closed = asyncio.get_running_loop().run_in_executor(executor, self._close_session)
        executor.shutdown(wait=False)
        # Shielded: if this close is cancelled the worker still closes the session and frees the lock.
        await asyncio.shield(closed)

    async def applied_migrations(self) -> list[int]:
        """The versions recorded in ``schema_migrations``, ascending."""
        return await self._run(self._applied_migrations)

    async def insert(self, table: str, rows: pa.Table) -> int:
        """Validate ``rows`` and insert them in one statement; returns the number of rows sent."""
        return await counted_insert(TABLES, table, rows, self._insert_async)

    async def _insert_async(self, spec: TableSpec, rows: pa.Table) -> None:
        await self._run(self._insert, spec, rows)

    async def query(self, sql: str) -> pa.Table:
        """Run a ClickHouse-dialect query; ``DateTime`` columns come back as ``timestamp[s, tz]``."""
        return await self._run(self._query, sql)

    async def drop_partition(self, table: str, partition: str) -> None:
        """``ALTER TABLE ... DROP PARTITION YYYYMMDD``; dropping a missing partition is not an error."""
        spec = find_table(TABLES, table)
        spec.check_partition(partition)
        sql = f"ALTER TABLE `{self.database}`.`{table}` DROP PARTITION {partition}"
        await self._run(self._execute, sql)

    async def partitions(self, table: str) -> dict[str, int]:
        """Active partitions from ``system.parts`` with their row counts (before de-duplication)."""
        find_table(TABLES, table).require_day_partitions()
        sql = (
            "SELECT partition, toInt64(sum(rows)) AS rows FROM system.parts "
            f"WHERE database = '{self.database}' AND table = '{table}' AND active "
            "GROUP BY partition ORDER BY partition"
        )
        result = await self._run(self._execute, sql)
        return dict(
            zip(result.column("partition").to_pylist(), result.column("rows").to_pylist(), strict=True)
        )

    async def _run(self, fn: Callable[[*Ts], T], *args: *Ts) -> T:
        if self._executor is None:
            raise StoreError(f"the chDB store on {self.path} is not started (or already closed)")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- on the worker thread ---------------------------------------------------------------------

    def _open(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            self._session = chdb_session.Session(str(self.path))  # type: ignore[no-untyped-call]
        except RuntimeError as exc:
            if _directory_held_elsewhere(self.path):
                raise StoreLockedError(
                    f"{self.path} is held by another process (chDB lets one process open a directory): "
                    "an engine is probably running on this directory; send commands through its admin "
                    "socket (alphaengine admin ...) instead of opening the store directly"
                ) from exc
            raise StoreError(f"chDB cannot open {self.path}: {exc}") from exc
        db = self.database
        self._execute(f"CREATE DATABASE IF NOT EXISTS `{db}`")
        # The session keeps its current database, so unqualified names in queries resolve in ours.
        self._execute(f"USE `{db}`")
        self._execute(MIGRATIONS_TABLE.create_sql(db))
        applied = set(self._applied_migrations())
        for migration in MIGRATIONS:
            if migration.version in applied:
                continue
            for spec in migration.tables:
                self._execute(spec.create_sql(db))
            for statement in migration.statements:
                self._execute(statement.format(db=db))
            record = pa.table(
                {
                    "version": pa.array([migration.version], pa.uint32()),
                    "name": pa.array([migration.name], pa.string()),
                    "applied_ns": pa.array([time.time_ns()], pa.int64()),
                }
            )
            self._insert(MIGRATIONS_TABLE, MIGRATIONS_TABLE.conform(record))
            log.info("applied migration %d (%s) to %s", migration.version, migration.name, self.path)

    def _close_session(self) -> None:
        if self._session is not None:
            self._session.close()  # type: ignore[no-untyped-call]
            self._session = None

    def _applied_migrations(self) -> list[int]:
        result = self._execute(f"SELECT version FROM `{MIGRATIONS_TABLE.name}` FINAL ORDER BY version")
        return [int(v) for v in result.column("version").to_pylist()]

    def _insert(self, spec: TableSpec, insert_rows: pa.Table) -> None:
        columns = ", ".join(f"`{c.name}`" for c in spec.columns)
        select = ", ".join(
            f"toDateTime(intDiv(`{c.derived_from_ns}`, 1000000000), 'UTC') AS `{c.name}`"
            if c.derived_from_ns
            else f"`{c.name}`"
            for c in spec.columns
        )
        target = f"`{self.database}`.`{spec.name}` ({columns})"
        # Python(insert_rows) is chDB's table function over a Python object: it finds the Arrow table by
        # looking up that name among the caller's local variables, so the parameter's name is load-bearing.
        self._execute(f"INSERT INTO {target} SELECT {select} FROM Python(insert_rows)")

    def _query(self, sql: str) -> pa.Table:
        result = self._execute(sql)
        if any(pa.types.is_uint32(f.type) for f in result.schema):
            result = self._with_datetimes(sql, result)
        return result

    def _with_datetimes(self, sql: str, result: pa.Table) -> pa.Table:
        """``result`` with its ``DateTime`` columns typed ``timestamp[s, tz]``.

        ClickHouse's Arrow output writes ``DateTime`` as bare ``uint32`` seconds, the same as ``UInt32``;
        ``DESCRIBE`` of the query tells them apart. Statements it cannot describe (``SHOW``, ...) are
        returned as they are.
        """
        # Newlines keep a trailing "-- comment" in the query from swallowing the closing parenthesis.
        statement = sql.strip().rstrip(";")
        try:
            described = self._execute(f"DESCRIBE TABLE (\n{statement}\n)")
        except StoreError:
            return result
        types = described.column("type").to_pylist()
        if len(types) != result.num_columns:
            return result
        for i, ch_type in enumerate(types):
            match = _DATETIME.fullmatch(ch_type)
            if match is not None and pa.types.is_uint32(result.schema.field(i).type):
                column = result.column(i).cast(pa.int64()).cast(pa.timestamp("s", tz=match["tz"] or "UTC"))
                result = result.set_column(i, result.schema.field(i).with_type(column.type), column)
        return result

    def _execute(self, sql: str) -> pa.Table:
        if self._session is None:
            raise StoreError(f"the chDB store on {self.path} is not open")
        try:
            result: pa.Table = self._session.query(sql, "ArrowTable")  # type: ignore[no-untyped-call]
        except RuntimeError as exc:
            raise StoreError(f"chDB: {exc}") from exc
        return result
