"""The paper broker: fills orders against the trades of the tick stream, with fees, slippage and latency.

An order reaches the market ``latency_ms`` after its ``ts_ns`` and then meets the trades that follow:

- A **market** order fills whole at the first trade it meets, at that price moved against it by the
  slippage (``spread_bps / 2 + impact_bps * sqrt(notional / impact_notional_usd)``: half the spread,
  plus a square-root impact that is ``impact_bps`` at ``impact_notional_usd``), and pays the taker fee.
  Its ``limit_price`` is a protection price: a first trade beyond it cancels the order, and the
  slippage never takes the fill beyond it.
- A **limit** order that can trade at once (a buy at or above the first trade it meets) fills whole as a
  taker, like a market order capped at its limit. Otherwise it rests: each later trade strictly through
  its price (a sell below a resting buy) fills it at its price as a maker, up to that trade's quantity,
  so it may fill in parts. Whatever is left ``limit_ttl_s`` after the order's time is canceled.

Everything is a function of the order and of the trades, never of when the broker happens to be called,
so a backtest fills exactly as the live run did. Fill ids are the order id and the fill's number within
the order (``<order_id>:f<n>``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated

import msgspec
import numpy as np
import numpy.typing as npt

from alphaengine.config import Strict
from alphaengine.domain import Fill, Liquidity, Order, OrderStatus, OrderType, Side

NS = 1_000_000_000

_NonNegative = Annotated[float, msgspec.Meta(ge=0)]


class BrokerSettings(Strict, frozen=True):
    """Costs and timing of the paper broker. The fee defaults are Binance spot's base rates (0.1 %)."""

    taker_fee_bps: _NonNegative = 10.0
    maker_fee_bps: _NonNegative = 10.0
    spread_bps: _NonNegative = 2.0
    """The quoted spread assumed around the last trade; a market order pays half of it."""
    impact_bps: _NonNegative = 10.0
    """Price impact of an order of ``impact_notional_usd`` (square-root law in between)."""
    impact_notional_usd: Annotated[float, msgspec.Meta(gt=0)] = 1_000_000.0
    latency_ms: _NonNegative = 50.0
    """Time from the order's decision to its arrival at the market."""
    limit_ttl_s: Annotated[float, msgspec.Meta(gt=0)] = 60.0
    """A limit order still open this long after its time is canceled."""


@dataclass(slots=True)
class _Working:
    order: Order
    filled: float = 0.0
    fills: int = 0
    resting: bool = False
    """Met its first trade without trading: now fills only as a maker."""


@dataclass(frozen=True, slots=True)
class _Trades:
    ts_ns: npt.NDArray[np.int64]
    price: npt.NDArray[np.float64]
    qty: npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class Execution:
    """What the broker did with one order at one moment: a fill, or a change of the order's state."""

    ts_ns: int
    order: Order
    """The order after this step (its status, filled quantity and reason)."""
    fill: Fill | None = None


