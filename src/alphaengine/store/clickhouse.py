"""The Store port on a ClickHouse server, over the native protocol with asynch.

The store keeps a small pool of connections (``pool_size``) whose default database is the configured
one, so unqualified table names in queries resolve there. A connection that saw any error, a server
exception included, is closed rather than reused: after an exception asynch can leave a connection out
of step with the server ("expected Pong, got Exception" on ClickHouse 18.16).

Errors: connection failures and timeouts (and the few server errors that are about load, not the
request) are retried with capped exponential backoff, ``retry_attempts`` times in all; if they persist
the caller gets a retriable :class:`~alphaengine.errors.StoreError` naming the server. Every request is
idempotent (inserts by the table's key, DDL with ``IF NOT EXISTS``, dropping a partition), so a retry
after an attempt whose outcome is unknown is safe. What retrying cannot fix (SQL errors, unknown tables
or columns, type mismatches) is a :class:`~alphaengine.store.base.StoreRequestError` carrying the
server's message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import pyarrow as pa
import pyarrow.compute as pc
from asynch.errors import ColumnException, ErrorCode, ServerException
from asynch.errors import Error as AsynchError
from asynch.proto.connection import Connection

from alphaengine.backoff import Backoff
from alphaengine.config import ClickHouseStoreConfig
from alphaengine.errors import ConfigError, StoreError
from alphaengine.store.base import StoreRequestError, TableSpec, counted_insert, find_table
from alphaengine.store.schema import MIGRATIONS, MIGRATIONS_TABLE, TABLES

log = logging.getLogger(__name__)

T = TypeVar("T")

_NS_PER_S = 1_000_000_000
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_UTC_ZONES = frozenset({"UTC", "Etc/UTC", "Etc/UCT", "UCT", "Etc/Universal", "Universal", "Zulu"})

_TRANSPORT_ERRORS = (OSError, EOFError, AsynchError)
"""What a broken, refused or timed-out connection raises (``TimeoutError`` is an ``OSError``)."""

_RETRIABLE_SERVER_CODES = frozenset(
    {
        ErrorCode.TIMEOUT_EXCEEDED,
        ErrorCode.TOO_SLOW,
        ErrorCode.CANNOT_ALLOCATE_MEMORY,
        ErrorCode.TOO_MANY_SIMULTANEOUS_QUERIES,
        ErrorCode.NO_FREE_CONNECTION,
        ErrorCode.SOCKET_TIMEOUT,
        ErrorCode.NETWORK_ERROR,
        ErrorCode.ABORTED,  # a server shutting down aborts the queries it runs
        ErrorCode.MEMORY_LIMIT_EXCEEDED,
        ErrorCode.TABLE_IS_READ_ONLY,
        ErrorCode.TOO_MANY_PARTS,  # inserts faster than merges: backing off is the remedy
        ErrorCode.ALL_CONNECTION_TRIES_FAILED,
        ErrorCode.UNKNOWN_STATUS_OF_INSERT,
        ErrorCode.ALL_REPLICAS_ARE_STALE,
        ErrorCode.QUERY_WAS_CANCELLED,
        ErrorCode.KEEPER_EXCEPTION,
    }
)
"""Server exceptions about the server's state or load rather than the request: worth another attempt."""

_SIMPLE_TYPES: dict[str, pa.DataType] = {
    "String": pa.string(),
    "Int8": pa.int8(),
    "Int16": pa.int16(),
    "Int32": pa.int32(),
    "Int64": pa.int64(),
    "UInt8": pa.uint8(),
    "UInt16": pa.uint16(),
    "UInt32": pa.uint32(),
    "UInt64": pa.uint64(),
    "Float32": pa.float32(),
    "Float64": pa.float64(),
    "Date": pa.date32(),
    "Bool": pa.bool_(),
    "Nothing": pa.null(),
}
_WRAPPER = re.compile(r"(?P<outer>Nullable|LowCardinality|Array)\((?P<inner>.*)\)")
_DATETIME = re.compile(r"DateTime(?:\('(?P<tz>[^']*)'\))?")
_DATETIME64 = re.compile(r"DateTime64\((?P<precision>\d+)(?:,\s*'(?P<tz>[^']*)')?\)")
_DECIMAL = re.compile(r"Decimal\((?P<precision>\d+),\s*(?P<scale>\d+)\)")
_NAIVE_DATETIME = re.compile(r"\bDateTime(?:64\(\d+\))?(?!\(|64)")
"""A ``DateTime`` without a time zone anywhere in a type: asynch reads it as the server's wall time."""


