"""The Binance REST backfill client against a small local exchange written here (aiohttp.web)."""

from __future__ import annotations

import asyncio
import bisect
import itertools
import logging
import random
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from prometheus_client import REGISTRY

from alphaengine.backoff import Backoff
from alphaengine.domain import SIDE_BUY, SIDE_SELL, TICK_SCHEMA
from alphaengine.errors import FeedAuthError, RestError
from alphaengine.sources.binance_rest import (
    AGG_WINDOW_MS,
    BinanceRestClient,
    RestAuthError,
    RestRequestError,
)

MINUTE_NS = 60_000_000_000
START_NS = 28_720_000 * MINUTE_NS + 10_000_000_000  # ten seconds into a UTC minute of 2024-08-09
FIRST_ID = 3_735_683_259
FIRST_MS = 1_723_161_255_342
N_TRADES = 3_000
WEIGHTS = {"/api/v3/historicalTrades": 25, "/api/v3/aggTrades": 4, "/api/v3/time": 1}


class StepClock:
    """A clock whose sleeps return at once, moving its time forward by the time slept (each recorded)."""

    def __init__(self, start_ns: int = START_NS) -> None:
        self.now = start_ns
        self.sleeps: list[float] = []

    def now_ns(self) -> int:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += int(seconds * 1e9)
        await asyncio.sleep(0)


def generate_trades(n: int, seed: int = 7) -> list[dict[str, Any]]:
    """Trades in historicalTrades form: contiguous ids, bursts in one millisecond, exact repeats."""
    rng = random.Random(seed)
    trades: list[dict[str, Any]] = []
    ms, price = FIRST_MS, 61_837.63
    for i in range(n):
        if trades and rng.random() < 0.25:
            # The same trade again in the same millisecond: legal, and must not be deduplicated away.
            previous = trades[-1]
            trades.append({**previous, "id": FIRST_ID + i})
            continue
        ms += rng.choice([0, 0, 1, 2, 7])
        price = round(price + rng.choice([-0.01, 0.0, 0.01]), 2)
        qty = rng.choice([0.0001, 0.002, 0.01503, 1.2])
        trades.append(
            {
                "id": FIRST_ID + i,
                "price": f"{price:.8f}",
                "qty": f"{qty:.8f}",
                "quoteQty": f"{price * qty:.8f}",
                "time": ms,
                "isBuyerMaker": rng.random() < 0.5,
                "isBestMatch": True,
            }
        )
    return trades


