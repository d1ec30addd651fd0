"""The Finnhub message parser: every message class, every reject reason, good entries kept beside bad."""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import orjson
import pytest
from prometheus_client import REGISTRY

from alphaengine.clock import SimClock
from alphaengine.domain import SIDE_UNKNOWN, TICK_SCHEMA
from alphaengine.sources.binance import REJECT_REASONS
from alphaengine.sources.finnhub_parser import (
    BAD_NUMBER,
    BINARY_FRAME,
    FINNHUB_REJECT_REASONS,
    MALFORMED_JSON,
    MISSING_FIELD,
    NON_POSITIVE,
    OUT_OF_RANGE,
    OVERSIZED_FRAME,
    PROVIDER_ERROR,
    UNKNOWN_SYMBOL,
    WRONG_TYPE,
    FinnhubParser,
)

SYMBOLS = ("BINANCE:BTCUSDT", "BINANCE:ETHUSDT", "COINBASE:BTC-USD", "AAPL")
ENTRY = {"p": 7296.89, "s": "BINANCE:BTCUSDT", "t": 1575526691134, "v": 0.011467}


def entry(**changes: object) -> dict[str, object]:
    e = {**ENTRY, **changes}
    return {k: v for k, v in e.items() if v is not ...}


def trades(*entries: object) -> bytes:
    """A trade message; an infinite float is written as 1e400, the valid JSON that overflows to inf."""
    # The stdlib encoder: orjson refuses integers beyond 64 bits, which some tests need. It writes inf
    # as the non-JSON literal Infinity, hence the replacement.
    return json.dumps({"data": list(entries), "type": "trade"}).replace("Infinity", "1e400").encode()


def rejects(source: str, reason: str) -> float:
    return (
        REGISTRY.get_sample_value("alphaengine_source_rejects_total", {"source": source, "reason": reason})
        or 0.0
    )


def parser(source: str = "finnhub-test", **kwargs: Any) -> FinnhubParser:
    return FinnhubParser(source, SYMBOLS, **kwargs)


def test_a_trade_becomes_one_tick_with_every_column() -> None:
    p = parser()
    frames = p.parse([trades(ENTRY)], [1575526691200000000])
    assert frames.trades.data.schema.equals(TICK_SCHEMA)
    assert frames.trades.data.to_pylist() == [
        {
            "venue": "BINANCE",
            "symbol": "BTCUSDT",
            "trade_id": 0,
            "ts_ns": 1575526691134 * 1_000_000,
            "recv_ns": 1575526691200000000,
            "price": 7296.89,
            "qty": 0.011467,
            "side": SIDE_UNKNOWN,
        }
    ]
    assert (frames.pings, frames.price_updates, frames.errors) == (0, 0, [])
    assert p.stats.trades == 1
    assert p.stats.rejected_total == 0


def test_many_symbols_keep_message_then_entry_order() -> None:
    p = parser()
    messages: list[bytes | str] = [
        trades(
            entry(s="BINANCE:ETHUSDT", p=3400.5, v=1.25, t=10),
            entry(s="AAPL", p=189, v=100, t=11),  # integers are numbers too
            entry(t=12),
        ),
        trades(entry(s="COINBASE:BTC-USD", t=13)).decode(),  # str as well as bytes
        trades(entry(t=14), entry(t=14)),  # identical trades in one millisecond are both kept
    ]
    frames = p.parse(messages, np.array([100, 200, 300], dtype=np.int64))
    batch = frames.trades
    venues = ["BINANCE", "FINNHUB", "BINANCE", "COINBASE", "BINANCE", "BINANCE"]
    assert batch.data.column("venue").to_pylist() == venues
    assert batch.data.column("symbol").to_pylist() == [
        "ETHUSDT",
        "AAPL",
        "BTCUSDT",
        "BTC-USD",
        "BTCUSDT",
        "BTCUSDT",
    ]
    assert batch.np("ts_ns").tolist() == [t * 1_000_000 for t in (10, 11, 12, 13, 14, 14)]
    assert batch.np("recv_ns").tolist() == [100, 100, 100, 200, 300, 300]
    assert batch.np("price").tolist() == [3400.5, 189.0, 7296.89, 7296.89, 7296.89, 7296.89]
    assert batch.np("qty").tolist() == [1.25, 100.0, 0.011467, 0.011467, 0.011467, 0.011467]
    assert batch.np("trade_id").tolist() == [0] * 6
    assert batch.np("side").tolist() == [SIDE_UNKNOWN] * 6


def test_volume_zero_is_a_price_update_not_a_trade_nor_a_reject() -> None:
    p = parser()
    frames = p.parse([trades(entry(v=0), entry(t=5), entry(v=0.0, s="AAPL"))], [1])
    assert frames.price_updates == 2
    assert frames.trades.np("ts_ns").tolist() == [5_000_000]
    assert p.stats.price_updates == 2
    assert p.stats.rejected_total == 0