def _config_problems(config: ClickHouseStoreConfig) -> list[str]:
    problems = []
    if not _IDENTIFIER.fullmatch(config.database):
        problems.append(f"store.database: {config.database!r} is not a plain identifier")
    if not 0 < config.port < 65536:
        problems.append(f"store.port: {config.port} is not a TCP port")
    if config.pool_size < 1:
        problems.append(f"store.pool_size: {config.pool_size} must be at least 1")
    if config.retry_attempts < 1:
        problems.append(f"store.retry_attempts: {config.retry_attempts} must be at least 1")
    for key in ("connect_timeout_s", "query_timeout_s"):
        if getattr(config, key) <= 0:
            problems.append(f"store.{key}: {getattr(config, key)} must be positive")
    if not 0 < config.backoff_initial_s <= config.backoff_max_s:
        problems.append(
            f"store.backoff_initial_s, store.backoff_max_s: need 0 < initial <= max, got "
            f"{config.backoff_initial_s}, {config.backoff_max_s}"
        )
    return problems


class ClickHouseStore:
    """The Store port on a ClickHouse server (18.16 or current); see the module docstring for errors.

    ``start()`` connects, creates ``config.database`` and applies pending migrations, recording them in
    ``schema_migrations``. ``DateTime`` columns of query results are ``timestamp[s, tz]`` (``UTC`` when
    the column has no time zone).
    """

    def __init__(self, config: ClickHouseStoreConfig) -> None:
        problems = _config_problems(config)
        if problems:
            raise ConfigError(problems)
        self.config = config
        self.database = config.database
        self._where = f"ClickHouse at {config.host}:{config.port}"
        self._slots: asyncio.Semaphore | None = None  # None unless started
        self._idle: list[Connection] = []
        self._server_zone: ZoneInfo | None = None
        """The server's time zone when it is not UTC: tz-less ``DateTime`` values come in its wall time."""

    async def start(self) -> None:
        """Connect, create the database, apply pending migrations (idempotent).

        Raises a retriable StoreError naming the server when it cannot be reached.
        """
        if self._slots is not None:
            return
        self._slots = asyncio.Semaphore(self.config.pool_size)
        try:
            await self._open()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Close the idle connections (idempotent); a request still running closes its own when done."""
        self._slots = None
        idle, self._idle = self._idle, []
        for connection in idle:
            await _discard(connection)

    async def applied_migrations(self) -> list[int]:
        """The versions recorded in ``schema_migrations``, ascending."""
        result = await self.query(
            f"SELECT version FROM `{self.database}`.`{MIGRATIONS_TABLE.name}` FINAL ORDER BY version"
        )
        return [int(v) for v in result.column("version").to_pylist()]

    async def insert(self, table: str, rows: pa.Table) -> int:
        """Validate ``rows`` and insert them in one statement; returns the number of rows sent."""
        return await counted_insert(TABLES, table, rows, self._insert)

    async def query(self, sql: str) -> pa.Table:
        """Run a ClickHouse-dialect query; unqualified table names resolve in the configured database."""

        async def select(connection: Connection) -> tuple[list[Sequence[Any]], list[tuple[str, str]]]:
            columns, types = await connection.execute(sql, with_column_types=True, columnar=True)
            return columns, types

        columns, types = await self._request("query", select)
        return _to_arrow(columns, types, self._server_zone)

    async def drop_partition(self, table: str, partition: str) -> None:
        """``ALTER TABLE ... DROP PARTITION YYYYMMDD``; dropping a missing partition is not an error."""
        spec = find_table(TABLES, table)
        spec.check_partition(partition)
        await self._execute(
            f"drop partition {partition} of {table}",
            f"ALTER TABLE `{self.database}`.`{table}` DROP PARTITION {partition}",
        )

    async def partitions(self, table: str) -> dict[str, int]:
        """Active partitions from ``system.parts`` with their row counts (before de-duplication)."""
        find_table(TABLES, table).require_day_partitions()
        result = await self.query(
            "SELECT partition, toInt64(sum(rows)) AS rows FROM system.parts "
            f"WHERE database = '{self.database}' AND table = '{table}' AND active "
            "GROUP BY partition ORDER BY partition"
        )
        return dict(
            zip(result.column("partition").to_pylist(), result.column("rows").to_pylist(), strict=True)
        )

    # -- start ------------------------------------------------------------------------------------

    async def _open(self) -> None:
        db = self.database

        async def create_database(connection: Connection) -> tuple[str, str]:
            await connection.execute(f"CREATE DATABASE IF NOT EXISTS `{db}`")
            rows = await connection.execute("SELECT version(), timezone()")
            version, zone = rows[0]
            return str(version), str(zone)

        # The pool's connections open in the configured database, which may not exist yet: this one
        # opens in the user's default database instead.
        version, zone = await self._request("create the database", create_database, database="")
        self._server_zone = None if zone in _UTC_ZONES else ZoneInfo(zone)
        log.info("connected to ClickHouse %s (time zone %s) at %s", version, zone, self._where)

        await self._execute("create schema_migrations", MIGRATIONS_TABLE.create_sql(db))
        applied = set(await self.applied_migrations())
        for migration in MIGRATIONS:
            if migration.version in applied:
                continue
            what = f"migration {migration.version} ({migration.name})"
            for spec in migration.tables:
                await self._execute(what, spec.create_sql(db))
            for statement in migration.statements:
                await self._execute(what, statement.format(db=db))
            record = pa.table(
                {
                    "version": pa.array([migration.version], pa.uint32()),
                    "name": pa.array([migration.name], pa.string()),
                    "applied_ns": pa.array([time.time_ns()], pa.int64()),
                }
            )
            await self._insert(MIGRATIONS_TABLE, MIGRATIONS_TABLE.conform(record))
            log.info(
                "applied migration %d (%s) to %s on %s", migration.version, migration.name, db, self._where
            )

    # -- requests ---------------------------------------------------------------------------------

    async def _insert(self, spec: TableSpec, rows: pa.Table) -> None:
        names = ", ".join(f"`{c.name}`" for c in spec.columns)
        statement = f"INSERT INTO `{self.database}`.`{spec.name}` ({names}) VALUES"
        columns = _insert_columns(spec, rows)

        async def insert(connection: Connection) -> None:
            # asynch slices the columns into blocks of new lists, so a retry can send the same lists.
            await connection.execute(statement, columns, columnar=True)

        await self._request(f"insert into {spec.name}", insert)

    async def _execute(self, what: str, sql: str) -> None:
        async def execute(connection: Connection) -> None:
            await connection.execute(sql)

        await self._request(what, execute)

    async def _request(
        self, what: str, run: Callable[[Connection], Awaitable[T]], *, database: str | None = None
    ) -> T:
        """``run`` on a connection, retried on connection errors and timeouts with backoff."""
        config = self.config
        backoff = Backoff(config.backoff_initial_s, config.backoff_max_s)
        for attempt in range(1, config.retry_attempts + 1):
            try:
                return await self._attempt(what, run, database)
            except StoreError as exc:
                if not exc.retriable or self._slots is None:
                    raise
                if attempt == config.retry_attempts:
                    raise StoreError(f"{exc} (gave up after {attempt} attempt(s))") from exc
                delay = backoff.next_delay()
                log.warning("%s; attempt %d of %d in %.2fs", exc, attempt + 1, config.retry_attempts, delay)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _attempt(self, what: str, run: Callable[[Connection], Awaitable[T]], database: str | None) -> T:
        """One attempt of a request on a pooled connection (a fresh one in ``database`` if given)."""
        slots = self._slots
        if slots is None:
            raise self._closed_error()
        async with slots:
            if self._slots is not slots:  # closed while this request waited for a connection
                raise self._closed_error()
            pooled = database is None
            if pooled and self._idle:
                connection = self._idle.pop()
            else:
                connection = self._connection(self.database if database is None else database)
            timeout_s = self.config.query_timeout_s
            deadline = asyncio.timeout(timeout_s)
            # The socket is cut at the deadline too: asynch's cleanup of a cancelled request waits for
            # unsent data to drain, which a peer that stopped reading (a partition, a frozen server) never
            # lets happen.
            cut = asyncio.get_running_loop().call_later(timeout_s, _cut, connection)
            try:
                async with deadline:
                    result = await run(connection)
            except ServerException as exc:
                await _discard(connection)
                raise self._server_error(what, exc) from exc
            except ColumnException as exc:
                await _discard(connection)
                raise StoreRequestError(
                    f"{self._where}: {what}: asynch cannot send the values: {exc}"
                ) from exc
            except _TRANSPORT_ERRORS as exc:
                await _discard(connection)
                if deadline.expired():
                    why = f"no answer within {timeout_s}s"
                else:
                    why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                raise StoreError(f"{self._where}: {what}: {why}") from exc
            except BaseException:
                await _discard(connection)
                raise
            finally:
                cut.cancel()
            if pooled and self._slots is slots:
                self._idle.append(connection)
            else:
                await _discard(connection)
            return result

    def _connection(self, database: str) -> Connection:
        config = self.config
        return Connection(  # type: ignore[no-untyped-call]
            host=config.host,
            port=config.port,
            database=database,
            user=config.user,
            password=config.password,
            secure=config.secure,
            connect_timeout=config.connect_timeout_s,
            # The liveness ping before each request on a pooled connection: a hung server fails it fast.
            sync_request_timeout=config.connect_timeout_s,
            send_receive_timeout=config.query_timeout_s,
        )

    def _closed_error(self) -> StoreError:
        return StoreError(f"the store on {self._where} is not started (or already closed)")

    def _server_error(self, what: str, exc: ServerException) -> StoreError:
        message = f"{self._where}: {what}: {str(exc.message).strip()} (code {exc.code})"
        if exc.code in _RETRIABLE_SERVER_CODES:
            return StoreError(message)
        return StoreRequestError(message)


def _insert_columns(spec: TableSpec, rows: pa.Table) -> list[list[Any]]:
    """The values of ``spec``'s columns as Python lists, the derived ``DateTime``s as epoch seconds."""
    columns = []
    for column in spec.columns:
        if column.derived_from_ns is not None:
            seconds = pc.divide(rows.column(column.derived_from_ns), _NS_PER_S)
            columns.append(seconds.to_numpy().tolist())
        elif pa.types.is_string(column.arrow_type):
            columns.append(rows.column(column.name).to_pylist())
        else:
            # Through NumPy: several times faster than Arrow's to_pylist for numbers.
            columns.append(rows.column(column.name).to_numpy().tolist())
    return columns


