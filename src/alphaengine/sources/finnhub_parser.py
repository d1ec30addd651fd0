"""Parsing of Finnhub WebSocket messages into tick batches.

:class:`FinnhubParser` turns many raw text messages at once (bytes or str) and their local receive times
into :class:`FinnhubFrames`. Like :class:`~alphaengine.sources.binance.BinanceTradeParser`, the
per-message Python work is one ``orjson.loads`` and one look-up of the four fields kept per entry; types,
ranges and symbols are then checked column-wise with numpy.

Message classes (see PROTOCOLS.md):

* ``{"type":"trade","data":[{"p":..,"s":..,"t":..,"v":..}, ...]}``: each entry of ``data`` is one
  *item*. An entry with ``v > 0`` is a trade and becomes a tick: ``venue`` = the part of ``s`` before the
  first ``":"`` (``"BINANCE:BTCUSDT"`` gives ``BINANCE``; a symbol without ``":"`` gets ``FINNHUB``),
  ``symbol`` = the part after it, ``trade_id`` = 0 (Finnhub has no trade ids: the source assigns them),
  ``ts_ns`` = ``t`` ms x 1e6, the receive time of its message, ``price`` = ``p``, ``qty`` = ``v``,
  ``side`` = 0 (unknown). An entry with ``v == 0`` is a last-price update where the venue had no trade:
  counted in :attr:`FinnhubFrames.price_updates`, not a tick and not a reject. Ticks keep message order,
  then the order within ``data``;
* ``{"type":"ping"}``: counted in :attr:`FinnhubFrames.pings`;
* ``{"type":"error","msg":...}``: the provider's error; its ``msg`` goes to :attr:`FinnhubFrames.errors`,
  and it is also counted and logged as a reject with reason :data:`PROVIDER_ERROR`;
* any other JSON object (another ``type``, none, a trade message with an empty ``data`` list) is
  *ignored*: counted in :attr:`FinnhubParseStats.ignored`;
* everything else is *rejected* with one of :data:`FINNHUB_REJECT_REASONS`, counted in
  ``alphaengine_source_rejects_total{source, reason}`` and logged at most once per ``log_interval_s`` per
  reason. A bad entry is rejected alone: the good entries of its message are kept. The parser never
  raises on input.

Accounting: every message is one item, except a trade message whose ``data`` is a non-empty list, which
is as many items as it has entries. Each item lands in exactly one count, so over any calls
``trades + price_updates + pings + ignored + rejected_total`` of :class:`FinnhubParseStats` equals the
number of items given.

Numbers: ``p`` and ``v`` must be JSON numbers and ``t`` a JSON integer (``true`` is not a number). A
number beyond the float range (``1e400``) is valid JSON that orjson refuses; such a message is decoded
again by the standard library (without its non-standard ``NaN``/``Infinity`` literals, which stay
malformed), so the oversized value is rejected as :data:`BAD_NUMBER` in its own entry only.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import orjson
import pyarrow as pa

from alphaengine.clock import Clock, LiveClock
from alphaengine.domain import SIDE_UNKNOWN, TICK_SCHEMA, TickBatch
from alphaengine.sources.binance import (
    BAD_NUMBER,
    MALFORMED_JSON,
    MISSING_FIELD,
    NON_POSITIVE,
    OUT_OF_RANGE,
    REJECT_REASONS,
    WRONG_TYPE,
    RejectCounter,
    describe_value,
)
from alphaengine.sources.feed import BINARY_FRAME, OVERSIZED_FRAME, PROVIDER_ERROR, UNKNOWN_SYMBOL

DEFAULT_VENUE: Final = "FINNHUB"
"""The venue of a Finnhub symbol that names none (no ``"VENUE:"`` prefix, e.g. a stock)."""

FINNHUB_REJECT_REASONS: Final = (
    *REJECT_REASONS,
    UNKNOWN_SYMBOL,
    PROVIDER_ERROR,
    OVERSIZED_FRAME,
    BINARY_FRAME,
)
"""The fixed set of ``reason`` label values the Finnhub parser and source count rejects under.

