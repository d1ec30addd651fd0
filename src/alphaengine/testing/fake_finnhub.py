"""A local fake of Finnhub's trade WebSocket, publishing a tape's trades as ``BINANCE:<symbol>``.

It speaks Finnhub as the design notes describe it (``PROTOCOLS.md``) on one port of 127.0.0.1::

    async with FakeFinnhub(tape, speed=20.0, token="secret") as fake:
        async with session.ws_connect(f"{fake.ws_url}?token=secret") as ws:
            await ws.send_json({"type": "subscribe", "symbol": "BINANCE:BTCUSDT"})

The market publishes the tape in time (see :mod:`alphaengine.testing._server` for the clock, flat-out
mode, what a disconnected client misses and :attr:`~FakeFinnhub.windows`).

* Connect to ``/?token=...``; a missing or wrong token gets HTTP 401 at the upgrade. One connection per
  token: a new connection closes the older one (close code 1008, reason :data:`REPLACED`).
* ``{"type":"subscribe","symbol":"BINANCE:BTCUSDT"}`` / ``unsubscribe``, no acknowledgement. The tape's
  symbols (with the ``BINANCE:`` prefix) and ``extra_symbols`` (silent unless price updates are
  injected) can be subscribed; anything else gets ``{"type":"error","msg":"Invalid symbol"}``, and
  subscriptions beyond ``max_symbols`` ``{"type":"error","msg":"Subscribing to too many symbols"}``.
  Input that is not a JSON object with a known ``type`` gets ``{"type":"error","msg":"Invalid
  message"}`` (Finnhub does not document this case; an assumption of the fake).
* Trades: ``{"data":[{"p":61234.56,"s":"BINANCE:BTCUSDT","t":1723161255123,"v":0.0123},...],
  "type":"trade"}`` with ``p``/``v`` JSON numbers (the float of the decimal string) and no ``c``. The
  trades published in one step of the market (those due at the same moment) go in one message per
  connection, at most ``max_trades_per_message`` per message.
* Price updates (``v`` = 0): :meth:`FakeFinnhub.inject_price_update`, and with ``quiet_update_s`` one
  for every subscribed tape symbol that had no trade for that long, at its last published price.
* ``{"type":"ping"}`` every ``ping_interval_s`` on every connection, subscribed or not (none during a
  :meth:`~FakeFinnhub.silence`). WebSocket ping frames from the client are answered.
* :meth:`FakeFinnhub.deploy` closes every connection as a deploy does (close code 1001).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

import orjson
from aiohttp import WSMsgType, web

from alphaengine.testing._server import Connection, FakeExchange, FakeStats
from alphaengine.testing.tape import Tape

VENUE_PREFIX: Final = "BINANCE:"
"""How the tape's symbols are named on Finnhub."""
REPLACED: Final = "replaced"
"""Close reason: a newer connection with the same token took over."""
DEPLOY: Final = "deploy"
"""Close reason: :meth:`FakeFinnhub.deploy`."""

_CLOSING: Final = frozenset((WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR))
_PING: Final = '{"type":"ping"}'


@dataclass
class FinnhubStats(FakeStats):
    """Counters of :class:`FakeFinnhub`."""

    messages_received: int = 0
    trade_messages_sent: int = 0
    price_updates_sent: int = 0
    errors_sent: int = 0


class _FinnhubConnection(Connection):
    def __init__(self, ws: web.WebSocketResponse, request: web.Request, opened: float) -> None:
        super().__init__(ws, request, opened)
        self.symbols: dict[str, None] = {}

    @property
    def subscribed(self) -> bool:
        return bool(self.symbols)


