"""What the trader knows of each instrument's market: its last trade and its volatility.

The volatility is an exponentially weighted estimate of the variance of the log return per second,
sampled at the end of every second in which the instrument traded (a quiet spell adds its whole return
over its length, so gaps neither inflate nor deflate the estimate). Everything is in event time, updated
as the trader moves through the trades, so a backtest sees exactly the estimates the live run saw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from alphaengine.trading.risk import Quote

NS = 1_000_000_000


@dataclass(slots=True)
class InstrumentState:
    """Last trade and volatility estimate of one instrument."""

    price: float = 0.0
    """0 before the first trade."""
    ts_ns: int = 0
    sample_ns: int = 0
    """The end of the last second sampled."""
    sample_price: float = 0.0
    variance_per_s: float = 0.0
    """Meaningful once ``samples`` is at least 1."""
    samples: int = 0
    open_ns: int = 0
    """The end of the second being traded in, not yet sampled (0: none)."""
    open_price: float = 0.0


class MarketState:
    """Last trades and volatility of every instrument seen."""

    def __init__(self, halflife_s: float) -> None:
        if not halflife_s > 0:
            raise ValueError(f"volatility half-life must be positive, not {halflife_s}")
        self.halflife_s = halflife_s
        self._alpha = 1.0 - 0.5 ** (1.0 / halflife_s)
        self.instruments: dict[str, InstrumentState] = {}

    def marks(self) -> dict[str, float]:
        """Last trade price per instrument."""
        return {k: s.price for k, s in self.instruments.items() if s.price > 0}

    def quote(self, key: str) -> Quote | None:
        """The last trade and volatility of ``key`` (None before its first trade)."""
        s = self.instruments.get(key)
        if s is None or not s.price > 0:
            return None
        vol = math.sqrt(s.variance_per_s) if s.samples else math.nan
        return Quote(price=s.price, ts_ns=s.ts_ns, volatility=vol, volatility_samples=s.samples)

    def update(
        self, key: str, ts_ns: npt.NDArray[np.int64], price: npt.NDArray[np.float64], until_ns: int
    ) -> None:
        """Take the instrument's trades up to ``until_ns`` (in time order, maybe none) in.

        A second is sampled once ``until_ns`` has reached its end, so the estimate does not depend on
        where the trader's steps happen to cut the trades.
        """
        s = self.instruments.setdefault(key, InstrumentState())
        ends: list[int] = []
        prices: list[float] = []
        if s.open_ns:
            ends.append(s.open_ns)
            prices.append(s.open_price)
        if len(ts_ns):
            seconds = ts_ns // NS + 1
            last_in_second = np.flatnonzero(np.diff(seconds, append=seconds[-1] + 1))
            for end, p in zip(
                (seconds[last_in_second] * NS).tolist(), price[last_in_second].tolist(), strict=True
            ):
                if ends and ends[-1] == end:
                    prices[-1] = p
                else:
                    ends.append(end)
                    prices.append(p)
            s.price = float(price[-1])
            s.ts_ns = int(ts_ns[-1])
        s.open_ns, s.open_price = 0, 0.0
        for end, p in zip(ends, prices, strict=True):
            if end > until_ns:
                s.open_ns, s.open_price = end, p
                break
            self._sample(s, end, p)

    def _sample(self, s: InstrumentState, end: int, p: float) -> None:
        if s.sample_price > 0 and p > 0:
            r2_per_s = math.log(p / s.sample_price) ** 2 / ((end - s.sample_ns) / NS)
            if s.samples == 0:
                s.variance_per_s = r2_per_s
            else:
                s.variance_per_s += self._alpha * (r2_per_s - s.variance_per_s)
            s.samples += 1
        s.sample_ns = end
        s.sample_price = p

    def state(self) -> dict[str, tuple[float, int, int, float, float, int, int, float]]:
        """Every instrument's state as data."""
        return {
            k: (
                s.price,
                s.ts_ns,
                s.sample_ns,
                s.sample_price,
                s.variance_per_s,
                s.samples,
                s.open_ns,
                s.open_price,
            )
            for k, s in sorted(self.instruments.items())
        }

    def restore(self, state: dict[str, tuple[float, int, int, float, float, int, int, float]]) -> None:
        """Take the state of an earlier :class:`MarketState` over."""
        self.instruments = {k: InstrumentState(*v) for k, v in state.items()}
