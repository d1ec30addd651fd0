"""The tables of alphaengine and the migrations that create them.

DDL rules (so that the Debian ClickHouse 18.16 server and current ClickHouse both accept it): ``DateTime``
plus an integer nanosecond column rather than ``DateTime64``; no ``LowCardinality``, no codecs, no TTL
(retention is the archiver's job); ``ReplacingMergeTree`` keyed by the natural idempotency key.
"""

from __future__ import annotations

import pyarrow as pa

from alphaengine.store.base import Column, Migration, TableSpec

_TS = Column("ts", "DateTime('UTC')", pa.timestamp("s", tz="UTC"), derived_from_ns="ts_ns")
_VENUE = Column("venue", "String", pa.string())
_SYMBOL = Column("symbol", "String", pa.string())


def _f64(name: str) -> Column:
    return Column(name, "Float64", pa.float64())


def _i64(name: str) -> Column:
    return Column(name, "Int64", pa.int64())


TICKS = TableSpec(
    name="ticks",
    columns=(
        _TS,
        _VENUE,
        _SYMBOL,
        _i64("trade_id"),
        _i64("ts_ns"),
        _i64("recv_ns"),
        _f64("price"),
        _f64("qty"),
        Column("side", "Int8", pa.int8()),
    ),
    key=("venue", "symbol", "trade_id"),
    doc="Every trade received, once per (venue, symbol, trade_id).",
)

BARS = TableSpec(
    name="bars",
    columns=(
        _TS,
        _VENUE,
        _SYMBOL,
        Column("interval_s", "Int32", pa.int32()),
        _i64("ts_ns"),
        _f64("open"),
        _f64("high"),
        _f64("low"),
        _f64("close"),
        _f64("volume"),
        _f64("quote_volume"),
        _f64("vwap"),
        _i64("trade_count"),
        _f64("buy_volume"),
        _f64("sell_volume"),
        _i64("first_trade_id"),
        _i64("last_trade_id"),
    ),
    key=("venue", "symbol", "interval_s", "ts_ns"),
    doc="Time bars built from ticks, once per (venue, symbol, interval_s, ts_ns).",
)

MIGRATIONS_TABLE = TableSpec(
    name="schema_migrations",
    columns=(
        Column("version", "UInt32", pa.uint32()),
        Column("name", "String", pa.string()),
        Column("applied_ns", "Int64", pa.int64()),
    ),
    key=("version",),
    partition_by=None,
    doc="Which migrations have been applied to this database.",
)

ARCHIVE_MANIFEST = TableSpec(
    name="archive_manifest",
    columns=(
        Column("table", "String", pa.string()),
        Column("day", "UInt32", pa.uint32()),
        Column("object_key", "String", pa.string()),
        Column("rows", "UInt64", pa.uint64()),
        Column("content_checksum", "String", pa.string()),
        Column("file_sha256", "String", pa.string()),
        Column("bytes", "UInt64", pa.uint64()),
        Column("archived_ns", "Int64", pa.int64()),
    ),
    key=("table", "day"),
    partition_by=None,
    doc="One row per archived (table, day YYYYMMDD): where its Parquet file is and how it was verified.",
)

FEED_GAPS = TableSpec(
    name="feed_gaps",
    columns=(
        _TS,
        Column("source", "String", pa.string()),
        _VENUE,
        _SYMBOL,
        Column("kind", "String", pa.string()),
        _i64("from_value"),
        _i64("to_value"),
        _i64("ts_ns"),
        Column("status", "String", pa.string()),
        _i64("ticks"),
        Column("detail", "String", pa.string()),
    ),
    key=("source", "venue", "symbol", "kind", "from_value"),
    doc=(
        "Interruptions of a live feed, once per (source, venue, symbol, kind, from_value): "
        "kind 'ids' is a trade-id gap [from_value, to_value]; kind 'time' a disconnected window in ns. "
        "status is 'filled' (backfilled, ticks = trades recovered), 'partial' or 'unfilled'; ts_ns is "
        "when it was recorded."
    ),
)