class FakeFinnhub(FakeExchange[_FinnhubConnection]):
    """A fake Finnhub trade WebSocket; see the module docstring.

    ``speed``: multiple of the tape's pace (None: flat out). ``autostart``: start the market at the
    first subscription (else call :meth:`start_market`).
    """

    def __init__(
        self,
        tape: Tape,
        speed: float | None = 20.0,
        *,
        token: str = "secret",
        autostart: bool = True,
        max_symbols: int = 50,
        extra_symbols: Iterable[str] = (),
        ping_interval_s: float = 15.0,
        max_trades_per_message: int = 50,
        quiet_update_s: float | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.stats: FinnhubStats = FinnhubStats()
        super().__init__(tape, speed=speed, autostart=autostart, stats=self.stats, host=host, port=port)
        self.token = token
        self.max_symbols = max_symbols
        self.ping_interval_s = ping_interval_s
        self.max_trades_per_message = max_trades_per_message
        self.quiet_update_s = quiet_update_s
        self._names = [VENUE_PREFIX + s for s in tape.symbols]
        self._known = set(self._names) | set(extra_symbols)
        self._last_sent: dict[str, float] = {}
        """Loop time of the last trade message per symbol (for the quiet-symbol price updates)."""

    @property
    def ws_url(self) -> str:
        """``ws://127.0.0.1:PORT``: the client appends ``?token=...``."""
        return f"ws://{self.host}:{self.port}"

    async def start(self) -> None:
        """Bind the port and serve; starts the quiet-symbol updates if asked for."""
        await super().start()
        if self.quiet_update_s is not None:
            self._spawn(self._quiet_updates(self.quiet_update_s))

    def _add_routes(self, app: web.Application) -> None:
        app.router.add_get("/", self._serve_ws)

    async def _serve_ws(self, request: web.Request) -> web.StreamResponse:
        status = self._rejection()
        if status is not None:
            return self._refuse(status, f"Scripted rejection {status}", {"Retry-After": "1"})
        if request.query.get("token") != self.token:
            return self._refuse(401, "Invalid API key")
        now = asyncio.get_running_loop().time()
        older = [c for c in self._conns if c.reason is None]
        conn = await self._accept(request, lambda ws: _FinnhubConnection(ws, request, now))
        for old in older:
            self._close(old, REPLACED, 1008, "Another connection with the same API key")
        self._attach(conn, self._keepalive(conn))
        try:
            while True:
                msg = await conn.ws.receive()
                if msg.type in _CLOSING:
                    break
                if msg.type is WSMsgType.PING:
                    with contextlib.suppress(ConnectionError):  # the client may be gone already
                        await conn.ws.pong(msg.data)
                elif msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                    await self._on_message(conn, msg.data)
        finally:
            await self._finish(conn)
        return conn.ws

    async def _keepalive(self, conn: _FinnhubConnection) -> None:
        while True:
            await asyncio.sleep(self.ping_interval_s)
            if not self.silenced and await self._send(conn, _PING):
                self.stats.pings_sent += 1

    async def _error(self, conn: _FinnhubConnection, msg: str) -> None:
        if await self._send(conn, orjson.dumps({"type": "error", "msg": msg}).decode()):
            self.stats.errors_sent += 1

    async def _on_message(self, conn: _FinnhubConnection, data: str | bytes) -> None:
        self.stats.messages_received += 1
        try:
            message = orjson.loads(data)
        except orjson.JSONDecodeError:
            message = None
        if not isinstance(message, dict) or message.get("type") not in ("subscribe", "unsubscribe"):
            await self._error(conn, "Invalid message")
            return
        symbol = message.get("symbol")
        if message["type"] == "unsubscribe":
            if isinstance(symbol, str):
                conn.symbols.pop(symbol, None)
                self._update_subscribed()
            return
        if not isinstance(symbol, str) or symbol not in self._known:
            await self._error(conn, "Invalid symbol")
        elif symbol not in conn.symbols:
            if len(conn.symbols) >= self.max_symbols:
                await self._error(conn, "Subscribing to too many symbols")
            else:
                conn.symbols[symbol] = None
                self._update_subscribed()

    async def _publish(self, start: int, stop: int) -> None:
        conns = self._listeners()
        if not conns:
            return
        tape = self.tape
        batches: list[list[dict[str, Any]]] = [[] for _ in conns]
        now = asyncio.get_running_loop().time()
        for g in range(start, stop):
            name = self._names[tape.symbol_of(g)]
            wanted = [i for i, c in enumerate(conns) if name in c.symbols]
            if not wanted:
                continue
            t = tape.trade(g)
            item = {"p": float(t.price), "s": name, "t": t.time_ms, "v": float(t.qty)}
            for i in wanted:
                batches[i].append(item)
            self._last_sent[name] = now
        cap = self.max_trades_per_message
        for conn, items in zip(conns, batches, strict=True):
            for k in range(0, len(items), cap):
                frame = orjson.dumps({"data": items[k : k + cap], "type": "trade"}).decode()
                if await self._send(conn, frame):
                    self.stats.trade_messages_sent += 1

    # -- scripting ------------------------------------------------------------------------------

    async def inject_price_update(self, symbol: str, price: float | str) -> int:
        """Send a price update (``v`` = 0, ``t`` = market time) to the connections subscribed to it."""
        item = {"p": float(price), "s": symbol, "t": self.market_ms(), "v": 0}
        frame = orjson.dumps({"data": [item], "type": "trade"}).decode()
        sent = 0
        for conn in self._listeners():
            if symbol in conn.symbols and await self._send(conn, frame):
                sent += 1
        self.stats.price_updates_sent += sent
        return sent

    async def _quiet_updates(self, quiet_s: float) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(quiet_s / 2)
            if not self.market_started:
                continue
            now = loop.time()
            subscribed = {s for c in self._listeners() for s in c.symbols}
            for name in subscribed:
                if name not in self._names or now - self._last_sent.get(name, 0.0) < quiet_s:
                    continue
                history = self.tape.history(name.removeprefix(VENUE_PREFIX))
                visible = history.visible(self.published)
                if visible:
                    await self.inject_price_update(name, history.trade(visible - 1).price)
                    self._last_sent[name] = now

    async def send_error(self, msg: str) -> int:
        """Send ``{"type":"error","msg":msg}`` to every connection; returns how many."""
        conns = [c for c in self._conns if c.reason is None]
        for conn in conns:
            await self._error(conn, msg)
        return len(conns)

    async def deploy(self, message: str = "Server deploy") -> int:
        """Close every connection as a deploy does (close code 1001); returns how many."""
        return await self.close_all(1001, message, DEPLOY)
