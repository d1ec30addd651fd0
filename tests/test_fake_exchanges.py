"""The local fake exchanges (alphaengine.testing) against aiohttp's client: they must speak PROTOCOLS.md.

Most tests use a small hand-made tape (BTCUSDT and ETHUSDT, with multi-trade aggregates and ETH trades
between the trades of a BTC aggregate); one replays the real BTCUSDT recording at high speed.
"""

from __future__ import annotations

import asyncio
import gzip
import itertools
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from typing import Any, NamedTuple

import aiohttp
import numpy as np
import orjson
import pytest
from aiohttp import WSMsgType

from alphaengine.sources.binance import BinanceTradeParser
from alphaengine.testing import (
    DEPLOY,
    DROPPED,
    MAX_AGE,
    PONG_TIMEOUT,
    RATE_LIMIT,
    REPLACED,
    SERVER_SHUTDOWN,
    FakeBinance,
    FakeFinnhub,
    Tape,
)
from tests.conftest import real_file

T0 = 1_723_161_255_000
STEP_MS = 40


class Row(NamedTuple):
    symbol: str
    trade_id: int
    price: str
    qty: str
    time_ms: int
    maker: bool


def make_rows(steps: int = 12, start_ms: int = T0) -> list[Row]:
    """At each step one BTC aggregate of 1-3 trades (same time, price, side; an ETH trade in between on
    even steps), then one more BTC trade at the same time and price on the other side."""
    rows: list[Row] = []
    btc, eth = 1000, 500
    for step in range(steps):
        t = start_ms + step * STEP_MS
        price = f"{61000 + step % 4}.50000000"
        maker = step % 2 == 0
        for k in range(1 + step % 3):
            rows.append(Row("BTCUSDT", btc, price, f"0.0{k + 1}000000", t, maker))
            btc += 1
            if k == 0 and step % 2 == 0:
                rows.append(Row("ETHUSDT", eth, "2500.10000000", "0.50000000", t, True))
                eth += 1
        rows.append(Row("BTCUSDT", btc, price, "0.00500000", t, not maker))
        btc += 1
    return rows


ROWS = make_rows()
LAST_BTC = max(r.trade_id for r in ROWS if r.symbol == "BTCUSDT")


def tape_of(rows: list[Row]) -> Tape:
    return Tape.from_trades(rows)


def trade_payload(r: Row) -> dict[str, Any]:
    return {
        "e": "trade",
        "E": r.time_ms,
        "s": r.symbol,
        "t": r.trade_id,
        "p": r.price,
        "q": r.qty,
        "T": r.time_ms,
        "m": r.maker,
        "M": True,
    }


def expected_aggregates(rows: list[Row], symbol: str) -> list[tuple[str, str, int, int, int, bool]]:
    """(p, q, f, l, T, m) of each aggregate: consecutive trades of the symbol with equal T, p and m."""
    mine = [r for r in rows if r.symbol == symbol]
    out = []
    for (t, p, m), group in itertools.groupby(mine, key=lambda r: (r.time_ms, r.price, r.maker)):
        trades = list(group)
        qty = format(sum(Decimal(r.qty) for r in trades), "f")
        out.append((p, qty, trades[0].trade_id, trades[-1].trade_id, t, m))
    return out


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def eventually(check: Callable[[], bool], timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not check():
            await asyncio.sleep(0.01)


async def read_json(ws: aiohttp.ClientWebSocketResponse, n: int, timeout_s: float = 5.0) -> list[Any]:
    """The next n text frames, decoded."""
    out = []
    async with asyncio.timeout(timeout_s):
        while len(out) < n:
            msg = await ws.receive()
            assert msg.type is WSMsgType.TEXT, msg
            out.append(orjson.loads(msg.data))
    return out


async def read_until_closed(ws: aiohttp.ClientWebSocketResponse, timeout_s: float = 5.0) -> list[Any]:
    """Every text frame until the connection ends."""
    out = []
    async with asyncio.timeout(timeout_s):
        while (msg := await ws.receive()).type is WSMsgType.TEXT:
            out.append(orjson.loads(msg.data))
    assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.ERROR)
    return out


async def get(session: aiohttp.ClientSession, url: str, **params: object) -> tuple[int, Any, Any]:
    async with session.get(url, params={k: str(v) for k, v in params.items()}) as resp:
        return resp.status, await resp.json(), resp.headers


# -- the tape ----------------------------------------------------------------------------------


