"""The in-memory store: the Store port's semantics inside the process, for tests and throwaway runs.

Rows are kept per table as polars frames, already de-duplicated by the table's key (what ClickHouse's
ReplacingMergeTree shows after a merge), so ``FINAL`` is a no-op here. Queries go through polars' SQL
engine, which covers the simple ClickHouse-dialect SELECTs the engine and the tests use; anything else
is refused with a StoreRequestError naming the problem.
"""

from __future__ import annotations

import re
import time

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from alphaengine.errors import StoreError
from alphaengine.store.base import StoreRequestError, TableSpec, counted_insert, find_table
from alphaengine.store.schema import MIGRATIONS, MIGRATIONS_TABLE, TABLES

_NS_PER_S = 1_000_000_000

# String literals are matched first so that a FINAL or count() inside quotes is left alone.
_CLICKHOUSE_ONLY = re.compile(r"'(?:[^'\\]|\\.)*'|(?P<final>\bFINAL\b)|(?P<count>\bcount\s*\(\s*\))", re.I)


def _to_polars_sql(sql: str) -> str:
    """ClickHouse-dialect SQL rewritten for polars: ``FINAL`` dropped, ``count()`` as ``count(*)``."""

    def rewrite(match: re.Match[str]) -> str:
        if match.group("final"):
            return ""
        if match.group("count"):
            return "count(*)"
        return match.group(0)

    return _CLICKHOUSE_ONLY.sub(rewrite, sql)


def _with_derived_columns(spec: TableSpec, rows: pa.Table) -> pa.Table:
    """Conformed input rows with the derived columns added, in the table's column order."""
    columns = []
    for column in spec.columns:
        if column.derived_from_ns is None:
            columns.append(rows.column(column.name))
        else:
            seconds = pc.divide(rows.column(column.derived_from_ns), _NS_PER_S)
            columns.append(seconds.cast(pa.int64()).cast(column.arrow_type))
    return pa.Table.from_arrays(columns, schema=_full_schema(spec))


def _full_schema(spec: TableSpec) -> pa.Schema:
    return pa.schema([pa.field(c.name, c.arrow_type, nullable=False) for c in spec.columns])


def _clickhouse_types(result: pa.Table) -> pa.Table:
    """A polars result with the Arrow types ClickHouse stores give: ``string``, ``DateTime`` in seconds.

    Polars writes strings as ``large_string``/``string_view`` and keeps datetimes in milliseconds or
    finer, while every datetime here comes from a ``DateTime`` column, which has whole seconds.
    """
    fields = []
    for f in result.schema:
        if pa.types.is_large_string(f.type) or pa.types.is_string_view(f.type):
            fields.append(f.with_type(pa.string()))
        elif pa.types.is_timestamp(f.type):
            fields.append(f.with_type(pa.timestamp("s", tz=f.type.tz or "UTC")))
        else:
            fields.append(f)
    return result.cast(pa.schema(fields), safe=False)


class MemoryStore:
    """The Store port in memory: idempotent by key, partitioned by day, queried with polars SQL.

    Data lives from :meth:`start` to :meth:`close`; every migration counts as applied at start.
    """

    def __init__(self) -> None:
        self._frames: dict[str, pl.DataFrame] | None = None

    async def start(self) -> None:
        """Create every table empty and record every migration as applied."""
        if self._frames is not None:
            return
        self._frames = {name: pl.DataFrame(_full_schema(spec).empty_table()) for name, spec in TABLES.items()}
        applied_ns = time.time_ns()
        migrations = pa.table(
            {
                "version": pa.array([m.version for m in MIGRATIONS], pa.uint32()),
                "name": pa.array([m.name for m in MIGRATIONS], pa.string()),
                "applied_ns": pa.array([applied_ns] * len(MIGRATIONS), pa.int64()),
            }
        )
        self._put(MIGRATIONS_TABLE, MIGRATIONS_TABLE.conform(migrations))

    async def close(self) -> None:
        """Drop every table's data (idempotent)."""
        self._frames = None

    async def applied_migrations(self) -> list[int]:
        """The versions recorded in ``schema_migrations``, ascending."""
        versions = self._frame(MIGRATIONS_TABLE.name).get_column("version")
        return sorted(int(v) for v in versions)

    async def insert(self, table: str, rows: pa.Table) -> int:
        """Validate ``rows``, add derived columns and replace rows with the same key; returns len(rows)."""
        return await counted_insert(TABLES, table, rows, self._put_async)

    async def _put_async(self, spec: TableSpec, rows: pa.Table) -> None:
        self._put(spec, rows)

    async def query(self, sql: str) -> pa.Table:
        """Run a simple ClickHouse-dialect SELECT through polars SQL (``FINAL`` is implied)."""
        frames = self._require_started()
        context = pl.SQLContext(frames={name: frame.lazy() for name, frame in frames.items()})
        try:
            result = context.execute(_to_polars_sql(sql), eager=True)
        except pl.exceptions.PolarsError as exc:
            # Polars appends the resolved query plan to the message; its first line says what failed.
            problem = str(exc).strip().splitlines()[0]
            raise StoreRequestError(f"the in-memory store cannot run this query: {problem}") from exc
        return _clickhouse_types(result.to_arrow())

    async def drop_partition(self, table: str, partition: str) -> None:
        """Remove every row of one day (``YYYYMMDD``); a day with no rows is not an error."""
        spec = find_table(TABLES, table)
        spec.check_partition(partition)
        frames = self._require_started()
        frames[table] = frames[table].filter(pl.col("ts").dt.strftime("%Y%m%d") != partition)

    async def partitions(self, table: str) -> dict[str, int]:
        """Row counts per day (``YYYYMMDD``) of a table partitioned by day."""
        spec = find_table(TABLES, table)
        spec.require_day_partitions()
        days = self._frame(table).group_by(pl.col("ts").dt.strftime("%Y%m%d").alias("day")).len()
        return dict(sorted(zip(days.get_column("day"), days.get_column("len"), strict=True)))

    def _require_started(self) -> dict[str, pl.DataFrame]:
        if self._frames is None:
            raise StoreError("the in-memory store is not started (or already closed)")
        return self._frames

    def _frame(self, table: str) -> pl.DataFrame:
        return self._require_started()[table]

    def _put(self, spec: TableSpec, conformed: pa.Table) -> None:
        frames = self._require_started()
        new = pl.DataFrame(_with_derived_columns(spec, conformed))
        # keep="last": a re-inserted key replaces the earlier row, as ReplacingMergeTree keeps the last.
        frames[spec.name] = pl.concat([frames[spec.name], new]).unique(
            subset=list(spec.key), keep="last", maintain_order=True
        )
