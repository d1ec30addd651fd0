"""Features and targets: streaming equals batch, no look-ahead, hand-checked values, gaps and nulls."""

from __future__ import annotations

import itertools
import math

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from alphaengine.domain import BarBatch
from alphaengine.features import (
    GRID_SCHEMA,
    KEY,
    ROW_COLUMNS,
    Feature,
    FeatureParams,
    FeatureSet,
    Targets,
    bars_from_candles_csv,
    core_feature_set,
    regularize,
    training_frame,
)
from alphaengine.sources.synthetic import SyntheticMarket, SyntheticSettings
from tests.conftest import real_file
from tests.reference import BAR_COLUMNS, reference_bars

NS = 1_000_000_000
T0 = 1_723_161_600 * NS  # 2024-08-09 00:00:00 UTC
SECONDS = 900
SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT", "ADAUSDT", "XRPUSDT")
# Streaming and batch evaluate the same expressions, but rolling sums start from different rows, so the
# rounding differs: z-scores of a close against a VWAP a hair away from it amplify that to about 1e-11.
TOLERANCE = {"rel_tol": 1e-9, "abs_tol": 1e-10}


@pytest.fixture(scope="module")
def bars() -> pl.DataFrame:
    """15 minutes of 1-second bars of five symbols at 15 trades/s in all: quiet symbols skip seconds."""
    market = SyntheticMarket(
        SyntheticSettings(symbols=SYMBOLS, rate_per_s=15.0, predictability=0.3), T0, seed=11
    )
    ticks = pl.DataFrame(market.generate(SECONDS * 20).data)
    return reference_bars(ticks, 1, drop_last=False).select(BAR_COLUMNS)


def bar_rows(
    closes: list[float], *, start_s: int = 0, symbol: str = "X", **columns: list[float]
) -> pl.DataFrame:
    """Consecutive 1-second bars with the given closes (high = low = open = close unless given)."""
    n = len(closes)
    data: dict[str, object] = {
        "venue": ["V"] * n,
        "symbol": [symbol] * n,
        "interval_s": [1] * n,
        "ts_ns": [(start_s + i) * NS for i in range(n)],
        "open": closes,
        "high": closes,
        "low": closes,
        "close": closes,
        "volume": [1.0] * n,
        "quote_volume": closes,
        "vwap": closes,
        "trade_count": [1] * n,
        "buy_volume": [1.0] * n,
        "sell_volume": [0.0] * n,
        "first_trade_id": list(range(n)),
        "last_trade_id": list(range(n)),
    }
    data.update(columns)
    return pl.DataFrame(data, schema_overrides={"interval_s": pl.Int32})


def test_streaming_features_equal_batch_features(bars: pl.DataFrame) -> None:
    feature_set = core_feature_set()
    batch = feature_set.compute(bars)
    assert batch.height > bars.height, "the quiet symbols skip seconds, which the grid fills"
    assert batch.group_by("symbol").agg(pl.col("filled").any())["filled"].all()

    stream = feature_set.stream()
    seconds = bars.sort("ts_ns").partition_by("ts_ns", maintain_order=True)
    outputs = [stream.update(part) for part in seconds[:300]]  # one second at a time, past max_lookback
    rng = np.random.default_rng(3)
    i = 300
    while i < len(seconds):
        size = int(rng.integers(1, 40))
        chunk = pl.concat(seconds[i : i + size])
        # Bars sent again (a restarted bar builder re-emits its last bars) are ignored.
        outputs.append(stream.update(pl.concat([seconds[i - 1], chunk])))
        i += size
        assert stream.history_rows <= len(SYMBOLS) * (feature_set.max_lookback - 1)
    streamed = pl.concat(outputs).sort(*KEY, "ts_ns")

    assert_frame_equal(streamed, batch, **TOLERANCE)
    # Not vacuous: after the warm-up every feature has a value on every row.
    assert batch.filter(pl.col("ts_ns") >= T0 + 300 * NS).null_count().sum_horizontal().item() == 0


