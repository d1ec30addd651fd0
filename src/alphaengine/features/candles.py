"""Bars from a candle file: OHLCV only, mapped onto the bar columns.

The shared month of real candles (``candles/btc-perp-20211231-20220201_1m.csv``, FTX BTC-PERP) has
``timestamp,open,high,low,close,volume`` with ``timestamp`` the bar's open in UTC and ``volume`` the quote
(USD) notional. The mapping:

* ``quote_volume`` is the file's ``volume``;
* ``vwap`` is unknown and estimated by the typical price ``(high + low + close) / 3``, and ``volume`` (base
  asset) by ``quote_volume / vwap``;
* ``trade_count``, ``buy_volume``, ``sell_volume`` and the trade ids are unknown: null. Features built on
  them (the imbalances and the trade-count surges) are therefore null on candles; a model trained on
  candles uses a feature set without them.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl


def bars_from_candles_csv(
    path: str | Path, *, venue: str = "FTX", symbol: str = "BTC-PERP", interval_s: int = 60
) -> pl.DataFrame:
    """Bars (the :data:`~alphaengine.domain.BAR_SCHEMA` columns) from an OHLCV candle file.

    The file's ``volume`` is quote notional; the module docstring says what is estimated and what is null.
    """
    raw = pl.read_csv(
        path,
        schema={
            "timestamp": pl.String,
            "open": pl.Float64,
            "high": pl.Float64,
            "low": pl.Float64,
            "close": pl.Float64,
            "volume": pl.Float64,
        },
    )
    typical = (pl.col("high") + pl.col("low") + pl.col("close")) / 3.0
    return raw.select(
        pl.lit(venue).alias("venue"),
        pl.lit(symbol).alias("symbol"),
        pl.lit(interval_s, dtype=pl.Int32).alias("interval_s"),
        pl.col("timestamp")
        .str.to_datetime("%Y-%m-%d %H:%M:%S%.f", time_unit="ns", time_zone="UTC")
        .dt.epoch("ns")
        .alias("ts_ns"),
        "open",
        "high",
        "low",
        "close",
        (pl.col("volume") / typical).alias("volume"),
        pl.col("volume").alias("quote_volume"),
        typical.alias("vwap"),
        pl.lit(None, dtype=pl.Int64).alias("trade_count"),
        pl.lit(None, dtype=pl.Float64).alias("buy_volume"),
        pl.lit(None, dtype=pl.Float64).alias("sell_volume"),
        pl.lit(None, dtype=pl.Int64).alias("first_trade_id"),
        pl.lit(None, dtype=pl.Int64).alias("last_trade_id"),
    )
