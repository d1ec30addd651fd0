"""The bar builder: time bars (OHLCV, VWAP, trade count, buy and sell volume) from the ``ticks`` topic.

Each ``ticks.v1`` record holds one symbol's trades in time order, so a record is folded into the open
bars with a handful of numpy reductions (``reduceat`` over the runs of equal bar index), never a Python
loop per tick. A bar is emitted to ``bars`` when its symbol's first trade of a later bar arrives (event
time, so a replay at any speed builds the same bars as live).

Recovery without duplicated or partial bars: each commit carries the builder's state for the symbols of
that partition (the open bars and the last trade id folded) in the commit metadata, so the committed
offset is always the builder's true position and the log never has to be kept back for open bars (a
one-minute bar at 150,000 trades/s spans some 400 MB of records). After a restart the builder restores
that state and reads on from the committed offset. A bar emitted between the last commit and a crash
is emitted again, identical, and the ``bars`` table and consumers treat
``(venue, symbol, interval_s, ts_ns)`` as its idempotency key.

The state of one symbol is a few hundred bytes of JSON; with Kafka, the broker's
``offset.metadata.max.bytes`` (4096 by default) bounds the symbols one partition can carry, so
deployments with many symbols per partition raise it.

Trades are identified by their per-symbol, increasing trade id: one whose id is not above the last id
folded for its symbol (a source replaying data, an overlap after a reconnect, a redelivered record) is
counted as a duplicate and left out, so no bar counts a trade twice. Trades older than their symbol's
open bar (out of order across records) are counted as late and left out of the bars. Both kinds are
still stored as ticks.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

import msgspec
import numpy as np
import numpy.typing as npt
import orjson
import pyarrow as pa

from alphaengine.bus.base import Consumer, OffsetAndMetadata, Record, RecordMetadata, TopicPartition
from alphaengine.codec import BARS_V1, SCHEMA_HEADER, decode_ticks, encode_bars
from alphaengine.domain import BAR_SCHEMA, BarBatch, TickBatch
from alphaengine.kernel.module import Context, ModuleSettings
from alphaengine.metrics import BARS, DUPLICATE_TICKS, LATE_TICKS
from alphaengine.pipeline.consumer import ConsumerModule, ConsumerSettings

_NS = 1_000_000_000


class BarBuilderSettings(ConsumerSettings, frozen=True):
    """Settings of the bar builder."""

    input_topic: str = "ticks"
    output_topic: str = "bars"
    intervals_s: tuple[Annotated[int, msgspec.Meta(gt=0, le=86_400)], ...] = (1, 60)
    """Bar lengths in seconds."""


@dataclass(slots=True)
class _OpenBar:
    venue: str
    bucket: int
    open: float
    high: float
    low: float
    close: float
    volume: float
    quote_volume: float
    trade_count: int
    buy_volume: float
    sell_volume: float
    first_trade_id: int
    last_trade_id: int


_BAR_FIELDS = [f.name for f in BAR_SCHEMA]
_OPEN_BAR_FIELDS = list(_OpenBar.__dataclass_fields__)


def _bar_state(bar: _OpenBar) -> list[Any]:
    return [getattr(bar, name) for name in _OPEN_BAR_FIELDS]


class BarBuilder(ConsumerModule[BarBuilderSettings]):
    """Consumes ``ticks``, emits completed bars to ``bars``."""

    Config: ClassVar[type[ModuleSettings]] = BarBuilderSettings

    def __init__(self, name: str, config: BarBuilderSettings, ctx: Context) -> None:
        super().__init__(name, config, ctx)
        self._open: dict[tuple[str, int], _OpenBar] = {}
        self._symbol_tp: dict[str, TopicPartition] = {}
        self._next_offset: dict[TopicPartition, int] = {}
        self._pending: list[asyncio.Future[RecordMetadata]] = []
        self._smallest = min(config.intervals_s)
        self._last_id: dict[str, int] = {}

    def topics(self) -> Sequence[str]:
        """The tick topic."""
        return [self.config.input_topic]

    async def on_assigned(self, consumer: Consumer) -> None:
        """Restore the open bars and last trade ids from the commit metadata of each partition."""
        await self.ctx.bus.create_topic(self.config.output_topic)
        for tp in consumer.assignment():
            committed = await consumer.committed(tp)
            if committed is None or not committed.metadata:
                continue
            state: dict[str, dict[str, Any]] = orjson.loads(committed.metadata)
            for symbol, saved in state.items():
                self._track(symbol, tp)
                self._last_id[symbol] = int(saved["last_id"])
                for interval, values in saved["bars"].items():
                    self._open[(symbol, int(interval))] = _OpenBar(*values)

    def _track(self, symbol: str, tp: TopicPartition) -> None:
        """Remember the partition of a symbol; a new symbol's late and duplicate counters start at 0."""
        if symbol not in self._symbol_tp:
            LATE_TICKS.labels(symbol)
            DUPLICATE_TICKS.labels(symbol)
        self._symbol_tp[symbol] = tp

    async def handle(self, records: list[Record]) -> None:
        """Fold each tick record into the open bars and send the bars it completes."""
        closed: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for record in records:
            batch = await self.decode_or_dead_letter(record, decode_ticks)
            self._next_offset[record.tp] = record.offset + 1
            if batch is None or not len(batch):
                continue
            for symbol, whole in batch.split_by_symbol():
                self._track(symbol, record.tp)
                part = self._drop_seen(symbol, whole)
                if part is None:
                    continue
                for interval in self.config.intervals_s:
                    closed[symbol].extend(self._fold(symbol, interval, part))
        headers = ((SCHEMA_HEADER, BARS_V1),)
        for symbol, bars in closed.items():
            columns = {name: [bar[name] for bar in bars] for name in _BAR_FIELDS}
            value = encode_bars(BarBatch.from_pydict(columns))
            fut = await self.ctx.bus.send(
                self.config.output_topic, value, key=symbol.encode(), headers=headers
            )
            self._pending.append(fut)
            for bar in bars:
                BARS.labels(symbol, f"{bar['interval_s']}s").inc()

    async def flush(self) -> dict[TopicPartition, OffsetAndMetadata]:
        """Wait for the sent bars; commit every partition read with the state of its symbols."""
        if self._pending:
            await asyncio.gather(*self._pending)
            self._pending.clear()
        state: dict[TopicPartition, dict[str, dict[str, Any]]] = defaultdict(dict)
        for symbol, last_id in self._last_id.items():
            state[self._symbol_tp[symbol]][symbol] = {"last_id": last_id, "bars": {}}
        for (symbol, interval), bar in self._open.items():
            state[self._symbol_tp[symbol]][symbol]["bars"][str(interval)] = _bar_state(bar)
        offsets = {
            tp: OffsetAndMetadata(offset, orjson.dumps(state.get(tp, {})).decode())
            for tp, offset in self._next_offset.items()
        }
        self._next_offset.clear()
        return offsets

    def _drop_seen(self, symbol: str, batch: TickBatch) -> TickBatch | None:
        """The trades not folded before (ids above every id seen for the symbol), or None if none is new."""
        ids = batch.np("trade_id")
        previous = np.maximum.accumulate(np.r_[self._last_id.get(symbol, np.iinfo(np.int64).min), ids[:-1]])
        fresh = ids > previous
        if not fresh.any():
            DUPLICATE_TICKS.labels(symbol).inc(len(ids))
            return None
        self._last_id[symbol] = int(ids[fresh].max())
        if fresh.all():
            return batch
        DUPLICATE_TICKS.labels(symbol).inc(int((~fresh).sum()))
        return TickBatch(batch.data.filter(pa.array(fresh)))

    def _fold(self, symbol: str, interval: int, batch: TickBatch) -> list[dict[str, Any]]:
        key = (symbol, interval)
        ts = batch.np("ts_ns")
        bucket = ts // (interval * _NS)
        bar = self._open.get(key)
        # A trade whose bar index is below one already seen (the open bar's, or earlier in this record)
        # is late.
        keep = bucket >= np.maximum.accumulate(bucket)
        if bar is not None:
            keep &= bucket >= bar.bucket
        price = batch.np("price")
        qty = batch.np("qty")
        side = batch.np("side")
        ids = batch.np("trade_id")
        if not keep.all():
            if interval == self._smallest:
                LATE_TICKS.labels(symbol).inc(int((~keep).sum()))
            bucket, price, qty, side, ids = bucket[keep], price[keep], qty[keep], side[keep], ids[keep]
            if not len(bucket):
                return []
        venue = str(batch.data.column("venue")[0].as_py())
        starts = np.flatnonzero(np.r_[True, bucket[1:] != bucket[:-1]])
        ends = np.r_[starts[1:], len(bucket)]
        segments = _segments(starts, ends, (price, qty, side, ids))
        out: list[dict[str, Any]] = []
        first = True
        for seg_bucket, seg in zip(bucket[starts].tolist(), segments, strict=True):
            if first and bar is not None and bar.bucket == seg_bucket:
                _merge(bar, seg)
            else:
                if bar is not None:
                    out.append(_to_row(symbol, interval, bar))
                bar = _OpenBar(venue=venue, bucket=seg_bucket, **seg)
            first = False
        assert bar is not None
        self._open[key] = bar
        return out


