"""The tape a fake exchange publishes: the market's trades in time order, as plain columns.

A :class:`Tape` holds every trade of every symbol in trade-time order: the symbol (upper case, stored as
an index into :attr:`Tape.symbols`), the trade id, price and quantity as the exchange's decimal strings
(ASCII bytes columns, e.g. ``b"61234.56000000"``), the trade time in ms and whether the buyer was the
maker. Columns, not a dict per trade, so that a tape of millions of trades stays small.

Build it from raw recordings (:meth:`Tape.from_recordings`), by hand (:meth:`Tape.from_trades`, one
tuple a trade) or from columns (:meth:`Tape.from_columns`).

**Passes.** :meth:`Tape.loop` gives a view of the same columns that repeats the data ``n`` times (or
forever): pass ``k`` is shifted forward in time by ``k`` x (span + 1 s) and each symbol's trade ids by
``k`` x that symbol's id span (last id - first id + 1), so every pass is new, contiguous data, exactly as
the replay source loops. Trades are addressed by a *virtual index* ``g`` over all passes
(``g = k * len(tape) + row``); nothing is materialised per pass.

**Aggregates.** Binance's aggregate trades are defined here once, for the ``@aggTrade`` stream and the
REST ``aggTrades`` endpoint alike: consecutive trades *of one symbol* with the same trade time, price
and buyer-is-maker flag form one aggregate. Its quantity is the exact decimal sum of theirs; ``f``/``l``
are its first and last trade ids. Aggregate ids are contiguous per symbol and start at half the
symbol's first trade id (on Binance, too, aggregate ids are smaller than trade ids), so a client that
confuses the two kinds of id is caught. Per-symbol access (trades and aggregates by id, by time, and
how many are visible after ``n`` published trades) is :class:`SymbolHistory`, from
:meth:`Tape.history`.
"""

from __future__ import annotations

import copy
import gzip
import re
from collections.abc import Iterable, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any, Final, NamedTuple

import numpy as np
import numpy.typing as npt
import orjson

LOOP_GAP_MS: Final = 1_000
"""Time between the last trade of a pass and the first trade of the next one, beyond the span."""

_DECIMAL = re.compile(r"\A[0-9]+(\.[0-9]+)?\Z")
_CHUNK_TRADES: Final = 1 << 16
_COLUMN_TYPES: Final = (np.str_, np.int64, np.bytes_, np.bytes_, np.int64, np.bool_)


class Trade(NamedTuple):
    """One trade as the exchange reports it."""

    symbol: str
    trade_id: int
    price: str
    qty: str
    time_ms: int
    buyer_is_maker: bool


class AggTrade(NamedTuple):
    """One aggregate trade (Binance ``a,p,q,f,l,T,m``)."""

    agg_id: int
    price: str
    qty: str
    first_id: int
    last_id: int
    time_ms: int
    buyer_is_maker: bool


