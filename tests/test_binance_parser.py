"""The Binance trade parser: hand-written messages for every rule, and the real recordings."""

from __future__ import annotations

import gzip
import json
import logging
import random
from pathlib import Path

import numpy as np
import orjson
import pytest
from prometheus_client import REGISTRY

from alphaengine.clock import SimClock
from alphaengine.domain import SIDE_BUY, SIDE_SELL, TICK_SCHEMA
from alphaengine.sources.binance import (
    BAD_NUMBER,
    MALFORMED_JSON,
    MISSING_FIELD,
    NON_POSITIVE,
    OUT_OF_RANGE,
    REJECT_REASONS,
    WRONG_TYPE,
    BinanceTradeParser,
)
from tests.conftest import real_file

TRADE = {
    "e": "trade",
    "E": 1723161255343,
    "s": "BTCUSDT",
    "t": 3735683259,
    "p": "61837.63000000",
    "q": "0.02000000",
    "T": 1723161255342,
    "m": True,
    "M": True,
}


def trade(**changes: object) -> dict[str, object]:
    message = {**TRADE, **changes}
    return {k: v for k, v in message.items() if v is not ...}


def wrapped(payload: object, stream: str = "btcusdt@trade") -> bytes:
    return orjson.dumps({"stream": stream, "data": payload})


def rejects(source: str, reason: str) -> float:
    return (
        REGISTRY.get_sample_value("alphaengine_source_rejects_total", {"source": source, "reason": reason})
        or 0.0
    )


def test_a_trade_becomes_one_tick_with_every_column() -> None:
    parser = BinanceTradeParser("parser-fields")
    batch = parser.parse([wrapped(TRADE)], [1723161254087896568])
    assert batch.data.schema.equals(TICK_SCHEMA)
    assert batch.data.to_pylist() == [
        {
            "venue": "BINANCE",
            "symbol": "BTCUSDT",
            "trade_id": 3735683259,
            "ts_ns": 1723161255342 * 1_000_000,
            "recv_ns": 1723161254087896568,
            "price": 61837.63,
            "qty": 0.02,
            "side": SIDE_SELL,
        }
    ]
    assert parser.stats.trades == 1
    assert parser.stats.ignored == 0
    assert parser.stats.rejected_total == 0


def test_raw_payloads_str_and_bytes_wrappers_and_sides() -> None:
    parser = BinanceTradeParser("parser-forms")
    messages: list[bytes | str] = [
        orjson.dumps(trade(t=1, m=False)),  # raw stream payload, bytes
        orjson.dumps(trade(t=2, m=True)).decode(),  # raw stream payload, str
        wrapped(trade(t=3, m=False)).decode(),  # combined stream, str
        wrapped(trade(t=4, s="ETHUSDT", p="3400.5", q="1.25")),  # combined stream, bytes
    ]
    batch = parser.parse(messages, np.array([10, 20, 30, 40], dtype=np.int64))
    assert batch.np("trade_id").tolist() == [1, 2, 3, 4]
    assert batch.np("side").tolist() == [SIDE_BUY, SIDE_SELL, SIDE_BUY, SIDE_SELL]
    assert batch.np("recv_ns").tolist() == [10, 20, 30, 40]
    assert batch.data.column("symbol").to_pylist() == ["BTCUSDT", "BTCUSDT", "BTCUSDT", "ETHUSDT"]
    assert batch.np("price")[3] == 3400.5
    assert batch.np("qty")[3] == 1.25


def test_a_payload_on_a_trade_stream_is_a_trade_even_without_its_event_type() -> None:
    parser = BinanceTradeParser("parser-no-e")
    batch = parser.parse([wrapped(trade(e=...))], [1])
    assert len(batch) == 1


