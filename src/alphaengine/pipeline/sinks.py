"""Sinks: consume a topic and insert its batches into a store table, committing after each insert.

Inserts are idempotent by the table's key (ReplacingMergeTree), so a batch read again after a crash
changes nothing: with at-least-once delivery the stored result is exactly once. A failing store is
retried with capped exponential backoff while the module reports DEGRADED; consumption pauses meanwhile,
so the backlog stays in the bus (which pushes back on the producers) instead of in memory.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import ClassVar, Generic, TypeVar

import pyarrow as pa
import pyarrow.compute as pc

from alphaengine.backoff import Backoff
from alphaengine.bus.base import OffsetAndMetadata, Record, TopicPartition
from alphaengine.codec import decode_bars, decode_ticks
from alphaengine.domain import BarBatch, TickBatch
from alphaengine.errors import AlphaEngineError
from alphaengine.kernel.module import Context, ModuleSettings
from alphaengine.metrics import BARS_STORED, TICK_STORE_LATENCY, TICKS_STORED, observe_many
from alphaengine.pipeline.consumer import ConsumerModule, ConsumerSettings


class SinkSettings(ConsumerSettings, frozen=True):
    """Settings of a table sink."""

    topic: str = ""
    """Topic to read (default: the sink's natural topic, ``ticks`` or ``bars``)."""
    flush_rows: int = 200_000
    """Insert as soon as this many rows are buffered."""
    retry_initial_s: float = 0.5
    retry_max_s: float = 30.0


B = TypeVar("B", TickBatch, BarBatch)


class TableSink(ConsumerModule[SinkSettings], Generic[B]):
    """Buffers decoded batches and inserts them into one table; commits after each successful insert."""

    Config: ClassVar[type[ModuleSettings]] = SinkSettings
    default_topic: ClassVar[str]
    table: ClassVar[str]

    def __init__(self, name: str, config: SinkSettings, ctx: Context) -> None:
        super().__init__(name, config, ctx)
        self._buffer: list[B] = []
        self._rows = 0
        self._offsets: dict[TopicPartition, OffsetAndMetadata] = {}
        self._retry = Backoff(self.config.retry_initial_s, self.config.retry_max_s, jitter="equal")

    def topics(self) -> Sequence[str]:
        """The one topic this sink reads."""
        return [self.config.topic or self.default_topic]

    def decode(self, value: bytes) -> B:
        """Decode one record value."""
        raise NotImplementedError

    def count(self, rows: pa.Table) -> None:
        """Count stored rows in the sink's metrics."""
        raise NotImplementedError

    async def handle(self, records: list[Record]) -> None:
        """Decode and buffer; every record's offset becomes committable once the buffer is inserted."""
        for record in records:
            batch = await self.decode_or_dead_letter(record, self.decode)
            if batch is not None and len(batch):
                self._buffer.append(batch)
                self._rows += len(batch)
            self._offsets[record.tp] = OffsetAndMetadata(record.offset + 1)

    def needs_flush(self) -> bool:
        """Flush early when the buffer is full."""
        return self._rows >= self.config.flush_rows

    async def flush(self) -> dict[TopicPartition, OffsetAndMetadata]:
        """Insert the buffer (retrying until it succeeds or the module is stopped)."""
        if self._buffer:
            rows = type(self._buffer[0]).concat(self._buffer)
            await self._insert_with_retry(rows)
            self.count(rows)
            self._buffer.clear()
            self._rows = 0
        offsets, self._offsets = self._offsets, {}
        return offsets

    async def _insert_with_retry(self, rows: pa.Table) -> None:
        while True:
            try:
                await self.ctx.store.insert(self.table, rows)
            except AlphaEngineError as exc:
                if not exc.retriable:
                    raise
                delay = self._retry.next_delay()
                self.set_degraded(f"insert into {self.table} failed, retrying in {delay:.1f} s: {exc}")
                await asyncio.sleep(delay)
                continue
            self._retry.reset()
            self.set_healthy()
            return


class TickSink(TableSink[TickBatch]):
    """Stores the ``ticks`` topic in the ``ticks`` table."""

    default_topic = "ticks"
    table = "ticks"

    def decode(self, value: bytes) -> TickBatch:
        """Decode a ``ticks.v1`` record."""
        return decode_ticks(value)

    def count(self, rows: pa.Table) -> None:
        """Count stored ticks per symbol, and observe each one's latency from receive time to now.

        Called as the insert returns, so ``now - recv_ns`` is how long a trade took from the source to the
        store (``alphaengine_tick_store_latency_seconds``).
        """
        for item in pc.value_counts(rows.column("symbol")).to_pylist():
            TICKS_STORED.labels(item["values"]).inc(item["counts"])
        recv_ns = rows.column("recv_ns").to_numpy()
        observe_many(TICK_STORE_LATENCY, (self.ctx.clock.now_ns() - recv_ns) / 1e9)


class BarSink(TableSink[BarBatch]):
    """Stores the ``bars`` topic in the ``bars`` table."""

    default_topic = "bars"
    table = "bars"

    def decode(self, value: bytes) -> BarBatch:
        """Decode a ``bars.v1`` record."""
        return decode_bars(value)

    def count(self, rows: pa.Table) -> None:
        """Count stored bars per interval."""
        for item in pc.value_counts(rows.column("interval_s")).to_pylist():
            BARS_STORED.labels(f"{item['values']}s").inc(item["counts"])