def test_stream_ignores_old_bars_and_takes_bar_batches(bars: pl.DataFrame) -> None:
    feature_set = core_feature_set()
    stream = feature_set.stream()
    first = bars.filter(pl.col("ts_ns") < T0 + 100 * NS)
    stream.update(BarBatch.from_pydict(first.to_dict(as_series=False)))
    again = stream.update(first)
    assert again.is_empty()
    assert again.columns == [*ROW_COLUMNS, *feature_set.names]
    assert_frame_equal(
        feature_set.compute(BarBatch.from_pydict(bars.to_dict(as_series=False))), feature_set.compute(bars)
    )


def test_declared_lookbacks_are_exact(bars: pl.DataFrame) -> None:
    """A feature of the last ``lookback`` bars equals the batch value; with one bar fewer it is null."""
    feature_set = core_feature_set()
    grid = regularize(bars.filter(pl.col("symbol") == "BTCUSDT"))
    batch = feature_set.evaluate(grid)
    for end in (grid.height, grid.height - 1, 400):
        for feature in feature_set.features:
            expected = batch.item(end - 1, feature.name)
            assert expected is not None, feature.name
            window = feature_set.evaluate(grid.slice(end - feature.lookback, feature.lookback))
            assert window.item(-1, feature.name) == pytest.approx(expected, rel=1e-9, abs=1e-9), feature.name
            if feature.lookback > 1:
                short = feature_set.evaluate(grid.slice(end - feature.lookback + 1, feature.lookback - 1))
                assert short.item(-1, feature.name) is None, feature.name


def test_future_bars_never_change_past_features(bars: pl.DataFrame) -> None:
    feature_set = core_feature_set()
    cut = T0 + 500 * NS
    before = feature_set.compute(bars).filter(pl.col("ts_ns") <= cut)
    rng = np.random.default_rng(5)
    future = pl.col("ts_ns") > cut
    scale = pl.Series(rng.uniform(0.5, 2.0, bars.height))
    changed = bars.with_columns(
        *(pl.when(future).then(pl.col(c) * scale).otherwise(pl.col(c)).alias(c) for c in ("close", "volume")),
        pl.when(future).then(pl.col("trade_count") * 3).otherwise(pl.col("trade_count")).alias("trade_count"),
    )
    assert_frame_equal(feature_set.compute(changed).filter(pl.col("ts_ns") <= cut), before)
    # Without the future, a quiet symbol's trailing missing seconds are not known yet (no later bar says
    # they were empty); every row it does have is unchanged.
    truncated = feature_set.compute(bars.filter(~future))
    assert_frame_equal(truncated, before.join(truncated, on=[*KEY, "ts_ns"], how="semi"))
    assert before.join(truncated, on=[*KEY, "ts_ns"], how="anti")["filled"].all()


def test_targets_are_forward_log_returns_on_the_grid(bars: pl.DataFrame) -> None:
    targets = Targets(horizons=(1, 5, 60))
    assert targets.purge_bars == 60
    grid = regularize(bars)
    computed = targets.compute(bars)
    assert computed[list(ROW_COLUMNS)].equals(grid[list(ROW_COLUMNS)])
    for series in grid.partition_by(KEY):
        close = series["close"].to_numpy()
        ts = series["ts_ns"].to_numpy()
        mine = computed.join(series.select(*KEY, "ts_ns"), on=[*KEY, "ts_ns"], how="semi")
        for h in targets.horizons:
            ret = mine[f"target_ret_{h}"].to_numpy()
            expected = np.log(close[h:] / close[:-h])
            np.testing.assert_allclose(ret[:-h], expected, rtol=1e-12, atol=0)
            assert mine[f"target_ret_{h}"][-h:].is_null().all()
            assert (
                mine[f"target_sign_{h}"].head(len(ret) - h).to_list()
                == np.sign(expected).astype(int).tolist()
            )
            # h rows ahead on the grid is h seconds ahead, missing seconds included.
            assert (ts[h:] - ts[:-h] == h * NS).all()


