"""A local fake of Binance spot market data: WebSocket trade streams and the REST trade history.

It speaks Binance spot as the design notes describe it (``PROTOCOLS.md``) on one port of 127.0.0.1::

    async with FakeBinance(tape, speed=20.0) as fake:
        async with session.ws_connect(f"{fake.ws_url}/stream?streams=btcusdt@trade") as ws: ...
        async with session.get(f"{fake.rest_url}/api/v3/aggTrades", params=...) as resp: ...

The market publishes the tape in time (see :mod:`alphaengine.testing._server` for the clock, flat-out
mode and what a disconnected client misses).

**WebSocket.** ``/stream?streams=a/b`` (combined: each event wrapped as ``{"stream":..,"data":..}``),
``/ws/<stream>`` or ``/ws/<s1>/<s2>`` (raw payloads) and ``/ws`` (subscribe later). Live requests
``SUBSCRIBE``, ``UNSUBSCRIBE``, ``LIST_SUBSCRIPTIONS``, ``SET_PROPERTY``/``GET_PROPERTY`` (``combined``)
are answered ``{"result":..,"id":N}``; errors are ``{"code":N,"msg":"...","id":N}`` (``id`` only when
the request had one): code 3 for JSON that does not parse, 2 for a request that is not understood, 0/1
for a bad property or value. Streams ``<symbol>@trade`` and ``<symbol>@aggTrade`` (lower case) carry
data; any other name is accepted and stays silent. One event per frame; ``E`` (event time) is the trade
time. An aggregate (defined in :mod:`alphaengine.testing.tape`) is sent when its last trade is
published.

Connection rules, each enforced with a close frame and counted: a ping frame every ``ping_interval_s``
with a fresh payload, and a close (reason :data:`PONG_TIMEOUT`) when ``pong_timeout_s`` have passed
since a ping without a valid pong: one echoing the payload of one of the latest pings, also late, for an
older ping (unsolicited pongs are counted but do not help); more than
``max_incoming_per_s`` incoming messages (text, binary, ping and pong frames) within any second closes
the connection (:data:`RATE_LIMIT`); at most ``max_streams`` streams per connection (an upgrade naming
more gets HTTP 400, a SUBSCRIBE going beyond gets error code 2 and changes nothing); a connection is cut
after ``max_connection_age_s`` (:data:`MAX_AGE`); more than ``max_connects_per_5min`` upgrades within
five minutes get HTTP 429. :meth:`FakeBinance.send_server_shutdown` sends the ``serverShutdown`` event.

**REST** on the same port: ``GET /api/v3/time``, ``/api/v3/historicalTrades`` and ``/api/v3/aggTrades``
with Binance's parameters, fields and error codes; only trades already published are visible, an
aggregate only once all its trades are. ``historicalTrades`` without ``fromId`` and ``aggTrades``
without ``fromId``/``startTime``/``endTime`` give the most recent ``limit`` (default 500, at most 1000);
``aggTrades`` with ``startTime`` gives the first ``limit`` from there (up to ``endTime``), with only
``endTime`` the last ``limit`` up to it; ``fromId`` with a time is refused (-1128), as is a window over
one hour (-1127). ``quoteQty`` is price x qty rounded (half-even) to the larger number of decimals of
the two. ``serverTime`` is the market's time (tape ms).

Request weights (time 1, aggTrades 4, historicalTrades 25) are summed per ``weight_window_s`` window
(fixed windows from the start of the fake) and reported in ``X-MBX-USED-WEIGHT-1M`` on every answer. A
request that would pass ``weight_limit`` gets 429 with ``Retry-After`` (whole seconds, rounded up) until
the window ends; any request before that moment gets 418, an IP ban for ``ban_s`` seconds (again with
``Retry-After``). :meth:`FakeBinance.throttle`, :meth:`FakeBinance.ban` and
:meth:`FakeBinance.fail_rest` script the same answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Final

import orjson
from aiohttp import WSMsgType, web

from alphaengine.testing._server import Connection, FakeExchange, FakeStats
from alphaengine.testing.tape import AggTrade, SymbolHistory, Tape, Trade

PONG_TIMEOUT: Final = "pong_timeout"
"""Close reason: no pong echoing a ping's payload within ``pong_timeout_s``."""
RATE_LIMIT: Final = "rate_limit"
"""Close reason: more than ``max_incoming_per_s`` incoming messages within a second."""
MAX_AGE: Final = "max_age"
"""Close reason: the connection reached ``max_connection_age_s``."""
SERVER_SHUTDOWN: Final = "server_shutdown"
"""Close reason: closed after :meth:`FakeBinance.send_server_shutdown` (``close_after_s``)."""

