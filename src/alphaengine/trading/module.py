"""The ``trader`` module: paper trading live, on the trading core, and state that survives a SIGKILL.

It reads the ``ticks`` and ``predictions`` topics into a :class:`~alphaengine.trading.TradingCore`,
steps it after every poll, and publishes what the core did: signals to ``signals``, orders (new,
rejected with the reason, filled, canceled) to ``orders``, fills to ``fills`` and positions to
``positions``; the signals, fills, orders and equity curve also go into the store.

Recovery. Every ``snapshot_interval_s`` (and at a graceful stop) the module writes the core's state to
the ``trader_state`` table with the bus positions it corresponds to, after the fills, orders and equity
points before it are stored, and only then commits those positions. The position of a ``ticks``
partition is that of its oldest record still holding a trade the core has not applied (the core's
state leaves those out; they are read again), that of a ``predictions`` partition the next record
(pending predictions are in the state). After a crash the module restores the latest snapshot, rebuilds
the portfolio from the fills log up to the snapshot's last fill (and checks it against the snapshot),
seeks to the snapshot's positions and reads on: the core, being a function of the data, makes the same
decisions and fills again with the same ids and sequence numbers, which the store keeps once, and no
fill is applied twice. Trades read again that the core had already passed are counted as late.

Admin commands: ``positions`` (positions, cash and PnL), ``risk`` (the limits and the trading mode),
``set-limits`` (change limits; persisted with the next snapshot), ``pause`` (optionally
``reducing_only``) and ``resume``.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, ClassVar

import msgspec
import pyarrow as pa

from alphaengine import metrics
from alphaengine.bus.base import Consumer, OffsetAndMetadata, Record, RecordMetadata, TopicPartition
from alphaengine.codec import SCHEMA_HEADER, decode_event, decode_ticks, encode_event, event_schema
from alphaengine.domain import Event, Fill, Order, Prediction, Signal
from alphaengine.errors import AlphaEngineError, ConfigError
from alphaengine.kernel.module import AdminHandler, Context, ModuleSettings
from alphaengine.pipeline.consumer import ConsumerModule, ConsumerSettings
from alphaengine.store.schema import TABLES
from alphaengine.trading.broker import BrokerSettings
from alphaengine.trading.core import CoreSettings, CoreState, Outbox, TradingCore
from alphaengine.trading.portfolio import Portfolio, split_instrument
from alphaengine.trading.risk import CHECKS, RiskLimits, SizingSettings, TradingMode

_ACCOUNT = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class TraderSettings(ConsumerSettings, frozen=True):
    """Settings of the trader (``type = "trader"``); the trading ones are :class:`CoreSettings`'s."""

    ticks_topic: str = "ticks"
    predictions_topic: str = "predictions"
    signals_topic: str = "signals"
    orders_topic: str = "orders"
    fills_topic: str = "fills"
    positions_topic: str = "positions"
    snapshot_interval_s: Annotated[float, msgspec.Meta(gt=0)] = 10.0
    """How often the core's state is saved (and the bus positions committed)."""
    account: str = "paper"
    initial_cash_usd: Annotated[float, msgspec.Meta(gt=0)] = 100_000.0
    hold_s: Annotated[float, msgspec.Meta(ge=0)] = 5.0
    equity_interval_s: Annotated[int, msgspec.Meta(ge=1)] = 10
    volatility_halflife_s: Annotated[float, msgspec.Meta(gt=0)] = 300.0
    limits: RiskLimits = RiskLimits()
    sizing: SizingSettings = SizingSettings()
    broker: BrokerSettings = BrokerSettings()

    def __post_init__(self) -> None:
        if not _ACCOUNT.fullmatch(self.account):
            raise ValueError(f"account must be 1-64 letters, digits, '_', '.' or '-', not {self.account!r}")

    def core(self) -> CoreSettings:
        """The trading core's settings."""
        return CoreSettings(**{name: getattr(self, name) for name in CoreSettings.__struct_fields__})


