"""The risk engine: sizes each signal into an order within the limits, and checks every order before it goes.

Sizing is volatility-targeted: a signal whose expected return clears ``min_edge_bps`` asks for the
position whose one-sigma move over the signal's horizon is ``risk_bps`` of equity (``notional = equity *
risk_bps / (sigma_per_s * sqrt(horizon_s))``), in the signal's direction, capped by the position limit and
the gross headroom; a weaker signal asks for flat. The order is the difference from the position held,
at most ``max_order_notional_usd``, and is left out when it is small (``min_order_notional_usd``, or
less than ``rebalance_fraction`` of the target).

Every order, sized here or not, then passes the checks of :meth:`RiskEngine.check`, in this order; the
first that fails rejects it with a :class:`Rejection` naming the check (a bounded label for metrics)
and why:

``halted``, ``reducing_only``, ``stale_data``, ``price_band``, ``max_order_notional``,
``max_position_notional``, ``max_gross_exposure``, ``daily_loss``, ``max_drawdown``, ``rate_limit``.

The drawdown kill switch fires when the equity curve falls ``max_drawdown_pct`` below its peak: the
mode becomes ``halted`` and stays so until an operator resumes (which restarts the drawdown from the
equity of that moment). The daily loss limit lets only reducing orders through for the rest of the
UTC day. Time is always event time (the signal's, the equity point's), never the wall clock, so a
backtest decides exactly as the live run did.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from dataclasses import dataclass
from typing import Annotated, Literal

import msgspec

from alphaengine.config import Strict
from alphaengine.domain import Order, OrderType, Side, Signal
from alphaengine.trading.portfolio import EquityPoint, Portfolio, instrument

NS = 1_000_000_000
DAY_NS = 86_400 * NS
_RATE_WINDOW_NS = 60 * NS

_Positive = Annotated[float, msgspec.Meta(gt=0)]
_NonNegative = Annotated[float, msgspec.Meta(ge=0)]


class RiskLimits(Strict, frozen=True):
    """The trade limits in force; changed at run time through the admin socket and persisted."""

    max_order_notional_usd: _Positive = 2_000.0
    max_position_notional_usd: _Positive = 5_000.0
    """Per instrument, at the last trade price."""
    max_gross_exposure_usd: _Positive = 15_000.0
    """Sum of the absolute position notionals."""
    max_orders_per_minute: Annotated[int, msgspec.Meta(ge=1)] = 30
    max_daily_loss_usd: _Positive = 500.0
    """A loss this large since the UTC day began allows only reducing orders until the next day."""
    max_drawdown_pct: Annotated[float, msgspec.Meta(gt=0, le=100)] = 5.0
    """The kill switch: a fall this far below the equity peak halts trading until an operator resumes."""
    max_data_age_s: _Positive = 5.0
    """No order when the instrument's last trade is older than this at the decision."""
    price_band_bps: _Positive = 50.0
    """A limit order must be priced within this band around the last trade; a market order gets it as
    its protection price (the broker does not fill it beyond)."""


class SizingSettings(Strict, frozen=True):
    """How a signal becomes a target position."""

    min_edge_bps: _NonNegative = 25.0
    """The expected return over the horizon a position needs (about the round trip's fees and spread)."""
    risk_bps: _Positive = 10.0
    """Equity a one-sigma move over the horizon may cost, in bps of equity."""
    min_volatility_samples: Annotated[int, msgspec.Meta(ge=2)] = 60
    """No position before the instrument's volatility has this many samples."""
    min_order_notional_usd: _NonNegative = 10.0
    rebalance_fraction: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.25
    """Leave the position alone when the change is less than this fraction of the target."""
    order_type: Literal["market", "limit"] = "market"
    limit_offset_bps: _NonNegative = 0.0
    """Limit orders rest this far behind the last trade (0: at it)."""


class TradingMode(enum.StrEnum):
    """Whether orders may go out."""

    ACTIVE = "active"
    REDUCING = "reducing"
    """Only orders that shrink a position."""
    HALTED = "halted"
    """No orders (the kill switch fired, or an operator paused)."""


@dataclass(frozen=True, slots=True)
class Quote:
    """What the market looked like for one instrument at the decision."""

    price: float
    """The last trade's price."""
    ts_ns: int
    """The last trade's time."""
    volatility: float
    """Standard deviation of the log return per second (NaN until known)."""
    volatility_samples: int