def test_tape_merges_recordings_by_trade_time() -> None:
    paths = [
        real_file("binance-spot-ws/ethusdt_20240808.gz"),
        real_file("binance-spot-ws/btcusdt_20240808.gz"),
    ]
    tape = Tape.from_recordings(paths)
    assert len(tape) == 9_757 + 6_106
    assert tape.symbols == ("BTCUSDT", "ETHUSDT")
    assert (np.diff(tape.time_ms) >= 0).all()
    btc = tape.history("BTCUSDT")
    assert (np.diff(btc.ids) == 1).all()  # the recording's ids are contiguous
    assert btc.ids[0] == 3735683259
    first = tape.trade(int(btc.rows[0]))
    assert first == ("BTCUSDT", 3735683259, "61837.63000000", "0.02000000", 1723161255342, True)


def test_tape_sorts_hand_made_trades_stably_and_validates() -> None:
    tape = Tape.from_trades([("BTCUSDT", 2, "1.5", "1", 20, False), ("BTCUSDT", 1, "1.0", "2", 10, True)])
    assert [tape.trade(g).trade_id for g in range(2)] == [1, 2]
    with pytest.raises(ValueError, match="strictly increase"):
        Tape.from_trades([("BTCUSDT", 2, "1", "1", 10, True), ("BTCUSDT", 1, "1", "1", 20, True)])
    with pytest.raises(ValueError, match="decimal"):
        Tape.from_trades([("BTCUSDT", 1, "1e3", "1", 10, True)])
    with pytest.raises(ValueError, match="upper case"):
        Tape.from_trades([("btcusdt", 1, "1", "1", 10, True)])


def test_tape_loop_shifts_each_pass_to_new_contiguous_data() -> None:
    tape = tape_of(ROWS).loop(3)
    n = len(ROWS)
    assert tape.total == 3 * n
    span = ROWS[-1].time_ms - ROWS[0].time_ms + 1000
    btc_span = LAST_BTC - 1000 + 1
    second = tape.trade(n)
    assert second.time_ms == ROWS[0].time_ms + span
    assert second.trade_id == ROWS[0].trade_id + btc_span
    btc = tape.history("BTCUSDT")
    ids = [btc.trade(j).trade_id for j in range(btc.visible(3 * n))]
    assert ids == list(range(1000, 1000 + 3 * btc_span))
    aggs = [btc.aggregate(q) for q in range(btc.complete_aggregates(len(ids)))]
    assert [a.agg_id for a in aggs] == list(range(aggs[0].agg_id, aggs[0].agg_id + len(aggs)))
    assert len(aggs) == 3 * 24
    assert [(a.first_id, a.last_id) for a in aggs[24:27]] == [
        (1000 + btc_span, 1000 + btc_span),
        (1001 + btc_span, 1001 + btc_span),
        (1002 + btc_span, 1003 + btc_span),
    ]
    assert aggs[24].time_ms == T0 + span
    assert tape_of(ROWS).loop(None).total is None


# -- Binance WebSocket -------------------------------------------------------------------------


async def test_combined_stream_delivers_the_tape_in_order(session: aiohttp.ClientSession) -> None:
    async with FakeBinance(tape_of(ROWS), speed=4.0) as fake:
        url = f"{fake.ws_url}/stream?streams=btcusdt@trade/ethusdt@trade"
        async with session.ws_connect(url) as ws:
            first = await ws.receive_str(timeout=5)
            frames = [orjson.loads(first), *await read_json(ws, len(ROWS) - 1)]
            await fake.wait_finished()
    r = ROWS[0]
    assert first == (
        f'{{"stream":"btcusdt@trade","data":{{"e":"trade","E":{r.time_ms},"s":"BTCUSDT","t":1000,'
        f'"p":"61000.50000000","q":"0.01000000","T":{r.time_ms},"m":true,"M":true}}}}'
    )
    assert frames == [{"stream": f"{r.symbol.lower()}@trade", "data": trade_payload(r)} for r in ROWS]
    assert fake.published == len(ROWS)
    assert fake.stats.frames_sent == len(ROWS)


async def test_raw_stream_sends_bare_payloads_of_its_stream_only(session: aiohttp.ClientSession) -> None:
    eth = [r for r in ROWS if r.symbol == "ETHUSDT"]
    async with (
        FakeBinance(tape_of(ROWS), speed=4.0) as fake,
        session.ws_connect(f"{fake.ws_url}/ws/ethusdt@trade") as ws,
    ):
        frames = await read_json(ws, len(eth))
        await fake.wait_finished()
        with pytest.raises(TimeoutError):
            await ws.receive(timeout=0.1)
    assert frames == [trade_payload(r) for r in eth]


