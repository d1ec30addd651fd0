"""Independent reference computations (polars) that the engine's results are compared with."""

from __future__ import annotations

import polars as pl

NS = 1_000_000_000


def reference_bars(ticks: pl.DataFrame, interval_s: int, *, drop_last: bool = True) -> pl.DataFrame:
    """Bars of ``interval_s`` from trades, computed with a polars group-by.

    ``drop_last`` leaves out each symbol's last bar, which the streaming builder keeps open.
    """
    bars = (
        ticks.sort("venue", "symbol", "trade_id")
        .with_columns(((pl.col("ts_ns") // (interval_s * NS)) * (interval_s * NS)).alias("bar_ts_ns"))
        .group_by("venue", "symbol", "bar_ts_ns", maintain_order=True)
        .agg(
            pl.col("price").first().alias("open"),
            pl.col("price").max().alias("high"),
            pl.col("price").min().alias("low"),
            pl.col("price").last().alias("close"),
            pl.col("qty").sum().alias("volume"),
            (pl.col("price") * pl.col("qty")).sum().alias("quote_volume"),
            pl.len().cast(pl.Int64).alias("trade_count"),
            pl.col("qty").filter(pl.col("side") > 0).sum().alias("buy_volume"),
            pl.col("qty").filter(pl.col("side") < 0).sum().alias("sell_volume"),
            pl.col("trade_id").first().alias("first_trade_id"),
            pl.col("trade_id").last().alias("last_trade_id"),
        )
        .with_columns(
            (pl.col("quote_volume") / pl.col("volume")).alias("vwap"),
            pl.lit(interval_s, dtype=pl.Int32).alias("interval_s"),
        )
        .rename({"bar_ts_ns": "ts_ns"})
    )
    if drop_last:
        last = bars.group_by("venue", "symbol").agg(pl.col("ts_ns").max().alias("last_ts"))
        bars = (
            bars.join(last, on=["venue", "symbol"])
            .filter(pl.col("ts_ns") < pl.col("last_ts"))
            .drop("last_ts")
        )
    return bars.sort("venue", "symbol", "ts_ns")


BAR_COLUMNS = [
    "venue",
    "symbol",
    "interval_s",
    "ts_ns",
    "open",
    "high",
    "low",
    "close",
    "volume",
    "quote_volume",
    "vwap",
    "trade_count",
    "buy_volume",
    "sell_volume",
    "first_trade_id",
    "last_trade_id",
]


def assert_bars_equal(actual: pl.DataFrame, expected: pl.DataFrame) -> None:
    """Same bars: keys and counts exactly, prices and volumes to floating-point tolerance."""
    from polars.testing import assert_frame_equal

    key = ["venue", "symbol", "interval_s", "ts_ns"]
    assert_frame_equal(
        actual.select(BAR_COLUMNS).sort(key),
        expected.select(BAR_COLUMNS).sort(key),
        check_dtypes=False,
        rel_tol=1e-9,
        abs_tol=1e-9,
    )
