"""The Source base: a module that turns market data into tick batches on the ``ticks`` topic.

A concrete source implements :meth:`TickSource.batches`, an async iterator of :class:`TickBatch`; the base
splits each batch by symbol, sends one ``ticks.v1`` record per symbol keyed by the symbol (so a symbol's
ticks stay in order in one partition), waits for the acknowledgements in bulk, and counts
``alphaengine_ticks_received_total{source,symbol}`` once the bus has acknowledged them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import ClassVar, TypeVar

from alphaengine.bus.base import RecordMetadata
from alphaengine.codec import SCHEMA_HEADER, TICKS_V1, encode_ticks
from alphaengine.domain import TickBatch
from alphaengine.kernel.module import Context, Module, ModuleSettings
from alphaengine.metrics import TICKS_RECEIVED

TICKS_TOPIC = "ticks"


class SourceSettings(ModuleSettings, frozen=True):
    """Settings every source accepts."""

    topic: str = TICKS_TOPIC
    max_in_flight: int = 64
    """Records sent but not yet acknowledged before the source waits for the bus."""


S = TypeVar("S", bound=SourceSettings)


class TickSource(Module[S]):
    """Base of the market-data sources."""

    Config: ClassVar[type[ModuleSettings]] = SourceSettings
    role: ClassVar[str] = "source"

    def __init__(self, name: str, config: S, ctx: Context) -> None:
        super().__init__(name, config, ctx)
        self.ticks_emitted = 0
        self.finished = asyncio.Event()
        """Set when :meth:`batches` is exhausted (a replay reached its end)."""

    def batches(self) -> AsyncIterator[TickBatch]:
        """Yield tick batches until :attr:`stopping` is set or the data ends."""
        raise NotImplementedError

    async def sleep_until(self, deadline_ns: int) -> None:
        """Sleep until the clock reaches ``deadline_ns``; return early once a stop is requested."""
        if self.stopping.is_set():
            return
        sleeper = asyncio.ensure_future(self._sleep_until(deadline_ns))
        stopper = asyncio.ensure_future(self.stopping.wait())
        try:
            await asyncio.wait((sleeper, stopper), return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            stopper.cancel()

    async def _sleep_until(self, deadline_ns: int) -> None:
        # The duration is taken when the sleep begins, not when it was asked for: a simulated clock moved
        # in between must not push the wake-up past the deadline.
        clock = self.ctx.clock
        await clock.sleep(max(0, deadline_ns - clock.now_ns()) / 1e9)

    async def on_start(self) -> None:
        """Create the topic and start pumping."""
        await self.ctx.bus.create_topic(self.config.topic)
        self.spawn(self._pump(), "pump")

    async def on_stop(self) -> None:
        """Stop taking input; records already sent are acknowledged before the source stops."""
        await self.wait_tasks()

    async def _pump(self) -> None:
        pending: list[tuple[str, int, asyncio.Future[RecordMetadata]]] = []
        headers = ((SCHEMA_HEADER, TICKS_V1),)
        async for batch in self.batches():
            for symbol, part in batch.split_by_symbol():
                fut = await self.ctx.bus.send(
                    self.config.topic, encode_ticks(part), key=symbol.encode(), headers=headers
                )
                pending.append((symbol, len(part), fut))
            if len(pending) >= self.config.max_in_flight:
                await self._settle(pending)
            if self.stopping.is_set():
                break
        await self._settle(pending)
        self.finished.set()

    async def _settle(self, pending: list[tuple[str, int, asyncio.Future[RecordMetadata]]]) -> None:
        source = self.name
        for symbol, n, fut in pending:
            await fut
            TICKS_RECEIVED.labels(source, symbol).inc(n)
            self.ticks_emitted += n
        pending.clear()
