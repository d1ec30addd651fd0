"""Feature sets, their batch and streaming evaluation, and the forward-return targets.

Batch (training): :meth:`FeatureSet.compute` puts bars on the grid and evaluates every feature over each
whole series. Streaming (live): :class:`FeatureStream` keeps the last ``max_lookback - 1`` grid bars of
each series and, for each update, evaluates the same expressions once over the history of every series
the update touches, stacked in one frame, returning the rows of the new bars. Both paths run the same
expressions through the same method (:meth:`FeatureSet.evaluate`), so they agree to floating-point
rounding.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Annotated, Final, cast

import msgspec
import orjson
import polars as pl

from alphaengine.features.definitions import Feature, FeatureParams, core_features
from alphaengine.features.grid import GRID_SCHEMA, KEY, Bars, as_grid_input, fill_gaps, regularize

GRID_RULE: Final = "grid-v1: regular per series, gaps filled with the previous close and zero flow"
"""The gap rule, part of every feature set's version: changing the rule changes the features."""

ROW_COLUMNS: Final = (*KEY, "ts_ns", "filled")
"""Columns that name a row of features or targets (``filled``: no trade in that interval)."""


@dataclass(frozen=True, eq=False)
class FeatureSet:
    """A named, versioned list of features (and the intermediate columns they share).

    ``version`` is ``"{name}-{hash}"``, the hash covering the gap rule and each column's name, lookback
    and serialized expression (windows included): models record it to name the features they were
    trained on, and refuse features of another version. Polars' serialization is part of the hash, so a
    polars upgrade may change it (and with it, possibly, the values).
    """

    name: str
    columns: tuple[Feature, ...]
    params: FeatureParams | None = None
    """The parameters the columns were built from, when built by :func:`core_feature_set`."""
    version: str = field(init=False)
    _stages: tuple[tuple[pl.Expr, ...], ...] = field(init=False, repr=False)
    _outputs: tuple[pl.Expr, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        known = set(GRID_SCHEMA.names())
        depth: dict[str, int] = {}
        for column in self.columns:
            if column.output == column.name.startswith("_") or column.lookback < 1:
                raise ValueError(
                    f"column {column.name!r}: intermediates (and only they) start with '_'; lookback >= 1"
                )
            if column.name in known:
                raise ValueError(f"column {column.name!r} is defined twice or shadows a bar column")
            refs = set(column.expr.meta.root_names()) - set(KEY)
            if missing := refs - known:
                raise ValueError(f"column {column.name!r} refers to undefined columns {sorted(missing)}")
            depth[column.name] = 1 + max((depth.get(r, 0) for r in refs), default=0)
            known.add(column.name)
        if not self.names:
            raise ValueError("a feature set needs at least one output feature")
        # Columns are evaluated in stages, each stage over the columns of the stages before it; a column
        # of the current bar only (lookback 1) needs no per-series window, which saves a grouping.
        stages: list[list[pl.Expr]] = [[] for _ in range(max(depth.values()))]
        for column in self.columns:
            expr = column.expr if column.lookback == 1 else column.expr.over(KEY)
            stages[depth[column.name] - 1].append(expr.alias(column.name))
        object.__setattr__(self, "_stages", tuple(tuple(stage) for stage in stages))
        # Non-finite results (a zero denominator no rule of the definitions covers) become null.
        finite = (pl.when(pl.col(n).is_finite()).then(pl.col(n)).alias(n) for n in self.names)
        object.__setattr__(self, "_outputs", (*(pl.col(n) for n in GRID_SCHEMA.names()), *finite))
        canonical = orjson.dumps(
            {
                "grid": GRID_RULE,
                "columns": [
                    [c.name, c.output, c.lookback, c.expr.meta.serialize(format="json")] for c in self.columns
                ],
            }
        )
        object.__setattr__(self, "version", f"{self.name}-{hashlib.sha256(canonical).hexdigest()[:12]}")

    @property
    def features(self) -> list[Feature]:
        """The output features, in column order."""
        return [c for c in self.columns if c.output]

    @property
    def names(self) -> list[str]:
        """The output feature columns, in order."""
        return [c.name for c in self.columns if c.output]

    @property
    def max_lookback(self) -> int:
        """Bars of history (current bar included) the longest feature needs."""
        return max(c.lookback for c in self.columns)

    def compute(self, bars: Bars) -> pl.DataFrame:
        """Batch mode: features of every grid bar of every series in ``bars``.

        Returns :data:`ROW_COLUMNS` and the feature columns, sorted by series and time; a series' first
        ``lookback - 1`` rows of a feature are null.
        """
        return self.evaluate(regularize(bars))

    def evaluate(self, grid: pl.DataFrame) -> pl.DataFrame:
        """The features over each series of ``grid`` (grid bars sorted by series and time).

        The one evaluation both modes use: :meth:`compute` on whole series, :class:`FeatureStream` on
        each series' recent history.
        """
        return self._evaluate(grid)[[*ROW_COLUMNS, *self.names]]

    def _evaluate(self, grid: pl.DataFrame) -> pl.DataFrame:
        """The grid columns and the output features."""
        frame = grid
        for stage in self._stages:
            frame = frame.with_columns(stage)
        return frame.select(self._outputs)

    def stream(self) -> FeatureStream:
        """A new streaming evaluator of this feature set, with no history."""
        return FeatureStream(self)


def core_feature_set(params: FeatureParams | None = None) -> FeatureSet:
    """The core feature set (``core-<hash>``), with default windows unless ``params`` says otherwise."""
    params = params or FeatureParams()
    return FeatureSet("core", tuple(core_features(params)), params)


_SeriesKey = tuple[str, str, int]


class FeatureStream:
    """Streaming mode: features of each new bar from a bounded history per series.

    Keeps, per series, the last ``max_lookback - 1`` grid bars, what the next bar's features need.
    :meth:`update` takes the next bars of any series (each series' bars after the ones seen); a bar at or
    before the last one seen of its series is ignored (the bar builder may emit a bar again after a
    restart). All series an update touches are evaluated together, in one frame: the cost of an
    evaluation is mostly per call, not per row, so one update with a bar of each of five symbols costs
    about a third of five single-bar updates. Warming up is an update with recent history, e.g. the last
    bars read from the store.
    """

    def __init__(self, feature_set: FeatureSet) -> None:
        self.feature_set = feature_set
        # A new bar needs the max_lookback - 1 bars before it; one bar at least, for the gap rule's close.
        self._keep = max(feature_set.max_lookback - 1, 1)
        self._history: dict[_SeriesKey, pl.DataFrame] = {}
        self._last: dict[_SeriesKey, int] = {}
        self._out_columns = [*ROW_COLUMNS, *feature_set.names]
        self._grid_columns = GRID_SCHEMA.names()

    @property
    def history_rows(self) -> int:
        """Grid bars held over all series (at most ``max_lookback - 1`` per series)."""
        return sum(h.height for h in self._history.values())

    def update(self, bars: Bars) -> pl.DataFrame:
        """Features of the new grid bars that ``bars`` completes, as :meth:`FeatureSet.compute` would.

        The rows are those of the new bars and of the filled intervals before them (a gap of a series is
        filled when its next bar arrives), sorted by series and time.
        """
        pieces: list[pl.DataFrame] = []
        held: dict[_SeriesKey, int] = {}
        for series, part in _by_series(as_grid_input(bars)).items():
            history = self._history.get(series)
            if history is None:
                pieces.append(part)
                held[series] = 0
                continue
            last = self._last[series]
            new = part if cast(int, part["ts_ns"].min()) > last else part.filter(pl.col("ts_ns") > last)
            if not new.is_empty():
                pieces += [history, new]
                held[series] = history.height
        if not pieces:
            return self.feature_set.evaluate(pl.DataFrame(schema=GRID_SCHEMA))
        # Histories keep the feature columns of their last evaluation (picking columns per series costs
        # more than the evaluation): a diagonal concat and one pick put everything back on the grid schema.
        grid = fill_gaps(pl.concat(pieces, how="diagonal")[self._grid_columns])
        by_series = _by_series(self.feature_set._evaluate(grid))
        fresh: list[pl.DataFrame] = []
        for key in sorted(held):
            rows = by_series[key]
            fresh.append(rows.slice(held[key]))
            self._history[key] = rows.tail(self._keep)
            self._last[key] = rows["ts_ns"][-1]
        return pl.concat(fresh)[self._out_columns]


def _by_series(frame: pl.DataFrame) -> dict[_SeriesKey, pl.DataFrame]:
    """The rows of each series, in their order.

    ``partition_by(as_dict=True)`` reads each partition's key with a ``select`` of its own, which costs
    more than the partitioning itself with many series; one ``unique`` in the same order names them all.
    """
    keys = cast(list[_SeriesKey], frame[list(KEY)].unique(maintain_order=True).rows())
    return dict(zip(keys, frame.partition_by(KEY, maintain_order=True), strict=True))


_Horizon = Annotated[int, msgspec.Meta(ge=1, le=100_000)]


class Targets(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Forward log returns over ``horizons`` (in bars of the grid) and their signs.

    Row ``t`` of a series gets ``target_ret_{h} = log(close[t + h] / close[t])`` and ``target_sign_{h}``
    in {-1, 0, 1} (0: the close did not move, common on 1-second bars), null for the last ``h`` rows of
    the series. Features of row ``t`` use bars up to ``t`` only; targets use closes after ``t`` only.
    """

    horizons: tuple[_Horizon, ...] = (1, 5, 15, 60)

    def __post_init__(self) -> None:
        if not self.horizons:
            raise ValueError("targets need at least one horizon")

    @property
    def purge_bars(self) -> int:
        """Rows at the end of each series without every target: the longest horizon.

        The walk-forward validation purges this many bars (times ``interval_s`` in time) between a
        training window and the data after it, whose closes its last targets read.
        """
        return max(self.horizons)

    @property
    def names(self) -> list[str]:
        """The target columns, in order."""
        return [name for h in self.horizons for name in (f"target_ret_{h}", f"target_sign_{h}")]

    def compute(self, bars: Bars) -> pl.DataFrame:
        """Targets of every grid bar of every series in ``bars``: :data:`ROW_COLUMNS` and the targets."""
        return self.evaluate(regularize(bars))

    def evaluate(self, grid: pl.DataFrame) -> pl.DataFrame:
        """The targets over each series of ``grid`` (grid bars sorted by series and time)."""
        close = pl.col("close")
        columns: list[pl.Expr] = []
        for h in self.horizons:
            ret = (close.shift(-h) / close).log().over(KEY)
            columns += [ret.alias(f"target_ret_{h}"), ret.sign().cast(pl.Int8).alias(f"target_sign_{h}")]
        return grid.select(*ROW_COLUMNS, *columns)


def training_frame(bars: Bars, feature_set: FeatureSet, targets: Targets) -> pl.DataFrame:
    """Features and targets of every grid bar, rows with any null feature or target dropped.

    Each row is :data:`ROW_COLUMNS`, the features and the targets, sorted by series and time. What is
    dropped: each series' first ``max_lookback - 1`` rows, its last ``purge_bars`` rows, and rows whose
    features are undefined (e.g. no buy/sell split in the data).
    """
    grid = regularize(bars)
    features = feature_set.evaluate(grid)
    target_columns = targets.evaluate(grid)[targets.names]
    return pl.concat([features, target_columns], how="horizontal").drop_nulls(
        [*feature_set.names, *targets.names]
    )
