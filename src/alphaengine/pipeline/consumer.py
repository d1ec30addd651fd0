"""The consumer base: a module that reads topics in a consumer group and commits after its effect.

Delivery is at least once: a subclass handles polled records, and offsets are committed only once the
effect is durable (rows inserted, records acknowledged). Undecodable records never stop the loop: they
go to the dead-letter topic ``<topic>.dlq`` with a ``reason`` header and are counted.

On a graceful stop the loop drains: it reads until its partitions have no lag left (or the engine's
drain time is up), then flushes and commits, so a restart resumes exactly where this run ended.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import ClassVar, TypeVar

from alphaengine.bus.base import Consumer, OffsetAndMetadata, Record, TopicPartition
from alphaengine.errors import DecodeError
from alphaengine.kernel.module import Context, Module, ModuleSettings
from alphaengine.metrics import CONSUMER_LAG, DEAD_LETTERS, MODULE_BUSY

DLQ_SUFFIX = ".dlq"


class ConsumerSettings(ModuleSettings, frozen=True):
    """Settings every consumer module accepts."""

    group: str | None = None
    """Consumer group id; defaults to the module's name."""
    max_records: int = 500
    """Records per poll."""
    poll_timeout_s: float = 0.1
    flush_interval_s: float = 0.5
    """Flush (and commit) at least this often while records arrive."""


S = TypeVar("S", bound=ConsumerSettings)
T = TypeVar("T")