async def test_live_requests_and_their_errors(session: aiohttp.ClientSession) -> None:
    async with (
        FakeBinance(tape_of(ROWS), speed=None, autostart=False, max_incoming_per_s=100) as fake,
        session.ws_connect(f"{fake.ws_url}/ws") as ws,
    ):
        await ws.send_str('{"method":"SUBSCRIBE","params":["btcusdt@trade","btcusdt@aggTrade"],"id":1}')
        await ws.send_str('{"method":"UNSUBSCRIBE","params":["btcusdt@aggTrade"],"id":2}')
        await ws.send_str('{"method":"LIST_SUBSCRIPTIONS","id":3}')
        await ws.send_str('{"method":"GET_PROPERTY","params":["combined"],"id":4}')
        await ws.send_str('{"method":"SUBSCRIBE",')
        await ws.send_str('{"method":"SUBSCRIBE","params":"btcusdt@trade","id":5}')
        await ws.send_str('{"method":"FOO","id":6}')
        await ws.send_str('{"method":"SET_PROPERTY","params":["combined","yes"],"id":7}')
        await ws.send_str('{"method":"GET_PROPERTY","params":["other"],"id":8}')
        answers = await read_json(ws, 9)
    assert answers[:4] == [
        {"result": None, "id": 1},
        {"result": None, "id": 2},
        {"result": ["btcusdt@trade"], "id": 3},
        {"result": False, "id": 4},
    ]
    assert answers[4]["code"] == 3
    assert answers[4]["msg"].startswith("Invalid JSON: ")
    assert "id" not in answers[4]
    assert [(a["code"], a["id"]) for a in answers[5:]] == [(2, 5), (2, 6), (1, 7), (0, 8)]
    assert answers[6]["msg"].startswith("Invalid request: unknown variant `FOO`")
    assert fake.market_started is False  # autostart=False: only start_market() starts it


async def test_agg_trades_agree_between_stream_and_rest(session: aiohttp.ClientSession) -> None:
    expected = expected_aggregates(ROWS, "BTCUSDT")
    assert len(expected) == 24
    assert expected[2] == ("61001.50000000", "0.03000000", 1002, 1003, T0 + STEP_MS, False)
    assert expected[4] == ("61002.50000000", "0.06000000", 1005, 1007, T0 + 2 * STEP_MS, True)
    async with FakeBinance(tape_of(ROWS), speed=None) as fake:
        async with session.ws_connect(f"{fake.ws_url}/stream?streams=btcusdt@aggTrade") as ws:
            frames = await read_json(ws, len(expected))
        status, rest, _ = await get(session, f"{fake.rest_url}/api/v3/aggTrades", symbol="BTCUSDT")
    assert status == 200
    assert {f["stream"] for f in frames} == {"btcusdt@aggTrade"}
    events = [f["data"] for f in frames]
    assert [list(e) for e in events[:1]] == [["e", "E", "s", "a", "p", "q", "f", "l", "T", "m", "M"]]
    assert [(e["p"], e["q"], e["f"], e["l"], e["T"], e["m"]) for e in events] == expected
    assert [e["a"] for e in events] == list(range(events[0]["a"], events[0]["a"] + len(expected)))
    assert rest == [{k: e[k] for k in ("a", "p", "q", "f", "l", "T", "m", "M")} for e in events]


async def test_a_drop_loses_exactly_the_trades_published_while_disconnected(
    session: aiohttp.ClientSession,
) -> None:
    url_path = "/stream?streams=btcusdt@trade/ethusdt@trade"
    async with FakeBinance(tape_of(ROWS), speed=2.0) as fake:
        fake.drop_at([8])  # trades 8..10 share the time of trade 7: published before any reconnect
        async with session.ws_connect(fake.ws_url + url_path) as ws:
            before = await read_until_closed(ws)
            assert ws.close_code != 1000  # no close frame: an aborted connection
        last = trade_payload(ROWS[-1])
        async with session.ws_connect(fake.ws_url + url_path) as ws:
            after = await read_json(ws, 1)
            while after[-1]["data"] != last:
                after += await read_json(ws, 1)
        [(first, stop)] = fake.windows_published
        [(from_ms, to_ms)] = fake.windows
        missed_btc = [r.trade_id for r in ROWS[first:stop] if r.symbol == "BTCUSDT"]
        status, rest, _ = await get(
            session,
            f"{fake.rest_url}/api/v3/historicalTrades",
            symbol="BTCUSDT",
            fromId=missed_btc[0],
            limit=len(missed_btc),
        )
    assert [f["data"] for f in before] == [trade_payload(r) for r in ROWS[:8]]
    assert first == 8
    assert stop > first
    assert [f["data"] for f in after] == [trade_payload(r) for r in ROWS[stop:]]
    assert from_ms <= to_ms
    assert status == 200
    assert [t["id"] for t in rest] == missed_btc
    assert fake.stats.connections_closed[DROPPED] == 1
    assert fake.stats.drops == 1


