"""Test tooling shipped with the package: local fake exchanges and the tape they publish.

The fakes speak the providers' protocols (``PROTOCOLS.md``) on 127.0.0.1, with switches for drops,
silence, pings, malformed frames and rate limits; the test suite and ``bench/`` import them from here.
"""

from alphaengine.testing._server import CLIENT, CLOSED_BY_SERVER, DROPPED, SERVER_STOP, FakeStats
from alphaengine.testing.fake_binance import (
    MAX_AGE,
    PONG_TIMEOUT,
    RATE_LIMIT,
    SERVER_SHUTDOWN,
    BinanceStats,
    FakeBinance,
)
from alphaengine.testing.fake_finnhub import DEPLOY, REPLACED, VENUE_PREFIX, FakeFinnhub, FinnhubStats
from alphaengine.testing.tape import AggTrade, SymbolHistory, Tape, Trade

__all__ = [
    "CLIENT",
    "CLOSED_BY_SERVER",
    "DEPLOY",
    "DROPPED",
    "MAX_AGE",
    "PONG_TIMEOUT",
    "RATE_LIMIT",
    "REPLACED",
    "SERVER_SHUTDOWN",
    "SERVER_STOP",
    "VENUE_PREFIX",
    "AggTrade",
    "BinanceStats",
    "FakeBinance",
    "FakeFinnhub",
    "FakeStats",
    "FinnhubStats",
    "SymbolHistory",
    "Tape",
    "Trade",
]
