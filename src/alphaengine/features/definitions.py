"""The feature definitions: polars expressions over one series of grid bars, written once.

Each :class:`Feature` is a polars expression over the columns of :data:`~alphaengine.features.grid.
GRID_SCHEMA` of one series in time order (and over columns defined before it: shared intermediates such
as the 1-bar log return are computed once), and its ``lookback``: the number of bars up to and including
the current one that its value depends on. Batch mode evaluates the expressions over whole series;
streaming mode evaluates the same expressions over each series' new bars and the ``max_lookback - 1``
bars before them, and keeps the new rows. The expressions use finite windows only (shifts and
fixed-length rolling windows, no exponential smoothing or cumulative sums), so the two agree; a feature
with less than ``lookback`` bars of history is null. A test checks that every declared lookback is exact.

Undefined values: a zero denominator gives the value stated for each feature below (its natural value when
there is one, e.g. RSI 50 when the price did not move) or null; any other non-finite result is null.

The formulas are listed in ``docs/features.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated

import msgspec
import polars as pl

_Window = Annotated[int, msgspec.Meta(ge=1, le=100_000)]


class FeatureParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The windows of the core feature set, in bars (intervals of time, see the grid rule)."""

    return_horizons: tuple[_Window, ...] = (1, 5, 15, 60)
    """Log returns over these horizons: ``ret_{h}``."""
    vol_windows: tuple[_Window, ...] = (15, 60, 240)
    """Realized volatility over these windows (``rv_{w}``); ``vol_ratio`` divides the first by the last."""
    rsi_window: _Window = 14
    vwap_windows: tuple[_Window, ...] = (15, 60)
    """Close versus rolling VWAP, z-scored: ``vwap_z_{w}``."""
    imbalance_windows: tuple[_Window, ...] = (15, 60)
    """Buy/sell imbalance over these windows (``imbalance_{w}``), besides the bar's own ``imbalance_1``."""
    surge_windows: tuple[tuple[_Window, _Window], ...] = ((1, 60), (15, 240))
    """Trade-count surges: mean count over the short window against the long one, ``trade_surge_{s}_{l}``."""
    atr_window: _Window = 14
    stoch_window: _Window = 60
    volume_z_window: _Window = 60
    momentum_z_windows: tuple[_Window, ...] = (60,)
    """Return over ``w`` bars in units of its expected size ``rv_w * sqrt(w)``: ``momentum_z_{w}``."""
    order_flow: bool = True
    """False leaves out the features that need the buy/sell split and trade counts (the imbalances and
    trade-count surges): candle data has neither, and those features would be null on every row."""


@dataclass(frozen=True, slots=True, eq=False)
class Feature:
    """One column of a feature set.

    ``expr`` is a polars expression over one series in time order; it may refer to the bar columns and to
    columns defined before it in the set. ``lookback`` is the number of bars, current bar included, that
    its value depends on (through the columns it refers to as well). ``output`` False marks a shared
    intermediate (its name starts with ``_``) that other columns use and that is not returned.
    """

    name: str
    expr: pl.Expr
    lookback: int
    doc: str
    output: bool = True


_close = pl.col("close")
_high = pl.col("high")
_low = pl.col("low")
_volume = pl.col("volume")
_r1 = pl.col("_r1")


def log_return(horizon: int) -> pl.Expr:
    """``log(close[t] / close[t - horizon])``; lookback ``horizon + 1``."""
    return (_close / _close.shift(horizon)).log()


def _rv_name(window: int, params: FeatureParams) -> str:
    return f"rv_{window}" if window in params.vol_windows else f"_rv_{window}"


def _realized_vol(window: int) -> pl.Expr:
    # Exactly zero when every return in the window is zero: a rolling sum keeps rounding residue of
    # values that left the window, so the exact rolling maximum decides, the same way in both modes.
    still = _r1.abs().rolling_max(window) == 0
    return pl.when(still).then(0.0).otherwise(_r1.pow(2).rolling_mean(window).clip(lower_bound=0.0).sqrt())


def _flow_ratio(window: int) -> pl.Expr:
    """``sum(buy - sell) / sum(volume)`` over ``window`` bars; 0 without volume, null without the split."""
    flow = pl.col("_flow")
    if window == 1:
        flow_sum, volume_sum, no_volume = flow, _volume, _volume == 0
    else:
        flow_sum = flow.rolling_sum(window)
        volume_sum = _volume.rolling_sum(window)
        no_volume = _volume.rolling_max(window) == 0
    return pl.when(flow_sum.is_not_null() & no_volume).then(0.0).otherwise(flow_sum / volume_sum)


def _rsi(window: int) -> pl.Expr:
    change = pl.col("_change")
    gain = change.clip(lower_bound=0.0).rolling_mean(window)
    loss = (-change).clip(lower_bound=0.0).rolling_mean(window)
    still = change.abs().rolling_max(window) == 0
    return pl.when(still).then(50.0).otherwise(100.0 * gain / (gain + loss))


def _vwap_z(window: int, rv: pl.Expr) -> pl.Expr:
    vwap = pl.col("quote_volume").rolling_sum(window) / _volume.rolling_sum(window)
    no_volume = _volume.rolling_max(window) == 0
    return (
        pl.when(no_volume | (rv == 0)).then(None).otherwise((_close / vwap).log() / (rv * math.sqrt(window)))
    )


