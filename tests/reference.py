"""Independent reference computations (polars) that the engine's results are compared with."""

from __future__ import annotations

import polars as pl

from alphaengine.testing.bars import BAR_COLUMNS, bars_from_ticks

NS = 1_000_000_000


reference_bars = bars_from_ticks
"""Bars from trades with a polars group-by: independent of the bar builder's numpy folding."""


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