async def test_server_shutdown_event_in_both_forms_then_close(session: aiohttp.ClientSession) -> None:
    async with FakeBinance(tape_of(ROWS), speed=None, autostart=False) as fake:
        combined = await session.ws_connect(f"{fake.ws_url}/stream?streams=btcusdt@trade")
        raw = await session.ws_connect(f"{fake.ws_url}/ws/btcusdt@trade")
        await eventually(lambda: fake.connections == 2)
        assert await fake.send_server_shutdown(close_after_s=0.05) == 2
        [wrapped] = await read_json(combined, 1)
        [bare] = await read_json(raw, 1)
        assert (await combined.receive(timeout=5)).type is WSMsgType.CLOSE
        assert (await raw.receive(timeout=5)).type is WSMsgType.CLOSE
        await combined.close()
        await raw.close()
        await eventually(lambda: fake.stats.connections_closed[SERVER_SHUTDOWN] == 2)
    assert wrapped == {"stream": "!serverShutdown", "data": {"e": "serverShutdown", "E": T0}}
    assert bare == {"e": "serverShutdown", "E": T0}
    assert combined.close_code == raw.close_code == 1001


async def test_a_client_that_does_not_echo_pings_is_disconnected(session: aiohttp.ClientSession) -> None:
    async with FakeBinance(tape_of(ROWS), ping_interval_s=0.25, pong_timeout_s=0.6) as fake:
        silent = await session.ws_connect(f"{fake.ws_url}/ws", autoping=False)
        polite = await session.ws_connect(f"{fake.ws_url}/ws")
        # aiohttp's client answers pings (same payload) while something waits in receive().
        polite_reader = asyncio.ensure_future(polite.receive())
        late = await session.ws_connect(f"{fake.ws_url}/ws", autoping=False)

        async def answer_one_ping_late() -> None:
            previous = None
            while (msg := await late.receive()).type is WSMsgType.PING:
                if previous is not None:
                    await late.pong(previous)  # each ping answered only when the next one comes
                previous = msg.data

        late_reader = asyncio.ensure_future(answer_one_ping_late())
        pings = []
        async with asyncio.timeout(5):
            while (msg := await silent.receive()).type is WSMsgType.PING:
                pings.append(msg.data)
                await silent.pong(b"not the payload")  # an unsolicited pong is no answer
        assert msg.type is WSMsgType.CLOSE
        assert silent.close_code == 1008
        assert len(pings) >= 2
        assert len(set(pings)) == len(pings)  # every ping carries its own payload
        assert all(pings)
        await silent.close()
        await eventually(lambda: fake.stats.connections_closed[PONG_TIMEOUT] == 1)
        assert not polite.closed
        assert not late.closed
        assert not polite_reader.done()
        assert not late_reader.done()
        assert fake.stats.pongs_received >= 2 * len(pings)
        polite_reader.cancel()
        late_reader.cancel()
        await polite.close()
        await late.close()


async def test_more_than_five_messages_a_second_disconnects(session: aiohttp.ClientSession) -> None:
    async with FakeBinance(tape_of(ROWS), autostart=False) as fake:
        async with session.ws_connect(f"{fake.ws_url}/ws") as ws:
            for i in range(6):
                await ws.send_str(f'{{"method":"LIST_SUBSCRIPTIONS","id":{i}}}')
            answers = await read_until_closed(ws)
            assert ws.close_code == 1008
        await eventually(lambda: fake.stats.connections_closed[RATE_LIMIT] == 1)
    assert answers == [{"result": [], "id": i} for i in range(5)]
    assert fake.stats.rate_violations == 1


