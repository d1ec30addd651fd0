"""Domain types: ticks and bars as columnar batches, low-rate trading events as frozen structs.

Ticks and bars never travel as one Python object per row: a :class:`TickBatch` or :class:`BarBatch` wraps
an Arrow record batch with a fixed schema, so parsers, the bus codec, the bar builder and the stores all
work on whole columns. Signals, orders, fills and positions are rare enough to be plain frozen structs.

Units: every timestamp is integer nanoseconds since the UNIX epoch (``*_ns``); prices are in the quote
currency (USD for the ``*USDT`` symbols), quantities in the base asset.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

#: Aggressor side codes in the ``side`` column of ticks.
SIDE_BUY: int = 1
SIDE_SELL: int = -1
SIDE_UNKNOWN: int = 0

TICK_SCHEMA = pa.schema(
    [
        pa.field("venue", pa.string(), nullable=False),
        pa.field("symbol", pa.string(), nullable=False),
        pa.field("trade_id", pa.int64(), nullable=False),
        pa.field("ts_ns", pa.int64(), nullable=False),
        pa.field("recv_ns", pa.int64(), nullable=False),
        pa.field("price", pa.float64(), nullable=False),
        pa.field("qty", pa.float64(), nullable=False),
        pa.field("side", pa.int8(), nullable=False),
    ]
)
"""Columns of a tick: venue, symbol, venue trade id, exchange time, local receive time, price, quantity and
aggressor side (+1 the buyer took liquidity, -1 the seller did, 0 unknown)."""

BAR_SCHEMA = pa.schema(
    [
        pa.field("venue", pa.string(), nullable=False),
        pa.field("symbol", pa.string(), nullable=False),
        pa.field("interval_s", pa.int32(), nullable=False),
        pa.field("ts_ns", pa.int64(), nullable=False),
        pa.field("open", pa.float64(), nullable=False),
        pa.field("high", pa.float64(), nullable=False),
        pa.field("low", pa.float64(), nullable=False),
        pa.field("close", pa.float64(), nullable=False),
        pa.field("volume", pa.float64(), nullable=False),
        pa.field("quote_volume", pa.float64(), nullable=False),
        pa.field("vwap", pa.float64(), nullable=False),
        pa.field("trade_count", pa.int64(), nullable=False),
        pa.field("buy_volume", pa.float64(), nullable=False),
        pa.field("sell_volume", pa.float64(), nullable=False),
        pa.field("first_trade_id", pa.int64(), nullable=False),
        pa.field("last_trade_id", pa.int64(), nullable=False),
    ]
)
"""Columns of a time bar: ``ts_ns`` is the bar's open time (a multiple of ``interval_s``), volumes are in
the base asset, ``quote_volume`` is the traded notional, ``vwap = quote_volume / volume``."""


def _check_schema(data: pa.RecordBatch, schema: pa.Schema, what: str) -> None:
    if not data.schema.equals(schema, check_metadata=False):
        raise ValueError(f"{what} batch has schema {data.schema}, expected {schema}")


@dataclass(frozen=True, slots=True)
class TickBatch:
    """A batch of trades as columns (:data:`TICK_SCHEMA`).

    Build one with :meth:`from_columns`; read columns as zero-copy numpy arrays with :meth:`np`.
    """

    data: pa.RecordBatch

    def __post_init__(self) -> None:
        _check_schema(self.data, TICK_SCHEMA, "tick")

    def __len__(self) -> int:
        return int(self.data.num_rows)

    @classmethod
    def from_columns(
        cls,
        *,
        venue: str | Sequence[str] | pa.Array,
        symbol: str | Sequence[str] | pa.Array,
        trade_id: npt.ArrayLike,
        ts_ns: npt.ArrayLike,
        recv_ns: npt.ArrayLike,
        price: npt.ArrayLike,
        qty: npt.ArrayLike,
        side: npt.ArrayLike,
    ) -> TickBatch:
        """Build a batch from columns; a plain string for ``venue`` or ``symbol`` fills the whole column."""
        prices = np.asarray(price, dtype=np.float64)
        n = len(prices)
        arrays = [
            _string_column(venue, n),
            _string_column(symbol, n),
            pa.array(np.asarray(trade_id, dtype=np.int64)),
            pa.array(np.asarray(ts_ns, dtype=np.int64)),
            pa.array(np.asarray(recv_ns, dtype=np.int64)),
            pa.array(prices),
            pa.array(np.asarray(qty, dtype=np.float64)),
            pa.array(np.asarray(side, dtype=np.int8)),
        ]
        return cls(pa.RecordBatch.from_arrays(arrays, schema=TICK_SCHEMA))

    @classmethod
    def empty(cls) -> TickBatch:
        """A batch with no rows."""
        return cls(_empty(TICK_SCHEMA))

    def np(self, column: str) -> npt.NDArray[Any]:
        """A numeric column as a numpy array (zero-copy)."""
        return np.asarray(self.data.column(column).to_numpy(zero_copy_only=False))

    def symbols(self) -> list[str]:
        """The distinct symbols in this batch, in order of first appearance."""
        return [str(s) for s in pc.unique(self.data.column("symbol")).to_pylist()]

    def split_by_symbol(self) -> Iterator[tuple[str, TickBatch]]:
        """Yield ``(symbol, sub-batch)`` per symbol, rows in their original order."""
        symbols = self.data.column("symbol")
        distinct = pc.unique(symbols)
        if len(distinct) == 1:
            yield str(distinct[0].as_py()), self
            return
        for sym in distinct.to_pylist():
            mask = pc.equal(symbols, sym)
            yield str(sym), TickBatch(self.data.filter(mask))

    @staticmethod
    def concat(batches: Sequence[TickBatch]) -> pa.Table:
        """Concatenate batches into one Arrow table (for inserts)."""
        if not batches:
            return TICK_SCHEMA.empty_table()
        return pa.Table.from_batches([b.data for b in batches], schema=TICK_SCHEMA)


@dataclass(frozen=True, slots=True)
class BarBatch:
    """A batch of time bars as columns (:data:`BAR_SCHEMA`)."""

    data: pa.RecordBatch

    def __post_init__(self) -> None:
        _check_schema(self.data, BAR_SCHEMA, "bar")

    def __len__(self) -> int:
        return int(self.data.num_rows)

    @classmethod
    def from_pydict(cls, columns: dict[str, Any]) -> BarBatch:
        """Build a batch from a mapping of column name to values (numpy arrays or lists)."""
        return cls(pa.RecordBatch.from_pydict(columns, schema=BAR_SCHEMA))

    @staticmethod
    def concat(batches: Sequence[BarBatch]) -> pa.Table:
        """Concatenate batches into one Arrow table (for inserts)."""
        if not batches:
            return BAR_SCHEMA.empty_table()
        return pa.Table.from_batches([b.data for b in batches], schema=BAR_SCHEMA)


def _empty(schema: pa.Schema) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays([pa.array([], type=f.type) for f in schema], schema=schema)


def _string_column(value: str | Sequence[str] | pa.Array, n: int) -> pa.Array:
    if isinstance(value, str):
        # A one-entry dictionary cast to plain strings fills the column in C, not through a list of n.
        indices = pa.array(np.zeros(n, dtype=np.int32))
        return pa.DictionaryArray.from_arrays(indices, pa.array([value], pa.string())).cast(pa.string())
    if isinstance(value, pa.Array):
        return value.cast(pa.string())
    return pa.array(list(value), type=pa.string())


# --------------------------------------------------------------------------------------------------
# Low-rate trading events
# --------------------------------------------------------------------------------------------------


class Side(enum.StrEnum):
    """Direction of an order or fill."""

    BUY = "buy"
    SELL = "sell"


class OrderType(enum.StrEnum):
    """How an order is to be executed."""

    MARKET = "market"
    LIMIT = "limit"


class OrderStatus(enum.StrEnum):
    """Where an order is in its life."""

    NEW = "new"
    PARTIALLY_FILLED = "partially_filled"
    FILLED = "filled"
    CANCELED = "canceled"
    REJECTED = "rejected"


class Liquidity(enum.StrEnum):
    """Whether a fill added liquidity (maker) or took it (taker)."""

    MAKER = "maker"
    TAKER = "taker"


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    """Base of the low-rate events; encoded as JSON objects tagged by ``type``."""


class Signal(Event, frozen=True, tag="signal"):
    """A model ensemble's view on one symbol at one bar.

    ``score`` is the expected forward return over ``horizon_s`` (a fraction, 0.001 = 10 bps);
    ``model_versions`` names every model version that contributed.
    """

    signal_id: str
    ts_ns: int
    venue: str
    symbol: str
    bar_ts_ns: int
    horizon_s: int
    score: float
    confidence: float
    """Weighted agreement of the models on the direction: 1 when all agree, 0 when split evenly."""
    model_versions: tuple[str, ...] = ()
    """``<model>@<version>`` of every contributing prediction."""
    values: tuple[float, ...] = ()
    """Each contributing prediction's value, in the order of ``model_versions``."""
    weights: tuple[float, ...] = ()
    """Each contributing prediction's share of the score (they sum to 1)."""


