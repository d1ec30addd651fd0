"""Market-data sources: the TickSource base, live Binance and Finnhub, the synthetic market, replay."""

from alphaengine.sources.base import TICKS_TOPIC, SourceSettings, TickSource
from alphaengine.sources.binance import BinanceTradeParser
from alphaengine.sources.binance_live import BinanceSettings, BinanceSource
from alphaengine.sources.binance_rest import BinanceRestClient
from alphaengine.sources.feed import FeedSettings
from alphaengine.sources.finnhub import FinnhubSettings, FinnhubSource
from alphaengine.sources.finnhub_parser import FinnhubParser
from alphaengine.sources.replay import ReplaySettings, ReplaySource
from alphaengine.sources.synthetic import SyntheticMarket, SyntheticSettings, SyntheticSource

__all__ = [
    "TICKS_TOPIC",
    "BinanceRestClient",
    "BinanceSettings",
    "BinanceSource",
    "BinanceTradeParser",
    "FeedSettings",
    "FinnhubParser",
    "FinnhubSettings",
    "FinnhubSource",
    "ReplaySettings",
    "ReplaySource",
    "SourceSettings",
    "SyntheticMarket",
    "SyntheticSettings",
    "SyntheticSource",
    "TickSource",
]
