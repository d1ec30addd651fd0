"""Walk-forward validation: purged, embargoed splits; out-of-sample scores; baselines; promotion rules.

Everything here works on plain numpy arrays, one element per row (a sample of one symbol at one time):
``times`` (int64 ns), the model's out-of-sample predictions, the realized forward returns, and optionally
the symbol of each row. See ``docs/validation.md`` for the formulas and the reasons behind the defaults.

* :func:`walk_forward` splits rows by time into :class:`Fold` s: a training window (expanding or rolling)
  followed by a test span, training rows whose target window reaches the test span purged, plus an
  embargo gap.
* :class:`TradingSpec` says how a prediction becomes a position and what trading costs;
  :func:`score` gives the :class:`Scores` of one prediction vector (IC, hit rate, net PnL, Sharpe, ...);
  :func:`evaluate` scores every fold and the concatenated out-of-sample track (an :class:`Evaluation`).
* :func:`baseline_predictions` / :func:`evaluate_baselines`: the flat, momentum and last-sign signals,
  scored the same way.
* :func:`beats` (promotion) and :func:`should_demote` (demotion) apply a :class:`PromotionRule`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

YEAR_NS: Final = 365 * 24 * 3600 * 1_000_000_000
"""Crypto markets trade every day of the year: Sharpe ratios are annualized over 365 days."""

BASELINES: Final = ("flat", "momentum", "last_sign")
"""The naive signals every candidate must beat, in report order."""


# --------------------------------------------------------------------------------------------- splits


@dataclass(frozen=True, eq=False)
class Fold:
    """One walk-forward split: row indices (ascending) to train on and to test on.

    The test span is ``[test_start_ns, test_end_ns)``; training rows have times in
    ``[train_start_ns, test_start_ns - horizon_ns - embargo_ns)``.
    """

    index: int
    train: IntArray
    test: IntArray
    train_start_ns: int
    test_start_ns: int
    test_end_ns: int


def walk_forward(
    times: npt.ArrayLike,
    *,
    horizon_ns: int,
    min_train_span_ns: int,
    n_folds: int | None = None,
    test_span_ns: int | None = None,
    embargo_ns: int = 0,
    expanding: bool = True,
) -> list[Fold]:
    """Time-ordered train/test splits of the rows stamped ``times``, purged and embargoed.

    The first test span starts ``min_train_span_ns`` after the earliest time; test spans follow each
    other without gaps up to the last time, either ``n_folds`` of equal duration or spans of
    ``test_span_ns`` (the last one cut by the end of the data): give exactly one of the two. Each fold
    trains on the rows before its test span: all of them (``expanding=True``) or those of the last
    ``min_train_span_ns`` (a rolling window). Splits are by time, so rows of several symbols stamped
    with the same instant always land on the same side; ``times`` need not be sorted.

    Purging: a training row at ``t`` is labelled with the return over ``(t, t + horizon_ns]``; rows
    whose window reaches the test span (``t + horizon_ns >= test_start_ns``) are dropped. Embargo: a
    further ``embargo_ns`` is dropped before the test span, so a training row is kept only when
    ``t + horizon_ns + embargo_ns < test_start_ns``. Training rows never follow their test span, so the
    gap goes before it (see ``docs/validation.md`` for why and when it is worth setting).

    Folds whose test span holds no rows (a gap in the data), or whose training window is empty once
    purged, are left out; their ``index`` values are skipped.

    Raises ValueError when ``times`` is not a non-empty 1-D integer array, an argument is out of range,
    or the data leaves no fold.
    """
    t = _times_array(times, "times")
    if t.size == 0:
        raise ValueError("times is empty: nothing to split")
    if n_folds is not None and test_span_ns is not None:
        raise ValueError("give exactly one of n_folds and test_span_ns, not both")
    if horizon_ns <= 0:
        raise ValueError(f"horizon_ns must be positive, not {horizon_ns}")
    if embargo_ns < 0:
        raise ValueError(f"embargo_ns must be >= 0, not {embargo_ns}")
    if min_train_span_ns <= horizon_ns + embargo_ns:
        raise ValueError(
            f"min_train_span_ns ({min_train_span_ns}) must exceed horizon_ns + embargo_ns "
            f"({horizon_ns + embargo_ns}): purging would leave the first fold nothing to train on"
        )
    first, last = int(t.min()), int(t.max())
    test_start = first + min_train_span_ns
    if last < test_start:
        raise ValueError(
            f"the data spans {last - first} ns, less than min_train_span_ns ({min_train_span_ns}): "
            "no time is left to test on"
        )
    region_ns = last + 1 - test_start
    if n_folds is not None:
        if n_folds < 1:
            raise ValueError(f"n_folds must be >= 1, not {n_folds}")
        span = -(-region_ns // n_folds)  # ceiling, so n_folds spans cover the region
        count = n_folds
    elif test_span_ns is not None:
        if test_span_ns <= 0:
            raise ValueError(f"test_span_ns must be positive, not {test_span_ns}")
        span = test_span_ns
        count = -(-region_ns // test_span_ns)
    else:
        raise ValueError("give exactly one of n_folds and test_span_ns")

    folds: list[Fold] = []
    for k in range(count):
        start = test_start + k * span
        end = start + span
        test = np.flatnonzero((t >= start) & (t < end))
        train_start = first if expanding else start - min_train_span_ns
        train = np.flatnonzero((t >= train_start) & (t < start - horizon_ns - embargo_ns))
        if test.size and train.size:
            folds.append(Fold(k, train.astype(np.int64), test.astype(np.int64), train_start, start, end))
    if not folds:
        raise ValueError("no fold has both training and test rows (the data is too sparse for the spans)")
    return folds


# -------------------------------------------------------------------------------------------- scoring


@dataclass(frozen=True, kw_only=True)
class TradingSpec:
    """How a prediction becomes a position, and what changing the position costs.

    Position of a row (per symbol, in units of notional, between -1 and 1): 0 when ``|pred| <=
    threshold``; otherwise ``sign(pred)`` (``sizing="sign"``) or ``clip(pred / scale, -1, 1)``
    (``sizing="linear"``). Each position is held for ``horizon_bars`` bars of ``bar_ns`` and earns the
    row's realized forward return; every change of position costs ``fee_bps`` of the notional traded.
    The default fee is Binance spot's base taker fee, 0.1 %.
    """

    bar_ns: int
    horizon_bars: int = 1
    fee_bps: float = 10.0
    sizing: Literal["sign", "linear"] = "sign"
    threshold: float = 0.0
    scale: float = 1.0

    def __post_init__(self) -> None:
        problems = []
        if self.bar_ns <= 0:
            problems.append(f"bar_ns must be positive, not {self.bar_ns}")
        if self.horizon_bars < 1:
            problems.append(f"horizon_bars must be >= 1, not {self.horizon_bars}")
        if not (math.isfinite(self.fee_bps) and self.fee_bps >= 0):
            problems.append(f"fee_bps must be finite and >= 0, not {self.fee_bps}")
        if self.sizing not in ("sign", "linear"):
            problems.append(f"sizing must be 'sign' or 'linear', not {self.sizing!r}")
        if not (math.isfinite(self.threshold) and self.threshold >= 0):
            problems.append(f"threshold must be finite and >= 0, not {self.threshold}")
        if not (math.isfinite(self.scale) and self.scale > 0):
            problems.append(f"scale must be finite and positive, not {self.scale}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def horizon_ns(self) -> int:
        """The holding period in ns: the ``horizon_ns`` to give :func:`walk_forward`."""
        return self.horizon_bars * self.bar_ns

    @property
    def periods_per_year(self) -> float:
        """Non-overlapping holding periods in a year, for annualizing the Sharpe ratio."""
        return YEAR_NS / self.horizon_ns

    def positions(self, pred: npt.ArrayLike) -> FloatArray:
        """The position each prediction asks for."""
        p = np.asarray(pred, dtype=np.float64)
        sized = np.sign(p) if self.sizing == "sign" else np.clip(p / self.scale, -1.0, 1.0)
        return np.where(np.abs(p) > self.threshold, sized, 0.0)


@dataclass(frozen=True, kw_only=True)
class Scores:
    """Out-of-sample scores of one prediction vector; formulas in ``docs/validation.md``.

    PnL values are sums of per-period returns in units of one symbol's notional (0.01 is 1 % of the
    notional a position of size 1 holds), summed over symbols, not compounded. With a horizon of ``h``
    bars they are those of ``h`` staggered tranches, each holding ``1/h`` of the notional, so that every
    bar's return is counted once.
    """

    n_rows: int
    ic: float
    """Spearman rank correlation of prediction and realized return (0 when either is constant)."""
    pearson: float
    """Pearson correlation of prediction and realized return (0 when either is constant)."""
    hit_rate: float
    """Share of rows where the prediction's sign is the return's, over rows where neither is 0 (NaN
    when there is no such row)."""
    gross_pnl: float
    fees: float
    net_pnl: float
    sharpe: float
    """Annualized Sharpe ratio of the per-period net PnL (0 with fewer than two periods or no variance)."""
    turnover: float
    """Mean ``|position change|`` per row, exits included."""
    exposure: float
    """Mean ``|position|`` per row."""
    n_trades: float
    """Position changes (per tranche when the horizon is more than one bar)."""


def score(
    pred: npt.ArrayLike,
    realized: npt.ArrayLike,
    *,
    times: npt.ArrayLike,
    spec: TradingSpec,
    symbols: npt.ArrayLike | None = None,
) -> Scores:
    """Scores of predictions ``pred`` against the realized forward returns ``realized``.

    Rows may be in any order; ``symbols`` (any 1-D array of labels, default: one symbol) keeps each
    symbol's positions apart. Positions start flat, and are closed (and the exit charged) at the end
    and wherever a symbol's next holding period is missing from the rows. ``times`` are expected on the
    bar grid (multiples of ``spec.bar_ns``, as the bar builder stamps them).

    Raises ValueError on arrays of different lengths, no rows, non-finite values, or two rows of one
    symbol in one bar.
    """
    p = _finite_array(pred, "pred")
    r = _finite_array(realized, "realized")
    t = _times_array(times, "times")
    sym = _symbol_codes(symbols, p.size)
    if not (p.size == r.size == t.size):
        raise ValueError(f"pred, realized and times differ in length: {p.size}, {r.size}, {t.size}")
    if p.size == 0:
        raise ValueError("no rows to score")

    h = spec.horizon_bars
    slot = t // spec.bar_ns
    order = np.lexsort((slot, sym))
    sym, slot, r_sorted = sym[order], slot[order], r[order]
    pos = spec.positions(p[order])
    same_symbol = sym[1:] == sym[:-1]
    if np.any(same_symbol & (slot[1:] == slot[:-1])):
        raise ValueError("two rows of one symbol in one bar: score one prediction per symbol and bar")

    # A horizon of h bars makes consecutive rows' holding periods overlap. The row of bar number b
    # belongs to tranche b mod h; each tranche rebalances every h bars, so its periods do not overlap,
    # and the reported PnL is the mean over the h tranches: each bar's return is earned once, and every
    # prediction is used.
    tranche = slot % h
    gross_total = fees_total = trades_total = turnover_total = 0.0
    sharpes: list[float] = []
    fee_rate = spec.fee_bps / 1e4
    for k in range(h):
        rows = np.flatnonzero(tranche == k)  # stays sorted by (symbol, slot)
        if rows.size == 0:
            continue
        s, sl, q, ret = sym[rows], slot[rows], pos[rows], r_sorted[rows]
        held_on = (s[1:] == s[:-1]) & (sl[1:] - sl[:-1] == h)  # next period follows without a gap
        previous = np.zeros_like(q)
        previous[1:] = np.where(held_on, q[:-1], 0.0)
        closes = np.ones(q.size, dtype=bool)
        closes[:-1] = ~held_on
        exit_size = np.where(closes, np.abs(q), 0.0)
        traded = np.abs(q - previous) + exit_size
        gross = q * ret
        net = gross - fee_rate * traded
        gross_total += float(gross.sum())
        fees_total += fee_rate * float(traded.sum())
        turnover_total += float(traded.sum())
        trades_total += float(np.count_nonzero(q != previous) + np.count_nonzero(exit_size))
        # The tranche's periods are the slots k, k + h, k + 2h, ...: numbered without sorting, summed over
        # symbols, periods without rows left out.
        which = (sl - sl.min()) // h
        per_period = np.bincount(which, weights=net)[np.bincount(which) > 0]
        sharpes.append(_sharpe(np.asarray(per_period, np.float64), spec.periods_per_year))

    return Scores(
        n_rows=int(p.size),
        ic=spearman(p, r),
        pearson=pearson(p, r),
        hit_rate=hit_rate(p, r),
        gross_pnl=gross_total / h,
        fees=fees_total / h,
        net_pnl=(gross_total - fees_total) / h,
        sharpe=float(np.mean(sharpes)),
        turnover=turnover_total / p.size,
        exposure=float(np.mean(np.abs(pos))),
        n_trades=trades_total / h,
    )


def spearman(x: npt.ArrayLike, y: npt.ArrayLike) -> float:
    """Spearman rank correlation: Pearson correlation of the ranks, ties given their average rank."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.size < 2 or np.ptp(a) == 0.0 or np.ptp(b) == 0.0:
        return 0.0  # as pearson() says for a constant side, without ranking it first
    return pearson(_average_ranks(a), _average_ranks(b))