class Trader(ConsumerModule[TraderSettings]):
    """Paper trading on the live ticks and predictions."""

    Config: ClassVar[type[ModuleSettings]] = TraderSettings

    def __init__(self, name: str, config: TraderSettings, ctx: Context) -> None:
        super().__init__(name, config, ctx)
        self.core = TradingCore(config.core())
        self._pending: list[asyncio.Future[RecordMetadata]] = []
        self._rows: dict[str, list[dict[str, Any]]] = {"signals": [], "fills": [], "orders": [], "equity": []}
        self._tick_records: dict[TopicPartition, deque[tuple[int, int]]] = {}
        """Per ticks partition, (offset, newest trade time) of each record read since the last commit."""
        self._next: dict[TopicPartition, int] = {}
        """Per partition, the offset of the next record to read."""
        self._predicted_to: dict[TopicPartition, int] = {}
        """Per predictions partition, the close time of the newest bar whose predictions were read."""
        self._last_snapshot = time.monotonic()
        self._dirty_limits = False

    def topics(self) -> Sequence[str]:
        """Ticks and predictions."""
        return [self.config.ticks_topic, self.config.predictions_topic]

    async def on_assigned(self, consumer: Consumer) -> None:
        """Create the output topics; restore the latest snapshot and seek to its positions."""
        cfg = self.config
        for topic in (cfg.signals_topic, cfg.orders_topic, cfg.fills_topic, cfg.positions_topic):
            await self.ctx.bus.create_topic(topic)
        for check in CHECKS:  # a zero for every check, so that rates exist before the first rejection
            metrics.RISK_REJECTIONS.labels(check)
        row = await self.ctx.store.query(
            "SELECT state, offsets FROM trader_state FINAL "
            f"WHERE account = '{cfg.account}' ORDER BY saved_ns DESC LIMIT 1"
        )
        if not row.num_rows:
            self.log.info("account %s starts with %.2f USD", cfg.account, cfg.initial_cash_usd)
            self._note_positions(consumer)
            self._publish_gauges()
            return
        state = msgspec.json.decode(row["state"][0].as_py(), type=CoreState)
        portfolio = await self._rebuild_portfolio(state)
        self.core.restore(state, portfolio)
        for key, offset in msgspec.json.decode(row["offsets"][0].as_py(), type=dict[str, int]).items():
            topic, _, partition = key.rpartition("/")
            tp = TopicPartition(topic, int(partition))
            if tp in consumer.assignment():
                self.seek(tp, offset)
        self._note_positions(consumer)
        self.log.info(
            "account %s restored at %s: %d fills, equity %.2f USD, trading %s",
            cfg.account,
            _iso(state.now_ns),
            self.core.portfolio.fill_seq,
            self.core.last_equity.equity_usd if self.core.last_equity else cfg.initial_cash_usd,
            self.core.risk.mode.value,
        )
        self._publish_gauges()

    def _note_positions(self, consumer: Consumer) -> None:
        """Where each predictions partition is read from (to tell a backlog from the live edge)."""
        for tp in consumer.assignment():
            if tp.topic == self.config.predictions_topic:
                self._next[tp] = self.position(tp)

    async def _prediction_bound(self) -> int | None:
        """How far the core may go: not past the predictions read of a partition that has more to read.

        Reading a backlog, the trades of a poll can be far ahead of its predictions; at the live edge
        (nothing more to read) the core's ``hold_s`` covers the predictions still to come.
        """
        tps = [tp for tp in self._next if tp.topic == self.config.predictions_topic]
        if not tps:
            return None
        ends = await self.ctx.bus.end_offsets(tps)
        behind = [tp for tp in tps if ends[tp] > self._next[tp]]
        if not behind:
            return None
        return min(self._predicted_to.get(tp, self.core.now_ns) for tp in behind)

    async def _rebuild_portfolio(self, state: CoreState) -> Portfolio:
        """The portfolio folded from the fills log up to the snapshot's last fill, checked against it."""
        table = await self.ctx.store.query(
            "SELECT seq, fill_id, order_id, ts_ns, venue, symbol, side, qty, price, fee_usd, liquidity "
            f"FROM fills FINAL WHERE account = '{self.config.account}' AND seq <= {state.portfolio.fill_seq} "
            "ORDER BY seq"
        )
        fills = [(int(r["seq"]), msgspec.convert({"type": "fill", **r}, Fill)) for r in table.to_pylist()]
        if len(fills) != state.portfolio.fill_seq:
            raise AlphaEngineError(
                f"the fills log of account {self.config.account} holds {len(fills)} fills up to the "
                f"snapshot, which was taken after fill {state.portfolio.fill_seq}"
            )
        portfolio = Portfolio.from_fills(state.portfolio.initial_cash_usd, fills)
        rebuilt = msgspec.structs.replace(portfolio.state(), peak_equity_usd=state.portfolio.peak_equity_usd)
        if rebuilt != state.portfolio:
            raise AlphaEngineError(
                f"account {self.config.account}: the portfolio rebuilt from the fills log differs from the "
                f"snapshot ({rebuilt} != {state.portfolio})"
            )
        return portfolio

    # -- records in -----------------------------------------------------------------------------------

    async def handle(self, records: list[Record]) -> None:
        """Feed the core, step it, and send what it did."""
        cfg = self.config
        for record in records:
            self._next[record.tp] = record.offset + 1
            if record.topic == cfg.ticks_topic:
                batch = await self.decode_or_dead_letter(record, decode_ticks)
                if batch is not None and len(batch):
                    newest = int(batch.np("ts_ns").max())
                    self._tick_records.setdefault(record.tp, deque()).append((record.offset, newest))
                    self.core.add_ticks(batch)
            else:
                prediction = await self.decode_or_dead_letter(
                    record, lambda value: decode_event(value, Prediction)
                )
                if prediction is not None:
                    self.core.add_prediction(prediction)
                    close = prediction.bar_ts_ns + prediction.interval_s * 1_000_000_000
                    self._predicted_to[record.tp] = max(self._predicted_to.get(record.tp, 0), close)
        self.core.step(await self._prediction_bound())
        await self._send(self.core.drain())
        self._sync_mode()

    async def finish(self, until_ns: int) -> None:
        """Move the core to ``until_ns`` whatever the hold, and send what it did.

        The end of a backtest: called while the module is idle, every record read and handled.
        """
        self.core.run_until(until_ns)
        await self._send(self.core.drain())

    async def _send(self, out: Outbox) -> None:
        cfg = self.config
        account = cfg.account
        for e in out.ensembled:
            metrics.SIGNALS.labels(e.symbol, "signal" if e.signal else "none").inc()
            if e.signal is not None:
                await self._publish(cfg.signals_topic, e.signal, e.venue, e.symbol)
                self._rows["signals"].append(_signal_row(account, e.signal))
        for rejection in out.rejections:
            metrics.RISK_REJECTIONS.labels(rejection.check).inc()
            self.log.info("order rejected by %s: %s", rejection.check, rejection.reason)
        for halt in out.halts:
            self.log.warning("trading halted: %s", halt.reason)
        for updated_ns, order in out.orders:
            metrics.ORDERS.labels(order.symbol, order.status.value).inc()
            await self._publish(cfg.orders_topic, order, order.venue, order.symbol)
            self._rows["orders"].append(_order_row(account, updated_ns, order))
        for seq, fill in out.fills:
            metrics.FILLS.labels(fill.symbol, fill.liquidity.value).inc()
            metrics.FEES.labels(fill.symbol).inc(fill.fee_usd)
            await self._publish(cfg.fills_topic, fill, fill.venue, fill.symbol)
            self._rows["fills"].append({"account": account, "seq": seq, **msgspec.to_builtins(fill)})
        for position in out.positions:
            await self._publish(cfg.positions_topic, position, position.venue, position.symbol)
        for point in out.equity:
            self._rows["equity"].append({"account": account, **msgspec.structs.asdict(point)})
        if out.late_ticks:
            metrics.TRADER_LATE_TICKS.inc(out.late_ticks)
        if out.equity or out.fills or out.halts:
            self._publish_gauges()

    async def _publish(self, topic: str, event: Event, venue: str, symbol: str) -> None:
        fut = await self.ctx.bus.send(
            topic,
            encode_event(event),
            key=f"{venue}:{symbol}".encode(),
            headers=((SCHEMA_HEADER, event_schema(event)),),
        )
        self._pending.append(fut)

    def _publish_gauges(self) -> None:
        core = self.core
        marks = core.market.marks()
        metrics.EQUITY.set(core.portfolio.equity(marks))
        metrics.DRAWDOWN.set(core.last_equity.drawdown if core.last_equity else 0.0)
        metrics.TRADING_HALTED.set(0.0 if core.risk.mode is TradingMode.ACTIVE else 1.0)
        for name, value in msgspec.structs.asdict(core.risk.limits).items():
            metrics.RISK_LIMIT.labels(name).set(float(value))
        self._sync_mode()
        for key, holding in core.portfolio.holdings.items():
            _, symbol = split_instrument(key)
            metrics.POSITION_NOTIONAL.labels(symbol).set(holding.qty * marks.get(key, holding.avg_price))

    def _sync_mode(self) -> None:
        """DEGRADED, with the reason, while trading is halted or reducing-only (``status`` shows it)."""
        risk = self.core.risk
        if risk.mode is TradingMode.ACTIVE:
            self.set_healthy()
        else:
            self.set_degraded(f"trading {risk.mode.value}: {risk.mode_reason}")

    # -- durability -----------------------------------------------------------------------------------

    def needs_flush(self) -> bool:
        """Flush once a snapshot is due."""
        return time.monotonic() - self._last_snapshot >= self.config.snapshot_interval_s

    async def flush(self) -> dict[TopicPartition, OffsetAndMetadata]:
        """Wait for the events sent, store the rows; when a snapshot is due, save it and commit."""
        if self._pending:
            await asyncio.gather(*self._pending)
            self._pending.clear()
        for table, rows in self._rows.items():
            if rows:
                await self.ctx.store.insert(table, pa.Table.from_pylist(rows, schema=_SCHEMAS[table]))
                rows.clear()
        if not (self.needs_flush() or self.stopping.is_set() or self._dirty_limits):
            return {}
        offsets = self._positions()
        await self.ctx.store.insert(
            "trader_state",
            pa.Table.from_pylist(
                [
                    {
                        "account": self.config.account,
                        "ts_ns": self.core.now_ns,
                        "saved_ns": self.ctx.clock.now_ns(),
                        "state": msgspec.json.encode(self.core.state()).decode(),
                        "offsets": msgspec.json.encode(
                            {f"{tp.topic}/{tp.partition}": o for tp, o in offsets.items()}
                        ).decode(),
                    }
                ],
                schema=_SCHEMAS["trader_state"],
            ),
        )
        self._last_snapshot = time.monotonic()
        self._dirty_limits = False
        return {tp: OffsetAndMetadata(offset) for tp, offset in offsets.items()}

    def _positions(self) -> dict[TopicPartition, int]:
        """Where to read from after a restart from the snapshot about to be taken."""
        out = dict(self._next)
        for tp, records in self._tick_records.items():
            while records and records[0][1] < self.core.now_ns:
                records.popleft()
            if records:
                out[tp] = records[0][0]
        return out

    # -- admin ----------------------------------------------------------------------------------------

    def commands(self) -> Mapping[str, AdminHandler]:
        """``positions``, ``risk``, ``set-limits``, ``pause``, ``resume``."""
        return {
            "positions": self._cmd_positions,
            "risk": self._cmd_risk,
            "set-limits": self._cmd_set_limits,
            "pause": self._cmd_pause,
            "resume": self._cmd_resume,
        }

    async def _cmd_positions(self, args: dict[str, Any]) -> Any:
        core = self.core
        marks = core.market.marks()
        gross, net = core.portfolio.exposures(marks)
        return {
            "account": self.config.account,
            "as_of": _iso(core.now_ns) if core.now_ns else None,
            "equity_usd": core.portfolio.equity(marks),
            "cash_usd": core.portfolio.cash_usd,
            "realized_usd": core.portfolio.realized_usd,
            "unrealized_usd": core.portfolio.unrealized_usd(marks),
            "fees_usd": core.portfolio.fees_usd,
            "gross_exposure_usd": gross,
            "net_exposure_usd": net,
            "drawdown": core.last_equity.drawdown if core.last_equity else 0.0,
            "fills": core.portfolio.fill_seq,
            "positions": {
                key: {
                    "qty": h.qty,
                    "avg_price": h.avg_price,
                    "mark": marks.get(key),
                    "realized_usd": h.realized_usd,
                }
                for key, h in sorted(core.portfolio.holdings.items())
                if h.qty
            },
            "open_orders": [msgspec.to_builtins(o) for o in core.broker.open_orders],
        }

    async def _cmd_risk(self, args: dict[str, Any]) -> Any:
        risk = self.core.risk
        return {
            "mode": risk.mode.value,
            "reason": risk.mode_reason,
            "limits": msgspec.to_builtins(risk.limits),
            "daily_loss_usd": risk.daily_loss_usd(self.core.portfolio.equity(self.core.market.marks())),
        }

    async def _cmd_set_limits(self, args: dict[str, Any]) -> Any:
        """``{"max_order_notional_usd": 1000, ...}``: only the limits named change."""
        merged = msgspec.to_builtins(self.core.risk.limits) | args
        try:
            limits = msgspec.convert(merged, RiskLimits)
        except msgspec.ValidationError as exc:
            raise ConfigError([str(exc)], source="set-limits") from exc
        self.core.set_limits(limits)
        self._dirty_limits = True
        self._publish_gauges()
        self.log.warning("risk limits changed by the operator: %s", args)
        return await self._cmd_risk({})

    async def _cmd_pause(self, args: dict[str, Any]) -> Any:
        """``{"reducing_only": true, "reason": "..."}``."""
        reason = str(args.get("reason") or "paused by the operator")
        self.core.pause(reason, reducing_only=bool(args.get("reducing_only")))
        self._dirty_limits = True
        self.log.warning("trading %s: %s", self.core.risk.mode.value, reason)
        self._publish_gauges()
        return await self._cmd_risk({})

    async def _cmd_resume(self, args: dict[str, Any]) -> Any:
        self.core.resume()
        self._dirty_limits = True
        self.log.warning("trading resumed by the operator")
        self._publish_gauges()
        return await self._cmd_risk({})

    def health(self) -> dict[str, Any]:
        """Trading mode, equity and the core's time."""
        core = self.core
        return {
            "mode": core.risk.mode.value,
            "reason": core.risk.mode_reason,
            "equity_usd": round(core.portfolio.equity(core.market.marks()), 2),
            "fills": core.portfolio.fill_seq,
            "as_of": _iso(core.now_ns) if core.now_ns else None,
        }


