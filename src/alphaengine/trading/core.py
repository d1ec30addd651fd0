"""The trading core: signals, risk, paper broker and portfolio, stepped through event time in one order.

The trader (live) and the backtest both drive this one object: trades and predictions go in as they are
read, and :meth:`TradingCore.step` moves the core's time forward to ``hold_s`` behind the newest trade.
Moving to a time ``X`` applies, in time order, every trade before ``X`` to the broker's open orders and
the instruments' prices, the fills to the portfolio, and marks the equity curve every
``equity_interval_s``; a signal of a bar that closed at ``S`` is decided after the trades before ``S``
and before those at ``S`` or later, whatever the order the records were read in.

Holding back ``hold_s`` is what lets a bar's predictions arrive (the predictor answers after the bar has
closed) before the core's time passes the bar; reading a backlog, the caller also bounds the step by
the predictions read (:meth:`TradingCore.step`). A prediction that still comes later is *late*, given no
signal, and counted. It costs no simulated time: an order decided at ``S`` still meets the trades after
``S`` plus the broker's latency. A trade older than the core's time when it is read (a partition far
behind the others) is late too, counted and left out.

Because every step is a function of the data alone, a backtest of a recording and a live paper run over
the same data give the same fills, and a restart from a snapshot continues exactly where the snapshot
left off.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

import msgspec
import numpy as np
import numpy.typing as npt

from alphaengine.config import Strict
from alphaengine.domain import Fill, Order, OrderStatus, Position, Prediction, Signal, TickBatch
from alphaengine.trading.broker import BrokerSettings, Execution, PaperBroker
from alphaengine.trading.market import MarketState
from alphaengine.trading.portfolio import EquityPoint, Portfolio, PortfolioState, instrument
from alphaengine.trading.risk import Rejection, RiskEngine, RiskLimits, RiskState, SizingSettings
from alphaengine.trading.signals import Ensembled, SignalEngine

NS = 1_000_000_000

_Positive = Annotated[float, msgspec.Meta(gt=0)]


class CoreSettings(Strict, frozen=True):
    """How the trading core runs (the ``trader`` module's and the backtest's settings)."""

    account: str = "paper"
    """Names the account in the stored fills, orders and equity curve."""
    initial_cash_usd: _Positive = 100_000.0
    hold_s: Annotated[float, msgspec.Meta(ge=0)] = 5.0
    """How far behind the newest trade the core's time runs, for the predictions to arrive."""
    equity_interval_s: Annotated[int, msgspec.Meta(ge=1)] = 10
    """A point of the equity curve (and a kill-switch check) every this many seconds."""
    volatility_halflife_s: _Positive = 300.0
    limits: RiskLimits = RiskLimits()
    sizing: SizingSettings = SizingSettings()
    broker: BrokerSettings = BrokerSettings()


@dataclass(slots=True)
class Outbox:
    """What the core did since it was last emptied, for the trader to publish and store."""

    ensembled: list[Ensembled] = field(default_factory=list)
    """Every bar's outcome, a signal or why none (late bars included, with ``late`` as the reason)."""
    orders: list[tuple[int, Order]] = field(default_factory=list)
    """New and rejected orders and each later change of an order, with the time of the change."""
    fills: list[tuple[int, Fill]] = field(default_factory=list)
    """Fills with their sequence number in the fills log."""
    positions: list[Position] = field(default_factory=list)
    equity: list[EquityPoint] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    halts: list[Rejection] = field(default_factory=list)
    """The kill switch, when it fired."""
    late_ticks: int = 0


class CoreState(msgspec.Struct, frozen=True, kw_only=True):
    """The core as data: everything but the trades not yet applied (those are read again)."""

    now_ns: int
    next_equity_ns: int
    portfolio: PortfolioState
    risk: RiskState
    limits: RiskLimits
    broker: list[tuple[str, Order, float, int, bool]]
    market: dict[str, tuple[float, int, int, float, float, int, int, float]]
    signals: dict[str, Any]
    ready: list[Signal]
    last_equity: EquityPoint | None


