"""The Store port: tables with idempotent batched inserts and SQL queries (ClickHouse dialect).

Tables are declared once (:class:`TableSpec`, see :mod:`alphaengine.store.schema`) and used by every
implementation: the ClickHouse server, chDB (embedded ClickHouse) and the in-memory fake. Inserts are
idempotent by the table's key, as with ClickHouse's ReplacingMergeTree: inserting a row again with the
same key leaves one row once merged, and queries that must see unique rows use ``FINAL``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import pyarrow as pa

from alphaengine.errors import StoreError
from alphaengine.metrics import STORE_INSERT_ERRORS, STORE_INSERT_SECONDS, STORE_INSERTS

DAY_PARTITION = "toYYYYMMDD(ts)"
"""The partition expression of day-partitioned tables; their partitions are named ``YYYYMMDD``."""

_DAY = re.compile(r"[0-9]{8}")

_STRING_TYPES = (pa.large_string(), pa.string_view())
"""Arrow's other layouts of UTF-8 strings (polars writes them), accepted where ``string`` is expected."""


class StoreRequestError(StoreError):
    """A store request that cannot succeed as made, so retrying it unchanged is pointless.

    For example an unknown table, rows that do not fit the table's schema, a malformed partition, or SQL
    the store cannot run.
    """

    retriable = False


@dataclass(frozen=True, slots=True)
class Column:
    """A table column: its ClickHouse type and its Arrow type.

    A column with ``derived_from_ns`` is not supplied by the writer: the store computes it as the
    ``DateTime`` (UTC, whole seconds) of that nanosecond column (used for the ``ts`` partition column).
    """

    name: str
    ch_type: str
    arrow_type: pa.DataType
    derived_from_ns: str | None = None


@dataclass(frozen=True, slots=True)
class TableSpec:
    """A table: its columns, the idempotency key (ClickHouse ``ORDER BY``) and its partitioning."""

    name: str
    columns: tuple[Column, ...]
    key: tuple[str, ...]
    partition_by: str | None = DAY_PARTITION
    engine: str = "ReplacingMergeTree()"
    doc: str = field(default="", compare=False)

    @property
    def input_columns(self) -> tuple[Column, ...]:
        """The columns a writer supplies (all but the derived ones)."""
        return tuple(c for c in self.columns if c.derived_from_ns is None)

    @property
    def input_schema(self) -> pa.Schema:
        """The Arrow schema of the rows :meth:`Store.insert` accepts for this table."""
        return pa.schema([pa.field(c.name, c.arrow_type, nullable=False) for c in self.input_columns])

    def conform(self, rows: pa.Table) -> pa.Table:
        """``rows`` checked against :attr:`input_schema`, in its column order, ready to insert.

        Raises StoreRequestError naming the table and the column when a column is missing, unexpected
        (derived columns included: the store computes them), of another type, or holds nulls (ClickHouse
        would silently store a default value instead). ``large_string`` and ``string_view`` columns are
        accepted as ``string``.
        """
        expected = self.input_schema
        names = rows.column_names
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise StoreRequestError(f"insert into {self.name}: column(s) given more than once: {repeated}")
        extra = [name for name in names if expected.get_field_index(name) < 0]
        if extra:
            derived = {c.name: c.derived_from_ns for c in self.columns if c.derived_from_ns}
            why = "; ".join(
                f"{name!r} is computed by the store from {derived[name]!r}" if name in derived else repr(name)
                for name in extra
            )
            raise StoreRequestError(f"insert into {self.name}: unexpected column(s): {why}")
        columns = []
        for want in expected:
            if rows.schema.get_field_index(want.name) < 0:
                raise StoreRequestError(
                    f"insert into {self.name}: column {want.name!r} ({want.type}) is missing"
                )
            column = rows.column(want.name)
            if column.type != want.type:
                if want.type != pa.string() or column.type not in _STRING_TYPES:
                    raise StoreRequestError(
                        f"insert into {self.name}: column {want.name!r} has type {column.type}, "
                        f"expected {want.type}"
                    )
                column = column.cast(pa.string())
            if column.null_count:
                raise StoreRequestError(
                    f"insert into {self.name}: column {want.name!r} holds {column.null_count} null(s)"
                )
            columns.append(column)
        return pa.Table.from_arrays(columns, schema=expected)

    def require_day_partitions(self) -> None:
        """Raise StoreRequestError unless the table is partitioned by day (:data:`DAY_PARTITION`)."""
        if self.partition_by != DAY_PARTITION:
            raise StoreRequestError(f"table {self.name} is not partitioned by day")

    def check_partition(self, partition: str) -> None:
        """Raise StoreRequestError unless the table is partitioned by day and ``partition`` is ``YYYYMMDD``.

        Stores put the partition into SQL, so this check is also what keeps SQL out of it.
        """
        self.require_day_partitions()
        if not _DAY.fullmatch(partition):
            raise StoreRequestError(f"table {self.name}: partition {partition!r} is not of the form YYYYMMDD")

    def create_sql(self, database: str) -> str:
        """``CREATE TABLE IF NOT EXISTS`` in DDL that ClickHouse 18.16 and current ClickHouse accept."""
        cols = ",\n  ".join(f"`{c.name}` {c.ch_type}" for c in self.columns)
        partition = f"\nPARTITION BY {self.partition_by}" if self.partition_by else ""
        return (
            f"CREATE TABLE IF NOT EXISTS `{database}`.`{self.name}` (\n  {cols}\n)\n"
            f"ENGINE = {self.engine}{partition}\nORDER BY ({', '.join(self.key)})"
        )