class Prediction(Event, frozen=True, tag="prediction"):
    """One model version's forecast for one symbol at one bar (the signal engine ensembles them).

    ``value`` is the predicted log return over the ``horizon_s`` after the bar. A ``stale`` prediction
    (its model past its expiry, or its bar closed too long ago) must not be traded; ``stale_reason``
    says why.
    """

    ts_ns: int
    venue: str
    symbol: str
    interval_s: int
    bar_ts_ns: int
    model: str
    version: str
    horizon_s: int
    value: float
    stale: bool = False
    stale_reason: str = ""
    weight: float = 1.0
    """The ensemble weight: the version's out-of-sample information coefficient (0 when not positive)."""
    group_size: int = 1
    """How many predictions the predictor made for this bar (this one included): the signal engine
    ensembles a bar once all of them are in."""


class OrderIntent(Event, frozen=True, tag="order_intent"):
    """What the strategy wants to do, before the risk engine has sized and checked it."""

    intent_id: str
    ts_ns: int
    venue: str
    symbol: str
    side: Side
    qty: float
    order_type: OrderType = OrderType.MARKET
    limit_price: float | None = None
    signal_id: str | None = None


class Order(Event, frozen=True, tag="order"):
    """An order and where it is.

    Published when the risk engine decides on it (``new`` or ``rejected``) and again at each change
    (fills, cancellation), with ``reason`` for a rejection or cancellation.
    """

    order_id: str
    intent_id: str
    ts_ns: int
    venue: str
    symbol: str
    side: Side
    qty: float
    order_type: OrderType
    limit_price: float | None = None
    """A limit order's price; a market order's protection price (no fill beyond it)."""
    status: OrderStatus = OrderStatus.NEW
    filled_qty: float = 0.0
    reason: str = ""
    """Why it was rejected or canceled."""


class Fill(Event, frozen=True, tag="fill"):
    """An execution; ``fill_id`` is deterministic so a replayed fill is recognised and applied once."""

    fill_id: str
    order_id: str
    ts_ns: int
    venue: str
    symbol: str
    side: Side
    qty: float
    price: float
    fee_usd: float
    liquidity: Liquidity


class Position(Event, frozen=True, tag="position"):
    """Holdings in one symbol: signed quantity, average entry price, realised PnL and fees paid."""

    ts_ns: int
    venue: str
    symbol: str
    qty: float
    avg_price: float
    realized_pnl_usd: float
    fees_usd: float


AnyEvent = Prediction | Signal | OrderIntent | Order | Fill | Position
