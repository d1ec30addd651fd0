"""Market-data sources: the TickSource base, the synthetic market, replay, and exchange parsers."""

from alphaengine.sources.base import TICKS_TOPIC, SourceSettings, TickSource
from alphaengine.sources.binance import BinanceTradeParser
from alphaengine.sources.replay import ReplaySettings, ReplaySource
from alphaengine.sources.synthetic import SyntheticMarket, SyntheticSettings, SyntheticSource

__all__ = [
    "TICKS_TOPIC",
    "BinanceTradeParser",
    "ReplaySettings",
    "ReplaySource",
    "SourceSettings",
    "SyntheticMarket",
    "SyntheticSettings",
    "SyntheticSource",
    "TickSource",
]
