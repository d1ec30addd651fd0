"""A small two-symbol market with predictions that see ahead, for the trading tests."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from alphaengine.domain import Prediction, TickBatch
from alphaengine.trading import CoreSettings, RiskLimits, SizingSettings

NS = 1_000_000_000
T0 = 1_700_000_000 * NS
SECONDS = 900
HORIZON_S = 60
SYMBOLS = ("BTCUSDT", "ETHUSDT")


@dataclass(frozen=True)
class Market:
    ticks: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]
    predictions: list[Prediction]


def make_market(seed: int = 11) -> Market:
    """Two random walks with about 5 trades a second, and two models that see 60 s ahead, noisily."""
    rng = np.random.default_rng(seed)
    ticks = {}
    predictions: list[Prediction] = []
    for j, symbol in enumerate(SYMBOLS):
        n = SECONDS * 5
        ts = np.sort(rng.integers(0, SECONDS * NS, n)).astype(np.int64) + T0
        price = (100.0 * (j + 1)) * np.exp(np.cumsum(rng.normal(0, 6e-4, n)))
        ticks[symbol] = (ts, price, rng.uniform(0.01, 2.0, n))
        for second in range(SECONDS - HORIZON_S):
            start, end = np.searchsorted(ts, [T0 + second * NS, T0 + (second + 1) * NS])
            if start == end:
                continue
            later = np.searchsorted(ts, T0 + (second + 1 + HORIZON_S) * NS) - 1
            future = float(np.log(price[later] / price[end - 1]))
            for model, weight, noise in (("ridge", 0.2, 0.002), ("lgbm", 0.1, 0.004)):
                predictions.append(
                    Prediction(
                        ts_ns=T0 + (second + 1) * NS,
                        venue="BINANCE",
                        symbol=symbol,
                        interval_s=1,
                        bar_ts_ns=T0 + second * NS,
                        model=model,
                        version=f"v1-{model}",
                        horizon_s=HORIZON_S,
                        value=0.5 * future + float(rng.normal(0, noise)),
                        weight=weight,
                        group_size=2,
                    )
                )
    return Market(ticks, predictions)


MARKET = make_market()
SETTINGS = CoreSettings(
    hold_s=5.0,
    limits=RiskLimits(max_orders_per_minute=20),
    sizing=SizingSettings(min_edge_bps=25, min_volatility_samples=30),
)


def batch(symbol: str, lo: int, hi: int) -> TickBatch:
    ts, price, qty = MARKET.ticks[symbol]
    sel = (ts >= lo) & (ts < hi)
    n = int(sel.sum())
    return TickBatch.from_columns(
        venue="BINANCE",
        symbol=symbol,
        trade_id=np.flatnonzero(sel),
        ts_ns=ts[sel],
        recv_ns=ts[sel],
        price=price[sel],
        qty=qty[sel],
        side=np.ones(n),
    )