def _signal_row(account: str, signal: Signal) -> dict[str, Any]:
    return {
        "account": account,
        "signal_id": signal.signal_id,
        "ts_ns": signal.ts_ns,
        "venue": signal.venue,
        "symbol": signal.symbol,
        "bar_ts_ns": signal.bar_ts_ns,
        "horizon_s": signal.horizon_s,
        "score": signal.score,
        "confidence": signal.confidence,
        "models": msgspec.json.encode(signal.model_versions).decode(),
        "model_values": msgspec.json.encode(signal.values).decode(),
        "model_weights": msgspec.json.encode(signal.weights).decode(),
    }


def _order_row(account: str, updated_ns: int, order: Order) -> dict[str, Any]:
    return {
        "account": account,
        "order_id": order.order_id,
        "signal_id": order.intent_id,
        "ts_ns": order.ts_ns,
        "updated_ns": updated_ns,
        "venue": order.venue,
        "symbol": order.symbol,
        "side": order.side.value,
        "qty": order.qty,
        "order_type": order.order_type.value,
        "limit_price": math.nan if order.limit_price is None else order.limit_price,
        "status": order.status.value,
        "filled_qty": order.filled_qty,
        "reason": order.reason,
    }


def _iso(ts_ns: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts_ns / 1e9))


_SCHEMAS = {
    name: TABLES[name].input_schema for name in ("signals", "fills", "orders", "equity", "trader_state")
}
