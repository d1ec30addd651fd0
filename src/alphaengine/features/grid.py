"""The time grid that features and targets are computed on: each series' bars, gaps filled.

A bar exists only for an interval with at least one trade, so a quiet symbol's 1-second bars skip
seconds. Features and targets count in intervals of time, not in rows: before anything is computed, each
series (one ``venue, symbol, interval_s``) is put on its regular grid from its first bar to its last, and
every missing interval becomes a *filled* bar: open, high, low, close and VWAP equal to the previous close,
zero volumes and trade count, ``filled = True``. "5 bars back" is then always ``5 * interval_s`` seconds
back. The same function fills the gaps in batch and in streaming mode, where a series' gap is filled when
its next bar arrives.
"""

from __future__ import annotations

from typing import Final

import polars as pl

from alphaengine.domain import BarBatch

NS: Final = 1_000_000_000

KEY: Final = ("venue", "symbol", "interval_s")
"""The columns that name one series of bars; features never look across series."""

GRID_SCHEMA: Final = pl.Schema(
    {
        "venue": pl.String,
        "symbol": pl.String,
        "interval_s": pl.Int32,
        "ts_ns": pl.Int64,
        "open": pl.Float64,
        "high": pl.Float64,
        "low": pl.Float64,
        "close": pl.Float64,
        "volume": pl.Float64,
        "quote_volume": pl.Float64,
        "vwap": pl.Float64,
        "trade_count": pl.Int64,
        "buy_volume": pl.Float64,
        "sell_volume": pl.Float64,
        "filled": pl.Boolean,
    }
)
"""Columns of a bar on the grid: the bar columns features use (no trade ids), plus ``filled``."""

_INPUT_SCHEMA: Final = pl.Schema({k: v for k, v in GRID_SCHEMA.items() if k != "filled"})
_INPUT_COLUMNS: Final = _INPUT_SCHEMA.names()
_NOT_FILLED: Final = pl.lit(False).alias("filled")
_PRICES: Final = ("open", "high", "low", "vwap")
_FLOWS: Final = ("volume", "quote_volume", "buy_volume", "sell_volume")

Bars = pl.DataFrame | BarBatch
"""Bars as a polars frame with the :data:`~alphaengine.domain.BAR_SCHEMA` columns, or a bar batch."""


def as_grid_input(bars: Bars) -> pl.DataFrame:
    """The grid columns of some bars (``filled`` False), cast to :data:`GRID_SCHEMA`.

    Raises ValueError when a bar's ``ts_ns`` is not a multiple of its interval: the grid would not hold it.
    """
    frame = pl.DataFrame(bars.data) if isinstance(bars, BarBatch) else bars
    frame = frame[_INPUT_COLUMNS]
    if frame.schema != _INPUT_SCHEMA:
        frame = frame.cast(_INPUT_SCHEMA)
    frame = frame.with_columns(_NOT_FILLED)
    ts, interval = frame["ts_ns"], frame["interval_s"].cast(pl.Int64)
    misaligned = ts % (interval * NS) != 0
    if misaligned.any():
        first = int(misaligned.arg_true()[0])
        raise ValueError(
            f"{misaligned.sum()} bar(s) not aligned to their interval, e.g. {frame['symbol'][first]} "
            f"ts_ns={ts[first]} interval_s={interval[first]}"
        )
    return frame


def regularize(bars: Bars) -> pl.DataFrame:
    """Each series' bars on its regular grid, gaps filled, sorted by series and time.

    A repeated bar (same series and ``ts_ns``) is kept once, the first occurrence (the bar builder may
    emit a bar again, identical, after a restart).
    """
    return fill_gaps(as_grid_input(bars))


def fill_gaps(frame: pl.DataFrame) -> pl.DataFrame:
    """Put rows of :data:`GRID_SCHEMA` on their series' grids; rows already there keep their values.

    Rows already marked ``filled`` (the history a stream keeps) are taken as they are; only the missing
    intervals are added.
    """
    ts = pl.col("ts_ns")
    step = pl.col("interval_s").first().cast(pl.Int64) * NS
    spans = frame.group_by(KEY).agg(
        ts.min().alias("first"),
        ((ts.max() - ts.min()) // step + 1).alias("slots"),
        pl.len().alias("rows"),
        ts.n_unique().alias("distinct"),
    )
    if (spans["slots"] == spans["rows"]).all() and (spans["rows"] == spans["distinct"]).all():
        # Every slot holds exactly one bar: nothing to fill or drop.
        return frame.sort(*KEY, "ts_ns")
    frame = frame.unique(subset=[*KEY, "ts_ns"], keep="first", maintain_order=True)
    grid = (
        spans.with_columns(pl.int_ranges(pl.col("slots")).alias("slot"))
        .explode("slot")
        .select(
            *KEY, (pl.col("first") + pl.col("slot") * pl.col("interval_s").cast(pl.Int64) * NS).alias("ts_ns")
        )
    )
    filled = pl.col("filled")
    close = pl.col("close")
    return (
        grid.join(frame, on=[*KEY, "ts_ns"], how="left")
        .sort(*KEY, "ts_ns")
        .with_columns(filled.fill_null(True), close.forward_fill().over(KEY))
        .with_columns(
            *(pl.when(filled).then(close).otherwise(pl.col(name)).alias(name) for name in _PRICES),
            *(pl.when(filled).then(0.0).otherwise(pl.col(name)).alias(name) for name in _FLOWS),
            pl.when(filled).then(0).otherwise(pl.col("trade_count")).alias("trade_count"),
        )
        .select(GRID_SCHEMA.names())
    )
