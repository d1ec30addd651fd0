"""The Store contract: what every store (in-memory, chDB, the ClickHouse server) must do.

A test module subclasses :class:`StoreContract` and provides an async fixture ``store`` yielding a started
store on a fresh, empty database. The SQL here is deliberately plain ClickHouse (``FINAL``, ``count()``,
``GROUP BY``, ``ORDER BY``) that ClickHouse 18.16, current ClickHouse and the in-memory store all run.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pytest

from alphaengine.errors import StoreError
from alphaengine.store import BARS, MIGRATIONS, TICKS, Store

NS = 1_000_000_000
DAY1_NS = 1_795_132_800 * NS  # 2026-11-20 00:00:00 UTC
DAY2_NS = DAY1_NS + 86_400 * NS


def tick_rows(
    trade_ids: list[int],
    *,
    start_ns: int = DAY1_NS,
    step_ns: int = 1_234_567_891,
    symbols: tuple[str, ...] = ("BTCUSDT", "ETHUSDT"),
    price: float = 97_123.456789,
) -> pa.Table:
    """Tick rows in TICKS' input schema, with sub-second times, both sides and awkward floats."""
    n = len(trade_ids)
    return pa.Table.from_pydict(
        {
            "venue": ["binance"] * n,
            "symbol": [symbols[i % len(symbols)] for i in range(n)],
            "trade_id": trade_ids,
            "ts_ns": [start_ns + i * step_ns for i in range(n)],
            "recv_ns": [start_ns + i * step_ns + 1_500_000 for i in range(n)],
            "price": [price + i * 0.01 for i in range(n)],
            "qty": [0.001 * (i + 1) for i in range(n)],
            "side": [1 if i % 2 else -1 for i in range(n)],
        },
        schema=TICKS.input_schema,
    )


def bar_rows(n: int, *, interval_s: int = 60) -> pa.Table:
    """``n`` consecutive bars of one symbol in BARS' input schema."""
    return pa.Table.from_pydict(
        {
            "venue": ["binance"] * n,
            "symbol": ["BTCUSDT"] * n,
            "interval_s": [interval_s] * n,
            "ts_ns": [DAY1_NS + i * interval_s * NS for i in range(n)],
            "open": [100.0 + i for i in range(n)],
            "high": [101.5 + i for i in range(n)],
            "low": [99.25 + i for i in range(n)],
            "close": [100.75 + i for i in range(n)],
            "volume": [3.5 * (i + 1) for i in range(n)],
            "quote_volume": [350.0 * (i + 1) for i in range(n)],
            "vwap": [100.1 + i for i in range(n)],
            "trade_count": [10 * (i + 1) for i in range(n)],
            "buy_volume": [2.0 * (i + 1) for i in range(n)],
            "sell_volume": [1.5 * (i + 1) for i in range(n)],
            "first_trade_id": [1000 * i for i in range(n)],
            "last_trade_id": [1000 * i + 999 for i in range(n)],
        },
        schema=BARS.input_schema,
    )


