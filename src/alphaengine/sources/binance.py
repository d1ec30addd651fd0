"""Parsing of Binance spot trade messages into tick batches.

:class:`BinanceTradeParser` turns many raw messages at once (each a ``<symbol>@trade`` payload or a
combined-stream wrapper ``{"stream": ..., "data": ...}``, as bytes or str) and their local receive times
into one :class:`~alphaengine.domain.TickBatch`. It is shared by the replay of recordings and the live
WebSocket source.

The per-message Python work is only what cannot be avoided: one ``orjson.loads`` and one look-up of the
six fields we keep, appended to plain column lists. Types, ranges and the decimal strings of price and
quantity are then checked and converted column-wise (polars converts the strings; a value that is not a
decimal comes back null instead of raising), so the cost of validation does not grow with the number of
checks per message.

Message classes:

* a trade (``"e": "trade"``, or any payload on a ``...@trade`` stream) becomes a tick: venue
  ``BINANCE``, ``symbol`` = ``s``, ``trade_id`` = ``t``, ``ts_ns`` = ``T`` ms x 1e6, the receive time
  given, ``price``/``qty`` from the decimal strings ``p``/``q``, ``side`` = -1 if ``m`` (the buyer was
  the maker, so the taker sold) else +1. A parser made with ``event="aggTrade"`` takes aggregate trades
  (``"e": "aggTrade"``, ``...@aggTrade`` streams) instead, the aggregate id ``a`` as ``trade_id``;
* any other well-formed JSON object (bookTicker, depth diffs, the REST depth snapshot, subscribe results,
  ``serverShutdown``) is *ignored*: counted in :attr:`ParseStats.ignored`, not an error;
* everything else is *rejected* with one of :data:`REJECT_REASONS`, counted in
  ``alphaengine_source_rejects_total{source, reason}`` and logged, at most once per ``log_interval_s``
  per reason after the first occurrence. The parser never raises on input.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt
import orjson
import polars as pl
import pyarrow as pa

from alphaengine.clock import Clock, LiveClock
from alphaengine.domain import SIDE_BUY, SIDE_SELL, TICK_SCHEMA, TickBatch
from alphaengine.metrics import SOURCE_REJECTS

VENUE: Final = "BINANCE"

MALFORMED_JSON: Final = "malformed_json"
"""Not JSON, or JSON that is not an object."""
MISSING_FIELD: Final = "missing_field"
"""A trade message without one of ``s``, ``t``, ``T``, ``p``, ``q``, ``m``."""
WRONG_TYPE: Final = "wrong_type"
"""A trade field of the wrong JSON type (``p`` as a number, ``t`` as a string, ``m`` as 0/1, ...)."""
BAD_NUMBER: Final = "bad_number"
"""A price or quantity string that is not a finite decimal number."""
NON_POSITIVE: Final = "non_positive"
"""A price or quantity that is zero or negative."""
OUT_OF_RANGE: Final = "out_of_range"
"""A negative trade id, or a trade time that is not positive or does not fit int64 nanoseconds."""

REJECT_REASONS: Final = (MALFORMED_JSON, MISSING_FIELD, WRONG_TYPE, BAD_NUMBER, NON_POSITIVE, OUT_OF_RANGE)
"""The fixed set of ``reason`` label values a parser counts rejects under."""

_MAX_MS: Final = (2**63 - 1) // 1_000_000
_INT64_LIMIT: Final = 2**63
_EXCERPT_CHARS: Final = 200
_FIELDS = itemgetter("s", "t", "T", "p", "q", "m")
_AGG_FIELDS = itemgetter("s", "a", "T", "p", "q", "m")


@dataclass(slots=True)
class ParseStats:
    """Running counts of one parser: trades accepted, messages ignored, messages rejected by reason."""

    trades: int = 0
    ignored: int = 0
    rejected: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REJECT_REASONS, 0))

    @property
    def rejected_total(self) -> int:
        """Rejected messages over every reason."""
        return sum(self.rejected.values())


class RejectCounter:
    """Counts rejected input in ``alphaengine_source_rejects_total`` and logs it without flooding the log.

    The first reject of a reason is logged at once; after that at most one line per ``interval_s`` per
    reason, saying how many were suppressed since the previous line. Time comes from the injected clock.
    """

    def __init__(self, source: str, log: logging.Logger, clock: Clock, interval_s: float = 10.0) -> None:
        self.source = source
        self.log = log
        self.clock = clock
        self.interval_ns = int(interval_s * 1e9)
        self._last_logged_ns: dict[str, int] = {}
        self._suppressed: dict[str, int] = {}
        self._children: dict[str, Any] = {}

    def reject(self, reason: str, detail: str, count: int = 1) -> None:
        """Count ``count`` rejects for ``reason``; ``detail`` describes one of them for the log."""
        child = self._children.get(reason)
        if child is None:
            child = self._children[reason] = SOURCE_REJECTS.labels(self.source, reason)
        child.inc(count)
        now = self.clock.now_ns()
        last = self._last_logged_ns.get(reason)
        if last is not None and now - last < self.interval_ns:
            self._suppressed[reason] = self._suppressed.get(reason, 0) + count
            return
        suppressed = self._suppressed.pop(reason, 0)
        self._last_logged_ns[reason] = now
        more = f" (and {suppressed} more since the last report)" if suppressed else ""
        extra = f" ({count} in this batch)" if count > 1 else ""
        self.log.warning("%s: rejected input, %s%s: %s%s", self.source, reason, extra, detail, more)


class BinanceTradeParser:
    """Parses Binance spot ``@trade`` messages in bulk; see the module docstring for the rules.

    ``source`` is the label under which rejects are counted (the module name). Not thread-safe: one
    thread at a time may call :meth:`parse` (a replay parses in a worker thread, one chunk at a time).
    """

    def __init__(
        self,
        source: str,
        *,
        clock: Clock | None = None,
        log: logging.Logger | None = None,
        log_interval_s: float = 10.0,
        event: Literal["trade", "aggTrade"] = "trade",
    ) -> None:
        self.source = source
        self.event = event
        """``trade``: ``<symbol>@trade`` messages; ``aggTrade``: ``<symbol>@aggTrade`` messages, whose
        aggregate id ``a`` becomes the tick's ``trade_id`` (aggregate ids are contiguous per symbol too)."""
        self._suffix = f"@{event}"
        self._fields = _FIELDS if event == "trade" else _AGG_FIELDS
        self.stats = ParseStats()
        self.rejects = RejectCounter(
            source, log or logging.getLogger(f"alphaengine.{source}"), clock or LiveClock(), log_interval_s
        )

    def reject(self, reason: str, detail: str, count: int = 1) -> None:
        """Count and log rejected input (also used by callers for framing errors around the messages)."""
        self.stats.rejected[reason] = self.stats.rejected.get(reason, 0) + count
        self.rejects.reject(reason, detail, count)

    def parse(
        self, messages: Sequence[bytes | str], recv_ns: Sequence[int] | npt.NDArray[np.int64]
    ) -> TickBatch:
        """The trades among ``messages`` as one batch, in message order.

        ``recv_ns[i]`` is the local receive time of ``messages[i]`` (the two must be of equal length).
        Other messages are ignored or rejected: counted, never raised.
        """
        loads = orjson.loads
        fields = self._fields
        event = self.event
        suffix = self._suffix
        syms: list[Any] = []
        ids: list[Any] = []
        times: list[Any] = []
        prices: list[Any] = []
        qtys: list[Any] = []
        makers: list[Any] = []
        recvs: list[int] = []
        ignored = 0
        received = recv_ns.tolist() if isinstance(recv_ns, np.ndarray) else recv_ns
        for raw, recv in zip(messages, received, strict=True):
            try:
                obj = loads(raw)
            except orjson.JSONDecodeError:
                self.reject(MALFORMED_JSON, _excerpt(raw))
                continue
            try:
                # A combined-stream wrapper carries the payload under "data"; a raw stream sends it bare.
                data = obj["data"] if "stream" in obj else obj
                is_trade = data["e"] == event
            except (KeyError, TypeError):
                is_trade = False
            if not is_trade:
                if not isinstance(obj, dict):
                    self.reject(MALFORMED_JSON, _excerpt(raw))
                    continue
                if not _on_stream(obj, suffix):
                    ignored += 1
                    continue
                # The wrapper names a trade stream: what it carries must be a trade, even without "e".
                data = obj.get("data")
            try:
                s, t, ts, p, q, m = fields(data)
            except KeyError:
                self.reject(MISSING_FIELD, _excerpt(raw))
                continue
            except TypeError:
                self.reject(MISSING_FIELD if data is None else WRONG_TYPE, _excerpt(raw))
                continue
            syms.append(s)
            ids.append(t)
            times.append(ts)
            prices.append(p)
            qtys.append(q)
            makers.append(m)
            recvs.append(recv)
        self.stats.ignored += ignored
        batch = self._columns([syms, ids, times, prices, qtys, makers], recvs)
        self.stats.trades += len(batch)
        return batch

    def _columns(self, columns: list[list[Any]], recvs: list[int]) -> TickBatch:
        """Check and convert the collected fields column-wise; rows that fail are rejected and dropped."""
        if not recvs:
            return TickBatch.empty()
        converted = _convert(columns)
        if converted is None:
            wrong = _wrong_types(columns)
            self._reject_rows(WRONG_TYPE, wrong, columns)
            keep = ~wrong
            columns = [_compress(c, keep) for c in columns]
            recvs = _compress(recvs, keep)
            converted = _convert(columns) if recvs else None
            if converted is None:
                if recvs:  # values of the right types that still do not convert: never raise on input
                    self._reject_rows(WRONG_TYPE, np.ones(len(recvs), dtype=bool), columns)
                return TickBatch.empty()
        symbol, trade_id, trade_ms, price, qty, maker = converted
        bad = np.zeros(len(trade_id), dtype=bool)
        out_of_range = (trade_id < 0) | (trade_ms <= 0) | (trade_ms > _MAX_MS)
        if out_of_range.any():
            self._reject_rows(OUT_OF_RANGE, out_of_range, columns)
            bad |= out_of_range
        # NaN (a string that is not a number) and inf both fail isfinite; comparisons with NaN are False.
        not_number = ~(np.isfinite(price) & np.isfinite(qty)) & ~bad
        if not_number.any():
            self._reject_rows(BAD_NUMBER, not_number, columns)
            bad |= not_number
        non_positive = ((price <= 0.0) | (qty <= 0.0)) & ~bad
        if non_positive.any():
            self._reject_rows(NON_POSITIVE, non_positive, columns)
            bad |= non_positive
        side = np.where(maker, SIDE_SELL, SIDE_BUY).astype(np.int8)
        recv = np.array(recvs, dtype=np.int64)
        if bad.any():
            keep = ~bad
            trade_id, trade_ms, recv = trade_id[keep], trade_ms[keep], recv[keep]
            price, qty, side = price[keep], qty[keep], side[keep]
            symbol = symbol.filter(pa.array(keep))
        return _batch(
            symbol=symbol,
            trade_id=trade_id,
            ts_ns=trade_ms * 1_000_000,
            recv_ns=recv,
            price=price,
            qty=qty,
            side=side,
        )

    def _reject_rows(self, reason: str, mask: npt.NDArray[np.bool_], columns: list[list[Any]]) -> None:
        first = int(np.argmax(mask))
        s, t, ts, p, q, m = (describe_value(c[first]) for c in columns)
        detail = f"s={s} t={t} T={ts} p={p} q={q} m={m}"
        self.reject(reason, detail, int(mask.sum()))