async def test_connection_rules_streams_and_age(session: aiohttp.ClientSession) -> None:
    async with FakeBinance(tape_of(ROWS), autostart=False, max_streams=2, max_connection_age_s=0.3) as fake:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(f"{fake.ws_url}/stream?streams=a@trade/b@trade/c@trade")
        assert refused.value.status == 400
        async with session.ws_connect(f"{fake.ws_url}/stream?streams=a@trade") as ws:
            await ws.send_str('{"method":"SUBSCRIBE","params":["b@trade","c@trade"],"id":9}')
            await ws.send_str('{"method":"LIST_SUBSCRIPTIONS","id":10}')
            answers = await read_until_closed(ws)  # cut at the age limit
            assert ws.close_code == 1000
        await eventually(lambda: fake.stats.connections_closed[MAX_AGE] == 1)
    assert answers[0]["code"] == 2
    assert answers[0]["id"] == 9
    assert answers[1] == {"result": ["a@trade"], "id": 10}


async def test_scripted_rejections_drops_and_injected_frames(session: aiohttp.ClientSession) -> None:
    async with FakeBinance(tape_of(ROWS), autostart=False) as fake:
        fake.reject_connections(503, 2)
        for _ in range(2):
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(f"{fake.ws_url}/ws")
            assert refused.value.status == 503
        async with session.ws_connect(f"{fake.ws_url}/ws") as ws:
            assert await fake.inject("not json at all") == 1
            assert await fake.inject(b"\x00\x01") == 1
            text = await ws.receive(timeout=5)
            binary = await ws.receive(timeout=5)
            fake.drop_every(0.05)
            end = await ws.receive(timeout=5)
        fake.stop_drops()
        fake.drop_randomly(50.0, seed=3)
        async with session.ws_connect(f"{fake.ws_url}/ws") as ws:
            end_random = await ws.receive(timeout=5)
        fake.stop_drops()
        await eventually(lambda: fake.stats.connections_closed[DROPPED] == 2)
    assert (text.type, text.data) == (WSMsgType.TEXT, "not json at all")
    assert (binary.type, binary.data) == (WSMsgType.BINARY, b"\x00\x01")
    assert end.type in (WSMsgType.CLOSED, WSMsgType.ERROR)  # aborted: no close frame
    assert end_random.type in (WSMsgType.CLOSED, WSMsgType.ERROR)
    assert fake.stats.upgrades_rejected[503] == 2


async def test_silence_sends_nothing_but_keeps_the_connection(session: aiohttp.ClientSession) -> None:
    async with FakeBinance(tape_of(ROWS), speed=8.0, autostart=False, ping_interval_s=0.05) as fake:
        fake.silence(10.0)
        async with session.ws_connect(f"{fake.ws_url}/ws/btcusdt@trade", autoping=False) as ws:
            fake.start_market()
            await fake.wait_finished()
            with pytest.raises(TimeoutError):
                await ws.receive(timeout=0.2)
            await ws.send_str('{"method":"LIST_SUBSCRIPTIONS","id":1}')
            [answer] = await read_json(ws, 1)
    assert answer == {"result": ["btcusdt@trade"], "id": 1}
    assert fake.stats.pings_sent == 0
    assert fake.published == len(ROWS)


# -- Binance REST ------------------------------------------------------------------------------


