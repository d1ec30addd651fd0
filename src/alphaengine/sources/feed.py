"""Connection management shared by the live WebSocket sources (Binance, Finnhub).

* :class:`Connector` opens a WebSocket with capped exponential backoff and full jitter, forever: a feed
  never gives up on the network. Only a refusal of the credentials (HTTP 401/403 at the upgrade) stops it,
  with :class:`~alphaengine.errors.FeedAuthError`, so that the module turns FAULTED at once instead of
  hammering the provider (a reconnect storm with a bad key gets an IP banned).
* :class:`FeedConnection` reads one open connection: data frames go to a shared :class:`FrameBuffer`
  with their receive time; protocol pings are answered at once with the same payload; a watchdog pings a
  quiet connection every ``heartbeat_s`` and declares it dead when *nothing at all* (data, ping or pong) has
  arrived for ``idle_timeout_s``. A symbol without trades on a connection that still answers is quiet, not
  dead: it is reported (``alphaengine_feed_symbol_idle_seconds``), never a reason to reconnect.
* :class:`LatencyTracker` observes receive time minus exchange time per trade and warns about clock skew;
  :class:`GapRecorder` records interruptions (trade-id gaps, disconnected windows) in the ``feed_gaps``
  table, counts them and logs them.

Every connection has an id and a health record (:meth:`FeedConnection.health`); the metrics count connects,
connect failures and disconnects by reason, reconnect delays and the time spent disconnected.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Final, Literal

import aiohttp
import msgspec
import numpy as np
import numpy.typing as npt
import pyarrow as pa
from yarl import URL

from alphaengine.backoff import Backoff
from alphaengine.clock import Clock
from alphaengine.errors import FeedAuthError
from alphaengine.metrics import (
    FEED_CONNECT_FAILURES,
    FEED_CONNECTIONS,
    FEED_CONNECTS,
    FEED_DISCONNECTED_SECONDS,
    FEED_DISCONNECTS,
    FEED_GAPS,
    FEED_LATENCY,
    FEED_MIN_LATENCY,
    FEED_RECONNECT_DELAY,
    observe_many,
)
from alphaengine.sources.base import SourceSettings
from alphaengine.store.base import Store
from alphaengine.store.schema import FEED_GAPS as FEED_GAPS_TABLE

UNKNOWN_SYMBOL: Final = "unknown_symbol"
"""A trade of a symbol the source was not configured for."""
OVERSIZED_FRAME: Final = "oversized_frame"
"""A frame longer than ``max_frame_bytes`` (not parsed)."""
BINARY_FRAME: Final = "binary_frame"
"""A binary frame where the provider sends only text."""
PROVIDER_ERROR: Final = "provider_error"
"""An error message from the provider (Finnhub ``{"type":"error"}``, Binance ``{"code":..,"msg":..}``)."""

FRAMING_REJECT_REASONS: Final = (UNKNOWN_SYMBOL, OVERSIZED_FRAME, BINARY_FRAME, PROVIDER_ERROR)
"""Reject reasons a live source counts around its parser's own."""

# Disconnect reasons (the ``reason`` label of alphaengine_feed_disconnects_total).
CLOSED_BY_SERVER: Final = "closed_by_server"
DROPPED: Final = "dropped"
IDLE_TIMEOUT: Final = "idle_timeout"
PROTOCOL_ERROR: Final = "protocol_error"
SERVER_SHUTDOWN: Final = "server_shutdown"
MAX_AGE: Final = "max_age"
REPLACED: Final = "replaced"
STOPPING: Final = "stopping"
DISCONNECT_REASONS: Final = (
    CLOSED_BY_SERVER,
    DROPPED,
    IDLE_TIMEOUT,
    OVERSIZED_FRAME,
    PROTOCOL_ERROR,
    SERVER_SHUTDOWN,
    MAX_AGE,
    REPLACED,
    STOPPING,
)
CONNECT_FAILURE_REASONS: Final = ("refused", "timeout")
"""The reasons of alphaengine_feed_connect_failures_total besides ``http_<status>``."""