WEIGHTS: Final = {"/api/v3/time": 1, "/api/v3/aggTrades": 4, "/api/v3/historicalTrades": 25}
"""Request weight of each REST endpoint."""
MAX_LIMIT: Final = 1000
DEFAULT_LIMIT: Final = 500
MAX_WINDOW_MS: Final = 3_600_000
"""Widest ``startTime``..``endTime`` window of ``aggTrades``."""

_TRADE: Final = '{"e":"trade","E":%d,"s":"%s","t":%d,"p":"%s","q":"%s","T":%d,"m":%s,"M":true}'
_AGG: Final = '{"e":"aggTrade","E":%d,"s":"%s","a":%d,"p":"%s","q":"%s","f":%d,"l":%d,"T":%d,"m":%s,"M":true}'
_COMBINED: Final = '{"stream":"%s","data":%s}'
_SHUTDOWN: Final = '{"e":"serverShutdown","E":%d}'
_CLOSING: Final = frozenset((WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR))
_UNSIGNED = re.compile(r"\A[0-9]{1,20}\Z")
_METHODS: Final = "`SUBSCRIBE`, `UNSUBSCRIBE`, `LIST_SUBSCRIPTIONS`, `SET_PROPERTY`, `GET_PROPERTY`"
_POLICY_VIOLATION: Final = 1008
_PING_MEMORY: Final = 64


@dataclass
class BinanceStats(FakeStats):
    """Counters of :class:`FakeBinance`."""

    pongs_received: int = 0
    rate_violations: int = 0
    """Connections closed for sending more than ``max_incoming_per_s`` messages in a second."""
    server_shutdowns_sent: int = 0
    requests: Counter[tuple[str, int]] = field(default_factory=Counter)
    """REST requests by (path, HTTP status)."""
    bans: int = 0
    """418 IP bans imposed (by the weight rules or :meth:`FakeBinance.ban`)."""


class _BinanceConnection(Connection):
    def __init__(
        self,
        ws: web.WebSocketResponse,
        request: web.Request,
        opened: float,
        combined: bool,
        streams: list[str],
    ) -> None:
        super().__init__(ws, request, opened)
        self.combined = combined
        self.streams: dict[str, None] = dict.fromkeys(streams)
        self.ping_payloads: deque[bytes] = deque(maxlen=_PING_MEMORY)
        """Payloads of the latest pings: a pong echoing one of them is valid."""
        self.waiting_since: float | None = None
        """When the oldest ping sent since the last valid pong went out (None: nothing outstanding)."""
        self.incoming: deque[float] = deque()
        """Arrival times of the incoming messages of the last second."""

    @property
    def subscribed(self) -> bool:
        return bool(self.streams)


class _BadRequest(Exception):
    def __init__(self, code: int, msg: str) -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg


