"""The base of the live WebSocket sources: session, frames in, ordered batches out, backfill tasks.

:class:`LiveSource` owns what the Binance and Finnhub sources share: the HTTP session and the
:class:`~alphaengine.sources.feed.Connector`, the frame buffer the connections read into, the latency and
gap recorders, and the output queue. Batches are queued synchronously (:meth:`LiveSource.queue`), so the
order in which a source emits a symbol's trades is the order they reach the bus, whichever of its tasks
(parser, backfill, housekeeping) emits them; the parser waits while the queue is long, which stops the
connections reading (back-pressure). Subclasses implement :meth:`LiveSource.run_feed`.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Coroutine
from typing import Any, ClassVar, Protocol, TypeVar

import aiohttp

from alphaengine.domain import TickBatch
from alphaengine.errors import StoreError
from alphaengine.kernel.module import Context, ModuleSettings
from alphaengine.metrics import FEED_FRAMES
from alphaengine.sources.base import TickSource
from alphaengine.sources.binance_rest import BinanceRestClient
from alphaengine.sources.feed import (
    BINARY_FRAME,
    OVERSIZED_FRAME,
    Connector,
    FeedSettings,
    FrameBuffer,
    GapRecorder,
    LatencyTracker,
)

F = TypeVar("F", bound=FeedSettings)

_MAX_QUEUED_BATCHES = 1024


class _Rejects(Protocol):
    def reject(self, reason: str, detail: str, count: int = 1) -> None: ...


class LiveSource(TickSource[F]):
    """Base of the live sources (see the module docstring)."""

    Config: ClassVar[type[ModuleSettings]] = FeedSettings
    parser: _Rejects
    """Counts rejected input (each subclass sets its provider's parser)."""

    def __init__(self, name: str, config: F, ctx: Context) -> None:
        super().__init__(name, config, ctx)
        self.latency = LatencyTracker(name, ctx.clock, self.log, config.clock_skew_warn_s)
        self.gaps = GapRecorder(name, ctx.store, ctx.clock, self.log)
        self.buffer = FrameBuffer(config.max_buffered_frames)
        self.last_live_ns: dict[str, int] = {}
        """Local time of each symbol's last live trade."""
        self.session: aiohttp.ClientSession | None = None
        self.rest: BinanceRestClient | None = None
        self.connector: Connector | None = None
        self._out: deque[TickBatch] = deque()
        self._out_ready = asyncio.Event()
        self._out_space = asyncio.Event()
        self._out_space.set()
        self._done = asyncio.Event()
        self._backfills: set[asyncio.Task[None]] = set()
        self._frames_metric = FEED_FRAMES.labels(name)

    # -- lifecycle --------------------------------------------------------------------------------

    async def on_start(self) -> None:
        """Open the session and the connector, run :meth:`prepare`, then start pumping and the feed."""
        self.session = aiohttp.ClientSession()
        self.connector = Connector(
            source=self.name,
            session=self.session,
            settings=self.config,
            clock=self.ctx.clock,
            log=self.log,
            stopping=self.stopping,
        )
        try:
            await self.prepare()
        except BaseException:
            await self._close_session()
            raise
        await super().on_start()
        self.spawn(self.gaps.run(self.stopping), "gaps")
        self.spawn(self._feed(), "feed")

    async def prepare(self) -> None:
        """Set up before the first connection (REST client, resume points); the session is open."""

    async def run_feed(self) -> None:
        """Keep the connections up and parse what they deliver until :attr:`stopping` is set.

        Returns once the connections are closed and every frame they delivered is parsed.
        """
        raise NotImplementedError

    def at_stop(self) -> None:
        """Settle what is held once the connections are closed and backfills finished (synchronous)."""

    async def _feed(self) -> None:
        try:
            await self.run_feed()
            # Every connection is closed and what they delivered is parsed: let backfills finish.
            if self._backfills:
                await asyncio.wait(self._backfills)
        finally:
            for task in self._backfills:
                task.cancel()
            self.at_stop()
            if self.connector is not None:
                self.connector.account_downtime()
            self._done.set()

    async def on_stop(self) -> None:
        """Close the connections, finish backfills in flight, emit what was parsed, then stop pumping."""
        await self.wait_tasks()
        await self._close_session()

    async def on_abort(self) -> None:
        """Release the HTTP session after a failure."""
        await self._close_session()

    async def _close_session(self) -> None:
        if self.rest is not None:
            await self.rest.close()
        if self.session is not None:
            await self.session.close()
            self.session = None

    # -- output -----------------------------------------------------------------------------------

    async def batches(self) -> AsyncIterator[TickBatch]:
        """The queued batches until the feed has stopped and everything queued was emitted."""
        while True:
            while self._out:
                batch = self._out.popleft()
                if len(self._out) < _MAX_QUEUED_BATCHES:
                    self._out_space.set()
                yield batch
            if self._done.is_set():
                return
            self._out_ready.clear()
            ready = asyncio.ensure_future(self._out_ready.wait())
            done = asyncio.ensure_future(self._done.wait())
            try:
                await asyncio.wait((ready, done), return_when=asyncio.FIRST_COMPLETED)
            finally:
                ready.cancel()
                done.cancel()

    def queue(self, batch: TickBatch) -> None:
        """Queue ``batch`` for the bus now (synchronously: call order is emission order)."""
        self._out.append(batch)
        self._out_ready.set()
        if len(self._out) >= _MAX_QUEUED_BATCHES:
            self._out_space.clear()

    async def take_frames(self) -> tuple[list[bytes], list[int]]:
        """The next frames to parse, once the output queue has room; oversized ones rejected."""
        while not self._out_space.is_set():
            await self._out_space.wait()
        frames, recv_ns = await self.buffer.take()
        # Counted per batch, not per frame: a counter call per frame was a tenth of the read loop.
        self._frames_metric.inc(len(frames))
        limit = self.config.max_frame_bytes
        if all(len(f) <= limit for f in frames):
            return frames, recv_ns
        kept = [(f, r) for f, r in zip(frames, recv_ns, strict=True) if len(f) <= limit]
        for frame in frames:
            if len(frame) > limit:
                self.parser.reject(OVERSIZED_FRAME, f"{len(frame)} bytes")
        return [f for f, _ in kept], [r for _, r in kept]

    def binary_frame(self, frame: bytes) -> None:
        """Reject a binary frame (the providers send only text)."""
        self.parser.reject(BINARY_FRAME, f"{len(frame)} bytes: {frame[:40]!r}")

    # -- helpers ----------------------------------------------------------------------------------

    def start_backfill(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a backfill in the background; at stop the feed waits for those in flight."""
        task = asyncio.ensure_future(coro)
        self._backfills.add(task)
        task.add_done_callback(self._backfills.discard)

    async def stored_max_ids(self, where: str) -> list[dict[str, Any]]:
        """``venue, symbol, last_id`` of the stored ticks matching ``where``.

        None if the store cannot tell: the source then starts live, and says so.
        """
        sql = (
            f"SELECT venue, symbol, max(trade_id) AS last_id FROM ticks WHERE {where} GROUP BY venue, symbol"
        )
        try:
            rows = (await self.ctx.store.query(sql)).to_pylist()
        except StoreError as exc:
            self.log.warning("%s: no resume points from the store (%s): starting live", self.name, exc)
            return []
        return [r for r in rows if r["last_id"] is not None]