_HARD_FRAME_LIMIT_FACTOR: Final = 4
_CLOSE_TIMEOUT_S: Final = 2.0
"""How long closing waits for the peer's close frame before dropping the TCP connection."""


class FeedSettings(SourceSettings, frozen=True, kw_only=True):
    """Settings every live WebSocket source accepts."""

    ws_url: str
    """WebSocket endpoint (configuration, so that tests point it at a local server)."""
    symbols: Annotated[tuple[str, ...], msgspec.Meta(min_length=1)]
    """Symbols to subscribe to, in the provider's spelling."""
    reconnect_initial_s: Annotated[float, msgspec.Meta(gt=0.0)] = 0.5
    """Cap of the first reconnect delay; it doubles per failed attempt up to ``reconnect_max_s``."""
    reconnect_max_s: Annotated[float, msgspec.Meta(gt=0.0)] = 30.0
    """Ceiling of the reconnect delay (full jitter draws each delay uniformly below the cap)."""
    connect_timeout_s: Annotated[float, msgspec.Meta(gt=0.0)] = 10.0
    """Bound on one connection attempt (TCP, TLS and the WebSocket upgrade)."""
    heartbeat_s: Annotated[float, msgspec.Meta(gt=0.0)] = 20.0
    """Send a ping when nothing has arrived for this long."""
    idle_timeout_s: Annotated[float, msgspec.Meta(gt=0.0)] = 60.0
    """A connection on which nothing at all (data, ping, pong) arrived for this long is dead."""
    max_frame_bytes: Annotated[int, msgspec.Meta(gt=0)] = 1 << 20
    """Longer frames are rejected unparsed; beyond four times this the WebSocket layer drops the link."""
    max_buffered_frames: Annotated[int, msgspec.Meta(gt=0)] = 50_000
    """Frames received but not yet parsed before reading pauses (back-pressure to the socket)."""
    clock_skew_warn_s: Annotated[float, msgspec.Meta(gt=0.0)] = 1.0
    """Warn when the lower envelope of receive minus exchange time is beyond this, either way."""
    log_interval_s: Annotated[float, msgspec.Meta(gt=0.0)] = 10.0
    """At most one log line per reason per interval for rejected input."""
    max_messages_per_s: Annotated[int, msgspec.Meta(gt=0)] = 4
    """Messages the source sends per second and connection at most (pongs, pings, subscriptions):
    Binance disconnects above 5."""


def redact(url: str | URL) -> str:
    """``url`` with credentials in its query string (``token``, ``apiKey``, ...) replaced by ``***``."""
    parsed = URL(str(url))
    if not parsed.query:
        return str(parsed)
    hidden = {k: ("***" if _secret(k) else v) for k, v in parsed.query.items()}
    return str(parsed.with_query(hidden))


def _secret(key: str) -> bool:
    lowered = key.lower()
    return any(word in lowered for word in ("token", "key", "secret", "signature", "password"))


class MessageBudget:
    """At most ``per_s`` messages in any one-second window: :meth:`acquire` waits for a free slot."""

    def __init__(self, per_s: int, clock: Clock) -> None:
        self.per_s = per_s
        self.clock = clock
        self._sent: deque[int] = deque()

    def _expire(self, now_ns: int) -> None:
        while self._sent and self._sent[0] <= now_ns - 1_000_000_000:
            self._sent.popleft()

    def try_acquire(self, reserve: int = 0) -> bool:
        """Take a slot if one is free now and ``reserve`` more stay free for others."""
        now = self.clock.now_ns()
        self._expire(now)
        if len(self._sent) + reserve >= self.per_s:
            return False
        self._sent.append(now)
        return True

    async def acquire(self) -> None:
        """Take a slot, waiting until one frees up."""
        while not self.try_acquire():
            await self.clock.sleep(max(0.001, (self._sent[0] + 1_000_000_000 - self.clock.now_ns()) / 1e9))


