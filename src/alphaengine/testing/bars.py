"""Bars without running the engine: trades folded with a polars group-by, and a synthetic market's bars.

:func:`bars_from_ticks` is an implementation independent of the bar builder's (a group-by instead of
numpy reductions over a stream), which tests compare the builder with; :func:`synthetic_bars` gives the
bars of hours or days of the synthetic market in seconds, for the model tests and benchmarks.
"""

from __future__ import annotations

import polars as pl

from alphaengine.sources.synthetic import SyntheticMarket, SyntheticSettings

NS = 1_000_000_000

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
"""The columns of a bar (``BAR_SCHEMA``), in order."""


def bars_from_ticks(ticks: pl.DataFrame, interval_s: int, *, drop_last: bool = True) -> pl.DataFrame:
    """Bars of ``interval_s`` from trades (the ``TICK_SCHEMA`` columns), sorted by series and time.

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
    return bars.sort("venue", "symbol", "ts_ns").select(BAR_COLUMNS)


def synthetic_bars(
    settings: SyntheticSettings,
    *,
    seconds: int,
    start_ns: int,
    seed: int,
    interval_s: int = 1,
    chunk_s: int = 3_600,
) -> pl.DataFrame:
    """The bars of ``seconds`` of the synthetic market (every bar of the span, none left open).

    The trades are generated and folded ``chunk_s`` at a time (a multiple of ``interval_s``), so memory
    stays bounded by one chunk's trades however long the span.
    """
    if chunk_s % interval_s or seconds % interval_s:
        raise ValueError("seconds and chunk_s must be multiples of interval_s")
    market = SyntheticMarket(settings, start_ns, seed=seed)
    steps_per_s = 1_000 // settings.step_ms
    parts = []
    for begin in range(0, seconds, chunk_s):
        span = min(chunk_s, seconds - begin)
        ticks = pl.DataFrame(market.generate(span * steps_per_s).data)
        if not ticks.is_empty():
            parts.append(bars_from_ticks(ticks, interval_s, drop_last=False))
    return pl.concat(parts).sort("venue", "symbol", "ts_ns") if parts else pl.DataFrame()
