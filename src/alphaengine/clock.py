"""Clocks: every module asks the injected clock for the time, never the OS directly.

:class:`LiveClock` reads wall time; :class:`SimClock` is moved by event time (backtests, tests), so the
same modules run deterministically and fast under simulation.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from typing import Protocol, runtime_checkable


@runtime_checkable
class Clock(Protocol):
    """Time source for modules."""

    def now_ns(self) -> int:
        """Current time, nanoseconds since the UNIX epoch."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` of this clock's time."""
        ...


class LiveClock:
    """Wall-clock time; sleeping waits on the event loop."""

    def now_ns(self) -> int:
        """Current wall time in nanoseconds since the epoch."""
        return time.time_ns()

    async def sleep(self, seconds: float) -> None:
        """Sleep on the running event loop."""
        await asyncio.sleep(seconds)


class SimClock:
    """Simulated time, advanced explicitly; sleepers wake when the clock passes their deadline."""

    def __init__(self, start_ns: int = 0) -> None:
        self._now_ns = start_ns
        self._sleepers: list[tuple[int, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def now_ns(self) -> int:
        """Current simulated time."""
        return self._now_ns

    async def sleep(self, seconds: float) -> None:
        """Wait until the simulated time has advanced by ``seconds``."""
        deadline = self._now_ns + int(seconds * 1e9)
        if deadline <= self._now_ns:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (deadline, next(self._seq), fut))
        await fut

    def advance_to(self, ts_ns: int) -> None:
        """Move time forward to ``ts_ns`` (never backwards) and wake every sleeper that is due."""
        self._now_ns = max(self._now_ns, ts_ns)
        while self._sleepers and self._sleepers[0][0] <= self._now_ns:
            _, _, fut = heapq.heappop(self._sleepers)
            if not fut.done():
                fut.set_result(None)

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``."""
        self.advance_to(self._now_ns + int(seconds * 1e9))