class FakeBinance(FakeExchange[_BinanceConnection]):
    """A fake Binance spot market-data server; see the module docstring.

    ``speed``: multiple of the tape's pace (None: flat out). ``autostart``: start the market at the
    first subscription (else call :meth:`start_market`). The other arguments are the connection and
    REST rules of the module docstring, with Binance's values as defaults.
    """

    def __init__(
        self,
        tape: Tape,
        speed: float | None = 20.0,
        *,
        autostart: bool = True,
        ping_interval_s: float = 20.0,
        pong_timeout_s: float = 60.0,
        max_incoming_per_s: int = 5,
        max_streams: int = 1024,
        max_connection_age_s: float = 24 * 3600.0,
        max_connects_per_5min: int | None = 300,
        weight_limit: int = 6000,
        weight_window_s: float = 60.0,
        ban_s: float = 120.0,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.stats: BinanceStats = BinanceStats()
        super().__init__(tape, speed=speed, autostart=autostart, stats=self.stats, host=host, port=port)
        self.ping_interval_s = ping_interval_s
        self.pong_timeout_s = pong_timeout_s
        self.max_incoming_per_s = max_incoming_per_s
        self.max_streams = max_streams
        self.max_connection_age_s = max_connection_age_s
        self.max_connects_per_5min = max_connects_per_5min
        self.weight_limit = weight_limit
        self.weight_window_s = weight_window_s
        self.ban_s = ban_s
        self._streams = [(f"{s.lower()}@trade", f"{s.lower()}@aggTrade") for s in tape.symbols]
        self._connects: deque[float] = deque()
        self._ping_seq = 0
        self._epoch = 0.0
        self._weight_window = 0
        self._weight_used = 0
        self._retry_until = 0.0
        self._ban_until = 0.0
        self._throttle: tuple[int, float] = (0, 0.0)
        self._fail: tuple[int, int] = (0, 503)

    @property
    def ws_url(self) -> str:
        """``ws://127.0.0.1:PORT``: append ``/stream?streams=...`` or ``/ws/<stream>``."""
        return f"ws://{self.host}:{self.port}"

    @property
    def rest_url(self) -> str:
        """``http://127.0.0.1:PORT``: append ``/api/v3/...``."""
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        """Bind the port and serve (the weight windows count from here)."""
        self._epoch = asyncio.get_running_loop().time()
        await super().start()

    def _add_routes(self, app: web.Application) -> None:
        app.router.add_get("/stream", self._combined_ws)
        app.router.add_get("/ws", self._raw_ws)
        app.router.add_get("/ws/{streams:.+}", self._raw_ws)
        for path, handler in (
            ("/api/v3/time", self._time),
            ("/api/v3/historicalTrades", self._historical_trades),
            ("/api/v3/aggTrades", self._agg_trades),
        ):
            app.router.add_get(path, self._rest(path, handler))

    # -- WebSocket ------------------------------------------------------------------------------

    async def _combined_ws(self, request: web.Request) -> web.StreamResponse:
        return await self._serve_ws(request, True, request.query.get("streams", ""))

    async def _raw_ws(self, request: web.Request) -> web.StreamResponse:
        return await self._serve_ws(request, False, request.match_info.get("streams", ""))

    async def _serve_ws(self, request: web.Request, combined: bool, names: str) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        now = loop.time()
        streams = list(dict.fromkeys(s for s in names.split("/") if s))
        if self.max_connects_per_5min is not None:
            while self._connects and self._connects[0] <= now - 300.0:
                self._connects.popleft()
            self._connects.append(now)
            if len(self._connects) > self.max_connects_per_5min:
                return self._refuse(429, "Too many connection attempts", {"Retry-After": "300"})
        status = self._rejection()
        if status is not None:
            return self._refuse(status, f"Scripted rejection {status}", {"Retry-After": "1"})
        if len(streams) > self.max_streams:
            return self._refuse(400, f"Too many streams: at most {self.max_streams} per connection")
        conn = await self._accept(request, lambda ws: _BinanceConnection(ws, request, now, combined, streams))
        self._attach(conn, self._keepalive(conn))
        self._update_subscribed()
        try:
            while True:
                msg = await conn.ws.receive()
                if msg.type in _CLOSING or self._over_rate(conn, loop.time()):
                    break
                if msg.type is WSMsgType.PING:
                    with contextlib.suppress(ConnectionError):  # the client may be gone already
                        await conn.ws.pong(msg.data)
                elif msg.type is WSMsgType.PONG:
                    self._on_pong(conn, msg.data)
                elif msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                    await self._on_request(conn, msg.data)
        finally:
            await self._finish(conn)
        return conn.ws

    def _over_rate(self, conn: _BinanceConnection, now: float) -> bool:
        incoming = conn.incoming
        incoming.append(now)
        while incoming[0] <= now - 1.0:
            incoming.popleft()
        if len(incoming) <= self.max_incoming_per_s:
            return False
        self.stats.rate_violations += 1
        self._close(conn, RATE_LIMIT, _POLICY_VIOLATION, "Too many messages")
        return True

    def _on_pong(self, conn: _BinanceConnection, payload: bytes) -> None:
        self.stats.pongs_received += 1
        if payload in conn.ping_payloads:
            # Any valid pong shows the client alive, even one that answers an older ping late.
            conn.waiting_since = None

    async def _keepalive(self, conn: _BinanceConnection) -> None:
        """Ping, and enforce the pong timeout and the connection age."""
        loop = asyncio.get_running_loop()
        next_ping = conn.opened + self.ping_interval_s
        cut_at = conn.opened + self.max_connection_age_s
        while True:
            now = loop.time()
            if conn.waiting_since is not None and now - conn.waiting_since >= self.pong_timeout_s:
                self._close(conn, PONG_TIMEOUT, _POLICY_VIOLATION, "Pong timeout")
                return
            if now >= cut_at:
                self._close(conn, MAX_AGE, 1000, "Connection age limit reached")
                return
            if now >= next_ping:
                if not self.silenced:
                    self._ping_seq += 1
                    payload = str(self._ping_seq).encode()
                    try:
                        await conn.ws.ping(payload)
                    except ConnectionError:
                        return
                    conn.ping_payloads.append(payload)
                    if conn.waiting_since is None:
                        conn.waiting_since = now
                    self.stats.pings_sent += 1
                next_ping = now + self.ping_interval_s
            wake = min(next_ping, cut_at)
            if conn.waiting_since is not None:
                wake = min(wake, conn.waiting_since + self.pong_timeout_s)
            await asyncio.sleep(max(0.0, wake - loop.time()))

    async def _answer(self, conn: _BinanceConnection, body: dict[str, Any]) -> None:
        await self._send(conn, orjson.dumps(body).decode())

    async def _on_request(self, conn: _BinanceConnection, data: str | bytes) -> None:
        try:
            request = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            await self._answer(conn, {"code": 3, "msg": f"Invalid JSON: {exc}"})
            return
        if not isinstance(request, dict):
            await self._answer(conn, {"code": 2, "msg": "Invalid request: expected a JSON object"})
            return
        req_id = request.get("id")
        if not (req_id is None or isinstance(req_id, str) or (type(req_id) is int and req_id >= 0)):
            msg = "Invalid request: request ID must be an unsigned integer or a string"
            await self._answer(conn, {"code": 2, "msg": msg})
            return
        try:
            result = self._execute(conn, request.get("method"), request.get("params"))
        except _BadRequest as exc:
            error: dict[str, Any] = {"code": exc.code, "msg": exc.msg}
            if "id" in request:
                error["id"] = req_id
            await self._answer(conn, error)
            return
        await self._answer(conn, {"result": result, "id": req_id})

    def _execute(self, conn: _BinanceConnection, method: Any, params: Any) -> Any:
        """Carry out one live request; its result, or _BadRequest with Binance's code and message."""
        if method is None:
            raise _BadRequest(2, "Invalid request: missing field `method`")
        if method in ("SUBSCRIBE", "UNSUBSCRIBE"):
            if not isinstance(params, list) or not all(isinstance(p, str) and p for p in params):
                raise _BadRequest(2, "Invalid request: params must be a list of stream names")
            if method == "UNSUBSCRIBE":
                for name in params:
                    conn.streams.pop(name, None)
            else:
                new = [p for p in dict.fromkeys(params) if p not in conn.streams]
                if len(conn.streams) + len(new) > self.max_streams:
                    raise _BadRequest(
                        2, f"Invalid request: at most {self.max_streams} streams per connection"
                    )
                conn.streams.update(dict.fromkeys(new))
            self._update_subscribed()
            return None
        if method == "LIST_SUBSCRIPTIONS":
            return list(conn.streams)
        if method in ("SET_PROPERTY", "GET_PROPERTY"):
            if not isinstance(params, list) or not params or params[0] != "combined":
                raise _BadRequest(0, "Unknown property")
            if method == "GET_PROPERTY":
                return conn.combined
            if len(params) != 2 or not isinstance(params[1], bool):
                raise _BadRequest(1, "Invalid value type: expected Boolean")
            conn.combined = params[1]
            return None
        raise _BadRequest(2, f"Invalid request: unknown variant `{method}`, expected one of {_METHODS}")

    async def _publish(self, start: int, stop: int) -> None:
        conns = self._listeners()
        if not conns:
            return
        tape = self.tape
        for g in range(start, stop):
            trade_stream, agg_stream = self._streams[tape.symbol_of(g)]
            to_trade = [c for c in conns if trade_stream in c.streams]
            if to_trade:
                payload = _trade_event(tape.trade(g))
                for conn in to_trade:
                    await self._send(conn, _COMBINED % (trade_stream, payload) if conn.combined else payload)
            to_agg = [c for c in conns if agg_stream in c.streams]
            if to_agg and (agg := tape.completed_aggregate(g)) is not None:
                payload = _agg_event(tape.symbols[tape.symbol_of(g)], agg)
                for conn in to_agg:
                    await self._send(conn, _COMBINED % (agg_stream, payload) if conn.combined else payload)

    # -- scripting ------------------------------------------------------------------------------

    async def send_server_shutdown(self, close_after_s: float | None = None) -> int:
        """Send ``serverShutdown`` to every connection (wrapped on combined ones); returns how many.

        With ``close_after_s`` the connections are closed that much later (reason
        :data:`SERVER_SHUTDOWN`, close code 1001), as the real server does after its notice.
        """
        payload = _SHUTDOWN % self.market_ms()
        sent = 0
        for conn in list(self._conns):
            frame = _COMBINED % ("!serverShutdown", payload) if conn.combined else payload
            sent += await self._send(conn, frame)
        self.stats.server_shutdowns_sent += 1
        if close_after_s is not None:
            self._spawn(self._close_later(close_after_s))
        return sent

    async def _close_later(self, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        await self.close_all(1001, "Server shutdown", SERVER_SHUTDOWN)

    def throttle(self, n: int, retry_after_s: float = 1.0) -> None:
        """The next ``n`` REST requests get 429 with ``Retry-After``; one sooner than that gets 418."""
        self._throttle = (n, retry_after_s)

    def ban(self, retry_after_s: float) -> None:
        """Ban now: every REST request gets 418 for ``retry_after_s``."""
        self._ban_until = asyncio.get_running_loop().time() + retry_after_s
        self.stats.bans += 1

    def fail_rest(self, n: int, status: int = 503) -> None:
        """The next ``n`` REST requests get HTTP ``status`` (an internal error body, weight not counted)."""
        self._fail = (n, status)

    @property
    def weight_used(self) -> int:
        """Request weight used in the current window."""
        self._roll_window(asyncio.get_running_loop().time())
        return self._weight_used

    # -- REST -----------------------------------------------------------------------------------

    def _rest(self, path: str, handler: Callable[[web.Request], Any]) -> Callable[[web.Request], Any]:
        weight = WEIGHTS[path]

        async def serve(request: web.Request) -> web.Response:
            status, body, headers = self._admit(weight)
            if status == 200:
                try:
                    body = handler(request)
                except _BadRequest as exc:
                    status, body = 400, {"code": exc.code, "msg": exc.msg}
            headers["X-MBX-USED-WEIGHT-1M"] = str(self._weight_used)
            self.stats.requests[(path, status)] += 1
            return web.Response(
                status=status, body=orjson.dumps(body), content_type="application/json", headers=headers
            )

        return serve

    def _roll_window(self, now: float) -> int:
        window = int((now - self._epoch) // self.weight_window_s)
        if window != self._weight_window:
            self._weight_window, self._weight_used = window, 0
        return window

    def _admit(self, weight: int) -> tuple[int, Any, dict[str, str]]:
        """Apply bans, scripted failures and the weight limit: (200, None, {}) admits the request."""
        now = asyncio.get_running_loop().time()
        window = self._roll_window(now)
        if now < self._retry_until and now >= self._ban_until:
            # Still sending while told to wait: Binance bans the IP.
            self._retry_until = 0.0
            self._ban_until = now + self.ban_s
            self.stats.bans += 1
        if now < self._ban_until:
            wait = self._ban_until - now
            msg = f"Way too much request weight used; IP banned for {math.ceil(wait)} s."
            return 418, {"code": -1003, "msg": msg}, {"Retry-After": str(math.ceil(wait))}
        n, status = self._fail
        if n > 0:
            self._fail = (n - 1, status)
            msg = "Internal error; unable to process your request. Please try again."
            return status, {"code": -1001, "msg": msg}, {}
        n, retry_after = self._throttle
        if n > 0:
            self._throttle = (n - 1, retry_after)
        elif self._weight_used + weight > self.weight_limit:
            retry_after = self._epoch + (window + 1) * self.weight_window_s - now
        else:
            self._weight_used += weight
            return 200, None, {}
        self._retry_until = now + retry_after
        msg = (
            f"Too much request weight used; current limit is {self.weight_limit} request weight per 1 MINUTE."
        )
        return 429, {"code": -1003, "msg": msg}, {"Retry-After": str(max(1, math.ceil(retry_after)))}

    def _time(self, request: web.Request) -> Any:
        _params(request, ())
        return {"serverTime": self.market_ms()}

    def _historical_trades(self, request: web.Request) -> Any:
        params = _params(request, ("symbol", "limit", "fromId"))
        history = self._history(params)
        limit = _limit(params)
        from_id = _optional_int(params, "fromId")
        visible = history.visible(self.published)
        if from_id is None:
            lo, hi = max(0, visible - limit), visible
        else:
            lo = history.index_of_id(from_id)
            hi = min(visible, lo + limit)
        return [_historical(history.trade(j)) for j in range(lo, hi)]

    def _agg_trades(self, request: web.Request) -> Any:
        params = _params(request, ("symbol", "fromId", "startTime", "endTime", "limit"))
        history = self._history(params)
        limit = _limit(params)
        from_id = _optional_int(params, "fromId")
        start = _optional_int(params, "startTime")
        end = _optional_int(params, "endTime")
        if from_id is not None and (start is not None or end is not None):
            raise _BadRequest(-1128, "Combination of optional parameters invalid.")
        if start is not None and end is not None and end - start > MAX_WINDOW_MS:
            raise _BadRequest(-1127, "More than 1 hours between startTime and endTime.")
        complete = history.complete_aggregates(history.visible(self.published))
        upto = complete if end is None else min(complete, history.aggregates_before(end + 1))
        if from_id is not None:
            lo = history.aggregate_index_of_id(from_id)
            hi = min(complete, lo + limit)
        elif start is not None:
            lo = history.aggregates_before(start)
            hi = min(upto, lo + limit)
        else:
            hi = upto
            lo = max(0, hi - limit)
        return [_agg_row(history.aggregate(q)) for q in range(lo, hi)]

    def _history(self, params: dict[str, str]) -> SymbolHistory:
        symbol = params.get("symbol")
        if not symbol:
            raise _BadRequest(
                -1102, "Mandatory parameter 'symbol' was not sent, was empty/null, or malformed."
            )
        if symbol not in self.tape.symbols:
            raise _BadRequest(-1121, "Invalid symbol.")
        return self.tape.history(symbol)


def _params(request: web.Request, allowed: tuple[str, ...]) -> dict[str, str]:
    keys = list(request.query.keys())
    if len(keys) != len(set(keys)):
        raise _BadRequest(-1101, "Duplicate values for a parameter detected.")
    read = [k for k in keys if k in allowed]
    if len(read) != len(keys):
        raise _BadRequest(
            -1104,
            f"Not all sent parameters were read; read '{len(read)}' parameter(s) but was sent '{len(keys)}'.",
        )
    return dict(request.query)


def _optional_int(params: dict[str, str], name: str) -> int | None:
    value = params.get(name)
    if value is None:
        return None
    if not _UNSIGNED.match(value):
        raise _BadRequest(
            -1100, f"Illegal characters found in parameter '{name}'; legal range is '^[0-9]{{1,20}}$'."
        )
    return int(value)


def _limit(params: dict[str, str]) -> int:
    limit = _optional_int(params, "limit")
    if limit is None:
        return DEFAULT_LIMIT
    if not 1 <= limit <= MAX_LIMIT:
        raise _BadRequest(-1130, "Data sent for parameter 'limit' is not valid.")
    return limit


def _bool(value: bool) -> str:
    return "true" if value else "false"


def _trade_event(t: Trade) -> str:
    return _TRADE % (t.time_ms, t.symbol, t.trade_id, t.price, t.qty, t.time_ms, _bool(t.buyer_is_maker))


def _agg_event(symbol: str, a: AggTrade) -> str:
    return _AGG % (
        a.time_ms,
        symbol,
        a.agg_id,
        a.price,
        a.qty,
        a.first_id,
        a.last_id,
        a.time_ms,
        _bool(a.buyer_is_maker),
    )


def _historical(t: Trade) -> dict[str, Any]:
    return {
        "id": t.trade_id,
        "price": t.price,
        "qty": t.qty,
        "quoteQty": quote_qty(t.price, t.qty),
        "time": t.time_ms,
        "isBuyerMaker": t.buyer_is_maker,
        "isBestMatch": True,
    }


def _agg_row(a: AggTrade) -> dict[str, Any]:
    return {
        "a": a.agg_id,
        "p": a.price,
        "q": a.qty,
        "f": a.first_id,
        "l": a.last_id,
        "T": a.time_ms,
        "m": a.buyer_is_maker,
        "M": True,
    }


def quote_qty(price: str, qty: str) -> str:
    """Price x quantity as a decimal string with the larger number of decimals of the two (half-even)."""
    places = max(len(price.partition(".")[2]), len(qty.partition(".")[2]))
    return format((Decimal(price) * Decimal(qty)).quantize(Decimal(1).scaleb(-places)), "f")
