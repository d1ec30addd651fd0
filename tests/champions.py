"""A champion model for tests: ridge trained by a real training cycle on synthetic bars with a signal."""

from __future__ import annotations

from typing import Any

import polars as pl

from alphaengine.kernel.module import Context
from alphaengine.models.trainer import Retrainer, TrainerSettings
from alphaengine.sources.synthetic import SyntheticSettings
from alphaengine.testing.bars import synthetic_bars

NS = 1_000_000_000
SYMBOLS = ("BTCUSDT", "ETHUSDT")
HISTORY_S = 3 * 3600
LIVE_S = 60


def market(now_s: int) -> pl.DataFrame:
    """Three hours of bars ending a minute ago, then the last minute: history to train on, live bars."""
    settings = SyntheticSettings(symbols=SYMBOLS, rate_per_s=20.0, predictability=0.5)
    start_s = now_s - HISTORY_S - LIVE_S
    return synthetic_bars(settings, seconds=HISTORY_S + LIVE_S, start_ns=start_s * NS, seed=7)


async def train_champion(ctx: Context, **overrides: Any) -> str:
    """A ridge version trained by a real cycle, made champion (by hand if the rule did not promote it)."""
    config = TrainerSettings(**({"models": ("ridge",), "fee_bps": 1.0, "min_bars": 1000} | overrides))
    retrainer = Retrainer(
        config, store=ctx.store, objects=ctx.objects, clock=ctx.clock, data_dir=ctx.data_dir
    )
    try:
        report = await retrainer.cycle()
        (ridge,) = report.models
        assert ridge.version is not None, ridge
        if ridge.status != "promoted":
            await retrainer.registry.promote("ridge", ridge.version, by="operator", reason="test")
    finally:
        await retrainer.close()
    return ridge.version