async def test_rest_pages_contiguously_and_shows_only_published_trades(
    session: aiohttp.ClientSession,
) -> None:
    late = [
        Row("BTCUSDT", LAST_BTC + 1 + i, "61000.50000000", "0.01000000", T0 + 3_600_000, False)
        for i in range(5)
    ]
    async with FakeBinance(tape_of(ROWS + late), speed=50.0, autostart=False) as fake:
        _, before, _ = await get(session, f"{fake.rest_url}/api/v3/historicalTrades", symbol="BTCUSDT")
        fake.start_market()
        await eventually(lambda: fake.published == len(ROWS))
        pages, from_id = [], 1000
        while page := (
            await get(
                session, f"{fake.rest_url}/api/v3/historicalTrades", symbol="BTCUSDT", fromId=from_id, limit=7
            )
        )[1]:
            pages.append(page)
            from_id = page[-1]["id"] + 1
        _, recent, _ = await get(
            session, f"{fake.rest_url}/api/v3/historicalTrades", symbol="BTCUSDT", limit=3
        )
        _, window, _ = await get(
            session,
            f"{fake.rest_url}/api/v3/aggTrades",
            symbol="BTCUSDT",
            startTime=T0 + STEP_MS,
            endTime=T0 + 2 * STEP_MS,
        )
        _, agg_page, _ = await get(
            session, f"{fake.rest_url}/api/v3/aggTrades", symbol="BTCUSDT", fromId=window[0]["a"], limit=2
        )
        _, server_time, _ = await get(session, f"{fake.rest_url}/api/v3/time")
    btc = [r for r in ROWS if r.symbol == "BTCUSDT"]
    assert before == []
    assert [len(p) for p in pages] == [7, 7, 7, 7, 7, 1]
    trades = [t for p in pages for t in p]
    assert [t["id"] for t in trades] == [r.trade_id for r in btc]  # contiguous, the late ones unpublished
    assert trades[5] == {
        "id": 1005,
        "price": "61002.50000000",
        "qty": "0.01000000",
        "quoteQty": "610.02500000",
        "time": T0 + 2 * STEP_MS,
        "isBuyerMaker": True,
        "isBestMatch": True,
    }
    assert [t["id"] for t in recent] == [r.trade_id for r in btc[-3:]]
    assert [(a["f"], a["l"]) for a in window] == [(1002, 1003), (1004, 1004), (1005, 1007), (1008, 1008)]
    assert agg_page == window[:2]
    assert T0 <= server_time["serverTime"] < T0 + 3_600_000


async def test_rest_parameter_errors(session: aiohttp.ClientSession) -> None:
    async with FakeBinance(tape_of(ROWS)) as fake:
        url = f"{fake.rest_url}/api/v3/aggTrades"
        cases = [
            ({"symbol": "DOGEUSDT"}, -1121),
            ({}, -1102),
            ({"symbol": "BTCUSDT", "fromId": "-1"}, -1100),
            ({"symbol": "BTCUSDT", "limit": "1001"}, -1130),
            ({"symbol": "BTCUSDT", "startTime": T0, "endTime": T0 + 3_600_001}, -1127),
            ({"symbol": "BTCUSDT", "fromId": 1, "startTime": T0}, -1128),
            ({"symbol": "BTCUSDT", "foo": 1}, -1104),
        ]
        for params, code in cases:
            status, body, headers = await get(session, url, **params)
            assert (status, body["code"]) == (400, code), params
            assert isinstance(body["msg"], str)
            assert "X-MBX-USED-WEIGHT-1M" in headers
        status, body, _ = await get(session, f"{fake.rest_url}/api/v3/historicalTrades", symbol="XYZ")
    assert (status, body) == (400, {"code": -1121, "msg": "Invalid symbol."})


async def test_weights_then_429_then_418_ban(session: aiohttp.ClientSession) -> None:
    async with FakeBinance(tape_of(ROWS), weight_limit=60) as fake:
        trades_url = f"{fake.rest_url}/api/v3/historicalTrades"
        answers = [await get(session, f"{fake.rest_url}/api/v3/time")]
        answers += [await get(session, trades_url, symbol="BTCUSDT") for _ in range(4)]
        statuses = [a[0] for a in answers]
        used = [a[2]["X-MBX-USED-WEIGHT-1M"] for a in answers]
        assert statuses == [200, 200, 200, 429, 418]
        assert used == ["1", "26", "51", "51", "51"]
        retry_429 = int(answers[3][2]["Retry-After"])
        retry_418 = int(answers[4][2]["Retry-After"])
        assert 1 <= retry_429 <= 60
        assert retry_418 > retry_429
        assert answers[3][1]["code"] == answers[4][1]["code"] == -1003
        assert fake.stats.requests[("/api/v3/historicalTrades", 429)] == 1
        assert fake.stats.bans == 1


async def test_scripted_rest_failures(session: aiohttp.ClientSession) -> None:
    async with FakeBinance(tape_of(ROWS)) as fake:
        url = f"{fake.rest_url}/api/v3/time"
        fake.fail_rest(1, status=503)
        failed = await get(session, url)
        fake.throttle(1, retry_after_s=0.2)
        throttled = await get(session, url)
        await asyncio.sleep(0.25)  # a client that honours Retry-After is served again
        after_wait = await get(session, url)
        fake.ban(0.2)
        banned = await get(session, url)
    assert failed[0] == 503
    assert (throttled[0], throttled[2]["Retry-After"]) == (429, "1")
    assert after_wait[0] == 200
    assert banned[0] == 418
    assert fake.stats.requests[("/api/v3/time", 200)] == 1