def test_pings_are_counted() -> None:
    p = parser()
    frames = p.parse([b'{"type":"ping"}', trades(ENTRY), '{"type":"ping"}'], [1, 2, 3])
    assert frames.pings == 2
    assert len(frames.trades) == 1
    assert p.stats.pings == 2
    assert p.stats.ignored == 0


def test_provider_errors_are_returned_counted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    source = "finnhub-errors"
    before = rejects(source, PROVIDER_ERROR)
    p = parser(source)
    messages = [
        b'{"type":"error","msg":"Invalid symbol"}',
        trades(ENTRY),
        b'{"type":"error","msg":"Subscribing to too many symbols"}',
        b'{"type":"error"}',
    ]
    with caplog.at_level(logging.WARNING, logger=f"alphaengine.{source}"):
        frames = p.parse(messages, [1, 2, 3, 4])
    assert frames.errors[:2] == ["Invalid symbol", "Subscribing to too many symbols"]
    assert "error" in frames.errors[2]  # no msg: the message itself stands for it
    assert len(frames.trades) == 1
    assert p.stats.rejected[PROVIDER_ERROR] == 3
    assert rejects(source, PROVIDER_ERROR) == before + 3
    assert "Invalid symbol" in caplog.records[0].getMessage()


@pytest.mark.parametrize(
    "message",
    [
        pytest.param(b'{"type":"news","data":[]}', id="other-type"),
        pytest.param(b'{"type":"subscribe","symbol":"BINANCE:BTCUSDT"}', id="subscribe-echo"),
        pytest.param(b'{"data":[{"p":1,"s":"AAPL","t":1,"v":1}]}', id="no-type"),
        pytest.param(b'{"type":"trade","data":[]}', id="empty-data"),
        pytest.param(b"{}", id="empty-object"),
    ],
)
def test_other_objects_are_ignored(message: bytes) -> None:
    source = "finnhub-ignored"
    before = {r: rejects(source, r) for r in FINNHUB_REJECT_REASONS}
    p = parser(source)
    frames = p.parse([message, trades(ENTRY)], [1, 2])
    assert len(frames.trades) == 1
    assert p.stats.ignored == 1
    assert p.stats.rejected_total == 0
    assert {r: rejects(source, r) for r in FINNHUB_REJECT_REASONS} == before


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (b"not json", MALFORMED_JSON),
        (b"", MALFORMED_JSON),
        (b'{"type":"trade","data":[{"p":1', MALFORMED_JSON),
        (b"[1, 2]", MALFORMED_JSON),
        (b'"ping"', MALFORMED_JSON),
        (b"null", MALFORMED_JSON),
        (b'{"type":"trade","data":[{"p":NaN,"s":"AAPL","t":1,"v":1}]}', MALFORMED_JSON),
        (b'{"type":"trade","data":[{"p":Infinity,"s":"AAPL","t":1,"v":1}]}', MALFORMED_JSON),
        (b"\xff\xfe{}", MALFORMED_JSON),
        (b'{"type":"trade"}', MISSING_FIELD),
        (b'{"type":"trade","data":{"p":1}}', WRONG_TYPE),
        (b'{"type":"trade","data":null}', WRONG_TYPE),
    ],
)
def test_bad_messages_are_rejected_and_the_others_kept(message: bytes, reason: str) -> None:
    source = "finnhub-bad-messages"
    before = rejects(source, reason)
    p = parser(source)
    frames = p.parse([trades(entry(t=1)), message, trades(entry(t=3))], [1, 2, 3])
    assert frames.trades.np("recv_ns").tolist() == [1, 3]
    assert p.stats.rejected == {r: int(r == reason) for r in FINNHUB_REJECT_REASONS}
    assert rejects(source, reason) == before + 1