@pytest.mark.parametrize(
    "message",
    [
        pytest.param(
            wrapped(
                {"u": 1, "s": "BTCUSDT", "b": "1.0", "B": "2", "a": "1.1", "A": "3"}, "btcusdt@bookTicker"
            ),
            id="bookTicker",
        ),
        pytest.param(
            wrapped(
                {"e": "depthUpdate", "E": 1, "s": "BTCUSDT", "U": 1, "u": 2, "b": [["1.0", "0"]], "a": []},
                "btcusdt@depth@100ms",
            ),
            id="depth",
        ),
        pytest.param(b'{"lastUpdateId":50093239218,"bids":[["61837.63","3.78"]],"asks":[]}', id="snapshot"),
        pytest.param(b'{"result":null,"id":1}', id="subscribe-result"),
        pytest.param(b'{"code":3,"msg":"Invalid JSON"}', id="error-reply"),
        pytest.param(wrapped({"e": "serverShutdown", "E": 1}, "!serverShutdown"), id="serverShutdown"),
        pytest.param(
            orjson.dumps({"e": "aggTrade", "s": "BTCUSDT", "a": 1, "p": "1", "q": "1", "T": 1, "m": True}),
            id="aggTrade",
        ),
        pytest.param(b"{}", id="empty-object"),
    ],
)
def test_other_messages_are_ignored_not_rejected(message: bytes) -> None:
    source = "parser-ignored"
    before = {r: rejects(source, r) for r in REJECT_REASONS}
    parser = BinanceTradeParser(source)
    batch = parser.parse([message, wrapped(TRADE)], [1, 2])
    assert len(batch) == 1
    assert parser.stats.ignored == 1
    assert parser.stats.rejected_total == 0
    assert {r: rejects(source, r) for r in REJECT_REASONS} == before


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (b"not json", MALFORMED_JSON),
        (b'{"stream":"btcusdt@trade","data":{"e":"trade"', MALFORMED_JSON),
        (b"", MALFORMED_JSON),
        (b"[1, 2, 3]", MALFORMED_JSON),
        (b'"a string"', MALFORMED_JSON),
        (b"42", MALFORMED_JSON),
        (orjson.dumps(trade(p=...)), MISSING_FIELD),
        (orjson.dumps(trade(m=...)), MISSING_FIELD),
        (wrapped(trade(s=...)), MISSING_FIELD),
        (b'{"stream":"btcusdt@trade"}', MISSING_FIELD),
        (wrapped([1, 2]), WRONG_TYPE),
        (orjson.dumps(trade(p=61837.63)), WRONG_TYPE),
        (orjson.dumps(trade(q=None)), WRONG_TYPE),
        (orjson.dumps(trade(t="3735683259")), WRONG_TYPE),
        (orjson.dumps(trade(T=1723161255342.0)), WRONG_TYPE),
        (orjson.dumps(trade(m=1)), WRONG_TYPE),
        (orjson.dumps(trade(t=True)), WRONG_TYPE),
        (orjson.dumps(trade(s=7)), WRONG_TYPE),
        (orjson.dumps(trade(p="abc")), BAD_NUMBER),
        (orjson.dumps(trade(q="")), BAD_NUMBER),
        (orjson.dumps(trade(p="NaN")), BAD_NUMBER),
        (orjson.dumps(trade(q="inf")), BAD_NUMBER),
        (orjson.dumps(trade(p="1,5")), BAD_NUMBER),
        (orjson.dumps(trade(p="0.00000000")), NON_POSITIVE),
        (orjson.dumps(trade(q="-0.5")), NON_POSITIVE),
        (orjson.dumps(trade(t=-1)), OUT_OF_RANGE),
        (orjson.dumps(trade(T=0)), OUT_OF_RANGE),
        (orjson.dumps(trade(T=10**13)), OUT_OF_RANGE),
        (b'{"e":"trade","s":"X","t":9223372036854775808,"T":1,"p":"1","q":"1","m":true}', OUT_OF_RANGE),
    ],
)
def test_bad_trades_are_rejected_counted_and_the_rest_kept(message: bytes, reason: str) -> None:
    source = "parser-rejects"
    before = rejects(source, reason)
    parser = BinanceTradeParser(source)
    good = wrapped(trade(t=5))
    batch = parser.parse([good, message, good], [1, 2, 3])
    assert batch.np("trade_id").tolist() == [5, 5]
    assert batch.np("recv_ns").tolist() == [1, 3]
    assert parser.stats.rejected == {r: int(r == reason) for r in REJECT_REASONS}
    assert parser.stats.ignored == 0
    assert rejects(source, reason) == before + 1


def test_a_batch_of_only_bad_messages_is_empty() -> None:
    parser = BinanceTradeParser("parser-all-bad")
    batch = parser.parse([orjson.dumps(trade(m="yes")), orjson.dumps(trade(p="-1"))], [1, 2])
    assert len(batch) == 0
    assert batch.data.schema.equals(TICK_SCHEMA)
    assert parser.stats.rejected_total == 2
    assert len(parser.parse([], [])) == 0