class FrameBuffer:
    """Frames received by any connection of a source, waiting to be parsed in bulk.

    Readers append; one consumer takes everything at once. While the consumer is busy the readers keep
    appending, so the parser sees large batches under load and single frames when the market is quiet.
    Bounded: a reader waits once ``max_frames`` are waiting, which stops it reading its socket.
    """

    def __init__(self, max_frames: int) -> None:
        self.max_frames = max_frames
        self._frames: list[bytes] = []
        self._recv_ns: list[int] = []
        self._ready = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()
        self._empty = asyncio.Event()
        self._empty.set()

    def __len__(self) -> int:
        return len(self._frames)

    async def put(self, frame: bytes, recv_ns: int) -> None:
        """Add one frame; waits while the buffer is full."""
        while len(self._frames) >= self.max_frames:
            self._space.clear()
            await self._space.wait()
        self._frames.append(frame)
        self._recv_ns.append(recv_ns)
        self._ready.set()
        self._empty.clear()

    async def take(self) -> tuple[list[bytes], list[int]]:
        """Every waiting frame and its receive time; waits until there is at least one."""
        while not self._frames:
            self._ready.clear()
            await self._ready.wait()
        frames, recv_ns = self._frames, self._recv_ns
        self._frames, self._recv_ns = [], []
        self._space.set()
        self._empty.set()
        return frames, recv_ns

    async def drained(self) -> None:
        """Wait until every frame put so far has been taken."""
        await self._empty.wait()


@dataclass(slots=True)
class ConnectionHealth:
    """What is known about one connection (shown by the admin ``health`` command)."""

    id: int
    url: str
    opened_ns: int
    last_frame_ns: int
    frames: int = 0
    bytes: int = 0
    pings_answered: int = 0
    pings_sent: int = 0
    closed_reason: str | None = None

    def as_dict(self, now_ns: int) -> dict[str, Any]:
        """A JSON-ready summary, with ages in seconds."""
        return {
            "id": self.id,
            "url": self.url,
            "age_s": round((now_ns - self.opened_ns) / 1e9, 3),
            "idle_s": round((now_ns - self.last_frame_ns) / 1e9, 3),
            "frames": self.frames,
            "bytes": self.bytes,
            "pings_answered": self.pings_answered,
            "pings_sent": self.pings_sent,
            "closed_reason": self.closed_reason,
        }