def _on_stream(obj: Any, suffix: str) -> bool:
    """Whether a combined-stream wrapper names a stream of the parsed kind (its payload must then be one)."""
    if not isinstance(obj, dict):
        return False
    stream = obj.get("stream")
    return isinstance(stream, str) and stream.endswith(suffix)


_Converted = tuple[
    pa.Array,
    npt.NDArray[np.int64],
    npt.NDArray[np.int64],
    npt.NDArray[np.float64],
    npt.NDArray[np.float64],
    npt.NDArray[np.bool_],
]
_FIELD_TYPES: Final = (str, int, int, str, str, bool)


def _convert(columns: list[list[Any]]) -> _Converted | None:
    """The six trade fields as arrays, or None if some value has the wrong JSON type.

    Most checks come with the conversion: Arrow and polars refuse a non-string in a string column.
    Integers and booleans need an explicit look because numpy would take a bool, a float or a numeric
    string for an integer, and build a 2-D array from lists of booleans.
    """
    syms, ids, times, prices, qtys, makers = columns
    if set(map(type, ids)) != {int} or set(map(type, times)) != {int}:
        return None
    if set(map(type, makers)) != {bool}:
        return None
    # Polars is only ever given strings: some other values (found by fuzzing) sent its conversion
    # fallback into allocating gigabytes before it failed.
    if set(map(type, prices)) != {str} or set(map(type, qtys)) != {str}:
        return None
    maker = np.array(makers, dtype=np.bool_)
    try:
        symbol = pa.array(syms, type=pa.string())
        price = pl.Series(prices, dtype=pl.String)
        qty = pl.Series(qtys, dtype=pl.String)
    except (TypeError, ValueError):
        return None
    if symbol.null_count or price.null_count() or qty.null_count():
        return None
    return symbol, _int64(ids), _int64(times), _decimals(price), _decimals(qty), maker