def test_training_frame_drops_warm_up_purge_and_undefined_rows(bars: pl.DataFrame) -> None:
    feature_set, targets = core_feature_set(), Targets()
    frame = training_frame(bars, feature_set, targets)
    assert frame.columns == [*ROW_COLUMNS, *feature_set.names, *targets.names]
    assert frame.null_count().sum_horizontal().item() == 0
    grid = regularize(bars)
    for series in grid.partition_by(KEY):
        rows = frame.join(series.select(*KEY, "ts_ns"), on=[*KEY, "ts_ns"], how="semi")
        assert rows["ts_ns"].min() >= series["ts_ns"][feature_set.max_lookback - 1]
        assert rows["ts_ns"].max() <= series["ts_ns"][-1 - targets.purge_bars]
    # The target of a kept row is still its own forward return.
    row = frame.row(len(frame) // 2, named=True)
    later = grid.filter(
        (pl.col("symbol") == row["symbol"]) & pl.col("ts_ns").is_in([row["ts_ns"], row["ts_ns"] + 5 * NS])
    )["close"]
    assert row["target_ret_5"] == pytest.approx(math.log(later[1] / later[0]), rel=1e-12)


def test_hand_checked_returns_rsi_and_imbalance() -> None:
    closes = [10.0, 11.0, 10.5, 11.5, 11.5, 12.0]
    buys = [1.0, 3.0, 0.0, 2.0, 0.0, 1.0]
    sells = [1.0, 1.0, 4.0, 0.0, 0.0, 1.0]
    volume = [b + s for b, s in zip(buys, sells, strict=True)]
    bars = bar_rows(closes, volume=volume, buy_volume=buys, sell_volume=sells)
    params = FeatureParams(return_horizons=(1, 5), rsi_window=3, imbalance_windows=(3,))
    out = core_feature_set(params).compute(bars)

    assert out["ret_1"].to_list()[1:] == pytest.approx(
        [math.log(c1 / c0) for c0, c1 in itertools.pairwise(closes)]
    )
    assert out["ret_5"].to_list() == [None] * 5 + [pytest.approx(math.log(12.0 / 10.0))]
    # Changes +1, -0.5, +1, 0, +0.5: RSI(3) = 100 * mean gain / (mean gain + mean loss).
    assert out["rsi_3"].to_list() == [
        None,
        None,
        None,
        pytest.approx(100 * 2 / 2.5),
        pytest.approx(100 * 1 / 1.5),
        pytest.approx(100.0),
    ]
    # (buy - sell) / volume per bar; a bar without volume has no imbalance (0).
    assert out["imbalance_1"].to_list() == pytest.approx([0.0, 0.5, -1.0, 1.0, 0.0, 0.0])
    assert out["imbalance_3"].to_list()[2:] == pytest.approx([-2 / 10, 0.0, -2 / 6, 2 / 4])
    # Flat closes: RSI is 50, the volatility 0, the VWAP z-score undefined (null).
    flat = core_feature_set(params).compute(bar_rows([5.0] * 70))
    assert flat["rsi_3"][-1] == 50.0
    assert flat["rv_15"][-1] == 0.0
    assert flat["vwap_z_15"][-1] is None
    assert flat["momentum_z_60"][-1] == 0.0


def test_gaps_are_filled_on_the_grid_and_returns_count_time() -> None:
    bars = pl.concat([bar_rows([100.0, 101.0]), bar_rows([103.0, 104.0], start_s=5)])
    grid = regularize(bars)
    assert grid["ts_ns"].to_list() == [i * NS for i in range(7)]
    assert grid["filled"].to_list() == [False, False, True, True, True, False, False]
    assert grid["close"].to_list() == [100.0, 101.0, 101.0, 101.0, 101.0, 103.0, 104.0]
    filled = grid.filter("filled")
    assert (filled["high"] == 101.0).all()
    assert (filled["vwap"] == 101.0).all()
    assert (filled["volume"] == 0.0).all()
    assert (filled["trade_count"] == 0).all()
    out = core_feature_set().compute(bars)
    # Five bars back from second 6 is second 1 (101), not the fifth row before it.
    assert out["ret_5"][-1] == pytest.approx(math.log(104.0 / 101.0))
    assert out.filter("filled")["imbalance_1"].to_list() == [0.0, 0.0, 0.0]


def test_missing_buy_sell_split_gives_null_flow_features_and_no_nan(bars: pl.DataFrame) -> None:
    unknown = bars.with_columns(
        pl.lit(None, pl.Float64).alias("buy_volume"),
        pl.lit(None, pl.Float64).alias("sell_volume"),
        pl.lit(None, pl.Int64).alias("trade_count"),
    )
    out = core_feature_set().compute(unknown)
    flow = [n for n in out.columns if n.startswith(("imbalance", "trade_surge"))]
    assert len(flow) == 5
    real = ~pl.col("filled")
    assert out.filter(real).select(pl.col(flow).is_null().all()).row(0) == (True,) * 5
    features = core_feature_set().names
    assert out.select(pl.col(features).is_nan().any()).row(0) == (False,) * len(features)
    assert out.select(pl.col(features).is_infinite().any()).row(0) == (False,) * len(features)


def test_misaligned_bars_are_refused() -> None:
    bars = bar_rows([1.0, 2.0]).with_columns(pl.col("ts_ns") + 1)
    with pytest.raises(ValueError, match="not aligned"):
        regularize(bars)


def test_version_names_the_definitions_and_parameters() -> None:
    assert core_feature_set().version == core_feature_set().version
    assert core_feature_set().version.startswith("core-")
    assert core_feature_set(FeatureParams(rsi_window=21)).version != core_feature_set().version
    assert core_feature_set(FeatureParams(order_flow=False)).version != core_feature_set().version
    assert len(core_feature_set().names) == 21
    with pytest.raises(ValueError, match="undefined"):
        FeatureSet("x", (Feature("a", pl.col("nope") * 2, 1, "?"),))
    with pytest.raises(ValueError, match="twice"):
        FeatureSet("x", (Feature("close", pl.col("open"), 1, "?"),))


def test_real_candles_map_onto_bars_and_give_features() -> None:
    bars = bars_from_candles_csv(real_file("candles/btc-perp-20211231-20220201_1m.csv"))
    assert bars.height == 45_031
    assert bars.columns == BAR_COLUMNS
    assert bars["ts_ns"][0] == 1_640_991_660 * NS  # 2021-12-31 23:01 UTC
    assert (bars["ts_ns"].diff().drop_nulls() == 60 * NS).all()
    first = bars.row(0, named=True)
    assert (first["close"], first["quote_volume"]) == (46377.0, 2300413.7295)
    assert first["vwap"] == pytest.approx((46385.0 + 46319.0 + 46377.0) / 3)
    assert first["buy_volume"] is None
    assert first["trade_count"] is None

    ohlcv = core_feature_set(FeatureParams(order_flow=False))
    batch = ohlcv.compute(bars)
    assert not batch["filled"].any()
    # Only the warm-up rows lack values; every feature is defined after max_lookback bars.
    assert batch.slice(ohlcv.max_lookback - 1).null_count().sum_horizontal().item() == 0
    frame = training_frame(bars, ohlcv, Targets())
    assert frame.height == bars.height - (ohlcv.max_lookback - 1) - Targets().purge_bars

    stream = ohlcv.stream()
    head = bars.head(1_000)
    streamed = pl.concat([stream.update(head.slice(i, 50)) for i in range(0, head.height, 50)])
    assert_frame_equal(streamed, batch.head(1_000), **TOLERANCE)

    core = core_feature_set().compute(bars.head(300))
    assert core.select(pl.col("imbalance_1", "trade_surge_1_60").is_null().all()).row(0) == (True, True)


def test_feature_set_columns_are_the_grid_plus_outputs() -> None:
    feature_set = core_feature_set()
    out = feature_set.compute(bar_rows([1.0, 2.0, 3.0]))
    assert out.columns == [*ROW_COLUMNS, *feature_set.names]
    assert out.schema["filled"] == GRID_SCHEMA["filled"]
    assert all(out.schema[n] == pl.Float64 for n in feature_set.names)