class PaperBroker:
    """Simulated execution of orders against trades."""

    def __init__(self, settings: BrokerSettings) -> None:
        self.settings = settings
        self._working: dict[str, list[_Working]] = {}
        """Open orders per instrument, in the order they were submitted."""

    @property
    def open_orders(self) -> list[Order]:
        """Every order not yet filled or canceled."""
        return [w.order for orders in self._working.values() for w in orders]

    def submit(self, key: str, order: Order) -> None:
        """Accept an order for the instrument ``key``; it meets the trades after its arrival time."""
        self._working.setdefault(key, []).append(_Working(order))

    def on_trades(
        self,
        key: str,
        ts_ns: npt.NDArray[np.int64],
        price: npt.NDArray[np.float64],
        qty: npt.NDArray[np.float64],
        until_ns: int,
    ) -> list[Execution]:
        """Match the open orders of ``key`` with its trades up to (not including) ``until_ns``.

        ``ts_ns`` is in time order and holds every trade of the instrument since the previous call.
        Returns what happened, in time order per order.
        """
        orders = self._working.get(key)
        if not orders:
            return []
        out: list[Execution] = []
        still: list[_Working] = []
        trades = _Trades(ts_ns, price, qty)
        for w in orders:
            done = self._match(w, trades, until_ns, out)
            if not done:
                still.append(w)
        if still:
            self._working[key] = still
        else:
            del self._working[key]
        return out

    def _match(self, w: _Working, trades: _Trades, until_ns: int, out: list[Execution]) -> bool:
        order = w.order
        ts_ns, price, qty = trades.ts_ns, trades.price, trades.qty
        arrival = order.ts_ns + int(self.settings.latency_ms * 1e6)
        expiry = order.ts_ns + int(self.settings.limit_ttl_s * NS)
        start = int(np.searchsorted(ts_ns, arrival, side="left"))
        if order.order_type is OrderType.LIMIT:
            stop = int(np.searchsorted(ts_ns, expiry, side="left"))
        else:
            stop = len(ts_ns)
        buy = order.side is Side.BUY
        if not w.resting:
            if start >= stop:
                return self._expire(w, until_ns, expiry, out)
            first = float(price[start])
            limit = order.limit_price
            marketable = limit is None or (first <= limit if buy else first >= limit)
            if marketable:
                out.append(self._fill_taker(w, int(ts_ns[start]), first))
                return True
            if order.order_type is OrderType.MARKET:
                reason = f"first trade {first:g} beyond the protection price {limit:g}"
                out.append(self._close(w, int(ts_ns[start]), OrderStatus.CANCELED, reason))
                return True
            w.resting = True
            start += 1
        limit_price = float(order.limit_price or 0.0)
        window = price[start:stop]
        through = np.flatnonzero(window < limit_price if buy else window > limit_price)
        for i in through.tolist():
            j = start + i
            take = min(float(qty[j]), order.qty - w.filled)
            out.append(self._fill(w, int(ts_ns[j]), limit_price, take, Liquidity.MAKER))
            if w.filled >= order.qty:
                return True
        return self._expire(w, until_ns, expiry, out)

    def _expire(self, w: _Working, until_ns: int, expiry: int, out: list[Execution]) -> bool:
        if w.order.order_type is OrderType.LIMIT and until_ns >= expiry:
            left = w.order.qty - w.filled
            reason = f"{left:g} left unfilled after {self.settings.limit_ttl_s:g} s"
            out.append(self._close(w, expiry, OrderStatus.CANCELED, reason))
            return True
        return False

    def _fill_taker(self, w: _Working, ts: int, trade_price: float) -> Execution:
        order = w.order
        s = self.settings
        notional = order.qty * trade_price
        slip_bps = s.spread_bps / 2.0 + s.impact_bps * math.sqrt(notional / s.impact_notional_usd)
        if order.side is Side.BUY:
            fill_price = trade_price * (1.0 + slip_bps / 1e4)
            if order.limit_price is not None:
                fill_price = min(fill_price, order.limit_price)
        else:
            fill_price = trade_price * (1.0 - slip_bps / 1e4)
            if order.limit_price is not None:
                fill_price = max(fill_price, order.limit_price)
        return self._fill(w, ts, fill_price, order.qty, Liquidity.TAKER)

    def _fill(self, w: _Working, ts: int, fill_price: float, qty: float, liquidity: Liquidity) -> Execution:
        order = w.order
        fee_bps = self.settings.taker_fee_bps if liquidity is Liquidity.TAKER else self.settings.maker_fee_bps
        w.fills += 1
        w.filled = order.qty if qty >= order.qty - w.filled else w.filled + qty
        fill = Fill(
            fill_id=f"{order.order_id}:f{w.fills}",
            order_id=order.order_id,
            ts_ns=ts,
            venue=order.venue,
            symbol=order.symbol,
            side=order.side,
            qty=qty,
            price=fill_price,
            fee_usd=qty * fill_price * fee_bps / 1e4,
            liquidity=liquidity,
        )
        status = OrderStatus.FILLED if w.filled >= order.qty else OrderStatus.PARTIALLY_FILLED
        updated = msgspec.structs.replace(order, status=status, filled_qty=w.filled)
        return Execution(ts, updated, fill)

    @staticmethod
    def _close(w: _Working, ts: int, status: OrderStatus, reason: str) -> Execution:
        updated = msgspec.structs.replace(w.order, status=status, filled_qty=w.filled, reason=reason)
        return Execution(ts, updated)

    # -- state --------------------------------------------------------------------------------------

    def state(self) -> list[tuple[str, Order, float, int, bool]]:
        """The open orders as data: instrument, order, quantity filled, fills, resting."""
        return [
            (key, w.order, w.filled, w.fills, w.resting)
            for key, orders in self._working.items()
            for w in orders
        ]

    def restore(self, state: list[tuple[str, Order, float, int, bool]]) -> None:
        """Take the open orders of an earlier broker over."""
        self._working = {}
        for key, order, filled, fills, resting in state:
            self._working.setdefault(key, []).append(_Working(order, filled, fills, resting))
