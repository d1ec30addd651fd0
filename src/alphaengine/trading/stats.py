"""Performance statistics of an equity curve, with the conventions of empyrical (Quantopian's library).

The ratios are computed from simple period returns ``r`` exactly as empyrical computes them, so that the
two agree on the same series (the tests hold them to each other):

- annual return: compounded, ``prod(1 + r) ** (periods_per_year / n) - 1``;
- annual volatility: ``std(r, ddof=1) * sqrt(periods_per_year)``;
- Sharpe: ``mean(r) / std(r, ddof=1) * sqrt(periods_per_year)`` (no risk-free rate);
- Sortino: ``mean(r) * periods_per_year / (sqrt(mean(min(r, 0) ** 2)) * sqrt(periods_per_year))``;
- max drawdown: the deepest fall of the compounded curve below its running peak, as a negative
  fraction, with the curve starting after the first return, as empyrical's does.

The trading figures come from the fills and the equity curve: hit rate is the share of closing fills
that realized a profit (of those that realized anything), turnover the notional traded per day as a
multiple of the mean equity, exposure the mean gross exposure as a fraction of equity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

DAY_S = 86_400
YEAR_S = 365 * DAY_S
"""Crypto trades every day of the year."""


def simple_returns(equity: npt.ArrayLike) -> FloatArray:
    """Period returns of an equity curve: ``equity[i] / equity[i - 1] - 1``."""
    e = np.asarray(equity, dtype=np.float64)
    if len(e) < 2:
        return np.empty(0, dtype=np.float64)
    return e[1:] / e[:-1] - 1.0


def annual_return(returns: FloatArray, periods_per_year: float) -> float:
    """Compounded annual growth rate (NaN without returns)."""
    if not len(returns):
        return math.nan
    growth = float(np.prod(1.0 + returns))
    return float(growth ** (periods_per_year / len(returns))) - 1.0


def annual_volatility(returns: FloatArray, periods_per_year: float) -> float:
    """Standard deviation of the returns (ddof 1), annualized (NaN with fewer than two)."""
    if len(returns) < 2:
        return math.nan
    return float(np.std(returns, ddof=1)) * math.sqrt(periods_per_year)


def sharpe_ratio(returns: FloatArray, periods_per_year: float) -> float:
    """Annualized Sharpe ratio (NaN with fewer than two returns; inf or NaN without variance)."""
    if len(returns) < 2:
        return math.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.mean(returns) / np.std(returns, ddof=1) * math.sqrt(periods_per_year))


def sortino_ratio(returns: FloatArray, periods_per_year: float) -> float:
    """Annualized Sortino ratio against a required return of 0 (NaN with fewer than two returns)."""
    if len(returns) < 2:
        return math.nan
    downside = math.sqrt(float(np.mean(np.square(np.minimum(returns, 0.0))))) * math.sqrt(periods_per_year)
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.divide(np.mean(returns) * periods_per_year, downside))


def max_drawdown(returns: FloatArray) -> float:
    """Deepest fall below the running peak of the compounded returns, as a negative fraction."""
    if not len(returns):
        return math.nan
    curve = np.cumprod(1.0 + returns)
    peak = np.maximum.accumulate(curve)
    return float(np.min((curve - peak) / peak))


@dataclass(frozen=True, slots=True)
class Performance:
    """The summary figures of a run."""

    periods: int
    period_s: float
    total_return: float
    annual_return: float
    annual_volatility: float
    sharpe: float
    sortino: float
    max_drawdown: float
    hit_rate: float
    """Share of the fills that realized PnL whose PnL was positive (NaN when none did)."""
    turnover: float
    """Notional traded per day over the mean equity."""
    exposure: float
    """Mean gross exposure over equity."""
    fills: int
    fees_usd: float


def performance(
    equity_usd: npt.ArrayLike,
    gross_exposure_usd: npt.ArrayLike,
    period_s: float,
    *,
    realized_per_fill_usd: npt.ArrayLike,
    traded_usd: float,
    fees_usd: float,
) -> Performance:
    """The figures of an equity curve sampled every ``period_s`` and the fills behind it."""
    equity = np.asarray(equity_usd, dtype=np.float64)
    gross = np.asarray(gross_exposure_usd, dtype=np.float64)
    r = simple_returns(equity)
    per_year = YEAR_S / period_s
    realized = np.asarray(realized_per_fill_usd, dtype=np.float64)
    closing = realized[realized != 0.0]
    days = max(len(equity) - 1, 1) * period_s / DAY_S
    mean_equity = float(np.mean(equity)) if len(equity) else math.nan
    return Performance(
        periods=len(r),
        period_s=period_s,
        total_return=float(equity[-1] / equity[0] - 1.0) if len(equity) else math.nan,
        annual_return=annual_return(r, per_year),
        annual_volatility=annual_volatility(r, per_year),
        sharpe=sharpe_ratio(r, per_year),
        sortino=sortino_ratio(r, per_year),
        max_drawdown=max_drawdown(r),
        hit_rate=float(np.mean(closing > 0)) if len(closing) else math.nan,
        turnover=traded_usd / days / mean_equity if len(equity) else math.nan,
        exposure=float(np.mean(gross / equity)) if len(equity) else math.nan,
        fills=len(realized),
        fees_usd=fees_usd,
    )