def _to_arrow(
    columns: list[Sequence[Any]], types: list[tuple[str, str]], server_zone: ZoneInfo | None
) -> pa.Table:
    """A result as asynch gives it (``columnar=True``) as an Arrow table of the mapped types.

    ``server_zone``: the server's time zone if it is not UTC, in whose wall time asynch gives the values
    of ``DateTime`` columns that have no zone of their own.
    """
    arrays = []
    for i, (name, ch_type) in enumerate(types):
        # A result without rows comes back without columns.
        values: Sequence[Any] = columns[i] if columns else ()
        if server_zone is not None and _NAIVE_DATETIME.search(ch_type):
            values = [_in_zone(v, server_zone) for v in values]
        try:
            arrays.append(pa.array(values, _arrow_type(ch_type)))
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
            raise StoreRequestError(
                f"query: column {name!r} of type {ch_type} has no Arrow equivalent ({exc}); "
                "convert it in SQL, for example with toString()"
            ) from exc
    return pa.Table.from_arrays(arrays, names=[name for name, _ in types])


def _arrow_type(ch_type: str) -> pa.DataType | None:
    """The Arrow type for a ClickHouse type; None leaves it to Arrow to infer from the values."""
    simple = _SIMPLE_TYPES.get(ch_type)
    if simple is not None:
        return simple
    if ch_type.startswith(("FixedString(", "Enum8(", "Enum16(")):
        return pa.string()  # asynch reads both as str
    if match := _WRAPPER.fullmatch(ch_type):
        inner = _arrow_type(match["inner"])
        if match["outer"] != "Array" or inner is None:
            return inner
        return pa.list_(inner)
    if match := _DATETIME.fullmatch(ch_type):
        return pa.timestamp("s", tz=match["tz"] or "UTC")
    if match := _DATETIME64.fullmatch(ch_type):
        precision = int(match["precision"])
        unit = "s" if precision == 0 else "ms" if precision <= 3 else "us"  # asynch keeps microseconds
        return pa.timestamp(unit, tz=match["tz"] or "UTC")
    if match := _DECIMAL.fullmatch(ch_type):
        precision = int(match["precision"])
        factory = pa.decimal128 if precision <= 38 else pa.decimal256
        return factory(precision, int(match["scale"]))
    return None


def _in_zone(value: Any, zone: ZoneInfo) -> Any:
    """A naive ``datetime`` (or a list of them, nested) as the aware time it is in ``zone``."""
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=zone)
    if isinstance(value, list):
        return [_in_zone(v, zone) for v in value]
    return value


def _cut(connection: Connection) -> None:
    """Close a connection's socket at once, dropping whatever it has not sent yet."""
    buffered = getattr(connection, "writer", None)  # asynch's BufferedWriter, None unless connected
    stream = getattr(buffered, "writer", None)
    if isinstance(stream, asyncio.StreamWriter):
        stream.transport.abort()


async def _discard(connection: Connection) -> None:
    """Close a connection for good: it is never reused after an error.

    The socket is cut first, so closing cannot wait on a peer that stopped reading.
    """
    _cut(connection)
    with contextlib.suppress(OSError, EOFError, AsynchError):
        await connection.disconnect()
