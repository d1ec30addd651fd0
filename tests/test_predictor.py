"""The predictor: streaming features and champion predictions on live bars, staleness, hot swap."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import polars as pl
import pytest

from alphaengine.codec import decode_event, encode_bars
from alphaengine.domain import BarBatch, Prediction
from alphaengine.features import FeatureParams, core_feature_set
from alphaengine.kernel.module import Context
from alphaengine.models import load_model
from alphaengine.models.predictor import Predictor, PredictorSettings
from tests.champions import LIVE_S, NS, market, train_champion

pytestmark = pytest.mark.slow


async def publish(ctx: Context, bars: pl.DataFrame, seconds_per_record: int = 10) -> None:
    """Send bars as the bar builder does: records of one symbol, a few seconds of bars each."""
    await ctx.bus.create_topic("bars")
    chunk = (pl.col("ts_ns") // (seconds_per_record * NS)).alias("chunk")
    for (_, symbol, _), part in bars.with_columns(chunk).group_by(
        "chunk", "symbol", "venue", maintain_order=True
    ):
        value = encode_bars(BarBatch.from_pydict(part.drop("chunk").to_dict(as_series=False)))
        await (await ctx.bus.send("bars", value, key=str(symbol).encode()))


async def collect(ctx: Context, expected: int, timeout_s: float = 30.0) -> list[Prediction]:
    consumer = ctx.bus.consumer("test-reader", ["predictions"])
    await consumer.start()
    out: list[Prediction] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < expected and time.monotonic() < deadline:
            out += [decode_event(r.value, Prediction) for r in await consumer.getmany(1000, 0.2)]
    finally:
        await consumer.close()
    return out


def settings(**overrides: Any) -> PredictorSettings:
    return PredictorSettings(**({"models": ("ridge",), "refresh_s": 0.2, "max_bar_age_s": 30.0} | overrides))


async def test_live_predictions_equal_the_batch_model_on_the_same_bars(ctx: Context) -> None:
    now_s = time.time_ns() // NS
    bars = market(now_s)
    live_from = (now_s - LIVE_S) * NS
    history, live = bars.filter(pl.col("ts_ns") < live_from), bars.filter(pl.col("ts_ns") >= live_from)
    await ctx.store.insert("bars", history.to_arrow())
    version = await train_champion(ctx)

    predictor = Predictor("predictor", settings(), ctx)
    await predictor.start()
    try:
        assert predictor.champions == {"ridge": version}
        await publish(ctx, live)
        predictions = await collect(ctx, live.height)
    finally:
        await predictor.stop()
    # One prediction per live bar (the warm-up from the store gave every feature its history).
    assert len(predictions) == live.height
    assert {(p.symbol, p.bar_ts_ns) for p in predictions} == set(
        zip(live["symbol"], live["ts_ns"], strict=True)
    )
    assert {(p.model, p.version, p.horizon_s) for p in predictions} == {("ridge", version, 60)}

    # The batch path on all the bars: features computed at once, the registered model predicting them.
    info = await predictor.registry.version("ridge", version)
    features = core_feature_set(FeatureParams(**info.feature_params)).compute(bars)
    expected = features.filter(pl.col("ts_ns") >= live_from, ~pl.col("filled"))
    model = load_model(await predictor.registry.fetch("ridge", version))
    values = model.predict(expected.select(info.features).to_numpy())
    batch = dict(zip(zip(expected["symbol"], expected["ts_ns"], strict=True), values.tolist(), strict=True))
    for p in predictions:
        assert p.value == pytest.approx(batch[(p.symbol, p.bar_ts_ns)], rel=1e-5, abs=1e-9)
        # Stale exactly when the bar had closed more than max_bar_age_s before the prediction.
        too_old = p.ts_ns - (p.bar_ts_ns + NS) > 30 * NS
        assert p.stale == too_old
        assert p.stale_reason == ("" if not too_old else p.stale_reason)
    assert any(p.stale for p in predictions)
    assert not all(p.stale for p in predictions)


async def test_an_expired_champion_predicts_stale_and_a_demoted_one_not_at_all(ctx: Context) -> None:
    now_s = time.time_ns() // NS
    bars = market(now_s)
    live_from = (now_s - LIVE_S) * NS
    await ctx.store.insert("bars", bars.filter(pl.col("ts_ns") < live_from).to_arrow())
    await train_champion(ctx, max_model_age_s=0.001)
    live = bars.filter(pl.col("ts_ns") >= live_from)
    first, second = (
        live.filter(pl.col("ts_ns") < live_from + 30 * NS),
        live.filter(pl.col("ts_ns") >= live_from + 30 * NS),
    )

    predictor = Predictor("predictor", settings(max_bar_age_s=3600.0), ctx)
    await predictor.start()
    try:
        await publish(ctx, first)
        predictions = await collect(ctx, first.height)
        assert len(predictions) == first.height
        assert all(p.stale and p.stale_reason == "model expired" for p in predictions)

        await predictor.registry.demote("ridge", by="operator", reason="test")
        for _ in range(50):
            if not predictor.champions:
                break
            await asyncio.sleep(0.1)
        assert predictor.champions == {}
        await publish(ctx, second)
        await asyncio.sleep(1.0)
        assert len(await collect(ctx, first.height + 1, timeout_s=2.0)) == first.height
    finally:
        await predictor.stop()


def test_predictor_settings_in_a_config() -> None:
    from alphaengine.config import loads

    text = '[metrics]\nport = 0\n[admin]\nsocket = "a.sock"\n[modules.p]\ntype = "predictor"\n'
    loaded = loads(text + 'models = ["lgbm"]\n')
    settings = loaded.module("p").settings
    assert isinstance(settings, PredictorSettings)
    assert settings.models == ("lgbm",)