DIAGNOSTICS = TableSpec(
    name="diagnostics",
    columns=(
        _TS,
        Column("engine", "String", pa.string()),
        Column("metric", "String", pa.string()),
        Column("label", "String", pa.string()),
        _i64("ts_ns"),
        _f64("value"),
    ),
    key=("engine", "metric", "label", "ts_ns"),
    doc=(
        "Samples of the engine's own health, recorded by the monitor module every few seconds, once per "
        "(engine, metric, label, ts_ns): label is what the value is about (a symbol, a consumer, a table, "
        "or empty). Aged out by the monitor after its retention; see alphaengine.pipeline.monitor."
    ),
)

_ACCOUNT = Column("account", "String", pa.string())


def _str(name: str) -> Column:
    return Column(name, "String", pa.string())


FILLS = TableSpec(
    name="fills",
    columns=(
        _TS,
        _ACCOUNT,
        _i64("seq"),
        _str("fill_id"),
        _str("order_id"),
        _i64("ts_ns"),
        _VENUE,
        _SYMBOL,
        _str("side"),
        _f64("qty"),
        _f64("price"),
        _f64("fee_usd"),
        _str("liquidity"),
    ),
    key=("account", "seq"),
    doc=(
        "The fills log of each paper account, once per (account, seq): seq numbers the fills from 1 in the "
        "order they were applied; the portfolio is rebuilt from it at start-up."
    ),
)

ORDERS = TableSpec(
    name="orders",
    columns=(
        _TS,
        _ACCOUNT,
        _str("order_id"),
        _str("signal_id"),
        _i64("ts_ns"),
        _i64("updated_ns"),
        _VENUE,
        _SYMBOL,
        _str("side"),
        _f64("qty"),
        _str("order_type"),
        _f64("limit_price"),
        _str("status"),
        _f64("filled_qty"),
        _str("reason"),
    ),
    key=("account", "order_id", "updated_ns", "status"),
    doc=(
        "Every order and each change of its state (new, rejected with the risk check's reason, partially "
        "filled, filled, canceled), once per (account, order_id, updated_ns, status); limit_price is a "
        "market order's protection price."
    ),
)

EQUITY = TableSpec(
    name="equity",
    columns=(
        _TS,
        _ACCOUNT,
        _i64("ts_ns"),
        _f64("equity_usd"),
        _f64("cash_usd"),
        _f64("realized_usd"),
        _f64("unrealized_usd"),
        _f64("fees_usd"),
        _f64("gross_exposure_usd"),
        _f64("net_exposure_usd"),
        _f64("drawdown"),
    ),
    key=("account", "ts_ns"),
    doc="The equity curve of each paper account, a point every equity_interval_s, once per (account, ts_ns).",
)

SIGNALS = TableSpec(
    name="signals",
    columns=(
        _TS,
        _ACCOUNT,
        _str("signal_id"),
        _i64("ts_ns"),
        _VENUE,
        _SYMBOL,
        _i64("bar_ts_ns"),
        _i64("horizon_s"),
        _f64("score"),
        _f64("confidence"),
        _str("models"),
        _str("model_values"),
        _str("model_weights"),
    ),
    key=("account", "signal_id"),
    doc=(
        "Every signal the trader decided on, once per (account, signal_id): the ensembled score and, as "
        "JSON arrays in the same order, the contributing model@version, their values and their shares."
    ),
)

TRADER_STATE = TableSpec(
    name="trader_state",
    columns=(
        _TS,
        _ACCOUNT,
        _i64("ts_ns"),
        _i64("saved_ns"),
        _str("state"),
        _str("offsets"),
    ),
    key=("account",),
    partition_by=None,
    engine="ReplacingMergeTree(saved_ns)",
    doc=(
        "The latest snapshot of each account's trading core (JSON) and the bus positions it was taken at; "
        "ts_ns is the core's event time, saved_ns when it was written (the newest is kept)."
    ),
)

MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "ticks and bars", tables=(TICKS, BARS)),
    Migration(2, "archive manifest", tables=(ARCHIVE_MANIFEST,)),
    Migration(3, "feed gaps", tables=(FEED_GAPS,)),
    Migration(4, "diagnostics", tables=(DIAGNOSTICS,)),
    Migration(5, "trading", tables=(SIGNALS, FILLS, ORDERS, EQUITY, TRADER_STATE)),
)
"""Every schema change in order; a store applies those whose version it has not recorded."""

TABLES: dict[str, TableSpec] = {t.name: t for m in MIGRATIONS for t in m.tables} | {
    MIGRATIONS_TABLE.name: MIGRATIONS_TABLE
}
"""Every table by name, as of the newest migration."""