def aggregate(trades: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """aggTrades rows: runs of trades with the same time, price and side."""
    aggs: list[dict[str, Any]] = []
    for t in trades:
        last = aggs[-1] if aggs else None
        if last and (last["T"], last["p"], last["m"]) == (t["time"], t["price"], t["isBuyerMaker"]):
            last["l"] = t["id"]
            last["q"] = f"{float(last['q']) + float(t['qty']):.8f}"
            continue
        aggs.append(
            {
                "a": 100 + len(aggs),
                "p": t["price"],
                "q": t["qty"],
                "f": t["id"],
                "l": t["id"],
                "T": t["time"],
                "m": t["isBuyerMaker"],
                "M": True,
            }
        )
    return aggs


Fault = tuple[int, dict[str, str], bytes] | str


@dataclass
class FakeBinance:
    """Serves historicalTrades, aggTrades and time from a list of trades, counting weight per minute.

    ``faults`` are answered, one per request, before normal service resumes: ``(status, headers, body)``,
    or ``"hang"`` to answer only once ``release`` is set. ``preused`` is weight other clients of the same
    IP used, per minute.
    """

    clock: StepClock
    trades: list[dict[str, Any]]
    faults: list[Fault] = field(default_factory=list)
    requests: list[tuple[str, dict[str, str], int]] = field(default_factory=list)
    weight: dict[int, int] = field(default_factory=dict)
    preused: dict[int, int] = field(default_factory=dict)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.ids = [t["id"] for t in self.trades]
        self.aggs = aggregate(self.trades)

    async def handle(self, request: web.Request) -> web.Response:
        minute = self.clock.now_ns() // MINUTE_NS
        query = dict(request.query)
        self.requests.append((request.path, query, minute))
        self.weight[minute] = self.weight.get(minute, self.preused.get(minute, 0)) + WEIGHTS[request.path]
        headers = {"X-MBX-USED-WEIGHT-1M": str(self.weight[minute])}
        if self.faults:
            fault = self.faults.pop(0)
            if fault == "hang":
                await self.release.wait()
                return web.Response(status=503, headers=headers)
            assert not isinstance(fault, str)
            status, extra, body = fault
            return web.Response(status=status, headers=headers | extra, body=body)
        status, answer = self.answer(request.path, query)
        return web.Response(status=status, headers=headers, body=orjson.dumps(answer))

    def answer(self, path: str, query: dict[str, str]) -> tuple[int, Any]:
        if path == "/api/v3/time":
            return 200, {"serverTime": self.clock.now_ns() // 1_000_000}
        if query.get("symbol") != "BTCUSDT":
            return 400, {"code": -1121, "msg": "Invalid symbol."}
        limit = int(query.get("limit", "500"))
        if not 1 <= limit <= 1000:
            return 400, {"code": -1130, "msg": "Data sent for parameter 'limit' is not valid."}
        if path == "/api/v3/historicalTrades":
            start = bisect.bisect_left(self.ids, int(query["fromId"]))
            return 200, self.trades[start : start + limit]
        if "fromId" in query:
            rows = [a for a in self.aggs if a["a"] >= int(query["fromId"])]
        else:
            start_ms, end_ms = int(query["startTime"]), int(query["endTime"])
            if end_ms - start_ms >= AGG_WINDOW_MS:
                return 400, {"code": -1127, "msg": "More than 1 hours between startTime and endTime."}
            rows = [a for a in self.aggs if start_ms <= a["T"] <= end_ms]
        return 200, rows[:limit]

    def paths(self) -> list[str]:
        return [path for path, _, _ in self.requests]


@pytest.fixture
async def exchange() -> AsyncIterator[tuple[FakeBinance, str]]:
    fake = FakeBinance(StepClock(), generate_trades(N_TRADES))
    app = web.Application()
    app.router.add_get("/api/v3/{endpoint}", fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    yield fake, f"http://{host}:{port}"
    fake.release.set()
    await runner.cleanup()


ClientFactory = Callable[..., BinanceRestClient]


@pytest.fixture
async def make_client(exchange: tuple[FakeBinance, str]) -> AsyncIterator[ClientFactory]:
    fake, url = exchange
    clients: list[BinanceRestClient] = []

    def make(source: str = "rest-test", **kwargs: Any) -> BinanceRestClient:
        kwargs.setdefault("clock", fake.clock)
        kwargs.setdefault("backoff", Backoff(0.5, 4.0, rng=random.Random(3)))
        client = BinanceRestClient(kwargs.pop("base_url", url), source=source, **kwargs)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


def requests_total(source: str, endpoint: str, status: str) -> float:
    labels = {"source": source, "endpoint": endpoint, "status": status}
    return REGISTRY.get_sample_value("alphaengine_rest_requests_total", labels) or 0.0


def throttled_total(source: str, status: str) -> float:
    labels = {"source": source, "status": status}
    return REGISTRY.get_sample_value("alphaengine_rest_throttled_total", labels) or 0.0


def expected_rows(trades: list[dict[str, Any]], recv_ns: int) -> list[dict[str, Any]]:
    return [
        {
            "venue": "BINANCE",
            "symbol": "BTCUSDT",
            "trade_id": t["id"],
            "ts_ns": t["time"] * 1_000_000,
            "recv_ns": recv_ns,
            "price": float(t["price"]),
            "qty": float(t["qty"]),
            "side": SIDE_SELL if t["isBuyerMaker"] else SIDE_BUY,
        }
        for t in trades
    ]


# -- data ---------------------------------------------------------------------------------------------


async def test_historical_trades_become_ticks_with_every_column(
    exchange: tuple[FakeBinance, str], make_client: ClientFactory
) -> None:
    fake, _ = exchange
    client = make_client()
    batch = await client.historical_trades("btcusdt", FIRST_ID + 10, limit=50)
    assert batch.data.schema.equals(TICK_SCHEMA)
    assert batch.data.to_pylist() == expected_rows(fake.trades[10:60], START_NS)
    assert fake.requests[0][1] == {"symbol": "BTCUSDT", "fromId": str(FIRST_ID + 10), "limit": "50"}


async def test_paging_by_ids_returns_exactly_the_range(
    exchange: tuple[FakeBinance, str], make_client: ClientFactory
) -> None:
    fake, _ = exchange
    client = make_client()
    first, last = FIRST_ID + 123, FIRST_ID + 2_617  # 2,495 trades: three pages
    batch = await client.trades_between_ids("BTCUSDT", first, last)
    assert batch.data.to_pylist() == expected_rows(fake.trades[123:2_618], START_NS)
    assert [q["limit"] for _, q, _ in fake.requests] == ["1000", "1000", "495"]


async def test_paging_by_ids_stops_where_the_exchange_has_no_more(
    exchange: tuple[FakeBinance, str], make_client: ClientFactory
) -> None:
    fake, _ = exchange
    client = make_client()
    batch = await client.trades_between_ids("BTCUSDT", FIRST_ID + 2_500, FIRST_ID + 9_000)
    assert batch.np("trade_id").tolist() == fake.ids[2_500:]
    assert len(fake.requests) == 1  # a short page means the later trades do not exist yet
    assert len(await client.trades_between_ids("BTCUSDT", FIRST_ID + 5_000, FIRST_ID + 6_000)) == 0
    assert len(await client.trades_between_ids("BTCUSDT", FIRST_ID + 10, FIRST_ID + 9)) == 0


async def test_paging_by_time_returns_exactly_the_trades_in_the_interval(
    exchange: tuple[FakeBinance, str], make_client: ClientFactory
) -> None:
    fake, _ = exchange
    client = make_client()
    times = [t["time"] for t in fake.trades]
    # Both ends on milliseconds that hold several identical trades: every copy must come back.
    bursts = [ms for ms in sorted(set(times)) if times.count(ms) >= 3]
    start_ms, end_ms = bursts[2], bursts[-3]
    expected = [t for t in fake.trades if start_ms <= t["time"] <= end_ms]
    assert len(expected) > 1_000  # more than one page
    repeats = [t for t in expected if t["time"] == start_ms]
    assert len(repeats) >= 3

    batch = await client.trades_between_times("BTCUSDT", start_ms, end_ms)
    assert batch.data.to_pylist() == expected_rows(expected, START_NS)
    assert fake.paths()[0] == "/api/v3/aggTrades"
    assert set(fake.paths()[1:]) == {"/api/v3/historicalTrades"}


async def test_paging_by_time_walks_hour_windows_to_the_first_trade(
    exchange: tuple[FakeBinance, str], make_client: ClientFactory
) -> None:
    fake, _ = exchange
    client = make_client()
    start_ms = FIRST_MS - 3 * AGG_WINDOW_MS - 5  # three empty hours before the first trade
    end_ms = fake.trades[40]["time"]
    batch = await client.trades_between_times("BTCUSDT", start_ms, end_ms)
    assert batch.np("trade_id").tolist() == [t["id"] for t in fake.trades if t["time"] <= end_ms]
    windows = [(int(q["startTime"]), int(q["endTime"])) for p, q, _ in fake.requests if "startTime" in q]
    assert len(windows) == 4  # the server refuses windows of an hour or more: none was sent
    assert all(end - start < AGG_WINDOW_MS for start, end in windows)
    assert windows[0][0] == start_ms
    assert [b[0] - a[0] for a, b in itertools.pairwise(windows)] == [AGG_WINDOW_MS] * 3


async def test_paging_by_time_with_no_trade_in_the_interval_is_empty(
    exchange: tuple[FakeBinance, str], make_client: ClientFactory
) -> None:
    fake, _ = exchange
    client = make_client()
    batch = await client.trades_between_times("BTCUSDT", FIRST_MS - 10 * AGG_WINDOW_MS, FIRST_MS - 1)
    assert len(batch) == 0
    assert fake.paths() == ["/api/v3/aggTrades"] * 10
    last_ms = fake.trades[-1]["time"]
    assert len(await client.trades_between_times("BTCUSDT", last_ms + 1, last_ms + 1_000)) == 0


async def test_agg_trades_by_id_and_server_time(
    exchange: tuple[FakeBinance, str], make_client: ClientFactory
) -> None:
    fake, _ = exchange
    client = make_client()
    aggs = await client.agg_trades("BTCUSDT", from_id=110, limit=5)
    rows = fake.aggs[10:15]
    assert aggs.agg_id.tolist() == [a["a"] for a in rows]
    assert aggs.first_id.tolist() == [a["f"] for a in rows]
    assert aggs.last_id.tolist() == [a["l"] for a in rows]
    assert aggs.ts_ns.tolist() == [a["T"] * 1_000_000 for a in rows]
    assert aggs.qty.tolist() == [float(a["q"]) for a in rows]
    assert aggs.side.tolist() == [SIDE_SELL if a["m"] else SIDE_BUY for a in rows]
    assert len(aggs) == 5
    assert await client.server_time_ms() == START_NS // 1_000_000


async def test_limits_outside_the_api_range_are_refused_before_sending(make_client: ClientFactory) -> None:
    client = make_client()
    with pytest.raises(ValueError, match="limit"):
        await client.historical_trades("BTCUSDT", FIRST_ID, limit=1_001)
    with pytest.raises(ValueError, match="limit"):
        await client.agg_trades("BTCUSDT", from_id=1, limit=0)


# -- rate limits --------------------------------------------------------------------------------------


async def test_429_waits_retry_after_then_retries(
    exchange: tuple[FakeBinance, str], make_client: ClientFactory
) -> None:
    fake, _ = exchange
    source = "rest-429"
    client = make_client(source)
    too_many = b'{"code":-1003,"msg":"Too many requests."}'
    fake.faults = [(429, {"Retry-After": "3"}, too_many), (429, {}, too_many)]
    before = throttled_total(source, "429")
    batch = await client.historical_trades("BTCUSDT", FIRST_ID, limit=3)
    assert batch.np("trade_id").tolist() == fake.ids[:3]
    assert fake.clock.sleeps == [3.0, 1.0]  # the header's seconds, then the 1 s default
    assert len(fake.requests) == 3
    assert throttled_total(source, "429") == before + 2
    assert requests_total(source, "historicalTrades", "429") >= 2


async def test_418_logs_an_error_waits_retry_after_then_retries(
    exchange: tuple[FakeBinance, str], make_client: ClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    fake, _ = exchange
    source = "rest-418"
    client = make_client(source)
    fake.faults = [(418, {"Retry-After": "120"}, b'{"code":-1003,"msg":"Way too many requests; banned."}')]
    before = throttled_total(source, "418")
    with caplog.at_level(logging.WARNING, logger=f"alphaengine.{source}"):
        batch = await client.historical_trades("BTCUSDT", FIRST_ID, limit=1)
    assert len(batch) == 1
    assert fake.clock.sleeps == [120.0]
    assert len(fake.requests) == 2
    assert throttled_total(source, "418") == before + 1
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "418" in errors[0].getMessage()


async def test_weight_limit_waits_for_the_next_minute(
    exchange: tuple[FakeBinance, str], make_client: ClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    fake, _ = exchange
    source = "rest-weight"
    client = make_client(source, weight_limit_per_min=60)
    with caplog.at_level(logging.WARNING, logger=f"alphaengine.{source}"):
        for _ in range(3):
            await client.historical_trades("BTCUSDT", FIRST_ID, limit=1)  # weight 25 each
    assert fake.clock.sleeps == [50.0]  # 25 + 25 fit in 60, a third waits from :10 to the next minute
    minute = START_NS // MINUTE_NS
    assert [m for _, _, m in fake.requests] == [minute, minute, minute + 1]
    assert len(caplog.records) == 1
    assert REGISTRY.get_sample_value("alphaengine_rest_weight_used", {"source": source}) == 25


async def test_the_used_weight_header_counts_other_clients_of_the_ip(
    exchange: tuple[FakeBinance, str], make_client: ClientFactory
) -> None:
    fake, _ = exchange
    client = make_client(weight_limit_per_min=60)
    fake.preused[START_NS // MINUTE_NS] = 30  # another process used 30 this minute: the header says 55
    await client.historical_trades("BTCUSDT", FIRST_ID, limit=1)
    assert client.weight_used == 55
    await client.historical_trades("BTCUSDT", FIRST_ID, limit=1)
    assert fake.clock.sleeps == [50.0]
    assert client.weight_used == 25


# -- failures -----------------------------------------------------------------------------------------


async def test_5xx_is_retried_with_backoff_then_succeeds(
    exchange: tuple[FakeBinance, str], make_client: ClientFactory
) -> None:
    fake, _ = exchange
    source = "rest-5xx"
    client = make_client(source)
    fake.faults = [(503, {}, b"Service Unavailable"), (500, {}, b""), (502, {}, b"<html>")]
    assert await client.server_time_ms() == fake.clock.now_ns() // 1_000_000
    assert len(fake.requests) == 4
    assert len(fake.clock.sleeps) == 3
    # Full jitter under a cap that doubles from 0.5 s: each delay is at most its cap.
    assert all(0.0 <= s <= cap for s, cap in zip(fake.clock.sleeps, [0.5, 1.0, 2.0], strict=True))
    assert requests_total(source, "time", "503") >= 1
    assert requests_total(source, "time", "200") >= 1


async def test_persistent_5xx_raises_after_max_attempts(
    exchange: tuple[FakeBinance, str], make_client: ClientFactory
) -> None:
    fake, _ = exchange
    client = make_client(max_attempts=3)
    fake.faults = [(503, {}, b"")] * 5
    with pytest.raises(RestError) as raised:
        await client.server_time_ms()
    assert raised.value.status == 503
    assert raised.value.retriable
    assert len(fake.requests) == 3
    assert len(fake.clock.sleeps) == 2  # no wait after the last attempt


async def test_a_client_error_raises_at_once_with_the_code(make_client: ClientFactory) -> None:
    client = make_client()
    with pytest.raises(RestRequestError) as raised:
        await client.historical_trades("NOSUCHCOIN", 1)
    assert (raised.value.status, raised.value.code) == (400, -1121)
    assert "Invalid symbol." in str(raised.value)
    assert not raised.value.retriable
    assert isinstance(raised.value, RestError)


async def test_a_refused_api_key_is_an_auth_error(
    exchange: tuple[FakeBinance, str], make_client: ClientFactory
) -> None:
    fake, _ = exchange
    client = make_client(api_key="bad")
    fake.faults = [(401, {}, b'{"code":-2015,"msg":"Invalid API-key, IP, or permissions for action."}')]
    with pytest.raises(RestAuthError) as raised:
        await client.historical_trades("BTCUSDT", 1)
    assert isinstance(raised.value, FeedAuthError)
    assert (raised.value.status, raised.value.code, raised.value.retriable) == (401, -2015, False)
    assert len(fake.requests) == 1
    assert fake.clock.sleeps == []


async def test_timeouts_are_retried_then_raised(
    exchange: tuple[FakeBinance, str], make_client: ClientFactory
) -> None:
    fake, _ = exchange
    source = "rest-timeout"
    client = make_client(source, timeout_s=0.05, max_attempts=2)
    fake.faults = ["hang", "hang"]
    before = requests_total(source, "time", "error")
    with pytest.raises(RestError, match="after 2 attempts") as raised:
        await client.server_time_ms()
    assert raised.value.status is None
    assert requests_total(source, "time", "error") == before + 2
    assert len(fake.clock.sleeps) == 1


async def test_connection_errors_are_retried_then_raised(make_client: ClientFactory) -> None:
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    clock = StepClock()
    client = make_client(base_url=f"http://127.0.0.1:{port}", clock=clock, max_attempts=4)
    with pytest.raises(RestError, match="after 4 attempts"):
        await client.server_time_ms()
    assert len(clock.sleeps) == 3


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"<html>not json</html>", id="not-json"),
        pytest.param(b'{"code":0}', id="object-not-list"),
        pytest.param(b"[1, 2]", id="rows-not-objects"),
        pytest.param(b'[{"id":1,"qty":"1.0","time":1,"isBuyerMaker":true}]', id="missing-price"),
        pytest.param(b'[{"id":"1","price":"1","qty":"1","time":1,"isBuyerMaker":true}]', id="id-as-string"),
        pytest.param(b'[{"id":1,"price":1.5,"qty":"1","time":1,"isBuyerMaker":true}]', id="price-number"),
        pytest.param(b'[{"id":1,"price":"abc","qty":"1","time":1,"isBuyerMaker":true}]', id="price-text"),
        pytest.param(b'[{"id":1,"price":"NaN","qty":"1","time":1,"isBuyerMaker":true}]', id="price-nan"),
        pytest.param(b'[{"id":1,"price":"0.000","qty":"1","time":1,"isBuyerMaker":true}]', id="price-zero"),
        pytest.param(b'[{"id":1,"price":"1","qty":"-1","time":1,"isBuyerMaker":true}]', id="qty-negative"),
        pytest.param(b'[{"id":1,"price":"1","qty":"1","time":0,"isBuyerMaker":true}]', id="time-zero"),
        pytest.param(b'[{"id":1,"price":"1","qty":"1","time":1,"isBuyerMaker":1}]', id="maker-int"),
        pytest.param(b'[{"id":9,"price":"1","qty":"1","time":1,"isBuyerMaker":true}]', id="id-before-from"),
    ],
)
async def test_a_malformed_body_raises_rest_error(
    exchange: tuple[FakeBinance, str], make_client: ClientFactory, body: bytes
) -> None:
    fake, _ = exchange
    client = make_client()
    fake.faults = [(200, {}, body)]
    with pytest.raises(RestError) as raised:
        await client.historical_trades("BTCUSDT", 10)
    assert not isinstance(raised.value, RestRequestError)
    assert raised.value.status == 200
    assert len(fake.requests) == 1


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b'[{"a":1,"p":"1","q":"1","f":5,"l":4,"T":1,"m":true}]', id="first-after-last"),
        pytest.param(b'[{"a":1,"p":"1","q":"1","f":5,"T":1,"m":true}]', id="missing-last"),
        pytest.param(b'{"serverTime":1}', id="object"),
    ],
)
async def test_a_malformed_agg_trades_body_raises_rest_error(
    exchange: tuple[FakeBinance, str], make_client: ClientFactory, body: bytes
) -> None:
    fake, _ = exchange
    client = make_client()
    fake.faults = [(200, {}, body)]
    with pytest.raises(RestError):
        await client.agg_trades("BTCUSDT", from_id=1)


async def test_a_session_passed_in_is_left_open(exchange: tuple[FakeBinance, str]) -> None:
    fake, url = exchange
    async with aiohttp.ClientSession() as session:
        client = BinanceRestClient(url, source="rest-session", session=session, clock=fake.clock)
        assert await client.server_time_ms() > 0
        await client.close()
        assert not session.closed
        assert await client.server_time_ms() > 0
