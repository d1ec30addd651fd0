"""Binance spot REST client for gap backfill: trades by id range and by time range.

:class:`BinanceRestClient` speaks the three public market-data endpoints a backfill needs
(``/api/v3/historicalTrades``, ``/api/v3/aggTrades``, ``/api/v3/time``; see PROTOCOLS.md) over aiohttp
and returns trades as :class:`~alphaengine.domain.TickBatch` columns, with the same column rules as the
WebSocket parser: venue ``BINANCE``, upper-case symbol, ``ts_ns`` = trade time ms x 1e6, ``recv_ns`` = the
client's clock when the response arrived, price and quantity from the decimal strings, ``side`` -1 when
the buyer was the maker (the taker sold) else +1.

Responses are validated whole (msgspec against a typed schema, then ranges): a body that is not what the
endpoint documents raises :class:`~alphaengine.errors.RestError` instead of turning a malformed row into
a trade.

Rate limits and failures, per request:

* the weight used in the current UTC minute (the exchange's window, read from the injected clock) is
  counted locally and raised to the ``X-MBX-USED-WEIGHT-1M`` header of every answer; a request that would
  go over ``weight_limit_per_min`` waits for the next minute;
* 429 (too many requests) and 418 (IP banned after ignoring 429s) wait ``Retry-After`` seconds (1 s when
  the header is absent) and retry;
* 5xx, timeouts and connection errors retry after a :class:`~alphaengine.backoff.Backoff` delay (full
  jitter, capped); the backoff is shared by the client's requests and reset by a success;
* any other 4xx raises :class:`RestRequestError` at once (401, a refused API key, raises
  :class:`RestAuthError`, which is also a :class:`~alphaengine.errors.FeedAuthError`);
* after ``max_attempts`` attempts the last failure is raised as :class:`~alphaengine.errors.RestError`.

Every wait goes through the injected :class:`~alphaengine.clock.Clock`, so tests run on simulated time.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Final

import aiohttp
import msgspec
import numpy as np
import numpy.typing as npt
import orjson
import pyarrow as pa

from alphaengine.backoff import Backoff
from alphaengine.clock import Clock, LiveClock
from alphaengine.domain import SIDE_BUY, SIDE_SELL, TickBatch
from alphaengine.errors import FeedAuthError, RestError
from alphaengine.metrics import REST_REQUESTS, REST_THROTTLED, REST_WEIGHT_USED
from alphaengine.sources.binance import VENUE

MAX_LIMIT: Final = 1000
"""The most rows one historicalTrades or aggTrades request returns."""
WEIGHT_HISTORICAL_TRADES: Final = 25
WEIGHT_AGG_TRADES: Final = 4
WEIGHT_TIME: Final = 1
AGG_WINDOW_MS: Final = 3_600_000
"""aggTrades refuses a startTime/endTime window of an hour or more; windows end 1 ms short of it."""

_MINUTE_NS: Final = 60_000_000_000
_MAX_MS: Final = (2**63 - 1) // 1_000_000
_MAX_ID: Final = 2**63 - 1
_DEFAULT_RETRY_AFTER_S: Final = 1.0
_WEIGHT_HEADER: Final = "X-MBX-USED-WEIGHT-1M"
_EXCERPT_CHARS: Final = 200


class RestRequestError(RestError):
    """The exchange refused the request itself (a 4xx other than 429/418): retrying cannot help."""

    retriable = False


class RestAuthError(RestRequestError, FeedAuthError):
    """The exchange refused the API key (HTTP 401)."""


# -- response schemas (unknown fields are ignored; every field we use is required and typed) ----------

_Decimal = Annotated[str, msgspec.Meta(pattern=r"^[0-9]+(\.[0-9]+)?\Z")]
_TradeId = Annotated[int, msgspec.Meta(ge=0, le=_MAX_ID)]
_TradeMs = Annotated[int, msgspec.Meta(gt=0, le=_MAX_MS)]


class _HistoricalTrade(msgspec.Struct):
    id: _TradeId
    price: _Decimal
    qty: _Decimal
    time: _TradeMs
    is_buyer_maker: bool = msgspec.field(name="isBuyerMaker")


class _AggTrade(msgspec.Struct):
    agg_id: _TradeId = msgspec.field(name="a")
    price: _Decimal = msgspec.field(name="p")
    qty: _Decimal = msgspec.field(name="q")
    first_id: _TradeId = msgspec.field(name="f")
    last_id: _TradeId = msgspec.field(name="l")
    time: _TradeMs = msgspec.field(name="T")
    is_buyer_maker: bool = msgspec.field(name="m")


class _ServerTime(msgspec.Struct):
    server_time: _TradeMs = msgspec.field(name="serverTime")


_HISTORICAL_DECODER: Final = msgspec.json.Decoder(list[_HistoricalTrade])
_AGG_DECODER: Final = msgspec.json.Decoder(list[_AggTrade])
_TIME_DECODER: Final = msgspec.json.Decoder(_ServerTime)


@dataclass(frozen=True, slots=True)
class AggTrades:
    """Aggregate trades (one row per aggregate) as numpy columns.

    ``agg_id`` is the aggregate id (``a``), ``first_id``/``last_id`` the range of trade ids it covers
    (``f``/``l``), ``ts_ns`` its trade time, ``price``/``qty`` its price and summed quantity, ``side`` the
    aggressor side (-1 when the buyer was the maker, else +1); ``recv_ns`` is when the answer arrived.
    """

    symbol: str
    agg_id: npt.NDArray[np.int64]
    first_id: npt.NDArray[np.int64]
    last_id: npt.NDArray[np.int64]
    ts_ns: npt.NDArray[np.int64]
    price: npt.NDArray[np.float64]
    qty: npt.NDArray[np.float64]
    side: npt.NDArray[np.int8]
    recv_ns: int

    def __len__(self) -> int:
        return len(self.agg_id)

    def as_ticks(self) -> TickBatch:
        """The aggregates as ticks (venue ``BINANCE``), the aggregate id as ``trade_id``."""
        n = len(self)
        return TickBatch.from_columns(
            venue=VENUE,
            symbol=self.symbol,
            trade_id=self.agg_id,
            ts_ns=self.ts_ns,
            recv_ns=np.full(n, self.recv_ns, dtype=np.int64),
            price=self.price,
            qty=self.qty,
            side=self.side,
        )


class BinanceRestClient:
    """Binance spot market-data REST client; see the module docstring for limits, retries and errors.

    ``base_url`` is the scheme and host (``https://api.binance.com`` or a test server). ``source`` names
    the owning module in metrics and logs. A ``session`` passed in is used and left open by
    :meth:`close`; without one the client creates its own on first use and closes it.
    """

    def __init__(
        self,
        base_url: str,
        *,
        source: str,
        session: aiohttp.ClientSession | None = None,
        api_key: str | None = None,
        weight_limit_per_min: int = 6000,
        timeout_s: float = 10.0,
        max_attempts: int = 8,
        clock: Clock | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        if weight_limit_per_min < WEIGHT_HISTORICAL_TRADES:
            # A limit below one request's weight could never be met: the client would wait forever.
            raise ValueError(
                f"weight_limit_per_min must be at least {WEIGHT_HISTORICAL_TRADES}, "
                f"got {weight_limit_per_min}"
            )
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
        self.base_url = base_url.rstrip("/")
        self.source = source
        self.weight_limit_per_min = weight_limit_per_min
        self.max_attempts = max_attempts
        self.log = logging.getLogger(f"alphaengine.{source}")
        self._session = session
        self._owns_session = session is None
        self._headers = {"X-MBX-APIKEY": api_key} if api_key else {}
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._clock = clock or LiveClock()
        self._backoff = backoff or Backoff(0.25, 10.0, jitter="full")
        self._minute = -1
        self._weight_used = 0
        self._weight_gauge = REST_WEIGHT_USED.labels(source)

    async def close(self) -> None:
        """Close the HTTP session if this client created it (idempotent)."""
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def weight_used(self) -> int:
        """The request weight counted for the current minute (as of the last request)."""
        return self._weight_used

    async def server_time_ms(self) -> int:
        """The exchange's clock, UNIX milliseconds."""
        body, _ = await self._get("/api/v3/time", {}, WEIGHT_TIME, "time")
        answer: _ServerTime = _decode(_TIME_DECODER, body, "time")
        return answer.server_time

    async def historical_trades(self, symbol: str, from_id: int, limit: int = MAX_LIMIT) -> TickBatch:
        """Up to ``limit`` (at most 1000) trades of ``symbol`` with ids from ``from_id`` on, in id order."""
        _check_limit(limit)
        params = {"symbol": symbol.upper(), "fromId": str(from_id), "limit": str(limit)}
        body, recv_ns = await self._get(
            "/api/v3/historicalTrades", params, WEIGHT_HISTORICAL_TRADES, "historicalTrades"
        )
        rows = _decode(_HISTORICAL_DECODER, body, "historicalTrades")
        if len(rows) > limit:
            raise RestError(f"historicalTrades: {len(rows)} rows for limit {limit}", status=200)
        ids = np.array([r.id for r in rows], dtype=np.int64)
        if len(ids) and (ids[0] < from_id or (np.diff(ids) <= 0).any()):
            raise RestError(f"historicalTrades: ids not ascending from fromId={from_id}", status=200)
        price = _positive(np.array([r.price for r in rows], dtype=np.float64), "historicalTrades price")
        qty = _positive(np.array([r.qty for r in rows], dtype=np.float64), "historicalTrades qty")
        return TickBatch.from_columns(
            venue=VENUE,
            symbol=symbol.upper(),
            trade_id=ids,
            ts_ns=np.array([r.time for r in rows], dtype=np.int64) * 1_000_000,
            recv_ns=np.full(len(rows), recv_ns, dtype=np.int64),
            price=price,
            qty=qty,
            side=_sides([r.is_buyer_maker for r in rows]),
        )

    async def agg_trades(
        self,
        symbol: str,
        *,
        from_id: int | None = None,
        start_ms: int | None = None,
        end_ms: int | None = None,
        limit: int = MAX_LIMIT,
    ) -> AggTrades:
        """Up to ``limit`` aggregate trades of ``symbol``, by aggregate id (``from_id``) or by time.

        The exchange refuses a ``start_ms``..``end_ms`` window of an hour or more (both ends inclusive).
        """
        _check_limit(limit)
        params = {"symbol": symbol.upper(), "limit": str(limit)}
        for name, value in (("fromId", from_id), ("startTime", start_ms), ("endTime", end_ms)):
            if value is not None:
                params[name] = str(value)
        body, recv_ns = await self._get("/api/v3/aggTrades", params, WEIGHT_AGG_TRADES, "aggTrades")
        rows = _decode(_AGG_DECODER, body, "aggTrades")
        if len(rows) > limit:
            raise RestError(f"aggTrades: {len(rows)} rows for limit {limit}", status=200)
        first_id = np.array([r.first_id for r in rows], dtype=np.int64)
        last_id = np.array([r.last_id for r in rows], dtype=np.int64)
        if (first_id > last_id).any():
            raise RestError("aggTrades: an aggregate whose first trade id is above its last", status=200)
        return AggTrades(
            symbol=symbol.upper(),
            agg_id=np.array([r.agg_id for r in rows], dtype=np.int64),
            first_id=first_id,
            last_id=last_id,
            ts_ns=np.array([r.time for r in rows], dtype=np.int64) * 1_000_000,
            price=_positive(np.array([r.price for r in rows], dtype=np.float64), "aggTrades price"),
            qty=_positive(np.array([r.qty for r in rows], dtype=np.float64), "aggTrades qty"),
            side=_sides([r.is_buyer_maker for r in rows]),
            recv_ns=recv_ns,
        )

    async def trades_between_ids(self, symbol: str, first_id: int, last_id: int) -> TickBatch:
        """Every trade of ``symbol`` with ``first_id <= id <= last_id`` that the exchange has, in id order.

        Pages historicalTrades; stops early when the exchange has nothing more (the trades are not there
        yet), so the result can end before ``last_id``.
        """
        pages: list[TickBatch] = []
        from_id = first_id
        while from_id <= last_id:
            want = min(MAX_LIMIT, last_id - from_id + 1)
            page = await self.historical_trades(symbol, from_id, want)
            if not len(page):
                break
            ids = page.np("trade_id")
            pages.append(_keep(page, ids <= last_id))
            if len(page) < want:
                break
            from_id = int(ids[-1]) + 1
        return _concat(pages)

    async def aggregates_between_ids(self, symbol: str, first_id: int, last_id: int) -> TickBatch:
        """Every aggregate trade of ``symbol`` with ``first_id <= a <= last_id``, as ticks.

        The ``trade_id`` of each tick is the aggregate id; like :meth:`trades_between_ids`, the result can
        end before ``last_id``.
        """
        pages: list[TickBatch] = []
        from_id = first_id
        while from_id <= last_id:
            want = min(MAX_LIMIT, last_id - from_id + 1)
            page = await self.agg_trades(symbol, from_id=from_id, limit=want)
            if not len(page):
                break
            batch = page.as_ticks()
            pages.append(_keep(batch, page.agg_id <= last_id))
            if len(page) < want:
                break
            from_id = int(page.agg_id[-1]) + 1
        return _concat(pages)

    async def trades_between_times(self, symbol: str, start_ms: int, end_ms: int) -> TickBatch:
        """Every trade of ``symbol`` with ``start_ms <= time <= end_ms`` (milliseconds), in id order.

        aggTrades by time, one window of under an hour at a time, finds the first trade id at or after
        ``start_ms`` (field ``f`` of the first aggregate); historicalTrades pages on from it until a trade
        is later than ``end_ms`` or the exchange has nothing more.
        """
        first_id: int | None = None
        window_ms = start_ms
        while first_id is None and window_ms <= end_ms:
            window_end = min(window_ms + AGG_WINDOW_MS - 1, end_ms)
            aggs = await self.agg_trades(symbol, start_ms=window_ms, end_ms=window_end, limit=1)
            if len(aggs):
                first_id = int(aggs.first_id[0])
            window_ms += AGG_WINDOW_MS
        if first_id is None:
            return TickBatch.empty()
        start_ns, end_ns = start_ms * 1_000_000, end_ms * 1_000_000
        pages: list[TickBatch] = []
        from_id = first_id
        while True:
            page = await self.historical_trades(symbol, from_id, MAX_LIMIT)
            if not len(page):
                break
            ts = page.np("ts_ns")
            pages.append(_keep(page, (ts >= start_ns) & (ts <= end_ns)))
            if ts[-1] > end_ns or len(page) < MAX_LIMIT:
                break
            from_id = int(page.np("trade_id")[-1]) + 1
        return _concat(pages)

    # -- transport ---------------------------------------------------------------------------------

    async def _get(
        self, path: str, params: Mapping[str, str], weight: int, endpoint: str
    ) -> tuple[bytes, int]:
        """The body of a 200 answer and when it arrived; retries and raises as the module docstring says."""
        if self._session is None:
            self._session = aiohttp.ClientSession()
        url = self.base_url + path
        failure = "no attempt"
        status: int | None = None
        code: int | None = None
        for attempt in range(1, self.max_attempts + 1):
            await self._reserve(weight)
            level = logging.WARNING
            try:
                async with self._session.get(
                    url, params=params, headers=self._headers, timeout=self._timeout
                ) as resp:
                    body = await resp.read()
                    status = resp.status
                    headers = resp.headers
            except (TimeoutError, aiohttp.ClientError) as exc:
                REST_REQUESTS.labels(self.source, endpoint, "error").inc()
                failure, status, code = f"{type(exc).__name__}: {exc}", None, None
                delay = self._backoff.next_delay()
            else:
                recv_ns = self._clock.now_ns()
                REST_REQUESTS.labels(self.source, endpoint, str(status)).inc()
                self._observe_weight(headers.get(_WEIGHT_HEADER), recv_ns)
                if status == 200:
                    self._backoff.reset()
                    return body, recv_ns
                code, msg = _error_body(body)
                failure = f"HTTP {status} code={code} msg={msg}"
                if status in (418, 429):
                    REST_THROTTLED.labels(self.source, str(status)).inc()
                    delay = _retry_after_s(headers.get("Retry-After"))
                    if status == 418:
                        # The IP is banned for ignoring 429s: someone must look at what else uses it.
                        level = logging.ERROR
                elif status >= 500:
                    delay = self._backoff.next_delay()
                else:
                    error = RestAuthError if status == 401 else RestRequestError
                    raise error(f"{endpoint}: {failure}", status=status, code=code)
            if attempt == self.max_attempts:
                break
            self.log.log(
                level,
                "%s: %s attempt %d/%d failed (%s), retrying in %.2f s",
                self.source,
                endpoint,
                attempt,
                self.max_attempts,
                failure,
                delay,
            )
            await self._clock.sleep(delay)
        raise RestError(f"{endpoint}: {failure} after {self.max_attempts} attempts", status=status, code=code)

    async def _reserve(self, weight: int) -> None:
        """Count ``weight`` in the current minute, first waiting for the next minute if it would not fit."""
        logged = False
        while True:
            now = self._clock.now_ns()
            self._roll_minute(now)
            if self._weight_used + weight <= self.weight_limit_per_min:
                self._weight_used += weight
                self._weight_gauge.set(self._weight_used)
                return
            wait_s = ((now // _MINUTE_NS + 1) * _MINUTE_NS - now) / 1e9
            if not logged:
                self.log.warning(
                    "%s: request weight %d of %d used this minute, waiting %.1f s for the next",
                    self.source,
                    self._weight_used,
                    self.weight_limit_per_min,
                    wait_s,
                )
                logged = True
            await self._clock.sleep(wait_s)

    def _observe_weight(self, header: str | None, now_ns: int) -> None:
        """Take the exchange's count of this minute's weight when it is above ours (other clients, IP)."""
        if header is None:
            return
        try:
            used = int(header)
        except ValueError:
            return
        self._roll_minute(now_ns)
        self._weight_used = max(self._weight_used, used)
        self._weight_gauge.set(self._weight_used)

    def _roll_minute(self, now_ns: int) -> None:
        minute = now_ns // _MINUTE_NS
        if minute != self._minute:
            self._minute, self._weight_used = minute, 0


def _check_limit(limit: int) -> None:
    if not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit must be between 1 and {MAX_LIMIT}, got {limit}")


def _decode(decoder: msgspec.json.Decoder[Any], body: bytes, endpoint: str) -> Any:
    try:
        return decoder.decode(body)
    except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
        raise RestError(f"{endpoint}: malformed response ({exc}): {_excerpt(body)}", status=200) from exc


def _positive(values: npt.NDArray[np.float64], what: str) -> npt.NDArray[np.float64]:
    # The schema admits only decimal strings, so the values are finite; zero is still not a trade.
    if (values <= 0.0).any():
        raise RestError(f"{what}: a value that is not positive", status=200)
    return values


def _sides(buyer_is_maker: list[bool]) -> npt.NDArray[np.int8]:
    return np.where(np.array(buyer_is_maker, dtype=bool), SIDE_SELL, SIDE_BUY).astype(np.int8)


def _error_body(body: bytes) -> tuple[int | None, str]:
    """``code`` and ``msg`` of an error answer (``{"code":-1121,"msg":"Invalid symbol."}``), if it is one."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None, _excerpt(body)
    if not isinstance(obj, dict):
        return None, _excerpt(body)
    code = obj.get("code")
    msg = obj.get("msg")
    return (
        code if type(code) is int else None,
        msg if isinstance(msg, str) else _excerpt(body),
    )


def _retry_after_s(header: str | None) -> float:
    """Seconds to wait from a ``Retry-After`` header (Binance sends whole seconds); 1 s if absent or bad."""
    if header is None:
        return _DEFAULT_RETRY_AFTER_S
    try:
        seconds = float(header)
    except ValueError:
        return _DEFAULT_RETRY_AFTER_S
    return seconds if math.isfinite(seconds) and seconds >= 0 else _DEFAULT_RETRY_AFTER_S


def _keep(batch: TickBatch, mask: npt.NDArray[np.bool_]) -> TickBatch:
    return batch if mask.all() else TickBatch(batch.data.filter(pa.array(mask)))


def _concat(pages: list[TickBatch]) -> TickBatch:
    if not pages:
        return TickBatch.empty()
    if len(pages) == 1:
        return pages[0]
    return TickBatch(pa.concat_batches([p.data for p in pages]))


def _excerpt(body: bytes) -> str:
    text = body.decode("utf-8", "replace")
    return repr(text[:_EXCERPT_CHARS] + ("..." if len(text) > _EXCERPT_CHARS else ""))