class FeedConnection:
    """One open WebSocket: reads frames into a :class:`FrameBuffer` until the connection ends.

    :meth:`run` returns the reason the connection ended. :meth:`close` ends it from outside (rotation,
    stop) with a reason; closing is idempotent.
    """

    def __init__(
        self,
        ws: aiohttp.ClientWebSocketResponse[Literal[False]],
        *,
        conn_id: int,
        url: str,
        source: str,
        settings: FeedSettings,
        clock: Clock,
        log: logging.Logger,
    ) -> None:
        self.ws = ws
        self.source = source
        self.settings = settings
        self.clock = clock
        self.log = log
        now = clock.now_ns()
        self.health = ConnectionHealth(id=conn_id, url=url, opened_ns=now, last_frame_ns=now)
        self._close_reason: str | None = None
        self.delivering = asyncio.Event()
        """Set when the first data frame has arrived."""
        self.budget = MessageBudget(settings.max_messages_per_s, clock)
        """Every message this connection sends goes through it."""

    @property
    def closed(self) -> bool:
        """Whether the connection has ended (or is ending)."""
        return self._close_reason is not None or self.ws.closed

    async def send_str(self, text: str) -> None:
        """Send a text frame (a subscription message), within the message budget."""
        await self.budget.acquire()
        await self.ws.send_str(text)

    async def run(
        self,
        buffer: FrameBuffer,
        *,
        on_binary: Callable[[bytes], None],
        on_frame: Callable[[bytes], None] | None = None,
    ) -> str:
        """Read until the connection ends; return why (one of the disconnect reasons).

        Text frames go to ``buffer``. Binary frames (the providers send none) go to ``on_binary`` instead,
        for the source to reject. ``on_frame`` sees every text frame before it is buffered (cheap checks
        such as spotting a ``serverShutdown`` event); neither callback may block.
        """
        watchdog = asyncio.get_running_loop().create_task(self._watchdog(), name=f"{self.source}:watchdog")
        try:
            reason = await self._read(buffer, on_binary, on_frame)
        finally:
            watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watchdog
        # A reason given by close() (rotation, watchdog, stop) wins over how the socket ended.
        final = self._close_reason or reason
        self.health.closed_reason = final
        return final

    async def _read(
        self,
        buffer: FrameBuffer,
        on_binary: Callable[[bytes], None],
        on_frame: Callable[[bytes], None] | None,
    ) -> str:
        ws = self.ws
        health = self.health
        clock = self.clock
        limit = self.settings.max_frame_bytes * _HARD_FRAME_LIMIT_FACTOR
        text, binary, ping, pong = (
            aiohttp.WSMsgType.TEXT,
            aiohttp.WSMsgType.BINARY,
            aiohttp.WSMsgType.PING,
            aiohttp.WSMsgType.PONG,
        )
        while True:
            msg = await ws.receive()
            now = clock.now_ns()
            kind = msg.type
            if kind is text or kind is binary:
                data = msg.data
                health.last_frame_ns = now
                health.frames += 1
                health.bytes += len(data)
                if kind is binary:
                    on_binary(data)
                    continue
                self.delivering.set()
                if on_frame is not None:
                    on_frame(data)
                await buffer.put(data, now)
            elif kind is ping:
                # Binance counts pongs against the 5 messages/s budget; one pong per server ping is the
                # minimum the protocol requires, and it must echo the payload.
                health.last_frame_ns = now
                health.pings_answered += 1
                await self.budget.acquire()
                try:
                    await ws.pong(msg.data)
                except (ConnectionError, aiohttp.ClientError):
                    return DROPPED  # the peer went away while the pong waited for its slot
            elif kind is pong:
                health.last_frame_ns = now
            elif kind is aiohttp.WSMsgType.ERROR:
                exc = msg.data
                if (
                    isinstance(exc, aiohttp.WebSocketError)
                    and exc.code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
                ):
                    self.log.warning("%s: frame beyond %d bytes, connection dropped", self.source, limit)
                    return OVERSIZED_FRAME
                self.log.warning("%s: connection %d failed: %r", self.source, health.id, exc)
                return PROTOCOL_ERROR
            else:  # CLOSE, CLOSING, CLOSED
                return CLOSED_BY_SERVER if ws.close_code not in (None, 1006) else DROPPED

    async def _watchdog(self) -> None:
        """Ping a quiet connection; abort one on which nothing has arrived for ``idle_timeout_s``."""
        settings = self.settings
        heartbeat_ns = int(settings.heartbeat_s * 1e9)
        idle_ns = int(settings.idle_timeout_s * 1e9)
        step = min(settings.heartbeat_s, settings.idle_timeout_s) / 4
        last_ping_ns = 0
        while True:
            await self.clock.sleep(step)
            now = self.clock.now_ns()
            quiet = now - self.health.last_frame_ns
            if quiet >= idle_ns:
                self.log.warning(
                    "%s: nothing received on connection %d for %.1f s: it is dead, reconnecting",
                    self.source,
                    self.health.id,
                    quiet / 1e9,
                )
                await self.close(IDLE_TIMEOUT)
                return
            # A heartbeat is optional: it is skipped unless a slot stays free for a pong.
            if (
                quiet >= heartbeat_ns
                and now - last_ping_ns >= heartbeat_ns
                and self.budget.try_acquire(reserve=1)
            ):
                last_ping_ns = now
                self.health.pings_sent += 1
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await self.ws.ping(b"alphaengine")

    async def close(self, reason: str) -> None:
        """End the connection with ``reason`` (idempotent; the first reason is kept)."""
        if self._close_reason is None:
            self._close_reason = reason
        # aiohttp waits up to the ws_close timeout for the peer's close frame (a dead peer never sends
        # one), then closes the transport itself.
        with contextlib.suppress(Exception):
            await self.ws.close()


