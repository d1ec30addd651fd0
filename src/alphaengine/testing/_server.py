"""What the fake exchanges share: the server's lifecycle, the market clock, connections and scripting.

A fake is an aiohttp application on one port of 127.0.0.1 (port 0 picks a free one). Its *market*
publishes a :class:`~alphaengine.testing.tape.Tape` in time; each fake sends what is published to its
connections in its own protocol (subclasses implement :meth:`FakeExchange._publish`).

**The market clock.** The market starts with :meth:`FakeExchange.start_market`, or (``autostart``, the
default) at the first *subscription*: the first connection that names streams in its URL or subscribes
afterwards. Not at the first connection: a client that connects and then subscribes would otherwise
miss the first trades. Trade ``g`` is due ``(time(g) - time(0)) / speed`` seconds after the start.

* Timed mode (``speed`` a number): the market advances whether or not anyone listens. Trades published
  while a client is disconnected (or not subscribed, or while the fake is silenced) are never sent
  to it: they exist only in the REST history, which is what gap backfill is for. A client too slow
  to take the frames delays the market (sends are awaited); it catches up by publishing what is due at
  once.
* Flat-out mode (``speed=None``): trades are published as fast as the subscribed connections accept
  them, in batches. The market does not advance while nobody is subscribed or while the fake is
  silenced, so a drop loses only frames in flight, never whole stretches of the tape.

The market's own time (:meth:`FakeExchange.market_ms`, tape milliseconds) is the time of the first trade
plus the elapsed time x ``speed`` in timed mode, and the time of the last published trade in flat-out
mode. :attr:`FakeExchange.windows` lists the stretches of market time during which no connection was
subscribed to anything, with the published trades of each in :attr:`FakeExchange.windows_published`.

**Scripting** (callable while the fake runs, from the test's event loop): drops (:meth:`drop_all`, on a
schedule, at published counts or at random), :meth:`silence`, :meth:`inject` raw frames,
:meth:`reject_connections`, :meth:`close_all`. A drop aborts the TCP connection: no close frame, frames
still in the server's write buffer are lost, as with a real network failure.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import math
import random
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Generic, Self, TypeVar

from aiohttp import web

from alphaengine.testing.tape import Tape

CLIENT: Final = "client"
"""Close reason: the client closed the connection (or it went away)."""
DROPPED: Final = "dropped"
"""Close reason: aborted by a scripted drop (no close frame)."""
SERVER_STOP: Final = "server_stop"
"""Close reason: the fake was stopped."""
CLOSED_BY_SERVER: Final = "closed_by_server"
"""Close reason: :meth:`FakeExchange.close_all` without a more specific reason."""

FLAT_OUT_BATCH: Final = 256
"""Trades per publishing step in flat-out mode (the event loop runs between steps)."""
TIMED_BATCH: Final = 2_000
"""Most trades per publishing step in timed mode when the market has fallen behind."""
CLOSE_TIMEOUT_S: Final = 2.0
"""How long a server-initiated close waits for the client's close frame before cutting the connection."""


@dataclass
class FakeStats:
    """Counters of a fake exchange's connections that tests assert on."""

    connections_opened: int = 0
    connections_closed: Counter[str] = field(default_factory=Counter)
    """Closed connections by reason (:data:`CLIENT`, :data:`DROPPED`, ... and the fake's own)."""
    upgrades_rejected: Counter[int] = field(default_factory=Counter)
    """WebSocket upgrades answered with an HTTP error, by status."""
    frames_sent: int = 0
    """WebSocket data frames sent (trades, events, answers, injected frames)."""
    pings_sent: int = 0
    drops: int = 0
    """Scripted drops (each aborts every connection open at the time)."""


class Connection:
    """One open WebSocket connection of a fake (subclasses add the protocol's state)."""

    def __init__(self, ws: web.WebSocketResponse, request: web.Request, opened: float) -> None:
        self.ws = ws
        self.transport = request.transport
        self.opened = opened
        """Event-loop time of the upgrade."""
        self.reason: str | None = None
        """Why the server ended the connection (None while open or when the client ended it)."""
        self.closing: asyncio.Task[bool] | None = None
        self.tasks: list[asyncio.Task[None]] = []

    @property
    def subscribed(self) -> bool:
        """Whether the connection is subscribed to anything (data would reach it)."""
        raise NotImplementedError