class Tape:
    """Trades of all symbols in time order, as columns; see the module docstring.

    Build one with :meth:`from_trades`, :meth:`from_columns` or :meth:`from_recordings`; the
    constructor takes columns that are already sorted by time. Raises ``ValueError`` on an empty tape,
    a price or quantity that is not a positive decimal string, or trade ids that do not strictly
    increase per symbol.
    """

    def __init__(
        self,
        *,
        symbols: Sequence[str],
        symbol_index: npt.NDArray[np.int16],
        trade_id: npt.NDArray[np.int64],
        price: npt.NDArray[np.bytes_],
        qty: npt.NDArray[np.bytes_],
        time_ms: npt.NDArray[np.int64],
        buyer_is_maker: npt.NDArray[np.bool_],
    ) -> None:
        n = len(trade_id)
        if n == 0:
            raise ValueError("a tape needs at least one trade")
        columns = (symbol_index, price, qty, time_ms, buyer_is_maker)
        if any(len(c) != n for c in columns):
            raise ValueError("tape columns differ in length")
        if np.any(np.diff(time_ms) < 0):
            raise ValueError("tape trades are not in time order")
        for name, values in (("price", price), ("qty", qty)):
            for value in np.unique(values):
                text = value.decode("ascii")
                if not _DECIMAL.match(text) or Decimal(text) <= 0:
                    raise ValueError(f"{name} {text!r} is not a positive decimal string")
        self.symbols: tuple[str, ...] = tuple(symbols)
        """The distinct symbols, upper case; :attr:`symbol_index` points into this."""
        self.symbol_index = symbol_index
        self.trade_id = trade_id
        self.price = price
        """Prices as ASCII decimal strings (bytes)."""
        self.qty = qty
        """Quantities as ASCII decimal strings (bytes)."""
        self.time_ms = time_ms
        self.buyer_is_maker = buyer_is_maker
        self.passes: int | None = 1
        """How many times the data repeats (None: forever); see :meth:`loop`."""
        self.pass_shift_ms = int(time_ms[-1] - time_ms[0]) + LOOP_GAP_MS
        """Time shift from one pass to the next: the span of the data plus :data:`LOOP_GAP_MS`."""
        self._histories = {s: SymbolHistory(self, i) for i, s in enumerate(self.symbols)}
        # Each row's position among its symbol's rows, so that a published row finds its aggregate.
        self._local = np.empty(n, dtype=np.int64)
        for history in self._histories.values():
            self._local[history.rows] = np.arange(len(history.rows))

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_trades(cls, trades: Iterable[Trade | tuple[str, int, str, str, int, bool]]) -> Tape:
        """A tape from hand-made trades in any order (sorted by time, stable).

        Each trade is ``(symbol, trade_id, price, qty, time_ms, buyer_is_maker)`` (or a :class:`Trade`):
        ``symbol`` upper case (``"BTCUSDT"``), ``price``/``qty`` decimal strings as the exchange sends
        them (``"61234.56000000"``).
        """
        rows = list(trades)
        if not rows:
            raise ValueError("a tape needs at least one trade")
        symbols, ids, prices, qtys, times, makers = zip(*rows, strict=True)
        return cls.from_columns(
            symbols=symbols, trade_ids=ids, prices=prices, qtys=qtys, times_ms=times, buyer_is_maker=makers
        )

    @classmethod
    def from_columns(
        cls,
        *,
        symbols: Sequence[str] | npt.NDArray[np.str_],
        trade_ids: Sequence[int] | npt.NDArray[np.int64],
        prices: Sequence[str] | npt.NDArray[np.bytes_],
        qtys: Sequence[str] | npt.NDArray[np.bytes_],
        times_ms: Sequence[int] | npt.NDArray[np.int64],
        buyer_is_maker: Sequence[bool] | npt.NDArray[np.bool_],
    ) -> Tape:
        """A tape from per-trade columns of equal length, in any order (sorted by time, stable).

        Prices and quantities are decimal strings, or arrays of their ASCII bytes.
        """
        if not len(trade_ids):
            raise ValueError("a tape needs at least one trade")
        for symbol in set(symbols):
            if not symbol or symbol != symbol.upper():
                raise ValueError(f"symbol {symbol!r} is not upper case")
        names, index = np.unique(np.asarray(symbols, dtype=np.str_), return_inverse=True)
        time_col = np.asarray(times_ms, dtype=np.int64)
        order = np.argsort(time_col, kind="stable")
        return cls(
            symbols=[str(s) for s in names],
            symbol_index=index.astype(np.int16)[order],
            trade_id=np.asarray(trade_ids, dtype=np.int64)[order],
            price=np.asarray(prices, dtype=np.bytes_)[order],
            qty=np.asarray(qtys, dtype=np.bytes_)[order],
            time_ms=time_col[order],
            buyer_is_maker=np.asarray(buyer_is_maker, dtype=np.bool_)[order],
        )

    @classmethod
    def from_recordings(cls, paths: Iterable[str | Path]) -> Tape:
        """The ``@trade`` messages of raw Binance recordings, merged by trade time (stable).

        A recording is text, gzip-compressed if its name ends in ``.gz``, one ``<receive ns> <message>``
        a line, the message a combined-stream wrapper or a raw payload. Other streams are skipped; a
        trade line that cannot be parsed raises ``ValueError`` naming the file and line.
        """
        # Collected a chunk at a time: a long recording never lives as millions of Python objects.
        rows: tuple[list[Any], ...] = ([], [], [], [], [], [])
        chunks: list[list[npt.NDArray[Any]]] = [[] for _ in rows]

        def flush() -> None:
            for column, values, dtype in zip(chunks, rows, _COLUMN_TYPES, strict=True):
                column.append(np.asarray(values, dtype=dtype))
                values.clear()

        symbols, ids, prices, qtys, times, makers = rows
        for path in map(Path, paths):
            opener = gzip.open if path.name.endswith(".gz") else open
            with opener(path, "rb") as lines:
                for number, line in enumerate(lines, 1):
                    # `"trade"` only occurs in trade events ("aggTrade" has no quote before "trade").
                    if b'"trade"' not in line:
                        continue
                    try:
                        message = orjson.loads(line.partition(b" ")[2])
                        data = message.get("data", message)
                        if data.get("e") != "trade":
                            continue
                        symbols.append(data["s"])
                        ids.append(data["t"])
                        prices.append(data["p"])
                        qtys.append(data["q"])
                        times.append(data["T"])
                        makers.append(data["m"])
                    except (orjson.JSONDecodeError, AttributeError, KeyError) as exc:
                        raise ValueError(f"{path}:{number}: not a trade message: {exc}") from exc
                    if len(ids) >= _CHUNK_TRADES:
                        flush()
        flush()
        s, t, p, q, ts, m = (np.concatenate(c) for c in chunks)
        return cls.from_columns(symbols=s, trade_ids=t, prices=p, qtys=q, times_ms=ts, buyer_is_maker=m)

    def loop(self, passes: int | None) -> Tape:
        """A view of this tape's data repeated ``passes`` times (None: forever); see the module doc."""
        if passes is not None and passes < 1:
            raise ValueError("passes must be at least 1 (or None for forever)")
        view = copy.copy(self)
        view.passes = passes
        return view

    # -- the whole tape, by virtual index -------------------------------------------------------

    def __len__(self) -> int:
        """Trades in one pass."""
        return len(self.trade_id)

    @property
    def total(self) -> int | None:
        """Trades over all passes (None when the tape repeats forever)."""
        return None if self.passes is None else self.passes * len(self)

    @property
    def start_ms(self) -> int:
        """Time of the first trade."""
        return int(self.time_ms[0])

    def symbol_of(self, g: int) -> int:
        """Index into :attr:`symbols` of trade ``g``."""
        return int(self.symbol_index[g % len(self)])

    def time_at(self, g: int) -> int:
        """Trade time (ms) of trade ``g``."""
        k, row = divmod(g, len(self))
        return int(self.time_ms[row]) + k * self.pass_shift_ms

    def trade(self, g: int) -> Trade:
        """Trade ``g`` (a virtual index over all passes)."""
        k, row = divmod(g, len(self))
        history = self._histories[self.symbols[self.symbol_index[row]]]
        return Trade(
            history.symbol,
            int(self.trade_id[row]) + k * history.id_span,
            self.price[row].decode("ascii"),
            self.qty[row].decode("ascii"),
            int(self.time_ms[row]) + k * self.pass_shift_ms,
            bool(self.buyer_is_maker[row]),
        )

    def count_until(self, time_ms: int) -> int:
        """How many trades (over all passes) have a trade time at or before ``time_ms``."""
        k = max(0, (time_ms - self.start_ms) // self.pass_shift_ms)
        count = k * len(self) + int(np.searchsorted(self.time_ms, time_ms - k * self.pass_shift_ms, "right"))
        total = self.total
        return count if total is None else min(count, total)

    def completed_aggregate(self, g: int) -> AggTrade | None:
        """The aggregate that trade ``g`` completes (it is the aggregate's last trade), else None."""
        k, row = divmod(g, len(self))
        history = self._histories[self.symbols[self.symbol_index[row]]]
        local = int(self._local[row])
        if not history.agg_end_flag[local]:
            return None
        return history.aggregate(k * history.n_aggregates + int(history.agg_of[local]))

    def history(self, symbol: str) -> SymbolHistory:
        """One symbol's trades and aggregates (KeyError for a symbol not on the tape)."""
        return self._histories[symbol]

    @property
    def symbol_column(self) -> npt.NDArray[np.str_]:
        """The symbol of every trade of one pass (built on demand)."""
        return np.asarray(self.symbols, dtype=np.str_)[self.symbol_index]


class SymbolHistory:
    """One symbol's trades and aggregates over all passes of a tape, by symbol-local index.

    Local index ``j`` is the ``j``-th trade of the symbol counting from the first pass; ``q`` the
    ``q``-th aggregate. A history knows no end: the caller bounds the indices (by what is published,
    which never exceeds the passes of the tape); :meth:`Tape.loop` views share their histories.
    """

    def __init__(self, tape: Tape, index: int) -> None:
        self._tape = tape
        self.symbol = tape.symbols[index]
        self.rows: npt.NDArray[np.int64] = np.flatnonzero(tape.symbol_index == index).astype(np.int64)
        self.ids: npt.NDArray[np.int64] = tape.trade_id[self.rows]
        if np.any(np.diff(self.ids) <= 0):
            raise ValueError(f"{self.symbol}: trade ids do not strictly increase in time order")
        self.id_span = int(self.ids[-1] - self.ids[0]) + 1
        """Shift of the trade ids from one pass to the next."""
        times = tape.time_ms[self.rows]
        prices = tape.price[self.rows]
        makers = tape.buyer_is_maker[self.rows]
        start = np.ones(len(self.rows), dtype=np.bool_)
        start[1:] = (times[1:] != times[:-1]) | (prices[1:] != prices[:-1]) | (makers[1:] != makers[:-1])
        self.agg_start: npt.NDArray[np.int64] = np.flatnonzero(start).astype(np.int64)
        """Local index of the first trade of each aggregate (first pass)."""
        self.agg_last: npt.NDArray[np.int64] = np.append(self.agg_start[1:] - 1, len(self.rows) - 1)
        """Local index of the last trade of each aggregate (first pass)."""
        self.agg_of: npt.NDArray[np.int64] = np.cumsum(start) - 1
        """Aggregate of each local trade (first pass)."""
        self.agg_end_flag: npt.NDArray[np.bool_] = np.zeros(len(self.rows), dtype=np.bool_)
        self.agg_end_flag[self.agg_last] = True
        self.agg_times: npt.NDArray[np.int64] = times[self.agg_start]
        self.n_aggregates = len(self.agg_start)
        self.first_agg_id = int(self.ids[0]) // 2
        """Aggregate id of the first aggregate; ids are contiguous from here over all passes."""

    # -- trades ---------------------------------------------------------------------------------

    def visible(self, published: int) -> int:
        """How many of this symbol's trades are among the first ``published`` trades of the tape."""
        k, row = divmod(published, len(self._tape))
        return k * len(self.rows) + int(np.searchsorted(self.rows, row, "left"))

    def trade(self, j: int) -> Trade:
        """The symbol's ``j``-th trade."""
        tape = self._tape
        k, local = divmod(j, len(self.rows))
        row = int(self.rows[local])
        return Trade(
            self.symbol,
            int(self.ids[local]) + k * self.id_span,
            tape.price[row].decode("ascii"),
            tape.qty[row].decode("ascii"),
            int(tape.time_ms[row]) + k * tape.pass_shift_ms,
            bool(tape.buyer_is_maker[row]),
        )

    def index_of_id(self, trade_id: int) -> int:
        """Local index of the first trade with an id at or above ``trade_id``."""
        if trade_id <= self.ids[0]:
            return 0
        k = (trade_id - int(self.ids[0])) // self.id_span
        return k * len(self.rows) + int(np.searchsorted(self.ids, trade_id - k * self.id_span, "left"))

    # -- aggregates -----------------------------------------------------------------------------

    def complete_aggregates(self, visible: int) -> int:
        """How many aggregates are complete when the first ``visible`` trades of the symbol are."""
        k, local = divmod(visible, len(self.rows))
        return k * self.n_aggregates + int(np.searchsorted(self.agg_last, local, "left"))

    def aggregate(self, q: int) -> AggTrade:
        """The symbol's ``q``-th aggregate."""
        tape = self._tape
        k, a = divmod(q, self.n_aggregates)
        first, last = int(self.agg_start[a]), int(self.agg_last[a])
        rows = self.rows[first : last + 1]
        row = int(rows[0])
        if len(rows) == 1:
            qty = tape.qty[row].decode("ascii")
        else:
            qty = format(sum((Decimal(x.decode("ascii")) for x in tape.qty[rows]), Decimal(0)), "f")
        return AggTrade(
            self.first_agg_id + q,
            tape.price[row].decode("ascii"),
            qty,
            int(self.ids[first]) + k * self.id_span,
            int(self.ids[last]) + k * self.id_span,
            int(tape.time_ms[row]) + k * tape.pass_shift_ms,
            bool(tape.buyer_is_maker[row]),
        )

    def aggregate_index_of_id(self, agg_id: int) -> int:
        """Index of the aggregate with id ``agg_id`` (ids are contiguous; 0 below the first)."""
        return max(0, agg_id - self.first_agg_id)

    def aggregates_before(self, time_ms: int) -> int:
        """How many aggregates have a trade time before ``time_ms``."""
        tape = self._tape
        k = max(0, (time_ms - tape.start_ms) // tape.pass_shift_ms)
        within = int(np.searchsorted(self.agg_times, time_ms - k * tape.pass_shift_ms, "left"))
        return k * self.n_aggregates + within
