"""The signal engine: one ensembled signal per instrument and bar from the live models' predictions.

The predictor sends every champion's prediction of a bar together, each saying how many there are
(``group_size``) and its ensemble weight (its version's out-of-sample information coefficient). A bar's
group is ensembled once all of its predictions are in, or, if some never come, once the engine's event
time has moved past it (:meth:`SignalEngine.due`).

The score is the weighted mean of the fresh predictions; stale ones (an expired model, a bar that closed
too long ago) and those with no positive weight take no part, and a bar with no fresh, weighted
prediction gives no signal, only the reason why. A demoted model has no champion, so the predictor sends
nothing from it. Each signal names the model versions behind it with their values and shares, which is
what the per-model contribution of a backtest is computed from.

A prediction for a bar already ensembled (a redelivery after a restart) is ignored, so each bar gives at
most one signal, with a deterministic id: ``<venue>:<symbol>:<interval_s>:<bar_ts_ns>``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import msgspec

from alphaengine.domain import Prediction, Signal

NS = 1_000_000_000

_Series = tuple[str, str, int]
"""venue, symbol, interval_s."""


@dataclass(slots=True)
class _Group:
    close_ns: int
    size: int
    predictions: dict[str, Prediction] = field(default_factory=dict)
    """By model: a model's second prediction of one bar (a redelivery) replaces nothing."""


@dataclass(frozen=True, slots=True)
class Ensembled:
    """The outcome of one bar: a signal, or the reason there is none."""

    close_ns: int
    venue: str
    symbol: str
    signal: Signal | None
    reason: str = ""


class SignalEngine:
    """Groups predictions by bar and ensembles each complete group."""

    def __init__(self) -> None:
        self._groups: dict[tuple[_Series, int], _Group] = {}
        self._done: dict[_Series, int] = {}
        """Per series, the open time of the newest bar ensembled."""

    def add(self, p: Prediction) -> list[Ensembled]:
        """Take one prediction; returns the bars it completed (none, or its own)."""
        series = (p.venue, p.symbol, p.interval_s)
        done = self._done.get(series)
        if done is not None and p.bar_ts_ns <= done:
            return []
        key = (series, p.bar_ts_ns)
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group(p.bar_ts_ns + p.interval_s * NS, p.group_size)
        group.size = max(group.size, p.group_size)
        group.predictions.setdefault(p.model, p)
        if len(group.predictions) < group.size:
            return []
        return [self._finish(key)]

    def due(self, before_ns: int) -> list[Ensembled]:
        """Ensemble, incomplete as they are, the bars that closed before ``before_ns``."""
        keys = sorted(
            (k for k, g in self._groups.items() if g.close_ns < before_ns),
            key=lambda k: (self._groups[k].close_ns, k[0]),
        )
        return [self._finish(k) for k in keys]

    def _finish(self, key: tuple[_Series, int]) -> Ensembled:
        series, bar_ts = key
        group = self._groups.pop(key)
        self._done[series] = max(self._done.get(series, bar_ts), bar_ts)
        venue, symbol, interval_s = series
        fresh = [p for _, p in sorted(group.predictions.items()) if not p.stale]
        weighted = [p for p in fresh if p.weight > 0 and math.isfinite(p.value)]
        if not weighted:
            reason = (
                f"every prediction is stale ({group.predictions[min(group.predictions)].stale_reason})"
                if not fresh
                else "no fresh prediction has a positive weight"
            )
            return Ensembled(group.close_ns, venue, symbol, None, reason)
        total = math.fsum(p.weight for p in weighted)
        shares = tuple(p.weight / total for p in weighted)
        score = math.fsum(s * p.value for s, p in zip(shares, weighted, strict=True))
        agreement = abs(
            math.fsum(s * math.copysign(1.0, p.value) for s, p in zip(shares, weighted, strict=True))
        )
        signal = Signal(
            signal_id=f"{venue}:{symbol}:{interval_s}:{bar_ts}",
            ts_ns=group.close_ns,
            venue=venue,
            symbol=symbol,
            bar_ts_ns=bar_ts,
            horizon_s=max(p.horizon_s for p in weighted),
            score=score,
            confidence=agreement,
            model_versions=tuple(f"{p.model}@{p.version}" for p in weighted),
            values=tuple(p.value for p in weighted),
            weights=shares,
        )
        return Ensembled(group.close_ns, venue, symbol, signal)

    # -- state --------------------------------------------------------------------------------------

    def state(self) -> dict[str, object]:
        """Pending predictions and the newest bar ensembled per series, as data."""
        return {
            "pending": [p for g in self._groups.values() for p in g.predictions.values()],
            "done": [[*s, bar] for s, bar in self._done.items()],
        }

    def restore(self, state: dict[str, object]) -> None:
        """Take the state of an earlier engine over."""
        self._groups.clear()
        self._done = {
            (str(v), str(s), int(i)): int(b)
            for v, s, i, b in msgspec.convert(state["done"], list[tuple[str, str, int, int]])
        }
        for p in msgspec.convert(state["pending"], list[Prediction]):
            self.add(p)