BIG = 10**400


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        pytest.param([1, 2], WRONG_TYPE, id="entry-list"),
        pytest.param("BINANCE:BTCUSDT", WRONG_TYPE, id="entry-string"),
        pytest.param(None, WRONG_TYPE, id="entry-null"),
        pytest.param(7, WRONG_TYPE, id="entry-number"),
        pytest.param(entry(p=...), MISSING_FIELD, id="no-p"),
        pytest.param(entry(s=...), MISSING_FIELD, id="no-s"),
        pytest.param(entry(t=...), MISSING_FIELD, id="no-t"),
        pytest.param(entry(v=...), MISSING_FIELD, id="no-v"),
        pytest.param(entry(p="7296.89"), WRONG_TYPE, id="p-string"),
        pytest.param(entry(p=True), WRONG_TYPE, id="p-bool"),
        pytest.param(entry(v=None), WRONG_TYPE, id="v-null"),
        pytest.param(entry(v=False), WRONG_TYPE, id="v-bool"),
        pytest.param(entry(t=1575526691134.0), WRONG_TYPE, id="t-float"),
        pytest.param(entry(t="1575526691134"), WRONG_TYPE, id="t-string"),
        pytest.param(entry(t=True), WRONG_TYPE, id="t-bool"),
        pytest.param(entry(s=42), WRONG_TYPE, id="s-number"),
        pytest.param(entry(s={"x": 1}), WRONG_TYPE, id="s-object"),
        pytest.param(entry(p=float("inf")), BAD_NUMBER, id="p-1e400"),
        pytest.param(entry(v=-float("inf")), BAD_NUMBER, id="v-minus-1e400"),
        pytest.param(entry(p=BIG), BAD_NUMBER, id="p-huge-integer"),
        pytest.param(entry(p=0), NON_POSITIVE, id="p-zero"),
        pytest.param(entry(p=-1.5), NON_POSITIVE, id="p-negative"),
        pytest.param(entry(v=-0.5), NON_POSITIVE, id="v-negative"),
        pytest.param(entry(t=0), OUT_OF_RANGE, id="t-zero"),
        pytest.param(entry(t=-5), OUT_OF_RANGE, id="t-negative"),
        pytest.param(entry(t=10**13), OUT_OF_RANGE, id="t-beyond-int64-ns"),
        pytest.param(entry(t=2**63), OUT_OF_RANGE, id="t-beyond-int64"),
        pytest.param(entry(t=BIG), OUT_OF_RANGE, id="t-huge-integer"),
        pytest.param(entry(s="BINANCE:DOGEUSDT"), UNKNOWN_SYMBOL, id="unknown-symbol"),
        pytest.param(entry(s="BTCUSDT"), UNKNOWN_SYMBOL, id="symbol-without-venue"),
    ],
)
def test_a_bad_entry_is_rejected_alone(bad: object, reason: str) -> None:
    source = "finnhub-bad-entries"
    before = rejects(source, reason)
    p = parser(source)
    message = trades(entry(t=1), bad, entry(t=3, v=0), entry(t=4))
    frames = p.parse([message], [9])
    assert frames.trades.np("ts_ns").tolist() == [1_000_000, 4_000_000]
    assert frames.price_updates == 1
    assert p.stats.rejected == {r: int(r == reason) for r in FINNHUB_REJECT_REASONS}
    assert rejects(source, reason) == before + 1


def test_each_item_is_counted_once() -> None:
    p = parser()
    messages: list[bytes | str] = [
        trades(entry(), entry(v=0), entry(p=-1), [1]),  # 4 items: trade, update, reject, reject
        b'{"type":"ping"}',
        b'{"type":"error","msg":"x"}',
        b'{"type":"other"}',
        b"garbage",
        trades(),  # empty data: ignored, one item
    ]
    frames = p.parse(messages, list(range(len(messages))))
    s = p.stats
    assert (s.trades, s.price_updates, s.pings, s.ignored, s.rejected_total) == (1, 1, 1, 2, 4)
    assert s.trades + s.price_updates + s.pings + s.ignored + s.rejected_total == 9
    assert len(frames.trades) == s.trades


def test_a_batch_of_only_bad_input_is_an_empty_batch() -> None:
    p = parser()
    frames = p.parse([trades(entry(p="1"), entry(s=...)), b"{", trades(entry(t=-1))], [1, 2, 3])
    assert len(frames.trades) == 0
    assert frames.trades.data.schema.equals(TICK_SCHEMA)
    assert p.stats.rejected_total == 4
    assert len(p.parse([], []).trades) == 0
    assert len(FinnhubParser("finnhub-none", []).parse([trades(ENTRY)], [1]).trades) == 0


def test_reject_reasons_extend_the_binance_ones_with_the_framing_reasons() -> None:
    assert FINNHUB_REJECT_REASONS[: len(REJECT_REASONS)] == REJECT_REASONS
    assert set(FINNHUB_REJECT_REASONS) - set(REJECT_REASONS) == {
        UNKNOWN_SYMBOL,
        PROVIDER_ERROR,
        OVERSIZED_FRAME,
        BINARY_FRAME,
    }
    source = "finnhub-framing"
    before = rejects(source, BINARY_FRAME)
    p = parser(source)
    p.reject(BINARY_FRAME, "8 bytes")  # what the live source does with a frame it cannot parse
    assert p.stats.rejected[BINARY_FRAME] == 1
    assert rejects(source, BINARY_FRAME) == before + 1


def test_rejects_are_logged_first_then_at_most_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    clock = SimClock(start_ns=1_000_000_000)
    source = "finnhub-log"
    p = parser(source, clock=clock, log_interval_s=10.0)
    caplog.set_level(logging.WARNING, logger=f"alphaengine.{source}")
    unknown = trades(entry(s="X"), entry(s="Y"))
    p.parse([unknown, unknown], [1, 2])
    assert len(caplog.records) == 1
    assert "4 in this batch" in caplog.records[0].getMessage()
    clock.advance(10.0)
    p.parse([unknown], [3])
    assert len(caplog.records) == 2
    assert p.stats.rejected[UNKNOWN_SYMBOL] == 6


def test_messages_and_receive_times_must_pair_up() -> None:
    with pytest.raises(ValueError, match="zip"):
        parser().parse([orjson.dumps({"type": "ping"})], [1, 2])