def test_rejects_are_logged_first_then_at_most_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    clock = SimClock(start_ns=1_000_000_000)
    parser = BinanceTradeParser("parser-log", clock=clock, log_interval_s=10.0)
    bad = b"garbage"
    caplog.set_level(logging.WARNING)

    parser.parse([bad, bad, bad], [1, 2, 3])
    parser.parse([orjson.dumps(trade(p="abc"))], [4])
    assert len(caplog.records) == 2  # the first of each reason
    assert "malformed_json" in caplog.records[0].getMessage()
    assert "bad_number" in caplog.records[1].getMessage()

    clock.advance(9.0)
    parser.parse([bad], [5])
    assert len(caplog.records) == 2
    clock.advance(1.0)
    parser.parse([bad], [6])
    assert len(caplog.records) == 3
    assert "3 more since the last report" in caplog.records[2].getMessage()
    assert parser.stats.rejected[MALFORMED_JSON] == 5


def test_garbage_never_raises() -> None:
    rng = random.Random(11)
    real = wrapped(TRADE)
    messages: list[bytes | str] = []
    for _ in range(2_000):
        kind = rng.random()
        if kind < 0.3:
            messages.append(real[: rng.randrange(len(real))])
        elif kind < 0.6:
            noisy = bytearray(real)
            noisy[rng.randrange(len(noisy))] = rng.randrange(256)
            messages.append(bytes(noisy))
        elif kind < 0.8:
            messages.append(bytes(rng.randrange(256) for _ in range(rng.randrange(40))))
        else:
            payload = dict(TRADE)
            payload[rng.choice(list(payload))] = rng.choice([None, [], {}, 1.5, -3, "x", True, 2**70])
            # The stdlib encoder, because orjson refuses to write integers beyond 64 bits.
            messages.append(json.dumps({"stream": "btcusdt@trade", "data": payload}))
    parser = BinanceTradeParser("parser-fuzz")
    batch = parser.parse(messages, list(range(len(messages))))
    stats = parser.stats
    assert stats.trades == len(batch)
    assert stats.trades + stats.ignored + stats.rejected_total == len(messages)
    assert np.isfinite(batch.np("price")).all()
    assert (batch.np("qty") > 0).all()


# -- the real recordings ------------------------------------------------------------------------------


def parse_recording(parser: BinanceTradeParser, path: Path) -> tuple[np.ndarray, int]:
    with gzip.open(path, "rb") as f:
        lines = f.read().splitlines()
    parts = [line.partition(b" ") for line in lines]
    batch = parser.parse([p[2] for p in parts], [int(p[0]) for p in parts])
    return batch.np("trade_id"), len(lines)


@pytest.mark.parametrize(
    ("name", "trades", "symbol"),
    [
        ("btcusdt_20240808.gz", 9_757, "BTCUSDT"),
        ("btcusdt_20240809.gz", 10_147, "BTCUSDT"),
        ("ethusdt_20240808.gz", 6_106, "ETHUSDT"),
    ],
)
def test_real_recording_gives_every_trade_with_contiguous_ids(name: str, trades: int, symbol: str) -> None:
    path = real_file(f"binance-spot-ws/{name}")
    parser = BinanceTradeParser("parser-real")
    ids, lines = parse_recording(parser, path)
    assert len(ids) == trades
    assert (np.diff(ids) == 1).all()
    assert parser.stats.rejected_total == 0
    assert parser.stats.ignored == lines - trades


def test_real_recording_values_match_the_messages() -> None:
    path = real_file("binance-spot-ws/btcusdt_20240808.gz")
    with gzip.open(path, "rb") as f:
        lines = [line for line in f.read().splitlines() if b"@trade" in line]
    parts = [line.partition(b" ") for line in lines]
    batch = BinanceTradeParser("parser-real-values").parse([p[2] for p in parts], [int(p[0]) for p in parts])
    payloads = [orjson.loads(p[2])["data"] for p in parts]
    assert batch.data.column("symbol").unique().to_pylist() == ["BTCUSDT"]
    assert batch.np("ts_ns").tolist() == [d["T"] * 1_000_000 for d in payloads]
    assert batch.np("recv_ns").tolist() == [int(p[0]) for p in parts]
    assert batch.np("price").tolist() == [float(d["p"]) for d in payloads]
    assert batch.np("qty").tolist() == [float(d["q"]) for d in payloads]
    assert batch.np("side").tolist() == [SIDE_SELL if d["m"] else SIDE_BUY for d in payloads]


def test_the_two_btcusdt_recordings_join_without_a_gap() -> None:
    parser = BinanceTradeParser("parser-real-join")
    first, _ = parse_recording(parser, real_file("binance-spot-ws/btcusdt_20240808.gz"))
    second, _ = parse_recording(parser, real_file("binance-spot-ws/btcusdt_20240809.gz"))
    ids = np.concatenate([first, second])
    assert len(ids) == 19_904
    assert (np.diff(ids) == 1).all()
    assert (ids[0], ids[-1]) == (3_735_683_259, 3_735_703_162)
