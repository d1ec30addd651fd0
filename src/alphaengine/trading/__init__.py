"""Trading: signals from predictions, pre-trade risk, the paper broker, the portfolio and its statistics.

The pieces are plain synchronous objects, deterministic in event time; :class:`TradingCore` moves them
through time together, and the ``trader`` module (live) and the backtest drive that one core.
"""

from alphaengine.trading.broker import BrokerSettings, Execution, PaperBroker
from alphaengine.trading.core import CoreSettings, CoreState, Outbox, TradingCore
from alphaengine.trading.market import MarketState
from alphaengine.trading.portfolio import EquityPoint, Holding, Portfolio, PortfolioState, instrument
from alphaengine.trading.risk import (
    Quote,
    Rejection,
    RiskEngine,
    RiskLimits,
    RiskState,
    SizingSettings,
    TradingMode,
)
from alphaengine.trading.signals import Ensembled, SignalEngine
from alphaengine.trading.stats import Performance, performance

__all__ = [
    "BrokerSettings",
    "CoreSettings",
    "CoreState",
    "Ensembled",
    "EquityPoint",
    "Execution",
    "Holding",
    "MarketState",
    "Outbox",
    "PaperBroker",
    "Performance",
    "Portfolio",
    "PortfolioState",
    "Quote",
    "Rejection",
    "RiskEngine",
    "RiskLimits",
    "RiskState",
    "SignalEngine",
    "SizingSettings",
    "TradingCore",
    "TradingMode",
    "instrument",
    "performance",
]