def _segments(
    starts: npt.NDArray[np.intp], ends: npt.NDArray[np.intp], trades: tuple[npt.NDArray[Any], ...]
) -> list[dict[str, Any]]:
    """OHLCV and flow of each run of trades in one bar (price, qty, side, trade id), as plain numbers."""
    price, qty, side, ids = trades
    columns = {
        "open": price[starts],
        "high": np.maximum.reduceat(price, starts),
        "low": np.minimum.reduceat(price, starts),
        "close": price[ends - 1],
        "volume": np.add.reduceat(qty, starts),
        "quote_volume": np.add.reduceat(price * qty, starts),
        "trade_count": ends - starts,
        "buy_volume": np.add.reduceat(np.where(side > 0, qty, 0.0), starts),
        "sell_volume": np.add.reduceat(np.where(side < 0, qty, 0.0), starts),
        "first_trade_id": ids[starts],
        "last_trade_id": ids[ends - 1],
    }
    lists = {name: values.tolist() for name, values in columns.items()}
    return [dict(zip(lists, row, strict=True)) for row in zip(*lists.values(), strict=True)]


def _merge(bar: _OpenBar, seg: dict[str, Any]) -> None:
    bar.high = max(bar.high, seg["high"])
    bar.low = min(bar.low, seg["low"])
    bar.close = seg["close"]
    bar.volume += seg["volume"]
    bar.quote_volume += seg["quote_volume"]
    bar.trade_count += seg["trade_count"]
    bar.buy_volume += seg["buy_volume"]
    bar.sell_volume += seg["sell_volume"]
    bar.last_trade_id = seg["last_trade_id"]


def _to_row(symbol: str, interval: int, bar: _OpenBar) -> dict[str, Any]:
    return {
        "venue": bar.venue,
        "symbol": symbol,
        "interval_s": interval,
        "ts_ns": bar.bucket * interval * _NS,
        "open": bar.open,
        "high": bar.high,
        "low": bar.low,
        "close": bar.close,
        "volume": bar.volume,
        "quote_volume": bar.quote_volume,
        "vwap": bar.quote_volume / bar.volume if bar.volume > 0 else bar.close,
        "trade_count": bar.trade_count,
        "buy_volume": bar.buy_volume,
        "sell_volume": bar.sell_volume,
        "first_trade_id": bar.first_trade_id,
        "last_trade_id": bar.last_trade_id,
    }
