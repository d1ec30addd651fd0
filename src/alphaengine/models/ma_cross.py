"""The ``ma_cross`` module: a moving-average cross on bars, as predictions (a rule, not a learned model).

For each new bar of ``bar_interval_s`` it publishes a :class:`~alphaengine.domain.Prediction` of model
``ma_cross`` (version ``<fast>x<slow>``) once the slow average has its window: the value is
``+edge`` while the fast simple moving average of the closes is above the slow one, ``-edge`` while
below, so the trader goes long or short on each cross (with ``rebalance_fraction = 1`` in its sizing it
trades on the crosses only). It is the classic baseline strategy, and the one the backtest benchmark
runs side by side with NautilusTrader's example of the same rule.

Offsets are committed once the predictions of the bars read are acknowledged; the averages' windows are
not kept across a restart (they fill again from the bars that follow).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, ClassVar

import msgspec

from alphaengine.bus.base import Consumer, OffsetAndMetadata, Record, RecordMetadata, TopicPartition
from alphaengine.codec import SCHEMA_HEADER, decode_bars, encode_event, event_schema
from alphaengine.domain import Prediction
from alphaengine.kernel.module import ModuleSettings
from alphaengine.pipeline.consumer import ConsumerModule, ConsumerSettings


class MaCrossSettings(ConsumerSettings, frozen=True):
    """Settings of the moving-average cross (``type = "ma_cross"``)."""

    input_topic: str = "bars"
    output_topic: str = "predictions"
    bar_interval_s: Annotated[int, msgspec.Meta(ge=1)] = 1
    fast: Annotated[int, msgspec.Meta(ge=1)] = 10
    """Bars in the fast average."""
    slow: Annotated[int, msgspec.Meta(ge=2)] = 20
    """Bars in the slow average."""
    edge: Annotated[float, msgspec.Meta(gt=0)] = 0.01
    """The size of the value published (a return, above any sizing threshold)."""
    horizon_s: Annotated[int, msgspec.Meta(ge=1)] = 60

    def __post_init__(self) -> None:
        if self.fast >= self.slow:
            raise ValueError(f"fast ({self.fast}) must be shorter than slow ({self.slow})")


@dataclass(slots=True)
class _Averages:
    closes: deque[float]
    fast_sum: float = 0.0
    slow_sum: float = 0.0
    last_bar_ns: int = -1
    fast: deque[float] = field(default_factory=deque)


class MaCross(ConsumerModule[MaCrossSettings]):
    """Publishes a long or short view per bar from a fast and a slow moving average of the closes."""

    Config: ClassVar[type[ModuleSettings]] = MaCrossSettings

    _series: dict[tuple[str, str], _Averages]
    _pending: list[asyncio.Future[RecordMetadata]]
    _next: dict[TopicPartition, int]

    def topics(self) -> Sequence[str]:
        """The bar topic."""
        return [self.config.input_topic]

    async def on_assigned(self, consumer: Consumer) -> None:
        """Create the output topic."""
        self._series, self._pending, self._next = {}, [], {}
        await self.ctx.bus.create_topic(self.config.output_topic)

    async def handle(self, records: list[Record]) -> None:
        """Update the averages with each new bar and publish the view."""
        cfg = self.config
        version = f"{cfg.fast}x{cfg.slow}"
        headers: tuple[tuple[str, bytes], ...] = ()
        now = self.ctx.clock.now_ns()
        for record in records:
            self._next[record.tp] = record.offset + 1
            batch = await self.decode_or_dead_letter(record, decode_bars)
            if batch is None:
                continue
            data = batch.data
            intervals = data.column("interval_s").to_pylist()
            venues = data.column("venue").to_pylist()
            symbols = data.column("symbol").to_pylist()
            starts = data.column("ts_ns").to_pylist()
            closes = data.column("close").to_pylist()
            for interval, venue, symbol, ts, close in zip(
                intervals, venues, symbols, starts, closes, strict=True
            ):
                if interval != cfg.bar_interval_s:
                    continue
                s = self._series.get((venue, symbol))
                if s is None:
                    s = self._series[(venue, symbol)] = _Averages(deque())
                if ts <= s.last_bar_ns:  # a bar emitted again after a restart upstream
                    continue
                s.last_bar_ns = ts
                s.closes.append(close)
                s.slow_sum += close
                s.fast.append(close)
                s.fast_sum += close
                if len(s.closes) > cfg.slow:
                    s.slow_sum -= s.closes.popleft()
                if len(s.fast) > cfg.fast:
                    s.fast_sum -= s.fast.popleft()
                if len(s.closes) < cfg.slow:
                    continue
                above = s.fast_sum / cfg.fast > s.slow_sum / cfg.slow
                prediction = Prediction(
                    ts_ns=now,
                    venue=venue,
                    symbol=symbol,
                    interval_s=interval,
                    bar_ts_ns=ts,
                    model="ma_cross",
                    version=version,
                    horizon_s=cfg.horizon_s,
                    value=cfg.edge if above else -cfg.edge,
                )
                headers = headers or ((SCHEMA_HEADER, event_schema(prediction)),)
                self._pending.append(
                    await self.ctx.bus.send(
                        cfg.output_topic,
                        encode_event(prediction),
                        key=f"{venue}:{symbol}".encode(),
                        headers=headers,
                    )
                )

    async def flush(self) -> dict[TopicPartition, OffsetAndMetadata]:
        """Wait for the predictions sent; the bars read may then be committed."""
        if self._pending:
            await asyncio.gather(*self._pending)
            self._pending.clear()
        offsets = {tp: OffsetAndMetadata(offset) for tp, offset in self._next.items()}
        self._next.clear()
        return offsets