def pearson(x: npt.ArrayLike, y: npt.ArrayLike) -> float:
    """Pearson correlation; 0 when either side is constant (a constant signal carries no ranking)."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    # Tested on the values, not on the variance: a constant series minus its rounded mean leaves
    # rounding noise whose "correlation" could be anything.
    if a.size < 2 or np.ptp(a) == 0.0 or np.ptp(b) == 0.0:
        return 0.0
    a, b = a - a.mean(), b - b.mean()
    return float(np.clip(float(a @ b) / math.sqrt(float(a @ a) * float(b @ b)), -1.0, 1.0))


def hit_rate(pred: npt.ArrayLike, realized: npt.ArrayLike) -> float:
    """Share of sign agreement over rows where neither prediction nor return is 0; NaN if none.

    Returns of exactly 0 are common on 1-second bars; counting them as misses would push every model's
    hit rate below one half and hide the coin-flip reference.
    """
    sp, sr = np.sign(np.asarray(pred, dtype=np.float64)), np.sign(np.asarray(realized, dtype=np.float64))
    called = (sp != 0) & (sr != 0)
    if not np.any(called):
        return math.nan
    return float(np.mean(sp[called] == sr[called]))


def _sharpe(per_period: FloatArray, periods_per_year: float) -> float:
    if per_period.size < 2 or np.ptp(per_period) == 0.0:
        return 0.0
    return float(np.mean(per_period) / np.std(per_period, ddof=1)) * math.sqrt(periods_per_year)


def _average_ranks(x: FloatArray) -> FloatArray:
    order = np.argsort(x)  # tied values share their average rank, so the order among them is irrelevant
    ordered = x[order]
    starts_group = np.ones(x.size, dtype=bool)
    starts_group[1:] = ordered[1:] != ordered[:-1]
    group = np.cumsum(starts_group) - 1
    starts = np.flatnonzero(starts_group)
    ends = np.append(starts[1:], x.size)
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = ((starts + ends + 1) / 2.0)[group]  # mean of the 1-based ranks start+1 .. end
    return ranks


# ---------------------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class Evaluation:
    """Scores of one signal on each fold's test rows, and on all test rows together (``overall``).

    ``overall`` scores the concatenated out-of-sample track (positions carry over from one test span to
    the next, which follow each other in time). ``spans`` are the folds' ``(test_start_ns, test_end_ns)``,
    to check that two evaluations were made on the same folds.
    """

    folds: tuple[Scores, ...]
    overall: Scores
    spans: tuple[tuple[int, int], ...]

    @property
    def fold_ics(self) -> FloatArray:
        """The information coefficient of each fold."""
        return np.array([s.ic for s in self.folds], dtype=np.float64)

    @property
    def ic_t_stat(self) -> float:
        """``mean / (sd / sqrt(n))`` of the per-fold ICs (NaN with fewer than two folds).

        Folds are separated by the purge, so their ICs are close to independent, unlike the rows inside a
        fold whose overlapping returns would overstate a t-statistic computed row by row.
        """
        ics = self.fold_ics
        if ics.size < 2:
            return math.nan
        mean, sd = float(ics.mean()), float(ics.std(ddof=1))
        if sd == 0.0:
            return 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
        return mean / (sd / math.sqrt(ics.size))


def evaluate(
    pred: npt.ArrayLike,
    realized: npt.ArrayLike,
    folds: Sequence[Fold],
    *,
    times: npt.ArrayLike,
    spec: TradingSpec,
    symbols: npt.ArrayLike | None = None,
) -> Evaluation:
    """Score ``pred`` on every fold's test rows and on all of them together.

    The arrays cover every row the folds index (``pred[fold.test]`` are the predictions of the model
    trained on ``fold.train``); values outside the test rows are ignored and may be NaN.

    Raises ValueError when there are no folds, when the arrays differ in length, when folds' test rows
    overlap, or on what :func:`score` refuses.
    """
    if not folds:
        raise ValueError("no folds to evaluate")
    p = np.asarray(pred, dtype=np.float64)
    r = np.asarray(realized, dtype=np.float64)
    t = _times_array(times, "times")
    sym = None if symbols is None else np.asarray(symbols)
    if not (p.shape == r.shape == t.shape) or (sym is not None and sym.shape != t.shape):
        raise ValueError("pred, realized, times and symbols must have one value per row")
    everything = np.concatenate([f.test for f in folds])
    if np.any(np.bincount(everything, minlength=p.size) > 1):
        raise ValueError("folds' test rows overlap: an out-of-sample track must count each row once")

    def on(rows: IntArray) -> Scores:
        return score(p[rows], r[rows], times=t[rows], spec=spec, symbols=None if sym is None else sym[rows])

    return Evaluation(
        folds=tuple(on(f.test) for f in folds),
        overall=on(everything),
        spans=tuple((f.test_start_ns, f.test_end_ns) for f in folds),
    )


def baseline_predictions(past_return: npt.ArrayLike, last_return: npt.ArrayLike) -> dict[str, FloatArray]:
    """The naive signals, by name: ``flat`` (0), ``momentum`` and ``last_sign``.

    ``past_return`` is each row's return over the past ``horizon`` bars (up to and including the row's
    bar), ``last_return`` its last bar's return; both come from the features. Momentum bets that the past
    horizon's move continues, last-sign that the last bar's does. Where a return is undefined (NaN, at the
    start of a series) the signal is 0.
    """
    past = np.asarray(past_return, dtype=np.float64)
    last = np.asarray(last_return, dtype=np.float64)
    if past.shape != last.shape or past.ndim != 1:
        raise ValueError(f"past_return and last_return must be 1-D of one length: {past.shape}, {last.shape}")
    return {
        "flat": np.zeros_like(past),
        "momentum": np.where(np.isfinite(past), np.sign(past), 0.0),
        "last_sign": np.where(np.isfinite(last), np.sign(last), 0.0),
    }


def evaluate_baselines(
    past_return: npt.ArrayLike,
    last_return: npt.ArrayLike,
    realized: npt.ArrayLike,
    folds: Sequence[Fold],
    *,
    times: npt.ArrayLike,
    spec: TradingSpec,
    symbols: npt.ArrayLike | None = None,
) -> dict[str, Evaluation]:
    """:func:`evaluate` each of :func:`baseline_predictions` on the same folds, with the same costs."""
    return {
        name: evaluate(signal, realized, folds, times=times, spec=spec, symbols=symbols)
        for name, signal in baseline_predictions(past_return, last_return).items()
    }


# ------------------------------------------------------------------------------ promotion and demotion


@dataclass(frozen=True, kw_only=True)
class PromotionRule:
    """Thresholds of :func:`beats` (promotion) and :func:`should_demote` (demotion).

    Promotion asks for evidence (a significant IC, net PnL above every baseline's and above zero);
    keeping a champion asks only that it still earns and still ranks returns the right way round. The
    gap between the two is a hysteresis: a model near the bar is not promoted and demoted every cycle.
    """

    min_folds: int = 3
    """Fewer folds than this and the IC t-statistic means little: no promotion."""
    min_ic: float = 0.01
    """Overall out-of-sample Spearman IC must reach this."""
    min_ic_t_stat: float = 3.0
    """The per-fold ICs' t-statistic must reach this: with 5 folds a one-sided test at about 2 %, strict
    because five models are retrained every cycle and each retrain is another chance of a fluke."""
    min_net_pnl: float = 0.0
    """Overall net PnL must exceed this, and also every baseline's and the champion's."""
    keep_min_ic: float = 0.0
    """A champion whose recent overall IC is at or below this is demoted."""
    keep_min_net_pnl: float = 0.0
    """A champion whose recent net PnL is at or below this is demoted."""

    def __post_init__(self) -> None:
        if self.min_folds < 2:
            raise ValueError(f"min_folds must be >= 2 (a t-statistic needs two folds), not {self.min_folds}")
        if self.min_ic <= 0:
            raise ValueError(f"min_ic must be positive (promotion needs a positive IC), not {self.min_ic}")
        if self.keep_min_ic > self.min_ic or self.keep_min_net_pnl > self.min_net_pnl:
            raise ValueError("the keep thresholds must not be stricter than the promotion thresholds")


DEFAULT_RULE: Final = PromotionRule()


@dataclass(frozen=True)
class Decision:
    """Whether a candidate is promoted, and every check behind it (``"pass: ..."`` / ``"fail: ..."``)."""

    promote: bool
    reasons: list[str]


@dataclass(frozen=True)
class Demotion:
    """Whether a champion is demoted, and every check behind it (``"pass: ..."`` / ``"fail: ..."``)."""

    demote: bool
    reasons: list[str]


def beats(
    candidate: Evaluation,
    baselines: Mapping[str, Evaluation],
    champion: Evaluation | None = None,
    *,
    rule: PromotionRule = DEFAULT_RULE,
) -> Decision:
    """The promotion rule: promote ``candidate`` only if every check passes.

    1. at least ``rule.min_folds`` folds;
    2. overall IC >= ``rule.min_ic`` and the per-fold IC t-statistic >= ``rule.min_ic_t_stat``;
    3. overall net PnL > ``rule.min_net_pnl`` and > every baseline's net PnL;
    4. with a ``champion``: net PnL > the champion's.

    Every evaluation must be on the same folds as the candidate's.

    Raises ValueError when no baselines are given or an evaluation was made on other folds.
    """
    if not baselines:
        raise ValueError("a candidate is only promoted against the baselines: none were given")
    others = {f"baseline {name}": e for name, e in baselines.items()}
    if champion is not None:
        others["champion"] = champion
    for name, other in others.items():
        if other.spans != candidate.spans:
            raise ValueError(f"{name} was evaluated on other folds than the candidate")

    checks: list[tuple[bool, str]] = []
    n = len(candidate.folds)
    checks.append((n >= rule.min_folds, f"{n} folds (need >= {rule.min_folds})"))
    ic, t_stat = candidate.overall.ic, candidate.ic_t_stat
    checks.append((ic >= rule.min_ic, f"IC {ic:.4f} (need >= {rule.min_ic})"))
    checks.append((t_stat >= rule.min_ic_t_stat, f"IC t-stat {t_stat:.2f} (need >= {rule.min_ic_t_stat})"))
    pnl = candidate.overall.net_pnl
    checks.append((pnl > rule.min_net_pnl, f"net PnL {pnl:.6f} (need > {rule.min_net_pnl})"))
    for name, other in others.items():
        theirs = other.overall.net_pnl
        checks.append((pnl > theirs, f"net PnL {pnl:.6f} vs {name} {theirs:.6f} (need more)"))
    return Decision(promote=all(ok for ok, _ in checks), reasons=_reasons(checks))


def should_demote(recent: Evaluation, *, rule: PromotionRule = DEFAULT_RULE) -> Demotion:
    """The demotion rule: demote a champion whose recent out-of-sample scores no longer hold up.

    ``recent`` scores the champion on data after its training window (one fold is enough). It is
    demoted when its overall IC <= ``rule.keep_min_ic`` or its net PnL <= ``rule.keep_min_net_pnl``.
    """
    ic, pnl = recent.overall.ic, recent.overall.net_pnl
    checks = [
        (ic > rule.keep_min_ic, f"recent IC {ic:.4f} (need > {rule.keep_min_ic})"),
        (pnl > rule.keep_min_net_pnl, f"recent net PnL {pnl:.6f} (need > {rule.keep_min_net_pnl})"),
    ]
    return Demotion(demote=not all(ok for ok, _ in checks), reasons=_reasons(checks))


def _reasons(checks: list[tuple[bool, str]]) -> list[str]:
    return [f"{'pass' if ok else 'fail'}: {text}" for ok, text in checks]


# ---------------------------------------------------------------------------------------- validation


def _times_array(values: npt.ArrayLike, name: str) -> IntArray:
    a = np.asarray(values)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, not of shape {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must be integer nanoseconds, not {a.dtype}")
    return a.astype(np.int64, copy=False)


def _finite_array(values: npt.ArrayLike, name: str) -> FloatArray:
    a = np.asarray(values, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, not of shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} has {int(np.count_nonzero(~np.isfinite(a)))} non-finite values")
    return a


def _symbol_codes(symbols: npt.ArrayLike | None, n: int) -> IntArray:
    if symbols is None:
        return np.zeros(n, dtype=np.int64)
    labels = np.asarray(symbols)
    if labels.shape != (n,):
        raise ValueError(f"symbols must be 1-D with one label per row ({n}), not of shape {labels.shape}")
    return np.unique(labels, return_inverse=True)[1].astype(np.int64)