CHECKS = (
    "halted",
    "reducing_only",
    "stale_data",
    "price_band",
    "max_order_notional",
    "max_position_notional",
    "max_gross_exposure",
    "daily_loss",
    "max_drawdown",
    "rate_limit",
)
"""Every pre-trade check by the name a :class:`Rejection` carries, in the order they are applied."""


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why an order did not go out: ``check`` is the bounded label, ``reason`` the full sentence."""

    check: str
    reason: str


class RiskState(msgspec.Struct, frozen=True, kw_only=True):
    """The risk engine as data (snapshots, hot reload)."""

    mode: TradingMode
    mode_reason: str
    day: int
    day_start_equity_usd: float | None
    order_times_ns: list[int]


class RiskEngine:
    """Pre-trade sizing and checks for one account."""

    def __init__(self, limits: RiskLimits, sizing: SizingSettings) -> None:
        self.limits = limits
        self.sizing = sizing
        self.mode = TradingMode.ACTIVE
        self.mode_reason = ""
        self._day = -1
        self._day_start_equity: float | None = None
        self._order_times: deque[int] = deque()

    # -- the operator ---------------------------------------------------------------------------------

    def pause(self, reason: str, *, reducing_only: bool = False) -> None:
        """Stop new exposure: halt everything, or let only reducing orders through."""
        self.mode = TradingMode.REDUCING if reducing_only else TradingMode.HALTED
        self.mode_reason = reason

    def resume(self) -> None:
        """Trade again (the caller restarts the drawdown from the current equity)."""
        self.mode = TradingMode.ACTIVE
        self.mode_reason = ""

    # -- the equity curve -----------------------------------------------------------------------------

    def on_equity(self, point: EquityPoint) -> Rejection | None:
        """Follow the equity curve: the day's start, and the kill switch (returned when it fires now)."""
        day = point.ts_ns // DAY_NS
        if day != self._day:
            self._day = day
            self._day_start_equity = point.equity_usd
        if self.mode is not TradingMode.HALTED and point.drawdown * 100.0 >= self.limits.max_drawdown_pct:
            reason = (
                f"kill switch: drawdown {point.drawdown * 100:.2f} % reached the limit of "
                f"{self.limits.max_drawdown_pct:g} % (equity {point.equity_usd:,.2f} USD)"
            )
            self.pause(reason)
            return Rejection("max_drawdown", reason)
        return None

    def daily_loss_usd(self, equity_usd: float) -> float:
        """Loss since the UTC day began (negative: a gain)."""
        return 0.0 if self._day_start_equity is None else self._day_start_equity - equity_usd

    # -- signals into orders ----------------------------------------------------------------------------

    def target_notional(
        self, signal: Signal, quote: Quote, equity_usd: float, other_gross_usd: float
    ) -> float:
        """The signed position notional the signal asks for, within the position and gross limits."""
        if abs(signal.score) * 1e4 < self.sizing.min_edge_bps:
            return 0.0
        if quote.volatility_samples < self.sizing.min_volatility_samples or not quote.volatility > 0:
            return 0.0
        sigma = quote.volatility * math.sqrt(max(signal.horizon_s, 1))
        notional = equity_usd * self.sizing.risk_bps / 1e4 / sigma
        cap = min(
            self.limits.max_position_notional_usd,
            max(self.limits.max_gross_exposure_usd - other_gross_usd, 0.0),
        )
        return math.copysign(min(notional, cap), signal.score)

    def order_for(
        self, signal: Signal, quote: Quote, portfolio: Portfolio, marks: dict[str, float]
    ) -> Order | None:
        """The order that moves the position toward the signal's target (None: leave it)."""
        key = instrument(signal.venue, signal.symbol)
        held = portfolio.qty(key)
        gross, _ = portfolio.exposures(marks)
        other_gross = gross - abs(held) * quote.price
        target = self.target_notional(signal, quote, portfolio.equity(marks), other_gross)
        change = target - held * quote.price
        if abs(change) < max(
            self.sizing.min_order_notional_usd, self.sizing.rebalance_fraction * abs(target)
        ):
            return None
        if target == 0.0:
            qty = abs(held)  # flat means flat, whatever the order limit
        else:
            notional = min(abs(change), self.limits.max_order_notional_usd)
            qty = math.floor(notional / quote.price * 1e8) / 1e8  # whole satoshi-sized units, never above
        if qty <= 0:
            return None
        side = Side.BUY if change > 0 else Side.SELL
        order_type = OrderType(self.sizing.order_type)
        limit = self._limit_price(side, quote.price, order_type)
        return Order(
            order_id=f"{signal.signal_id}:o",
            intent_id=signal.signal_id,
            ts_ns=signal.ts_ns,
            venue=signal.venue,
            symbol=signal.symbol,
            side=side,
            qty=qty,
            order_type=order_type,
            limit_price=limit,
        )

    def _limit_price(self, side: Side, last: float, order_type: OrderType) -> float:
        sign = 1.0 if side is Side.BUY else -1.0
        if order_type is OrderType.MARKET:  # protection: the broker fills no worse than the band
            return last * (1.0 + sign * self.limits.price_band_bps / 1e4)
        return last * (1.0 - sign * self.sizing.limit_offset_bps / 1e4)

    # -- the checks ----------------------------------------------------------------------------------

    def check(
        self, order: Order, quote: Quote, portfolio: Portfolio, marks: dict[str, float]
    ) -> Rejection | None:
        """Every pre-trade check on ``order`` at its ``ts_ns``; None lets it through.

        An order let through is counted toward the rate limit.
        """
        lim = self.limits
        key = instrument(order.venue, order.symbol)
        held = portfolio.qty(key)
        signed = order.qty if order.side is Side.BUY else -order.qty
        after = held + signed
        reducing = held != 0.0 and (
            after == 0.0 or (abs(after) < abs(held) and math.copysign(1.0, after) == math.copysign(1.0, held))
        )
        price = quote.price
        notional = order.qty * price
        equity = portfolio.equity(marks)
        gross, _ = portfolio.exposures(marks)
        gross_after = gross - abs(held) * price + abs(after) * price

        if self.mode is TradingMode.HALTED:
            return Rejection("halted", f"trading is halted: {self.mode_reason}")
        if self.mode is TradingMode.REDUCING and not reducing:
            return Rejection("reducing_only", f"only reducing orders are allowed: {self.mode_reason}")
        age_s = (order.ts_ns - quote.ts_ns) / NS
        if age_s > lim.max_data_age_s:
            return Rejection(
                "stale_data",
                f"last trade of {order.symbol} is {age_s:.1f} s old (limit {lim.max_data_age_s:g} s)",
            )
        if order.order_type is OrderType.LIMIT and order.limit_price is not None:
            off_bps = abs(order.limit_price / price - 1.0) * 1e4
            if off_bps > lim.price_band_bps:
                return Rejection(
                    "price_band",
                    f"limit {order.limit_price:g} is {off_bps:.1f} bps from the last trade {price:g} "
                    f"(band {lim.price_band_bps:g} bps)",
                )
        if notional > lim.max_order_notional_usd and not reducing:
            return Rejection(
                "max_order_notional",
                f"order notional {notional:,.2f} USD above the limit of {lim.max_order_notional_usd:,.2f}",
            )
        if abs(after) * price > lim.max_position_notional_usd and not reducing:
            return Rejection(
                "max_position_notional",
                f"position would be {abs(after) * price:,.2f} USD, above the limit of "
                f"{lim.max_position_notional_usd:,.2f}",
            )
        if gross_after > lim.max_gross_exposure_usd and gross_after > gross:
            return Rejection(
                "max_gross_exposure",
                f"gross exposure would be {gross_after:,.2f} USD, above the limit of "
                f"{lim.max_gross_exposure_usd:,.2f}",
            )
        loss = self.daily_loss_usd(equity)
        if loss >= lim.max_daily_loss_usd and not reducing:
            return Rejection(
                "daily_loss",
                f"lost {loss:,.2f} USD today (limit {lim.max_daily_loss_usd:,.2f}): only reducing orders "
                "until the next UTC day",
            )
        peak = portfolio.peak_equity_usd
        drawdown_pct = (1.0 - equity / peak) * 100.0 if peak > 0 else 0.0
        if drawdown_pct >= lim.max_drawdown_pct:
            reason = (
                f"kill switch: drawdown {drawdown_pct:.2f} % reached the limit of {lim.max_drawdown_pct:g} %"
            )
            self.pause(reason)
            return Rejection("max_drawdown", reason)
        while self._order_times and self._order_times[0] <= order.ts_ns - _RATE_WINDOW_NS:
            self._order_times.popleft()
        if len(self._order_times) >= lim.max_orders_per_minute:
            return Rejection(
                "rate_limit",
                f"{len(self._order_times)} orders in the last minute (limit {lim.max_orders_per_minute})",
            )
        self._order_times.append(order.ts_ns)
        return None

    # -- state --------------------------------------------------------------------------------------

    def state(self) -> RiskState:
        """The engine's state as data (the limits are kept apart: they are configuration)."""
        return RiskState(
            mode=self.mode,
            mode_reason=self.mode_reason,
            day=self._day,
            day_start_equity_usd=self._day_start_equity,
            order_times_ns=list(self._order_times),
        )

    def restore(self, state: RiskState) -> None:
        """Take the state of an earlier engine over."""
        self.mode = state.mode
        self.mode_reason = state.mode_reason
        self._day = state.day
        self._day_start_equity = state.day_start_equity_usd
        self._order_times = deque(state.order_times_ns)
