"""The Store port: tables with idempotent batched inserts and SQL queries (ClickHouse dialect).

Tables are declared once (:class:`TableSpec`, see :mod:`alphaengine.store.schema`) and used by every
implementation: the ClickHouse server, chDB (embedded ClickHouse) and the in-memory fake. Inserts are
idempotent by the table's key, as with ClickHouse's ReplacingMergeTree: inserting a row again with the
same key leaves one row once merged, and queries that must see unique rows use ``FINAL``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import pyarrow as pa


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
    partition_by: str | None = "toYYYYMMDD(ts)"
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

    def create_sql(self, database: str) -> str:
        """``CREATE TABLE IF NOT EXISTS`` in DDL that ClickHouse 18.16 and current ClickHouse accept."""
        cols = ",\n  ".join(f"`{c.name}` {c.ch_type}" for c in self.columns)
        partition = f"\nPARTITION BY {self.partition_by}" if self.partition_by else ""
        return (
            f"CREATE TABLE IF NOT EXISTS `{database}`.`{self.name}` (\n  {cols}\n)\n"
            f"ENGINE = {self.engine}{partition}\nORDER BY ({', '.join(self.key)})"
        )


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