The shared reasons mean here: ``malformed_json`` not JSON or not an object; ``missing_field`` a trade
message without ``data``, or an entry without one of ``p``, ``s``, ``t``, ``v``; ``wrong_type`` ``data``
not a list, an entry not an object, or a field of the wrong JSON type; ``bad_number`` a price or volume
that is not finite; ``non_positive`` a price that is zero or negative, or a negative volume;
``out_of_range`` a time that is not positive or does not fit int64 nanoseconds.
"""

_MAX_MS: Final = (2**63 - 1) // 1_000_000
_INT64_LIMIT: Final = 2**63
_EXCERPT_CHARS: Final = 200
_FIELDS = itemgetter("s", "t", "p", "v")
_NUMBER_TYPES: Final = frozenset({int, float})
_INVALID: Final = object()


@dataclass(slots=True)
class FinnhubParseStats:
    """Running counts of one parser, per item (see the module docstring for what an item is)."""

    trades: int = 0
    price_updates: int = 0
    pings: int = 0
    ignored: int = 0
    rejected: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FINNHUB_REJECT_REASONS, 0))

    @property
    def rejected_total(self) -> int:
        """Rejected items over every reason (provider errors included)."""
        return sum(self.rejected.values())


@dataclass(frozen=True, slots=True)
class FinnhubFrames:
    """What one :meth:`FinnhubParser.parse` call found."""

    trades: TickBatch
    """The trades (``v > 0``), in message order then entry order."""
    pings: int
    """Keep-alive messages."""
    price_updates: int
    """Entries with ``v == 0``: the last price where the venue had no trade."""
    errors: list[str]
    """The ``msg`` of each provider error message, in order."""


class FinnhubParser:
    """Parses Finnhub WebSocket messages in bulk; see the module docstring for the rules.

    ``symbols`` are the Finnhub symbols subscribed to (``"BINANCE:BTCUSDT"``); an entry for any other is
    rejected. ``source`` is the label rejects are counted under. Not thread-safe.
    """

    def __init__(
        self,
        source: str,
        symbols: Iterable[str],
        *,
        clock: Clock | None = None,
        log: logging.Logger | None = None,
        log_interval_s: float = 10.0,
    ) -> None:
        self.source = source
        self.stats = FinnhubParseStats()
        self.rejects = RejectCounter(
            source, log or logging.getLogger(f"alphaengine.{source}"), clock or LiveClock(), log_interval_s
        )
        self.symbols = tuple(dict.fromkeys(symbols))
        self._index = {s: i for i, s in enumerate(self.symbols)}
        venues = [s.partition(":")[0] if ":" in s else DEFAULT_VENUE for s in self.symbols]
        distinct_venues = list(dict.fromkeys(venues))
        self._venues = pa.array(distinct_venues, type=pa.string())
        self._venue_of = np.array([distinct_venues.index(v) for v in venues], dtype=np.int32)
        self._names = pa.array([s.partition(":")[2] or s for s in self.symbols], type=pa.string())

    def reject(self, reason: str, detail: str, count: int = 1) -> None:
        """Count and log rejected input (also used by the source for framing errors around messages)."""
        self.stats.rejected[reason] = self.stats.rejected.get(reason, 0) + count
        self.rejects.reject(reason, detail, count)

    def parse(
        self, messages: Sequence[bytes | str], recv_ns: Sequence[int] | npt.NDArray[np.int64]
    ) -> FinnhubFrames:
        """Everything in ``messages``, ``recv_ns[i]`` being the local receive time of ``messages[i]``.

        Bad input is rejected and counted, never raised.
        """
        loads = orjson.loads
        fields = _FIELDS
        syms: list[Any] = []
        times: list[Any] = []
        prices: list[Any] = []
        volumes: list[Any] = []
        recvs: list[int] = []
        pings = ignored = 0
        errors: list[str] = []
        received = recv_ns.tolist() if isinstance(recv_ns, np.ndarray) else recv_ns
        for raw, recv in zip(messages, received, strict=True):
            try:
                obj = loads(raw)
            except orjson.JSONDecodeError:
                obj = _loads_beyond_float(raw)
                if obj is _INVALID:
                    self.reject(MALFORMED_JSON, _excerpt(raw))
                    continue
            if type(obj) is not dict:
                self.reject(MALFORMED_JSON, _excerpt(raw))
                continue
            kind = obj.get("type")
            if kind == "trade":
                data = obj.get("data")
                if type(data) is not list:
                    self.reject(WRONG_TYPE if "data" in obj else MISSING_FIELD, _excerpt(raw))
                    continue
                if not data:
                    ignored += 1
                    continue
                for entry in data:
                    try:
                        s, t, p, v = fields(entry)
                    except (KeyError, TypeError) as exc:  # TypeError: not an object
                        self.reject(
                            MISSING_FIELD if isinstance(exc, KeyError) else WRONG_TYPE, describe_value(entry)
                        )
                        continue
                    syms.append(s)
                    times.append(t)
                    prices.append(p)
                    volumes.append(v)
                    recvs.append(recv)
            elif kind == "ping":
                pings += 1
            elif kind == "error":
                msg = obj.get("msg")
                errors.append(msg if isinstance(msg, str) else _excerpt(raw))
                self.reject(PROVIDER_ERROR, _excerpt(errors[-1]))
            else:
                ignored += 1
        self.stats.ignored += ignored
        self.stats.pings += pings
        trades, price_updates = self._columns([syms, times, prices, volumes], recvs)
        self.stats.trades += len(trades)
        self.stats.price_updates += price_updates
        return FinnhubFrames(trades=trades, pings=pings, price_updates=price_updates, errors=errors)

    def _columns(self, columns: list[list[Any]], recvs: list[int]) -> tuple[TickBatch, int]:
        """Check the entries column-wise: the trades as a batch, and the number of price updates."""
        if not recvs:
            return TickBatch.empty(), 0
        if not _types_ok(columns):
            wrong = _wrong_types(columns)
            self._reject_rows(WRONG_TYPE, wrong, columns)
            columns = [_compress(c, wrong) for c in columns]
            recvs = _compress(recvs, wrong)
            if not recvs:
                return TickBatch.empty(), 0
        syms, times, prices, volumes = columns
        trade_ms = _int64(times)
        price = _float64(prices)
        qty = _float64(volumes)
        index = self._index
        symbol = np.array([index.get(s, -1) for s in syms], dtype=np.int32)

        bad = (trade_ms <= 0) | (trade_ms > _MAX_MS)
        if bad.any():
            self._reject_rows(OUT_OF_RANGE, bad, columns)
        # Each row is rejected for the first check it fails, in this order (NaN and inf both fail
        # isfinite, and every comparison with NaN is False).
        for reason, fails in (
            (BAD_NUMBER, ~(np.isfinite(price) & np.isfinite(qty))),
            (NON_POSITIVE, (price <= 0.0) | (qty < 0.0)),
            (UNKNOWN_SYMBOL, symbol < 0),
        ):
            failed = fails & ~bad
            if failed.any():
                self._reject_rows(reason, failed, columns)
                bad |= failed
        update = (qty == 0.0) & ~bad
        trade = ~(bad | update)
        if not trade.all():
            trade_ms, price, qty, symbol = trade_ms[trade], price[trade], qty[trade], symbol[trade]
            recv = np.array(recvs, dtype=np.int64)[trade]
        else:
            recv = np.array(recvs, dtype=np.int64)
        return self._batch(symbol, trade_ms, recv, price, qty), int(update.sum())

    def _batch(
        self,
        symbol: npt.NDArray[np.int32],
        trade_ms: npt.NDArray[np.int64],
        recv_ns: npt.NDArray[np.int64],
        price: npt.NDArray[np.float64],
        qty: npt.NDArray[np.float64],
    ) -> TickBatch:
        n = len(symbol)
        # Dictionary arrays over the configured symbols fill the string columns in C, not per row.
        venue = pa.DictionaryArray.from_arrays(pa.array(self._venue_of[symbol]), self._venues)
        name = pa.DictionaryArray.from_arrays(pa.array(symbol), self._names)
        arrays = [
            venue.cast(pa.string()),
            name.cast(pa.string()),
            pa.array(np.zeros(n, dtype=np.int64)),
            pa.array(trade_ms * 1_000_000),
            pa.array(recv_ns),
            pa.array(price),
            pa.array(qty),
            pa.array(np.full(n, SIDE_UNKNOWN, dtype=np.int8)),
        ]
        return TickBatch(pa.RecordBatch.from_arrays(arrays, schema=TICK_SCHEMA))

    def _reject_rows(self, reason: str, mask: npt.NDArray[np.bool_], columns: list[list[Any]]) -> None:
        first = int(np.argmax(mask))
        s, t, p, v = (describe_value(c[first]) for c in columns)
        self.reject(reason, f"s={s} t={t} p={p} v={v}", int(mask.sum()))


def _types_ok(columns: list[list[Any]]) -> bool:
    """Whether every field has its JSON type; ``type(x)`` (not isinstance) so that a bool is no number."""
    syms, times, prices, volumes = columns
    return (
        set(map(type, syms)) == {str}
        and set(map(type, times)) == {int}
        and set(map(type, prices)) <= _NUMBER_TYPES
        and set(map(type, volumes)) <= _NUMBER_TYPES
    )


def _wrong_types(columns: list[list[Any]]) -> npt.NDArray[np.bool_]:
    """Rows where some field has the wrong type (the slow path, taken only when :func:`_types_ok` fails)."""
    syms, times, prices, volumes = columns
    return np.array(
        [
            type(s) is not str
            or type(t) is not int
            or type(p) not in _NUMBER_TYPES
            or type(v) not in _NUMBER_TYPES
            for s, t, p, v in zip(syms, times, prices, volumes, strict=True)
        ],
        dtype=bool,
    )


def _int64(values: list[int]) -> npt.NDArray[np.int64]:
    """JSON integers as int64; one beyond int64 becomes -1 so that the range check rejects its row."""
    try:
        return np.array(values, dtype=np.int64)
    except OverflowError:
        return np.array([v if -_INT64_LIMIT <= v < _INT64_LIMIT else -1 for v in values], dtype=np.int64)


def _float64(values: list[int | float]) -> npt.NDArray[np.float64]:
    """JSON numbers as float64; an integer beyond the float range becomes inf (then rejected)."""
    try:
        return np.array(values, dtype=np.float64)
    except OverflowError:
        return np.array([_to_float(v) for v in values], dtype=np.float64)


def _to_float(value: int | float) -> float:
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def _compress(values: list[Any], drop: npt.NDArray[np.bool_]) -> list[Any]:
    return [v for v, d in zip(values, drop.tolist(), strict=True) if not d]


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _loads_beyond_float(raw: bytes | str) -> Any:
    """Decode what orjson refused with the standard library, for numbers beyond the float range.

    Returns ``_INVALID`` for input that is not JSON to the standard library either (``NaN`` and
    ``Infinity`` literals included), or that it cannot decode within its recursion limit.
    """
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        return json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return _INVALID


def _excerpt(raw: bytes | str) -> str:
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    return repr(text[:_EXCERPT_CHARS] + ("..." if len(text) > _EXCERPT_CHARS else ""))