def expected_rows(rows: pa.Table) -> list[dict[str, Any]]:
    """What ``SELECT *`` returns for input rows: ``ts`` first, the whole seconds of ``ts_ns`` in UTC."""
    return [{"ts": datetime.fromtimestamp(row["ts_ns"] // NS, UTC), **row} for row in rows.to_pylist()]


async def scalar(store: Store, sql: str) -> Any:
    """The single value a one-row, one-column query returns."""
    result = await store.query(sql)
    assert result.shape == (1, 1), f"{sql!r} returned {result.shape}"
    return result.column(0)[0].as_py()


class StoreContract:
    """Tests every Store implementation passes; subclasses provide the ``store`` fixture."""

    async def test_start_applies_and_records_every_migration(self, store: Store) -> None:
        assert await store.applied_migrations() == [m.version for m in MIGRATIONS]
        recorded = await store.query("SELECT version, name FROM schema_migrations FINAL ORDER BY version")
        assert recorded.to_pylist() == [{"version": m.version, "name": m.name} for m in MIGRATIONS]

    async def test_a_new_database_has_empty_tables(self, store: Store) -> None:
        assert await scalar(store, "SELECT count() AS n FROM ticks FINAL") == 0
        assert await scalar(store, "SELECT count() AS n FROM bars FINAL") == 0

    async def test_ticks_read_back_exactly(self, store: Store) -> None:
        rows = tick_rows(list(range(1, 8)))
        assert await store.insert("ticks", rows) == 7

        result = await store.query("SELECT * FROM ticks FINAL ORDER BY symbol, trade_id")

        assert result.column_names == [c.name for c in TICKS.columns]
        assert result.schema.types == [c.arrow_type for c in TICKS.columns]
        expected = sorted(expected_rows(rows), key=lambda r: (r["symbol"], r["trade_id"]))
        assert result.to_pylist() == expected

    async def test_bars_read_back_exactly(self, store: Store) -> None:
        rows = bar_rows(5)
        assert await store.insert("bars", rows) == 5

        result = await store.query("SELECT * FROM bars FINAL ORDER BY symbol, interval_s, ts_ns")

        assert result.column_names == [c.name for c in BARS.columns]
        assert result.schema.types == [c.arrow_type for c in BARS.columns]
        assert result.to_pylist() == expected_rows(rows)

    async def test_columns_may_come_in_any_order(self, store: Store) -> None:
        rows = tick_rows([1, 2, 3])
        await store.insert("ticks", rows.select(list(reversed(rows.column_names))))

        result = await store.query("SELECT * FROM ticks FINAL ORDER BY trade_id")

        assert result.to_pylist() == expected_rows(rows)

    async def test_large_strings_are_accepted_as_strings(self, store: Store) -> None:
        rows = tick_rows([1, 2])
        large = rows.cast(
            pa.schema([f.with_type(pa.large_string()) if f.type == pa.string() else f for f in rows.schema])
        )
        await store.insert("ticks", large)

        result = await store.query("SELECT venue, symbol FROM ticks FINAL ORDER BY trade_id")

        assert result.schema.types == [pa.string(), pa.string()]
        assert result.to_pylist() == rows.select(["venue", "symbol"]).to_pylist()

    async def test_inserting_the_same_rows_twice_keeps_them_once(self, store: Store) -> None:
        rows = tick_rows(list(range(1, 11)))
        await store.insert("ticks", rows)
        await store.insert("ticks", rows)
        await store.insert("ticks", rows.slice(2, 3))

        assert await scalar(store, "SELECT count() AS n FROM ticks FINAL") == 10
        totals = await store.query(
            "SELECT symbol, sum(qty) AS q FROM ticks FINAL GROUP BY symbol ORDER BY symbol"
        )
        by_symbol: dict[str, float] = {}
        for row in rows.to_pylist():
            by_symbol[row["symbol"]] = by_symbol.get(row["symbol"], 0.0) + row["qty"]
        assert totals.column("symbol").to_pylist() == sorted(by_symbol)
        assert totals.column("q").to_pylist() == pytest.approx([by_symbol[s] for s in sorted(by_symbol)])

    async def test_a_reinserted_key_replaces_the_row(self, store: Store) -> None:
        first = tick_rows([1, 2], price=100.0)
        await store.insert("ticks", first)
        await store.insert("ticks", tick_rows([1], price=200.0))

        result = await store.query("SELECT trade_id, price FROM ticks FINAL ORDER BY trade_id")

        assert result.column("price").to_pylist() == [200.0, first.column("price")[1].as_py()]

    async def test_rows_over_two_days_make_two_partitions(self, store: Store) -> None:
        await store.insert("ticks", tick_rows([1, 2, 3], start_ns=DAY1_NS + 3600 * NS))
        await store.insert("ticks", tick_rows([4, 5], start_ns=DAY2_NS))

        assert await store.partitions("ticks") == {"20261120": 3, "20261121": 2}

    async def test_drop_partition_removes_one_day(self, store: Store) -> None:
        await store.insert("ticks", tick_rows([1, 2, 3], start_ns=DAY2_NS - 2 * NS))

        await store.drop_partition("ticks", "20261120")

        assert await store.partitions("ticks") == {"20261121": 1}
        result = await store.query("SELECT trade_id FROM ticks FINAL ORDER BY trade_id")
        assert result.column("trade_id").to_pylist() == [3]

    async def test_dropping_a_missing_partition_does_nothing(self, store: Store) -> None:
        await store.insert("ticks", tick_rows([1]))

        await store.drop_partition("ticks", "20200101")
        await store.drop_partition("bars", "20261120")

        assert await store.partitions("ticks") == {"20261120": 1}

    @pytest.mark.parametrize("partition", ["2026-11-20", "20261120 OR 1", "", "202611200"])
    async def test_a_malformed_partition_is_refused(self, store: Store, partition: str) -> None:
        await store.insert("ticks", tick_rows([1]))

        with pytest.raises(StoreError, match="partition"):
            await store.drop_partition("ticks", partition)
        assert await store.partitions("ticks") == {"20261120": 1}

    @pytest.mark.parametrize(
        ("column", "change"),
        [
            ("qty", lambda rows: rows.drop_columns(["qty"])),
            ("price", lambda rows: rows.set_column(5, "price", rows.column("price").cast(pa.float32()))),
            (
                "trade_id",
                lambda rows: rows.set_column(2, "trade_id", rows.column("trade_id").cast(pa.string())),
            ),
            ("extra", lambda rows: rows.append_column("extra", pa.array([1] * len(rows)))),
            ("ts", lambda rows: rows.append_column("ts", pa.array([0] * len(rows), pa.uint32()))),
            ("qty", lambda rows: rows.set_column(6, "qty", pa.array([None] * len(rows), pa.float64()))),
            ("qty", lambda rows: rows.append_column("qty", rows.column("qty"))),
        ],
        ids=["missing", "float32", "string-for-int", "unexpected", "derived", "nulls", "repeated"],
    )
    async def test_rows_of_the_wrong_schema_are_refused(self, store: Store, column: str, change: Any) -> None:
        with pytest.raises(StoreError) as caught:
            await store.insert("ticks", change(tick_rows([1, 2])))

        assert "ticks" in str(caught.value)
        assert repr(column) in str(caught.value)
        assert not caught.value.retriable
        assert await scalar(store, "SELECT count() AS n FROM ticks FINAL") == 0

    async def test_an_unknown_table_is_refused(self, store: Store) -> None:
        with pytest.raises(StoreError, match="no_such_table"):
            await store.insert("no_such_table", tick_rows([1]))
        with pytest.raises(StoreError, match="no_such_table"):
            await store.partitions("no_such_table")

    async def test_an_empty_insert_does_nothing(self, store: Store) -> None:
        assert await store.insert("ticks", TICKS.input_schema.empty_table()) == 0
        assert await store.insert("bars", bar_rows(0)) == 0

        assert await scalar(store, "SELECT count() AS n FROM ticks FINAL") == 0
        assert await store.partitions("ticks") == {}

    async def test_a_query_the_store_cannot_run_raises_store_error(self, store: Store) -> None:
        with pytest.raises(StoreError):
            await store.query("SELECT no_such_column FROM ticks")
        with pytest.raises(StoreError):
            await store.query("SELECT count() AS n FROM no_such_table")