def _wrong_types(columns: list[list[Any]]) -> npt.NDArray[np.bool_]:
    """Rows where some field has the wrong type (the slow path, taken only when :func:`_convert` fails)."""
    wrong = np.zeros(len(columns[0]), dtype=bool)
    for col, tp in zip(columns, _FIELD_TYPES, strict=True):
        # `type(x) is int` (not isinstance) so that JSON true/false is not taken for an integer.
        wrong |= np.fromiter((type(x) is not tp for x in col), dtype=bool, count=len(col))
    return wrong


def _int64(values: list[int]) -> npt.NDArray[np.int64]:
    """JSON integers as int64; one beyond int64 becomes -1 so that the range check rejects its row."""
    try:
        return np.array(values, dtype=np.int64)
    except OverflowError:
        return np.array([v if -_INT64_LIMIT <= v < _INT64_LIMIT else -1 for v in values], dtype=np.int64)


def _decimals(values: pl.Series) -> npt.NDArray[np.float64]:
    """Decimal strings as float64; a string that is not a number becomes NaN."""
    return values.cast(pl.Float64, strict=False).fill_null(float("nan")).to_numpy()


def _compress(values: list[Any], keep: npt.NDArray[np.bool_]) -> list[Any]:
    return [v for v, k in zip(values, keep.tolist(), strict=True) if k]