# -- the real recording ------------------------------------------------------------------------


async def test_real_recording_replays_exactly_at_high_speed(session: aiohttp.ClientSession) -> None:
    path = real_file("binance-spot-ws/btcusdt_20240808.gz")
    recorded = []
    with gzip.open(path, "rb") as lines:
        for line in lines:
            if b"@trade" in line:
                recorded.append(orjson.loads(line.partition(b" ")[2])["data"])
    async with (
        FakeBinance(Tape.from_recordings([path]), speed=2000.0) as fake,
        session.ws_connect(f"{fake.ws_url}/stream?streams=btcusdt@trade") as ws,
    ):
        frames = []
        async with asyncio.timeout(10):
            while len(frames) < len(recorded):
                frames.append((await ws.receive()).data)
    batch = BinanceTradeParser("fake-replay").parse(frames, [0] * len(frames))
    assert len(batch) == len(recorded) == 9_757
    assert (np.diff(batch.np("trade_id")) == 1).all()
    fields = ("s", "t", "p", "q", "T", "m")
    sent = [orjson.loads(f)["data"] for f in frames]
    assert [tuple(d[k] for k in fields) for d in sent] == [tuple(d[k] for k in fields) for d in recorded]


# -- Finnhub -----------------------------------------------------------------------------------


async def test_finnhub_refuses_a_wrong_token(session: aiohttp.ClientSession) -> None:
    async with FakeFinnhub(tape_of(ROWS), token="secret") as fake:
        for url in (fake.ws_url, f"{fake.ws_url}?token=wrong"):
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(url)
            assert refused.value.status == 401
        async with session.ws_connect(f"{fake.ws_url}?token=secret"):
            pass
    assert fake.stats.upgrades_rejected[401] == 2


async def test_finnhub_trade_messages(session: aiohttp.ClientSession) -> None:
    btc = [r for r in ROWS if r.symbol == "BTCUSDT"]
    async with (
        FakeFinnhub(tape_of(ROWS), speed=4.0, max_trades_per_message=3) as fake,
        session.ws_connect(f"{fake.ws_url}?token=secret") as ws,
    ):
        await ws.send_str('{"type":"subscribe","symbol":"BINANCE:BTCUSDT"}')
        messages = []
        async with asyncio.timeout(5):
            while sum(len(m["data"]) for m in messages) < len(btc):
                messages.append(orjson.loads(await ws.receive_str()))
    assert all(list(m) == ["data", "type"] and m["type"] == "trade" for m in messages)
    items = [item for m in messages for item in m["data"]]
    assert all(list(item) == ["p", "s", "t", "v"] for item in items)
    assert items == [
        {"p": float(r.price), "s": "BINANCE:BTCUSDT", "t": r.time_ms, "v": float(r.qty)} for r in btc
    ]
    assert all(isinstance(item["p"], float) and isinstance(item["v"], float) for item in items)
    assert max(len(m["data"]) for m in messages) == 3  # the 4 trades of one millisecond: 3 + 1


async def test_finnhub_subscription_errors(session: aiohttp.ClientSession) -> None:
    async with (
        FakeFinnhub(tape_of(ROWS), autostart=False, max_symbols=1, extra_symbols=["AAPL"]) as fake,
        session.ws_connect(f"{fake.ws_url}?token=secret") as ws,
    ):
        await ws.send_str('{"type":"subscribe","symbol":"AAPL"}')
        await ws.send_str('{"type":"subscribe","symbol":"BINANCE:DOGEUSDT"}')
        await ws.send_str('{"type":"subscribe","symbol":"BINANCE:BTCUSDT"}')
        await ws.send_str('{"type":"unsubscribe","symbol":"AAPL"}')
        await ws.send_str('{"type":"subscribe","symbol":"BINANCE:BTCUSDT"}')
        await ws.send_str("hello")
        await ws.send_str('{"type":"subscribe","symbol":"BINANCE:ETHUSDT"}')
        errors = await read_json(ws, 4)
    assert errors == [
        {"type": "error", "msg": "Invalid symbol"},
        {"type": "error", "msg": "Subscribing to too many symbols"},
        {"type": "error", "msg": "Invalid message"},
        {"type": "error", "msg": "Subscribing to too many symbols"},
    ]
    assert fake.stats.errors_sent == 4