class ConsumerModule(Module[S]):
    """Base of modules that consume topics. Subclasses set ``topics`` and implement ``handle``/``flush``."""

    Config: ClassVar[type[ModuleSettings]] = ConsumerSettings

    def topics(self) -> Sequence[str]:
        """The topics to subscribe to."""
        raise NotImplementedError

    async def handle(self, records: list[Record]) -> None:
        """Process polled records (decoding with :meth:`decode_or_dead_letter`)."""
        raise NotImplementedError

    async def flush(self) -> dict[TopicPartition, OffsetAndMetadata]:
        """Make the effect of everything handled so far durable; return the offsets that may be committed."""
        raise NotImplementedError

    def needs_flush(self) -> bool:
        """Whether enough is buffered to flush before the interval is up."""
        return False

    async def on_assigned(self, consumer: Consumer) -> None:
        """Called after the consumer has joined, before the first poll (restore positions or state)."""

    # -- machinery --------------------------------------------------------------------------------

    _consumer: Consumer | None = None

    def __init__(self, name: str, config: S, ctx: Context) -> None:
        super().__init__(name, config, ctx)
        self._handled: dict[TopicPartition, int] = {}
        """Per partition, the offset after the last record handled (or where reading started)."""
        self._unflushed = 0
        """Records handled since the last flush (see :meth:`queue_depth`)."""

    @property
    def consumer(self) -> Consumer:
        """The group member this module reads with (exists once started)."""
        if self._consumer is None:
            raise RuntimeError(f"module {self.name} has not joined its consumer group")
        return self._consumer

    @property
    def group(self) -> str:
        """The consumer group id."""
        return self.config.group or self.name

    async def on_start(self) -> None:
        """Create the topics and their dead-letter topics, join the group and start the consume loop."""
        for topic in self.topics():
            await self.ctx.bus.create_topic(topic)
            # Provisioned now, with the bus's settings for it (on Kafka: ``bus.topics."<topic>.dlq"``),
            # rather than by the first dead letter: a broker's auto-creation would pick its own defaults.
            await self.ctx.bus.create_topic(topic + DLQ_SUFFIX)
        self._consumer = self.ctx.bus.consumer(self.group, list(self.topics()))
        await self._consumer.start()
        tps = sorted(self._consumer.assignment())
        beginnings = await self.ctx.bus.beginning_offsets(tps) if tps else {}
        self._handled = {}
        for tp in tps:
            committed = await self._consumer.committed(tp)
            self._handled[tp] = committed.offset if committed is not None else beginnings[tp]
        await self.on_assigned(self.consumer)
        self.spawn(self._run(), "consume")

    async def on_stop(self) -> None:
        """Let the loop drain, flush and commit, then leave the group."""
        await self.wait_tasks()
        await self.consumer.close()

    async def on_abort(self) -> None:
        """Leave the group without committing: the replacement reads the uncommitted records again."""
        if self._consumer is not None:
            await self._consumer.close()

    def queue_depth(self) -> int:
        """Records handled but not yet flushed and committed."""
        return self._unflushed

    async def _run(self) -> None:
        cfg = self.config
        busy = MODULE_BUSY.labels(self.name)
        last_flush = time.monotonic()
        lag_check = 0.0
        while True:
            records = await self.consumer.getmany(cfg.max_records, cfg.poll_timeout_s)
            began = time.perf_counter()
            if records:
                await self.handle(records)
                for record in records:
                    self._handled[record.tp] = record.offset + 1
                self._unflushed += len(records)
            now = time.monotonic()
            if self.needs_flush() or now - last_flush >= cfg.flush_interval_s:
                await self._flush_and_commit()
                last_flush = now
            busy.inc(time.perf_counter() - began)
            if now - lag_check >= 1.0:
                CONSUMER_LAG.labels(self.name).set(await self.consumer.lag())
                lag_check = now
            if self.stopping.is_set() and (
                self._drain_over() or (not records and await self.consumer.lag() == 0)
            ):
                break
        await self._flush_and_commit()
        CONSUMER_LAG.labels(self.name).set(0)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        """Read ``tp`` from ``offset`` next (restoring a position saved elsewhere than the commits)."""
        self.consumer.seek(tp, offset)
        self._handled[tp] = offset

    def positions(self) -> dict[str, int]:
        """The offset after the last record handled, per ``topic/partition``."""
        return {f"{tp.topic}/{tp.partition}": offset for tp, offset in sorted(self._handled.items())}

    def position(self, tp: TopicPartition) -> int:
        """The offset after the last record of ``tp`` handled (or where reading started)."""
        return self._handled[tp]

    async def caught_up(self) -> bool:
        """Whether every record written to this module's partitions so far has been handled.

        The backtest waits for this between steps.
        """
        tps = sorted(self._handled)
        ends = await self.ctx.bus.end_offsets(tps)
        return all(self._handled[tp] >= ends[tp] for tp in tps)

    def _drain_over(self) -> bool:
        if self.drain_until is None or time.monotonic() < self.drain_until:
            return False
        self.log.warning("drain time is up: leaving the rest of the backlog in the log for the next reader")
        return True

    async def _flush_and_commit(self) -> None:
        handled = self._unflushed
        offsets = await self.flush()
        if offsets:
            await self.consumer.commit(offsets)
        self._unflushed -= handled

    async def decode_or_dead_letter(self, record: Record, decode: Callable[[bytes], T]) -> T | None:
        """Decode a record; an undecodable one goes to ``<topic>.dlq`` with its reason (returns None)."""
        try:
            return decode(record.value)
        except DecodeError as exc:
            await self.dead_letter(record, str(exc))
            return None

    async def dead_letter(self, record: Record, reason: str) -> None:
        """Send a record to its topic's dead-letter topic with the reason, and count it."""
        self.log.warning(
            "dead-lettering %s[%d]@%d: %s", record.topic, record.partition, record.offset, reason
        )
        headers = (
            *record.headers,
            ("reason", reason.encode()[:1000]),
            ("consumer", self.name.encode()),
            ("source", f"{record.topic}/{record.partition}/{record.offset}".encode()),
        )
        fut = await self.ctx.bus.send(
            record.topic + DLQ_SUFFIX, record.value, key=record.key, headers=headers
        )
        await asyncio.shield(fut)
        DEAD_LETTERS.labels(record.topic, self.name).inc()