class Connector:
    """Opens connections for one source, retrying forever with capped exponential backoff and full jitter.

    The backoff starts again after a connection that lived at least ``stable_after_s``: a link that keeps
    dropping right after the upgrade keeps backing off, so a flapping server is never hammered.
    """

    def __init__(
        self,
        *,
        source: str,
        session: aiohttp.ClientSession,
        settings: FeedSettings,
        clock: Clock,
        log: logging.Logger,
        stopping: asyncio.Event,
        stable_after_s: float = 10.0,
    ) -> None:
        self.source = source
        self.session = session
        self.settings = settings
        self.clock = clock
        self.log = log
        self.stopping = stopping
        self.stable_after_s = stable_after_s
        self.backoff = Backoff(settings.reconnect_initial_s, settings.reconnect_max_s, jitter="full")
        self.attempts = 0
        self._ids = itertools.count(1)
        self._open = 0
        self._down_since_ns: int | None = None
        self.max_delay_s = 0.0
        """The longest backoff waited so far (never beyond ``reconnect_max_s``)."""
        # Zeros from the start, so that rates and alerts see the series before the first event.
        FEED_CONNECTIONS.labels(source).set(0)
        FEED_CONNECTS.labels(source)
        for reason in CONNECT_FAILURE_REASONS:
            FEED_CONNECT_FAILURES.labels(source, reason)
        for reason in DISCONNECT_REASONS:
            FEED_DISCONNECTS.labels(source, reason)

    @property
    def open_connections(self) -> int:
        """How many connections of this source are open."""
        return self._open

    async def connect(self, url: str, *, first: bool = False) -> FeedConnection | None:
        """An open connection to ``url``; None once the source is stopping.

        Waits a backoff delay before every attempt except a ``first`` one. Raises FeedAuthError when the
        provider refuses the credentials.
        """
        shown = redact(url)
        delay_next = not first
        while not self.stopping.is_set():
            if delay_next:
                delay = self.backoff.next_delay()
                self.max_delay_s = max(self.max_delay_s, delay)
                FEED_RECONNECT_DELAY.labels(self.source).observe(delay)
                if await _sleep_or_stop(self.clock, delay, self.stopping):
                    return None
            delay_next = True
            self.attempts += 1
            try:
                # The timeout bounds the connection and the upgrade only; an open connection is watched
                # by FeedConnection's watchdog.
                async with asyncio.timeout(self.settings.connect_timeout_s):
                    ws = await self.session.ws_connect(
                        url,
                        autoping=False,
                        max_msg_size=self.settings.max_frame_bytes * _HARD_FRAME_LIMIT_FACTOR,
                        decode_text=False,
                        timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=_CLOSE_TIMEOUT_S),
                    )
            except aiohttp.WSServerHandshakeError as exc:
                FEED_CONNECT_FAILURES.labels(self.source, f"http_{exc.status}").inc()
                if exc.status in (401, 403):
                    raise FeedAuthError(
                        f"{self.source}: {shown} refused the credentials (HTTP {exc.status}); "
                        "check the token or API key (not retrying)"
                    ) from None
                self.log.warning("%s: %s answered HTTP %s to the upgrade", self.source, shown, exc.status)
                continue
            except (TimeoutError, aiohttp.ServerTimeoutError):
                FEED_CONNECT_FAILURES.labels(self.source, CONNECT_FAILURE_REASONS[1]).inc()
                self.log.warning("%s: connecting to %s timed out", self.source, shown)
                continue
            except (aiohttp.ClientError, OSError) as exc:
                FEED_CONNECT_FAILURES.labels(self.source, CONNECT_FAILURE_REASONS[0]).inc()
                self.log.warning("%s: cannot connect to %s: %s", self.source, shown, exc)
                continue
            conn = FeedConnection(
                ws,
                conn_id=next(self._ids),
                url=shown,
                source=self.source,
                settings=self.settings,
                clock=self.clock,
                log=self.log,
            )
            self._opened()
            self.log.info("%s: connection %d open to %s", self.source, conn.health.id, shown)
            return conn
        return None

    def _opened(self) -> None:
        FEED_CONNECTS.labels(self.source).inc()
        self._open += 1
        FEED_CONNECTIONS.labels(self.source).set(self._open)
        if self._down_since_ns is not None:
            FEED_DISCONNECTED_SECONDS.labels(self.source).inc(
                (self.clock.now_ns() - self._down_since_ns) / 1e9
            )
            self._down_since_ns = None

    def closed(self, conn: FeedConnection, reason: str) -> None:
        """Account for a connection that ended (call once per connection returned by :meth:`connect`)."""
        FEED_DISCONNECTS.labels(self.source, reason).inc()
        self._open -= 1
        FEED_CONNECTIONS.labels(self.source).set(self._open)
        now = self.clock.now_ns()
        lived_s = (now - conn.health.opened_ns) / 1e9
        if lived_s >= self.stable_after_s:
            self.backoff.reset()
        if self._open == 0 and reason not in (STOPPING, REPLACED) and self._down_since_ns is None:
            self._down_since_ns = now
        level = logging.INFO if reason in (STOPPING, REPLACED, MAX_AGE, SERVER_SHUTDOWN) else logging.WARNING
        self.log.log(
            level, "%s: connection %d closed (%s) after %.1f s", self.source, conn.health.id, reason, lived_s
        )

    def account_downtime(self) -> None:
        """Add the current disconnected stretch to the metric (at stop)."""
        if self._down_since_ns is not None:
            FEED_DISCONNECTED_SECONDS.labels(self.source).inc(
                (self.clock.now_ns() - self._down_since_ns) / 1e9
            )
            self._down_since_ns = None