C = TypeVar("C", bound=Connection)

_log = logging.getLogger("alphaengine.testing")


def _log_crash(task: asyncio.Task[None]) -> None:
    """A fake's background task must not die silently: a test would only see a stalled market."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        _log.error("fake exchange task %s crashed", task.get_coro(), exc_info=exc)


class FakeExchange(Generic[C]):
    """Base of the fake exchanges; see the module docstring. Use as ``async with Fake(...) as fake``."""

    def __init__(
        self,
        tape: Tape,
        *,
        speed: float | None,
        autostart: bool,
        stats: FakeStats,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        if speed is not None and speed <= 0:
            raise ValueError("speed must be positive (or None for flat out)")
        self.tape = tape
        self.speed = speed
        self.autostart = autostart
        self.stats = stats
        self.host = host
        self.port = port
        """The bound port (known once started)."""
        self.published = 0
        """Trades of the tape published so far (virtual indices ``0 .. published - 1``)."""
        self.finished = asyncio.Event()
        """Set when the whole tape (all passes) is published."""
        self.windows: list[tuple[int, int]] = []
        """``(from_ms, to_ms)`` of market time during which no connection was subscribed."""
        self.windows_published: list[tuple[int, int]] = []
        """For each window, the trades published during it: ``(first, stop)`` virtual indices."""
        self._conns: list[C] = []
        self._runner: web.AppRunner | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._drop_tasks: set[asyncio.Task[None]] = set()
        self._market_started = asyncio.Event()
        self._subscribed = asyncio.Event()
        self._start_time = 0.0
        self._silent_until = 0.0
        self._drop_marks: list[int] = []
        self._rejections: list[tuple[int, int]] = []
        self._open_window: tuple[int, int] | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind the port and serve; returns once connections are accepted."""
        app = web.Application()
        self._add_routes(app)
        runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        await site.start()
        self._runner = runner
        self.port = runner.addresses[0][1]
        self._spawn(self._run_market())

    async def close(self) -> None:
        """Stop the market and the schedules, cut every connection and release the port (idempotent)."""
        if self._runner is None:
            return
        tasks = self._tasks | self._drop_tasks
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for conn in list(self._conns):
            self._abort(conn, SERVER_STOP)
        runner, self._runner = self._runner, None
        await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def _spawn(self, coro: Coroutine[Any, Any, None], group: set[asyncio.Task[None]] | None = None) -> None:
        tasks = self._tasks if group is None else group
        task = asyncio.ensure_future(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        task.add_done_callback(_log_crash)

    @staticmethod
    def _attach(conn: Connection, coro: Coroutine[Any, Any, None]) -> None:
        """Run a task for the life of a connection (cancelled when its handler ends)."""
        task = asyncio.ensure_future(coro)
        task.add_done_callback(_log_crash)
        conn.tasks.append(task)

    def _add_routes(self, app: web.Application) -> None:
        raise NotImplementedError

    # -- the market -----------------------------------------------------------------------------

    def start_market(self) -> None:
        """Start publishing the tape now (idempotent)."""
        if self._market_started.is_set():
            return
        self._start_time = asyncio.get_running_loop().time()
        self._market_started.set()
        self._update_subscribed()

    @property
    def market_started(self) -> bool:
        """Whether the market clock runs."""
        return self._market_started.is_set()

    def market_ms(self) -> int:
        """The market's current time in tape milliseconds (see the module docstring)."""
        tape = self.tape
        if not self._market_started.is_set():
            return tape.start_ms
        if self.speed is None:
            return tape.time_at(self.published - 1) if self.published else tape.start_ms
        elapsed = asyncio.get_running_loop().time() - self._start_time
        return tape.start_ms + math.floor(elapsed * self.speed * 1000.0)

    async def wait_finished(self) -> None:
        """Wait until the whole tape is published (bound it with ``asyncio.timeout``)."""
        await self.finished.wait()

    async def _run_market(self) -> None:
        await self._market_started.wait()
        loop = asyncio.get_running_loop()
        tape, total = self.tape, self.tape.total
        while total is None or self.published < total:
            g = self.published
            self._drop_at_marks(g)
            if self.speed is None:
                if self.silenced:
                    await asyncio.sleep(self._silent_until - loop.time())
                    continue
                if not self._subscribed.is_set():
                    await self._subscribed.wait()
                    continue
                stop = g + FLAT_OUT_BATCH
            else:
                due = self._start_time + (tape.time_at(g) - tape.start_ms) / (self.speed * 1000.0)
                if due > loop.time():
                    await asyncio.sleep(due - loop.time())
                    continue
                # Every trade of g's millisecond goes out together, even when float rounding puts the
                # market clock a hair before it.
                now_ms = max(tape.time_at(g), self.market_ms())
                stop = min(tape.count_until(now_ms), g + TIMED_BATCH)
            if total is not None:
                stop = min(stop, total)
            mark = bisect.bisect_right(self._drop_marks, g)
            if mark < len(self._drop_marks):
                stop = min(stop, self._drop_marks[mark])
            self.published = stop
            await self._publish(g, stop)
            self._drop_at_marks(stop)
            # Sends rarely suspend: yield so that readers, REST and the test run between batches.
            await asyncio.sleep(0)
        self._close_window()
        self.finished.set()

    async def _publish(self, start: int, stop: int) -> None:
        """Send trades ``start .. stop - 1`` (just published) to the connections subscribed to them."""
        raise NotImplementedError

    # -- connections ----------------------------------------------------------------------------

    def _rejection(self) -> int | None:
        """The HTTP status to refuse the next upgrade with, if :meth:`reject_connections` asked for one."""
        if not self._rejections:
            return None
        status, n = self._rejections[0]
        if n <= 1:
            self._rejections.pop(0)
        else:
            self._rejections[0] = (status, n - 1)
        return status

    def _refuse(self, status: int, text: str, headers: dict[str, str] | None = None) -> web.Response:
        self.stats.upgrades_rejected[status] += 1
        return web.Response(status=status, text=text, headers=headers)

    async def _accept(self, request: web.Request, make: Callable[[web.WebSocketResponse], C]) -> C:
        """Complete the upgrade and register the connection."""
        ws = web.WebSocketResponse(autoping=False, compress=False, timeout=CLOSE_TIMEOUT_S)
        await ws.prepare(request)
        conn = make(ws)
        self._conns.append(conn)
        self.stats.connections_opened += 1
        return conn

    async def _finish(self, conn: C) -> None:
        """The connection's handler ends: let a server-initiated close complete, then unregister it."""
        for task in conn.tasks:
            task.cancel()
        if conn.closing is not None:
            await asyncio.shield(conn.closing)
        elif not conn.ws.closed:
            await conn.ws.close()
        await asyncio.gather(*conn.tasks, return_exceptions=True)
        if conn in self._conns:
            self._conns.remove(conn)
        self.stats.connections_closed[conn.reason or CLIENT] += 1
        self._update_subscribed()

    def _close(self, conn: C, reason: str, code: int, message: str) -> None:
        """Start a server-initiated close with a close frame (idempotent)."""
        if conn.closing is not None or conn.ws.closed:
            return
        conn.reason = conn.reason or reason
        conn.closing = asyncio.ensure_future(conn.ws.close(code=code, message=message.encode()))
        self._update_subscribed()

    def _abort(self, conn: C, reason: str) -> None:
        """Cut the TCP connection: no close frame."""
        conn.reason = conn.reason or reason
        if conn.transport is not None:
            conn.transport.abort()
        self._update_subscribed()

    def _update_subscribed(self) -> None:
        """Track whether anyone is subscribed: autostart, the flat-out gate and the windows."""
        subscribed = any(c.subscribed and c.reason is None for c in self._conns)
        if subscribed:
            self._subscribed.set()
            if self.autostart:
                self.start_market()
        else:
            self._subscribed.clear()
        total = self.tape.total
        if not self._market_started.is_set() or (total is not None and self.published >= total):
            return  # nothing can be missed before the start or after the last trade
        if not subscribed and self._open_window is None:
            self._open_window = (self.market_ms(), self.published)
        elif subscribed:
            self._close_window()

    def _close_window(self) -> None:
        if self._open_window is not None:
            from_ms, first = self._open_window
            self._open_window = None
            self.windows.append((from_ms, self.market_ms()))
            self.windows_published.append((first, self.published))

    async def _send(self, conn: C, frame: str | bytes) -> bool:
        """Send one data frame; False if the connection is gone."""
        if conn.ws.closed or conn.reason is not None:
            return False
        try:
            if isinstance(frame, str):
                await conn.ws.send_str(frame)
            else:
                await conn.ws.send_bytes(frame)
        except ConnectionError:
            return False
        self.stats.frames_sent += 1
        return True

    def _listeners(self) -> list[C]:
        """Open, subscribed connections that data may be sent to now (none while silenced)."""
        if self.silenced:
            return []
        return [c for c in self._conns if c.subscribed and c.reason is None]

    @property
    def connections(self) -> int:
        """Open WebSocket connections."""
        return len(self._conns)

    @property
    def subscribed(self) -> bool:
        """Whether some open connection is subscribed to something (data would reach a client)."""
        return self._subscribed.is_set()

    # -- scripting ------------------------------------------------------------------------------

    def drop_all(self) -> int:
        """Abort every WebSocket connection now (no close frame); returns how many were open."""
        conns = [c for c in self._conns if c.reason is None]
        for conn in conns:
            self._abort(conn, DROPPED)
        self.stats.drops += 1
        return len(conns)

    def drop_every(self, seconds: float, jitter: float = 0.0, seed: int | None = None) -> None:
        """Drop every connection each ``seconds`` (+- uniform ``jitter``) until :meth:`stop_drops`."""
        if seconds <= 0 or not 0 <= jitter < seconds:
            raise ValueError("drop_every needs seconds > 0 and 0 <= jitter < seconds")
        rng = random.Random(seed)
        self._spawn(self._drop_loop(lambda: seconds + rng.uniform(-jitter, jitter)), self._drop_tasks)

    def drop_randomly(self, rate_per_s: float, seed: int | None = None) -> None:
        """Drop every connection at random moments, ``rate_per_s`` drops a second on average (Poisson)."""
        if rate_per_s <= 0:
            raise ValueError("rate_per_s must be positive")
        rng = random.Random(seed)
        self._spawn(self._drop_loop(lambda: rng.expovariate(rate_per_s)), self._drop_tasks)

    def drop_at(self, published_counts: Iterable[int]) -> None:
        """Drop every connection right after the given numbers of trades are published.

        The trades up to the count are sent first; in timed mode the ones after it are published while
        the client reconnects (missed on the stream, in the REST history). Counts already passed are
        ignored.
        """
        for count in published_counts:
            if count > self.published:
                bisect.insort(self._drop_marks, count)

    def stop_drops(self) -> None:
        """Cancel the drop schedules and the pending :meth:`drop_at` counts."""
        for task in self._drop_tasks:
            task.cancel()
        self._drop_marks.clear()

    async def _drop_loop(self, interval: Callable[[], float]) -> None:
        while True:
            await asyncio.sleep(interval())
            self.drop_all()

    def _drop_at_marks(self, published: int) -> None:
        if self._drop_marks and self._drop_marks[0] <= published:
            while self._drop_marks and self._drop_marks[0] <= published:
                self._drop_marks.pop(0)
            self.drop_all()

    def silence(self, seconds: float) -> None:
        """No data and no keep-alive pings for ``seconds``; connections stay open and answer requests."""
        self._silent_until = asyncio.get_running_loop().time() + seconds

    @property
    def silenced(self) -> bool:
        """Whether a :meth:`silence` is in force."""
        return asyncio.get_running_loop().time() < self._silent_until

    async def inject(self, frame: str | bytes) -> int:
        """Send a raw frame (text for str, binary for bytes) to every connection; returns how many."""
        results = [await self._send(c, frame) for c in list(self._conns)]
        return sum(results)

    def reject_connections(self, status: int, n: int = 1) -> None:
        """Answer the next ``n`` WebSocket upgrades with HTTP ``status`` (e.g. 401, 429, 503)."""
        if not 400 <= status <= 599 or n < 1:
            raise ValueError("reject_connections needs an HTTP error status and n >= 1")
        self._rejections.append((status, n))

    async def close_all(self, code: int = 1001, message: str = "", reason: str = CLOSED_BY_SERVER) -> int:
        """Close every connection with a close frame; returns how many; waits for the closes."""
        conns = [c for c in self._conns if c.reason is None]
        for conn in conns:
            self._close(conn, reason, code, message)
        closing: list[Awaitable[bool]] = [c.closing for c in conns if c.closing is not None]
        await asyncio.gather(*closing, return_exceptions=True)
        return len(conns)