class TradingCore:
    """Signal engine, risk engine, paper broker and portfolio, moved through event time together."""

    def __init__(self, settings: CoreSettings) -> None:
        self.settings = settings
        self.signals = SignalEngine()
        self.risk = RiskEngine(settings.limits, settings.sizing)
        self.broker = PaperBroker(settings.broker)
        self.portfolio = Portfolio(settings.initial_cash_usd)
        self.market = MarketState(settings.volatility_halflife_s)
        self.now_ns = 0
        """Every trade before this time has been applied (0: none seen yet)."""
        self.newest_ns = 0
        """The newest trade's time."""
        self.next_equity_ns = 0
        self.last_equity: EquityPoint | None = None
        self.out = Outbox()
        self._trades: dict[
            str, list[tuple[npt.NDArray[np.int64], npt.NDArray[np.float64], npt.NDArray[np.float64]]]
        ] = {}
        self._ready: list[tuple[int, str, str, Signal]] = []
        self._interval_ns = settings.equity_interval_s * NS

    # -- input ----------------------------------------------------------------------------------------

    def add_ticks(self, batch: TickBatch) -> None:
        """Take trades in; those before the core's time are late (counted in the outbox, left out)."""
        if not len(batch):
            return
        for symbol, part in batch.split_by_symbol():
            venue = str(part.data.column("venue")[0].as_py())
            ts = part.np("ts_ns").astype(np.int64, copy=False)
            if not self.now_ns:
                self.now_ns = int(ts.min()) // NS * NS
                self.next_equity_ns = -(-self.now_ns // self._interval_ns) * self._interval_ns
            keep = ts >= self.now_ns
            if not keep.all():
                self.out.late_ticks += int((~keep).sum())
                if not keep.any():
                    continue
            price = part.np("price").astype(np.float64, copy=False)
            qty = part.np("qty").astype(np.float64, copy=False)
            key = instrument(venue, symbol)
            self._trades.setdefault(key, []).append((ts[keep], price[keep], qty[keep]))
            self.newest_ns = max(self.newest_ns, int(ts.max()))

    def add_prediction(self, prediction: Prediction) -> None:
        """Take one prediction in; a bar whose group it completes becomes ready to trade."""
        for done in self.signals.add(prediction):
            self._ready_or_late(done)

    def _ready_or_late(self, done: Ensembled) -> None:
        if done.signal is None:
            self.out.ensembled.append(done)
        elif done.close_ns < self.now_ns:
            self.out.ensembled.append(
                Ensembled(
                    done.close_ns, done.venue, done.symbol, None, "late: the core's time had passed the bar"
                )
            )
        else:
            heapq.heappush(self._ready, (done.close_ns, done.venue, done.symbol, done.signal))

    # -- time -----------------------------------------------------------------------------------------

    def step(self, bound_ns: int | None = None) -> None:
        """Move to ``hold_s`` behind the newest trade (and not past ``bound_ns``), trading on the way.

        ``bound_ns`` is where the predictions read so far end, while more are waiting to be read.
        """
        if self.newest_ns:
            until = self.newest_ns - int(self.settings.hold_s * NS)
            self.run_until(until if bound_ns is None else min(until, bound_ns))

    def run_until(self, until_ns: int) -> None:
        """Move the core's time to ``until_ns``: every bar that closed before it is ensembled and traded."""
        if until_ns <= self.now_ns:
            return
        for done in self.signals.due(until_ns):
            self._ready_or_late(done)
        while self._ready and self._ready[0][0] < until_ns:
            close_ns, _, _, signal = heapq.heappop(self._ready)
            self._advance(close_ns)
            self._decide(signal)
        self._advance(until_ns)

    def _advance(self, until_ns: int) -> None:
        if until_ns <= self.now_ns:
            return
        windows: dict[
            str, tuple[npt.NDArray[np.int64], npt.NDArray[np.float64], npt.NDArray[np.float64]]
        ] = {}
        for key in sorted(self._trades):
            window, rest = _split(self._trades[key], until_ns)
            if rest is None:
                del self._trades[key]
            else:
                self._trades[key] = [rest]
            if window is not None:
                windows[key] = window
        before = self.market.marks()
        executions: list[Execution] = []
        empty = (np.empty(0, np.int64), np.empty(0, np.float64), np.empty(0, np.float64))
        for key in sorted({instrument(o.venue, o.symbol) for o in self.broker.open_orders} | set(windows)):
            ts, price, qty = windows.get(key, empty)
            executions.extend(self.broker.on_trades(key, ts, price, qty, until_ns))
        for key in sorted(set(self.market.instruments) | set(windows)):
            ts, price, _ = windows.get(key, empty)
            self.market.update(key, ts, price, until_ns)
        executions.sort(key=lambda e: (e.ts_ns, e.order.order_id, e.fill.fill_id if e.fill else ""))
        pending = iter(executions)
        nxt = next(pending, None)
        while self.next_equity_ns <= until_ns:
            b = self.next_equity_ns
            while nxt is not None and nxt.ts_ns < b:
                self._execute(nxt)
                nxt = next(pending, None)
            self._mark(b, _marks_before(b, before, windows))
            self.next_equity_ns += self._interval_ns
        while nxt is not None:
            self._execute(nxt)
            nxt = next(pending, None)
        self.now_ns = until_ns

    def _execute(self, e: Execution) -> None:
        self.out.orders.append((e.ts_ns, e.order))
        if e.fill is not None:
            seq = self.portfolio.fill_seq + 1
            position = self.portfolio.apply(e.fill, seq)
            self.out.fills.append((seq, e.fill))
            if position is not None:
                self.out.positions.append(position)

    def _mark(self, ts_ns: int, marks: Mapping[str, float]) -> None:
        point = self.portfolio.mark(ts_ns, marks)
        self.last_equity = point
        self.out.equity.append(point)
        fired = self.risk.on_equity(point)
        if fired is not None:
            self.out.halts.append(fired)

    def _decide(self, signal: Signal) -> None:
        key = instrument(signal.venue, signal.symbol)
        self.out.ensembled.append(Ensembled(signal.ts_ns, signal.venue, signal.symbol, signal))
        quote = self.market.quote(key)
        if quote is None:
            return
        marks = self.market.marks()
        order = self.risk.order_for(signal, quote, self.portfolio, marks)
        if order is None:
            return
        rejection = self.risk.check(order, quote, self.portfolio, marks)
        if rejection is not None:
            self.out.rejections.append(rejection)
            if rejection.check == "max_drawdown":
                self.out.halts.append(rejection)
            reason = f"{rejection.check}: {rejection.reason}"
            rejected = msgspec.structs.replace(order, status=OrderStatus.REJECTED, reason=reason)
            self.out.orders.append((order.ts_ns, rejected))
            return
        self.broker.submit(key, order)
        self.out.orders.append((order.ts_ns, order))

    # -- the operator ---------------------------------------------------------------------------------

    def pause(self, reason: str, *, reducing_only: bool = False) -> None:
        """Stop new exposure (see :meth:`RiskEngine.pause`)."""
        self.risk.pause(reason, reducing_only=reducing_only)

    def resume(self) -> None:
        """Trade again; the drawdown starts over from the equity now."""
        self.risk.resume()
        self.portfolio.reset_peak(self.portfolio.equity(self.market.marks()))

    def set_limits(self, limits: RiskLimits) -> None:
        """Put new limits in force."""
        self.risk.limits = limits

    def drain(self) -> Outbox:
        """What the core did since the last drain."""
        out, self.out = self.out, Outbox()
        return out

    # -- state ----------------------------------------------------------------------------------------

    def state(self) -> CoreState:
        """The core as data (the trades not yet applied excepted: the trader reads them again)."""
        return CoreState(
            now_ns=self.now_ns,
            next_equity_ns=self.next_equity_ns,
            portfolio=self.portfolio.state(),
            risk=self.risk.state(),
            limits=self.risk.limits,
            broker=self.broker.state(),
            market=self.market.state(),
            signals=self.signals.state(),
            ready=[r[3] for r in sorted(self._ready)],
            last_equity=self.last_equity,
        )

    def restore(self, state: CoreState, portfolio: Portfolio | None = None) -> None:
        """Continue from ``state``; ``portfolio``, when given, replaces the state's (rebuilt from fills)."""
        self.now_ns = state.now_ns
        self.newest_ns = state.now_ns  # the trades after now_ns are read again, and raise it
        self.next_equity_ns = state.next_equity_ns
        self.portfolio = portfolio if portfolio is not None else Portfolio.from_state(state.portfolio)
        self.portfolio.peak_equity_usd = state.portfolio.peak_equity_usd
        self.risk.limits = state.limits
        self.risk.restore(state.risk)
        self.broker.restore(state.broker)
        self.market.restore(state.market)
        self.signals.restore(state.signals)
        self._ready = [(s.ts_ns, s.venue, s.symbol, s) for s in state.ready]
        heapq.heapify(self._ready)
        self.last_equity = state.last_equity
        self._trades.clear()


def _split(
    chunks: list[tuple[npt.NDArray[np.int64], npt.NDArray[np.float64], npt.NDArray[np.float64]]],
    until_ns: int,
) -> tuple[
    tuple[npt.NDArray[np.int64], npt.NDArray[np.float64], npt.NDArray[np.float64]] | None,
    tuple[npt.NDArray[np.int64], npt.NDArray[np.float64], npt.NDArray[np.float64]] | None,
]:
    """Trades before ``until_ns`` (time order, arrival order among equal times) and the rest."""
    if len(chunks) == 1:
        ts, price, qty = chunks[0]
    else:
        ts = np.concatenate([c[0] for c in chunks])
        price = np.concatenate([c[1] for c in chunks])
        qty = np.concatenate([c[2] for c in chunks])
    if len(ts) > 1 and np.any(ts[1:] < ts[:-1]):
        order = np.argsort(ts, kind="stable")
        ts, price, qty = ts[order], price[order], qty[order]
    cut = int(np.searchsorted(ts, until_ns, side="left"))
    window = (ts[:cut], price[:cut], qty[:cut]) if cut else None
    rest = (ts[cut:], price[cut:], qty[cut:]) if cut < len(ts) else None
    return window, rest


def _marks_before(
    ts_ns: int,
    before: Mapping[str, float],
    windows: Mapping[str, tuple[npt.NDArray[np.int64], npt.NDArray[np.float64], npt.NDArray[np.float64]]],
) -> dict[str, float]:
    """Each instrument's last trade price before ``ts_ns``."""
    marks = dict(before)
    for key, (ts, price, _) in windows.items():
        i = int(np.searchsorted(ts, ts_ns, side="left"))
        if i:
            marks[key] = float(price[i - 1])
    return marks