def find_table(tables: Mapping[str, TableSpec], name: str) -> TableSpec:
    """The spec of table ``name``; StoreRequestError naming the known tables if there is none."""
    spec = tables.get(name)
    if spec is None:
        raise StoreRequestError(f"unknown table {name!r} (tables: {', '.join(sorted(tables))})")
    return spec


@dataclass(frozen=True, slots=True)
class Migration:
    """One versioned schema change: a version number, a name, and what it does to a database."""

    version: int
    name: str
    tables: tuple[TableSpec, ...] = ()
    statements: tuple[str, ...] = ()
    """Extra SQL with ``{db}`` standing for the database name, run after the tables are created."""


@runtime_checkable
class Store(Protocol):
    """Tables with idempotent batched inserts and ClickHouse-dialect queries."""

    async def start(self) -> None:
        """Open connections and apply pending migrations; returns when the store can be used."""
        ...

    async def close(self) -> None:
        """Release every resource (idempotent)."""
        ...

    async def applied_migrations(self) -> list[int]:
        """The versions of the migrations recorded as applied, ascending."""
        ...

    async def insert(self, table: str, rows: pa.Table) -> int:
        """Insert rows (the table's :attr:`TableSpec.input_schema`); returns the number of rows sent."""
        ...

    async def query(self, sql: str) -> pa.Table:
        """Run a ClickHouse-dialect ``SELECT`` and return its result."""
        ...

    async def drop_partition(self, table: str, partition: str) -> None:
        """Drop one day partition (``YYYYMMDD``) of a table."""
        ...

    async def partitions(self, table: str) -> dict[str, int]:
        """Active partitions of a table with their row counts (before de-duplication)."""
        ...


async def counted_insert(
    tables: Mapping[str, TableSpec],
    table: str,
    rows: pa.Table,
    write: Callable[[TableSpec, pa.Table], Awaitable[None]],
) -> int:
    """Validate ``rows`` for ``table`` and hand them to ``write``, counting statements, errors and time.

    Shared by every store so their insert metrics mean the same; returns the number of rows written.
    """
    spec = find_table(tables, table)
    errors = STORE_INSERT_ERRORS.labels(table)  # a zero from the first insert on, for rates and alerts
    started = time.perf_counter()
    try:
        conformed = spec.conform(rows)
        if conformed.num_rows == 0:
            return 0
        STORE_INSERTS.labels(table).inc()
        await write(spec, conformed)
    except StoreError:
        errors.inc()
        raise
    STORE_INSERT_SECONDS.labels(table).observe(time.perf_counter() - started)
    written: int = conformed.num_rows
    return written
