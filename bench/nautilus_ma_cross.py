"""NautilusTrader's side of ``bench/backtest.py``: the same trades through its BacktestEngine.

Run with the interpreter of a virtual environment holding the PyPI package ``nautilus_trader`` (the
benchmark makes one, ``.venv-nautilus``, beside the project's: the two packages pin different versions
of shared dependencies). Reads a tick file in alphaengine's tick schema (Parquet), builds Nautilus
``TradeTick`` objects for the Binance spot instruments of its test kit, and runs a simple moving-average
cross on 1-second bars aggregated from the trades, with market orders: long while the fast average is
at or above the slow one, short below (the rule of alphaengine's ``ma_cross`` module). Prints one JSON
line: trades, fills, and the seconds spent building the ticks and running the engine.
"""

from __future__ import annotations

import json
import sys
import time
from decimal import Decimal

import pandas as pd
import pyarrow.parquet as pq
from nautilus_trader.backtest.engine import BacktestEngine, BacktestEngineConfig
from nautilus_trader.config import LoggingConfig, StrategyConfig
from nautilus_trader.indicators import SimpleMovingAverage
from nautilus_trader.model.currencies import BTC, ETH, USDT
from nautilus_trader.model.data import Bar, BarType
from nautilus_trader.model.enums import AccountType, OmsType, OrderSide
from nautilus_trader.model.identifiers import InstrumentId, Venue
from nautilus_trader.model.objects import Money
from nautilus_trader.persistence.wranglers import TradeTickDataWrangler
from nautilus_trader.test_kit.providers import TestInstrumentProvider
from nautilus_trader.trading.strategy import Strategy


class MaCrossConfig(StrategyConfig, frozen=True):
    """One instrument's moving-average cross."""

    instrument_id: InstrumentId
    bar_type: BarType
    trade_size: Decimal
    fast: int = 10
    slow: int = 20


class MaCross(Strategy):
    """Long while the fast SMA is at or above the slow one, short below; market orders on each cross."""

    def __init__(self, config: MaCrossConfig) -> None:
        super().__init__(config)
        self.fast = SimpleMovingAverage(config.fast)
        self.slow = SimpleMovingAverage(config.slow)

    def on_start(self) -> None:
        self.register_indicator_for_bars(self.config.bar_type, self.fast)
        self.register_indicator_for_bars(self.config.bar_type, self.slow)
        self.subscribe_bars(self.config.bar_type)

    def on_bar(self, bar: Bar) -> None:
        if not self.indicators_initialized():
            return
        iid = self.config.instrument_id
        if self.fast.value >= self.slow.value:
            if self.portfolio.is_flat(iid):
                self._market(OrderSide.BUY)
            elif self.portfolio.is_net_short(iid):
                self.close_all_positions(iid)
                self._market(OrderSide.BUY)
        elif self.portfolio.is_flat(iid):
            self._market(OrderSide.SELL)
        elif self.portfolio.is_net_long(iid):
            self.close_all_positions(iid)
            self._market(OrderSide.SELL)

    def _market(self, side: OrderSide) -> None:
        instrument = self.cache.instrument(self.config.instrument_id)
        order = self.order_factory.market(
            self.config.instrument_id, side, instrument.make_qty(self.config.trade_size)
        )
        self.submit_order(order)

    def on_stop(self) -> None:
        self.close_all_positions(self.config.instrument_id)


def main(path: str) -> None:
    table = pq.read_table(path, columns=["symbol", "trade_id", "ts_ns", "price", "qty", "side"])
    frame = table.to_pandas()
    instruments = {
        "BTCUSDT": TestInstrumentProvider.btcusdt_binance(),
        "ETHUSDT": TestInstrumentProvider.ethusdt_binance(),
    }
    sizes = {"BTCUSDT": Decimal("0.010000"), "ETHUSDT": Decimal("0.10000")}

    started = time.perf_counter()
    ticks = []
    for symbol, part in frame.groupby("symbol"):
        data = pd.DataFrame(
            {
                "price": part["price"].to_numpy(),
                "quantity": part["qty"].to_numpy(),
                "trade_id": part["trade_id"].to_numpy(),
                "buyer_maker": (part["side"] < 0).to_numpy(),
            },
            index=pd.to_datetime(part["ts_ns"].to_numpy(), unit="ns", utc=True),
        )
        ticks += TradeTickDataWrangler(instruments[str(symbol)]).process(data)
    built = time.perf_counter() - started

    engine = BacktestEngine(BacktestEngineConfig(logging=LoggingConfig(log_level="ERROR")))
    engine.add_venue(
        venue=Venue("BINANCE"),
        oms_type=OmsType.NETTING,
        account_type=AccountType.CASH,
        base_currency=None,
        starting_balances=[Money(10_000_000, USDT), Money(100, BTC), Money(1_000, ETH)],
    )
    for symbol in sorted(set(frame["symbol"])):
        instrument = instruments[symbol]
        engine.add_instrument(instrument)
        engine.add_strategy(
            MaCross(
                MaCrossConfig(
                    strategy_id=f"MaCross-{symbol}",
                    instrument_id=instrument.id,
                    bar_type=BarType.from_str(f"{instrument.id}-1-SECOND-LAST-INTERNAL"),
                    trade_size=sizes[symbol],
                )
            )
        )
    engine.add_data(ticks)
    started = time.perf_counter()
    engine.run()
    ran = time.perf_counter() - started
    fills = len(engine.trader.generate_order_fills_report())
    engine.dispose()
    print(json.dumps({"trades": len(ticks), "fills": fills, "build_s": built, "run_s": ran}))


if __name__ == "__main__":
    main(sys.argv[1])