async def _sleep_or_stop(clock: Clock, seconds: float, stopping: asyncio.Event) -> bool:
    """Sleep ``seconds`` on ``clock``; True if a stop was requested meanwhile (returns early)."""
    if stopping.is_set():
        return True
    sleeper = asyncio.ensure_future(clock.sleep(seconds))
    stopper = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait((sleeper, stopper), return_when=asyncio.FIRST_COMPLETED)
    finally:
        sleeper.cancel()
        stopper.cancel()
    return stopping.is_set()


class LatencyTracker:
    """Receive time minus exchange time of live trades, and a clock-skew warning.

    Every trade goes into ``alphaengine_feed_latency_seconds``. The lower envelope (the minimum over the
    last ``window_s``) estimates the clock offset plus the fastest network path: the network cannot make it
    negative, so below ``-warn_s`` the local clock is behind the exchange's, and above ``+warn_s`` either it
    is ahead or every message is late. One warning per ``window_s`` at most.
    """

    def __init__(self, source: str, clock: Clock, log: logging.Logger, warn_s: float, window_s: float = 60.0):
        self.source = source
        self.clock = clock
        self.log = log
        self.warn_s = warn_s
        self.window_ns = int(window_s * 1e9)
        self._histogram = FEED_LATENCY.labels(source)
        self._min_gauge = FEED_MIN_LATENCY.labels(source)
        self._minima: deque[tuple[int, float]] = deque()
        self._last_warning_ns: int | None = None
        self.min_latency_s: float | None = None

    def observe(self, recv_ns: npt.NDArray[np.int64], ts_ns: npt.NDArray[np.int64]) -> None:
        """Account for a batch of live trades."""
        if not len(recv_ns):
            return
        latency = (recv_ns - ts_ns).astype(np.float64) / 1e9
        observe_many(self._histogram, latency)
        now = self.clock.now_ns()
        minima = self._minima
        low_here = float(latency.min())
        # One entry per second of arrival, so that the envelope costs the same at any batch rate.
        second = now // 1_000_000_000
        if minima and minima[-1][0] // 1_000_000_000 == second:
            minima[-1] = (minima[-1][0], min(minima[-1][1], low_here))
        else:
            minima.append((now, low_here))
        while minima and minima[0][0] < now - self.window_ns:
            minima.popleft()
        low = min(m for _, m in minima)
        self.min_latency_s = low
        self._min_gauge.set(low)
        if abs(low) > self.warn_s and (
            self._last_warning_ns is None or now - self._last_warning_ns >= self.window_ns
        ):
            self._last_warning_ns = now
            if low < 0:
                self.log.warning(
                    "%s: trades arrive %.3f s before their exchange time: the local clock is behind the "
                    "exchange's by at least that much (sync it with NTP)",
                    self.source,
                    -low,
                )
            else:
                self.log.warning(
                    "%s: even the fastest trades arrive %.3f s after their exchange time: the local clock "
                    "is ahead by up to that much, or the feed is delayed",
                    self.source,
                    low,
                )