def _trade_surge(short: int, long: int) -> pl.Expr:
    count = pl.col("_count")
    short_mean = count if short == 1 else count.rolling_mean(short)
    return short_mean.log1p() - count.rolling_mean(long).log1p()


def _true_range() -> pl.Expr:
    previous = _close.shift(1)
    # when(null comparison) takes the otherwise branch, so the first bar of a series has a null range.
    top = pl.when(_high > previous).then(_high).otherwise(previous)
    bottom = pl.when(_low < previous).then(_low).otherwise(previous)
    return (top / bottom).log()


def _stochastic(window: int) -> pl.Expr:
    lowest = _low.rolling_min(window)
    span = _high.rolling_max(window) - lowest
    return pl.when(span == 0).then(0.5).otherwise((_close - lowest) / span)


def _volume_z(window: int) -> pl.Expr:
    level = pl.col("_log_quote")
    flat = level.rolling_max(window) == level.rolling_min(window)
    return pl.when(flat).then(0.0).otherwise((level - level.rolling_mean(window)) / level.rolling_std(window))


def _order_flow_features(p: FeatureParams) -> list[Feature]:
    out = [
        Feature("_flow", pl.col("buy_volume") - pl.col("sell_volume"), 1, "buy - sell volume", output=False),
        Feature("_count", pl.col("trade_count").cast(pl.Float64), 1, "trade count", output=False),
    ]
    out += [
        Feature(
            f"imbalance_{w}",
            _flow_ratio(w),
            w,
            f"sum(buy - sell) / sum(volume) over {w} bar(s); 0 without volume, null without a buy/sell split",
        )
        for w in (1, *p.imbalance_windows)
    ]
    out += [
        Feature(
            f"trade_surge_{short}_{long}",
            _trade_surge(short, long),
            max(short, long),
            f"log(1 + mean trade count over {short} bar(s)) - log(1 + mean trade count over {long} bars)",
        )
        for short, long in p.surge_windows
    ]
    return out


def core_features(params: FeatureParams) -> list[Feature]:
    """The columns of the core feature set for ``params``: shared intermediates, then the features.

    About twenty output features with the default parameters, in column order.
    """
    p = params
    out = [
        Feature("_r1", log_return(1), 2, "1-bar log return", output=False),
        Feature("_change", _close.diff(), 2, "close change", output=False),
        Feature("_log_quote", pl.col("quote_volume").log1p(), 1, "log(1 + quote volume)", output=False),
        Feature("_tr", _true_range(), 2, "log true range", output=False),
    ]
    out += [
        Feature(f"ret_{h}", _r1 if h == 1 else log_return(h), h + 1, f"log(close / close {h} bar(s) back)")
        for h in p.return_horizons
    ]
    rv_windows = dict.fromkeys([*p.vol_windows, *p.vwap_windows, *p.momentum_z_windows])
    out += [
        Feature(
            _rv_name(w, p),
            _realized_vol(w),
            w + 1,
            f"root mean square of the 1-bar log returns over {w} bars; 0 when the close did not move",
            output=w in p.vol_windows,
        )
        for w in rv_windows
    ]
    if len(p.vol_windows) > 1:
        short, long = p.vol_windows[0], p.vol_windows[-1]
        rv_short, rv_long = pl.col(_rv_name(short, p)), pl.col(_rv_name(long, p))
        out.append(
            Feature(
                f"vol_ratio_{short}_{long}",
                pl.when(rv_long == 0).then(None).otherwise(rv_short / rv_long),
                max(short, long) + 1,
                f"rv_{short} / rv_{long}; null when rv_{long} is 0",
            )
        )
    w = p.rsi_window
    out.append(
        Feature(
            f"rsi_{w}",
            _rsi(w),
            w + 1,
            f"100 * mean gain / (mean gain + mean loss) of the close changes over {w} bars (simple means); "
            "50 when the close did not move",
        )
    )
    out += [
        Feature(
            f"vwap_z_{w}",
            _vwap_z(w, pl.col(_rv_name(w, p))),
            w + 1,
            f"log(close / VWAP of {w} bars) / (rv_{w} * sqrt({w})); null without volume or movement",
        )
        for w in p.vwap_windows
    ]
    if p.order_flow:
        out += _order_flow_features(p)
    out.append(Feature("hl_range", (_high / _low).log(), 1, "log(high / low) of the bar"))
    w = p.atr_window
    out.append(
        Feature(
            f"atr_{w}",
            pl.col("_tr").rolling_mean(w),
            w + 1,
            f"mean over {w} bars of the log true range log(max(high, prev close) / min(low, prev close))",
        )
    )
    w = p.stoch_window
    out.append(
        Feature(
            f"stoch_{w}",
            _stochastic(w),
            w,
            f"(close - lowest low) / (highest high - lowest low) over {w} bars; 0.5 when flat",
        )
    )
    w = p.volume_z_window
    out.append(
        Feature(
            f"volume_z_{w}",
            _volume_z(w),
            w,
            f"z-score of log(1 + quote volume) over {w} bars (sample sd); 0 when all equal",
        )
    )
    for w in p.momentum_z_windows:
        rv = pl.col(_rv_name(w, p))
        out.append(
            Feature(
                f"momentum_z_{w}",
                pl.when(rv == 0).then(0.0).otherwise(log_return(w) / (rv * math.sqrt(w))),
                w + 1,
                f"log(close / close {w} bars back) / (rv_{w} * sqrt({w})); 0 when the close did not move",
            )
        )
    return out