async def test_finnhub_pings_injected_updates_errors_and_silence(session: aiohttp.ClientSession) -> None:
    async with (
        FakeFinnhub(tape_of(ROWS), autostart=False, ping_interval_s=0.05) as fake,
        session.ws_connect(f"{fake.ws_url}?token=secret") as ws,
    ):
        [ping] = await read_json(ws, 1)  # not subscribed: pinged all the same
        await ws.send_str('{"type":"subscribe","symbol":"BINANCE:BTCUSDT"}')
        await eventually(lambda: fake.subscribed)
        assert await fake.inject_price_update("BINANCE:BTCUSDT", "61234.5") == 1
        assert await fake.send_error("Something happened") == 1
        seen = []
        async with asyncio.timeout(5):
            while len(seen) < 2:
                if (message := orjson.loads(await ws.receive_str())) != ping:
                    seen.append(message)
        fake.silence(10.0)
        pings = fake.stats.pings_sent
        await asyncio.sleep(0.2)
        assert fake.stats.pings_sent == pings
    assert ping == {"type": "ping"}
    assert seen == [
        {"data": [{"p": 61234.5, "s": "BINANCE:BTCUSDT", "t": T0, "v": 0}], "type": "trade"},
        {"type": "error", "msg": "Something happened"},
    ]


async def test_finnhub_price_updates_on_quiet_symbols(session: aiohttp.ClientSession) -> None:
    btc = [r for r in ROWS if r.symbol == "BTCUSDT"]
    async with (
        FakeFinnhub(tape_of(ROWS), speed=None, quiet_update_s=0.1) as fake,
        session.ws_connect(f"{fake.ws_url}?token=secret") as ws,
    ):
        await ws.send_str('{"type":"subscribe","symbol":"BINANCE:BTCUSDT"}')
        items: list[dict[str, Any]] = []
        async with asyncio.timeout(5):
            while not items or items[-1]["v"] != 0:
                items += orjson.loads(await ws.receive_str())["data"]
    assert [i["t"] for i in items[:-1]] == [r.time_ms for r in btc]
    assert items[-1]["p"] == float(btc[-1].price)
    assert items[-1]["s"] == "BINANCE:BTCUSDT"
    assert fake.stats.price_updates_sent >= 1


async def test_finnhub_windows_are_the_trades_missed_while_disconnected(
    session: aiohttp.ClientSession,
) -> None:
    btc = [r for r in ROWS if r.symbol == "BTCUSDT"]
    last = (btc[-1].time_ms, float(btc[-1].qty))
    subscribe = '{"type":"subscribe","symbol":"BINANCE:BTCUSDT"}'
    async with FakeFinnhub(tape_of(ROWS), speed=2.0) as fake:
        fake.drop_at([8])
        async with session.ws_connect(f"{fake.ws_url}?token=secret") as ws:
            await ws.send_str(subscribe)
            before = [d for m in await read_until_closed(ws) for d in m["data"]]
        async with session.ws_connect(f"{fake.ws_url}?token=secret") as ws:
            await ws.send_str(subscribe)
            after: list[dict[str, Any]] = []
            async with asyncio.timeout(5):
                while not after or (after[-1]["t"], after[-1]["v"]) != last:
                    after += orjson.loads(await ws.receive_str())["data"]
    [(first, stop)] = fake.windows_published
    [(from_ms, to_ms)] = fake.windows
    missed = [r for r in ROWS[first:stop] if r.symbol == "BTCUSDT"]
    assert first == 8
    assert missed
    assert [(d["t"], d["v"]) for d in before + after] == [
        (r.time_ms, float(r.qty)) for r in btc if r not in missed
    ]
    assert from_ms <= to_ms
    assert all(r.time_ms <= to_ms for r in missed)


async def test_finnhub_one_connection_per_token_and_deploy(session: aiohttp.ClientSession) -> None:
    async with FakeFinnhub(tape_of(ROWS), autostart=False) as fake:
        older = await session.ws_connect(f"{fake.ws_url}?token=secret")
        newer = await session.ws_connect(f"{fake.ws_url}?token=secret")
        assert (await older.receive(timeout=5)).type is WSMsgType.CLOSE
        assert older.close_code == 1008
        await older.close()
        assert await fake.deploy() == 1
        assert (await newer.receive(timeout=5)).type is WSMsgType.CLOSE
        assert newer.close_code == 1001
        await newer.close()
        await eventually(lambda: fake.stats.connections_closed[DEPLOY] == 1)
    assert fake.stats.connections_closed[REPLACED] == 1