def describe_value(value: Any) -> str:
    """A short repr of a decoded JSON value for the log, also of one nested too deep to repr."""
    try:
        text = repr(value)
    except RecursionError:
        return f"<{type(value).__name__} nested too deep to show>"
    return text[:_EXCERPT_CHARS] + ("..." if len(text) > _EXCERPT_CHARS else "")


def _excerpt(raw: bytes | str) -> str:
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    return repr(text[:_EXCERPT_CHARS] + ("..." if len(text) > _EXCERPT_CHARS else ""))


_VENUE_DICTIONARY = pa.array([VENUE], type=pa.string())


def _batch(
    *,
    symbol: pa.Array,
    trade_id: npt.NDArray[np.int64],
    ts_ns: npt.NDArray[np.int64],
    recv_ns: npt.NDArray[np.int64],
    price: npt.NDArray[np.float64],
    qty: npt.NDArray[np.float64],
    side: npt.NDArray[np.int8],
) -> TickBatch:
    n = len(trade_id)
    # A one-entry dictionary cast to string fills the venue column in C instead of a Python list of n.
    venue = pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, dtype=np.int32)), _VENUE_DICTIONARY)
    arrays = [
        venue.cast(pa.string()),
        symbol,
        pa.array(trade_id),
        pa.array(ts_ns),
        pa.array(recv_ns),
        pa.array(price),
        pa.array(qty),
        pa.array(side),
    ]
    return TickBatch(pa.RecordBatch.from_arrays(arrays, schema=TICK_SCHEMA))
