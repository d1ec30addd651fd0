"""The portfolio: positions, cash and PnL, folded from fills in their order; marks give the equity.

Accounting (every figure in USD, the quote currency of the ``*USDT`` symbols):

- A fill of signed quantity ``q`` (positive buys) at price ``p`` with fee ``f`` moves ``q * p + f`` out of
  cash.
- Adding to a position (or opening one) moves the average price to the quantity-weighted mean; reducing
  realizes ``closed * (p - avg) * sign(position)``; a fill that crosses zero closes the old position
  and opens the rest at ``p``.
- ``equity = cash + sum(qty * mark)``, which equals ``initial_cash + realized + unrealized - fees``
  (``unrealized = sum(qty * (mark - avg))``); the tests hold the two to each other.

The state is a fold of the fills log: applying the same fills in the same order from the same initial
cash gives the same numbers to the bit, which is what a restart rebuilds from. Each fill carries its
sequence number in the log, so a fill offered twice (a replay after a crash) is recognised and skipped.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import msgspec

from alphaengine.domain import Fill, Position, Side


def instrument(venue: str, symbol: str) -> str:
    """The key of one tradable: ``"<venue>:<symbol>"``."""
    return f"{venue}:{symbol}"


def split_instrument(key: str) -> tuple[str, str]:
    """``(venue, symbol)`` of an instrument key."""
    venue, _, symbol = key.partition(":")
    return venue, symbol


@dataclass(slots=True)
class Holding:
    """What the portfolio holds of one instrument."""

    qty: float = 0.0
    """Signed quantity in the base asset (negative: short)."""
    avg_price: float = 0.0
    """Average entry price of the open quantity (0 when flat)."""
    realized_usd: float = 0.0
    """PnL realized by reducing or closing, before fees."""
    fees_usd: float = 0.0
    traded_usd: float = 0.0
    """Notional traded, both sides (turnover)."""
    fills: int = 0

    def apply(self, signed_qty: float, price: float, fee_usd: float) -> float:
        """Fold one fill in; returns the PnL it realized (before its fee)."""
        realized = 0.0
        pos = self.qty
        if pos == 0.0 or math.copysign(1.0, pos) == math.copysign(1.0, signed_qty):
            new = pos + signed_qty
            self.avg_price = (self.avg_price * abs(pos) + price * abs(signed_qty)) / abs(new)
            self.qty = new
        else:
            closed = min(abs(signed_qty), abs(pos))
            realized = closed * (price - self.avg_price) * math.copysign(1.0, pos)
            new = pos + signed_qty
            if abs(signed_qty) > abs(pos):
                self.avg_price = price  # crossed zero: the rest opens a position at this price
            elif abs(signed_qty) == abs(pos):
                self.avg_price = 0.0
                new = 0.0
            self.qty = new
        self.realized_usd += realized
        self.fees_usd += fee_usd
        self.traded_usd += abs(signed_qty) * price
        self.fills += 1
        return realized


class EquityPoint(msgspec.Struct, frozen=True, kw_only=True):
    """The portfolio marked to market at one moment (one row of the equity curve)."""

    ts_ns: int
    equity_usd: float
    cash_usd: float
    realized_usd: float
    unrealized_usd: float
    fees_usd: float
    gross_exposure_usd: float
    net_exposure_usd: float
    drawdown: float
    """Fall from the highest equity so far, as a fraction of it (0.05 = 5 % below the peak)."""


class PortfolioState(msgspec.Struct, frozen=True, kw_only=True):
    """A portfolio as data (snapshots, hot reload): every holding, the cash and the fills applied."""

    initial_cash_usd: float
    cash_usd: float
    fill_seq: int
    peak_equity_usd: float
    holdings: dict[str, tuple[float, float, float, float, float, int]]
    """Per instrument: qty, avg_price, realized_usd, fees_usd, traded_usd, fills."""


class Portfolio:
    """Positions, cash, realized and unrealized PnL, fees, equity and drawdown of one account."""

    def __init__(self, initial_cash_usd: float) -> None:
        if not (math.isfinite(initial_cash_usd) and initial_cash_usd > 0):
            raise ValueError(f"initial cash must be positive and finite, not {initial_cash_usd}")
        self.initial_cash_usd = initial_cash_usd
        self.cash_usd = initial_cash_usd
        self.holdings: dict[str, Holding] = {}
        self.fill_seq = 0
        """How many fills have been applied: the sequence number of the last one."""
        self.peak_equity_usd = initial_cash_usd

    # -- fills --------------------------------------------------------------------------------------

    def apply(self, fill: Fill, seq: int) -> Position | None:
        """Apply the fill numbered ``seq`` in the fills log; returns the position after it.

        A fill whose ``seq`` was applied already returns None and changes nothing; a gap in the sequence
        is a bug upstream and raises ValueError.
        """
        if seq <= self.fill_seq:
            return None
        if seq != self.fill_seq + 1:
            raise ValueError(f"fill {fill.fill_id} has sequence {seq}, expected {self.fill_seq + 1}")
        key = instrument(fill.venue, fill.symbol)
        holding = self.holdings.setdefault(key, Holding())
        signed = fill.qty if fill.side is Side.BUY else -fill.qty
        holding.apply(signed, fill.price, fill.fee_usd)
        self.cash_usd -= signed * fill.price + fill.fee_usd
        self.fill_seq = seq
        return Position(
            ts_ns=fill.ts_ns,
            venue=fill.venue,
            symbol=fill.symbol,
            qty=holding.qty,
            avg_price=holding.avg_price,
            realized_pnl_usd=holding.realized_usd,
            fees_usd=holding.fees_usd,
        )

    @classmethod
    def from_fills(cls, initial_cash_usd: float, fills: Iterable[tuple[int, Fill]]) -> Portfolio:
        """Rebuild a portfolio by applying ``(seq, fill)`` pairs of the fills log in order."""
        portfolio = cls(initial_cash_usd)
        for seq, fill in fills:
            portfolio.apply(fill, seq)
        return portfolio

    # -- valuation ----------------------------------------------------------------------------------

    def qty(self, key: str) -> float:
        """Signed quantity held of an instrument."""
        holding = self.holdings.get(key)
        return 0.0 if holding is None else holding.qty

    @property
    def realized_usd(self) -> float:
        """Realized PnL of every instrument, before fees."""
        return math.fsum(h.realized_usd for h in self.holdings.values())

    @property
    def fees_usd(self) -> float:
        """Fees paid on every instrument."""
        return math.fsum(h.fees_usd for h in self.holdings.values())

    def unrealized_usd(self, marks: Mapping[str, float]) -> float:
        """PnL of the open positions at the marks."""
        return math.fsum(h.qty * (self._mark(k, marks) - h.avg_price) for k, h in self.holdings.items())

    def exposures(self, marks: Mapping[str, float]) -> tuple[float, float]:
        """``(gross, net)`` notional of the open positions at the marks."""
        values = [h.qty * self._mark(k, marks) for k, h in self.holdings.items() if h.qty]
        return math.fsum(abs(v) for v in values), math.fsum(values)

    def equity(self, marks: Mapping[str, float]) -> float:
        """Cash plus the open positions at the marks."""
        return self.cash_usd + math.fsum(
            h.qty * self._mark(k, marks) for k, h in self.holdings.items() if h.qty
        )

    def mark(self, ts_ns: int, marks: Mapping[str, float]) -> EquityPoint:
        """The equity curve's point at ``ts_ns``; raises the high-water mark when equity is above it."""
        equity = self.equity(marks)
        self.peak_equity_usd = max(self.peak_equity_usd, equity)
        gross, net = self.exposures(marks)
        return EquityPoint(
            ts_ns=ts_ns,
            equity_usd=equity,
            cash_usd=self.cash_usd,
            realized_usd=self.realized_usd,
            unrealized_usd=self.unrealized_usd(marks),
            fees_usd=self.fees_usd,
            gross_exposure_usd=gross,
            net_exposure_usd=net,
            drawdown=1.0 - equity / self.peak_equity_usd if self.peak_equity_usd > 0 else 0.0,
        )

    def reset_peak(self, equity_usd: float) -> None:
        """Start the drawdown over from ``equity_usd`` (an operator resumed trading after a halt)."""
        self.peak_equity_usd = equity_usd

    def _mark(self, key: str, marks: Mapping[str, float]) -> float:
        mark = marks.get(key)
        if mark is None:  # never traded since the start: its entry price is the best mark there is
            return self.holdings[key].avg_price
        return mark

    # -- state --------------------------------------------------------------------------------------

    def state(self) -> PortfolioState:
        """The whole portfolio as data."""
        return PortfolioState(
            initial_cash_usd=self.initial_cash_usd,
            cash_usd=self.cash_usd,
            fill_seq=self.fill_seq,
            peak_equity_usd=self.peak_equity_usd,
            holdings={
                k: (h.qty, h.avg_price, h.realized_usd, h.fees_usd, h.traded_usd, h.fills)
                for k, h in sorted(self.holdings.items())
            },
        )

    @classmethod
    def from_state(cls, state: PortfolioState) -> Portfolio:
        """A portfolio equal to the one whose :meth:`state` this is."""
        portfolio = cls(state.initial_cash_usd)
        portfolio.cash_usd = state.cash_usd
        portfolio.fill_seq = state.fill_seq
        portfolio.peak_equity_usd = state.peak_equity_usd
        portfolio.holdings = {k: Holding(*v) for k, v in state.holdings.items()}
        return portfolio