@dataclass(frozen=True, slots=True)
class Gap:
    """One interruption of a feed, as recorded in the ``feed_gaps`` table."""

    venue: str
    symbol: str
    kind: str
    """``ids``: trade ids ``[from_value, to_value]``; ``time``: a window in ns since the epoch."""
    from_value: int
    to_value: int
    status: str
    """``filled``, ``partial`` or ``unfilled``."""
    ticks: int
    """Trades recovered by backfill."""
    detail: str = ""


@dataclass(slots=True)
class GapRecorder:
    """Counts, logs and stores feed interruptions; inserts retry in the background until they succeed."""

    source: str
    store: Store
    clock: Clock
    log: logging.Logger
    recorded: list[Gap] = field(default_factory=list)
    _pending: list[tuple[int, Gap]] = field(default_factory=list)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)

    def record(self, gap: Gap) -> None:
        """Count and log ``gap`` now; store it soon (see :meth:`run`)."""
        FEED_GAPS.labels(self.source, gap.kind, gap.status).inc()
        self.recorded.append(gap)
        del self.recorded[:-1000]  # the latest ones, for health output and tests
        span = (
            f"trade ids {gap.from_value}..{gap.to_value}"
            if gap.kind == "ids"
            else f"{_iso(gap.from_value)} .. {_iso(gap.to_value)}"
        )
        level = logging.INFO if gap.status == "filled" else logging.WARNING
        self.log.log(
            level,
            "%s: %s %s: %s (%d trades backfilled)%s",
            self.source,
            gap.symbol,
            span,
            gap.status,
            gap.ticks,
            f": {gap.detail}" if gap.detail else "",
        )
        self._pending.append((self.clock.now_ns(), gap))
        self._wake.set()

    async def run(self, stopping: asyncio.Event) -> None:
        """Insert recorded gaps until ``stopping`` is set and nothing is pending."""
        backoff = Backoff(0.5, 30.0, jitter="equal")
        while True:
            if not self._pending:
                if stopping.is_set():
                    return
                self._wake.clear()
                waiter = asyncio.ensure_future(self._wake.wait())
                stopper = asyncio.ensure_future(stopping.wait())
                try:
                    await asyncio.wait((waiter, stopper), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiter.cancel()
                    stopper.cancel()
                continue
            batch, self._pending = self._pending, []
            try:
                await self.store.insert(FEED_GAPS_TABLE.name, _gap_rows(self.source, batch))
            except Exception as exc:  # the store may be down: keep the rows and try again
                self._pending[:0] = batch
                if stopping.is_set():
                    self.log.error("%s: %d gap records not stored: %s", self.source, len(batch), exc)
                    return
                delay = backoff.next_delay()
                self.log.warning(
                    "%s: storing gap records failed (%s), retrying in %.1f s", self.source, exc, delay
                )
                await _sleep_or_stop(self.clock, delay, stopping)
            else:
                backoff.reset()


def _gap_rows(source: str, rows: list[tuple[int, Gap]]) -> pa.Table:
    return pa.table(
        {
            "source": [source] * len(rows),
            "venue": [g.venue for _, g in rows],
            "symbol": [g.symbol for _, g in rows],
            "kind": [g.kind for _, g in rows],
            "from_value": [g.from_value for _, g in rows],
            "to_value": [g.to_value for _, g in rows],
            "ts_ns": [ts for ts, _ in rows],
            "status": [g.status for _, g in rows],
            "ticks": [g.ticks for _, g in rows],
            "detail": [g.detail for _, g in rows],
        },
        schema=FEED_GAPS_TABLE.input_schema,
    )


def _iso(ts_ns: int) -> str:
    return str(np.datetime64(ts_ns, "ns"))[:23]
