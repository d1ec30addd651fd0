"""A synthetic market: realistic trades for any number of symbols, generated in vectorised blocks.

The model (per symbol, on a grid of ``step_ms`` steps; every latent process is an Ornstein-Uhlenbeck
process with the stated time constant and stationary standard deviation, simulated exactly on the grid):

* **Stochastic volatility.** Log-volatility ``h`` is OU (time constant 30 min, sd 0.35); the diffusion
  volatility is ``sigma * exp(h - 0.35**2)``, so its mean square equals ``sigma**2`` (``sigma`` is the
  symbol's annual volatility, e.g. 50 % for BTC, on a 365-day year, less the share carried by jumps).
* **Jumps.** Compound Poisson: one jump per 20 minutes on average, normally distributed log sizes with
  mean zero, carrying 15 % of the return variance; a jump moves the price at the next trade.
* **Clustered trade arrivals.** A log-Gaussian Cox process: the intensity of symbol *i* is
  ``rate_per_s * w_i / sum(w) * exp(k * (g + h) - c)``, where ``w_i`` is the symbol's activity weight
  (BTC 0.35, ETH 0.25, SOL and XRP 0.15, ADA 0.10, others 0.10), ``g`` is a fast burst component (OU,
  2 s, sd 0.6), the ``h`` term makes volatile periods busy ones, ``k`` is ``clustering`` (1 by default,
  0 for a constant rate) and the constant ``c`` makes the mean rate exactly ``rate_per_s``. Arrival
  counts per step are Poisson given the intensity and times are uniform within a step, so counts
  cluster in time (their autocorrelation is positive from seconds to hours). ``h`` starts at the level
  where ``exp(h)`` has its long-run mean, so a short run sees ``rate_per_s`` too.
* **Prices** follow the log price: each trade moves it by ``vol * sqrt(dt) * z`` (``dt`` the time since
  the previous trade of the symbol, ``z`` standard normal) plus the jumps and the drift below. Trades
  print at the price rounded to about 1e-6 of the starting level (0.01 for BTC at 95,000).
* **Heavy-tailed sizes.** The notional is the symbol's median notional (150 USD for BTC, ...) times a
  mixture: 90 % log-normal (log sd 1.0), 10 % Pareto from twice the median with tail index 1.5 (infinite
  variance, as measured on real trade sizes; capped at 10,000 times the median). The quantity is the
  notional over the price, rounded to a lot worth 0.1 to 1 USD at the start (0.00001 BTC, 0.1 XRP).
* **Aggressor side correlated with the move.** A trade is a buy when ``z + e + tilt > 0``, with ``e``
  standard normal noise: buys come with up-moves (correlation of side and ``z`` about 0.56).
* **Receive times** are the trade time plus a log-normal latency with median ``latency_ms`` (kept in
  order per symbol, as on one connection).

**Predictability** (``predictability = rho``, off by default). A slow latent factor ``f`` per symbol (OU,
10 min, sd 1) sets the drift of the log price to ``k * vol_total * f`` per second, with
``k = rho / (sqrt(1 - rho**2) * sqrt(60))``: the correlation between ``f`` and the log return over the
next 60 s is then ``rho`` (for constant volatility and ``f`` constant over the minute). ``f`` is not
published, but it shows in observable past features: it drove the returns of the last minutes (the
factor decorrelates over 10 minutes, so a 60 s return predicts the next 60 s return with a correlation
of about ``0.9 * rho**2``) and it tilts order flow (``tilt = rho * f``, so the buy/sell imbalance leans
with the factor). With ``rho = 0`` the drift and tilt vanish and the log price is a martingale: no
function of the past predicts the expected next return, which is zero.

Trade ids are strictly increasing per symbol and need no state across restarts: ``id_i = max(id_{i-1} + 1,
trade time in microseconds)`` (a cumulative maximum), so a restarted source starts above every id it
issued before as long as a symbol averages under a million trades per second.

:class:`SyntheticMarket` is the generator on its own (deterministic given the seed, the start time and
the sequence of ``generate`` calls); :class:`SyntheticSource` runs it against the injected clock, emitting
each step once the clock has passed it and catching up with bigger blocks when the loop fell behind.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from typing import Annotated, Any, ClassVar, Final

import msgspec
import numpy as np
import numpy.typing as npt
import pyarrow as pa

from alphaengine.domain import SIDE_BUY, SIDE_SELL, TICK_SCHEMA, TickBatch
from alphaengine.kernel.module import Context, ModuleSettings
from alphaengine.sources.base import SourceSettings, TickSource

VENUE: Final = "SYNTH"

_SECONDS_PER_YEAR: Final = 365.0 * 86_400.0
_VOL_TAU_S: Final = 1_800.0
_VOL_SD: Final = 0.35
_BURST_TAU_S: Final = 2.0
_BURST_SD: Final = 0.6
_FACTOR_TAU_S: Final = 600.0
_HORIZON_S: Final = 60.0
_JUMPS_PER_S: Final = 1.0 / 1_200.0
_JUMP_VARIANCE_SHARE: Final = 0.15
_PARETO_SHARE: Final = 0.10
_PARETO_TAIL: Final = 1.5
_LOGNORMAL_SD: Final = 1.0
_MAX_SIZE_MULTIPLE: Final = 10_000.0
_LATENCY_SD: Final = 0.5
_MAX_CATCH_UP_S: Final = 1.0
"""A block covers at most this much simulated time; a loop further behind catches up block by block."""


@dataclass(frozen=True, slots=True)
class SymbolProfile:
    """How one symbol trades: start price, share of activity, annual volatility, median notional."""

    price: float
    weight: float
    annual_vol: float
    median_notional_usd: float


KNOWN_SYMBOLS: Final[dict[str, SymbolProfile]] = {
    "BTCUSDT": SymbolProfile(95_000.0, 0.35, 0.50, 150.0),
    "ETHUSDT": SymbolProfile(3_400.0, 0.25, 0.65, 100.0),
    "SOLUSDT": SymbolProfile(180.0, 0.15, 0.85, 60.0),
    "ADAUSDT": SymbolProfile(0.9, 0.10, 0.85, 40.0),
    "XRPUSDT": SymbolProfile(2.2, 0.15, 0.85, 50.0),
}
"""Built-in profiles; any other symbol trades like :data:`OTHER_SYMBOL` at ``default_price``."""

OTHER_SYMBOL: Final = SymbolProfile(100.0, 0.10, 0.80, 50.0)
"""The profile of a symbol not in :data:`KNOWN_SYMBOLS`; its price becomes ``default_price``."""

_Positive = Annotated[float, msgspec.Meta(gt=0)]


class SyntheticSettings(SourceSettings, frozen=True):
    """Settings of the synthetic market (the model is described in :mod:`alphaengine.sources.synthetic`)."""

    symbols: Annotated[tuple[str, ...], msgspec.Meta(min_length=1)] = tuple(KNOWN_SYMBOLS)
    """Symbols to simulate; the built-in ones trade at realistic levels, others at ``default_price``."""
    rate_per_s: _Positive = 1_000.0
    """Mean trades per second over all symbols. The rate clusters around it: the realised rate of a
    minute is spread about 10 % around it, that of ten seconds about 15 % (see ``clustering``)."""
    clustering: Annotated[float, msgspec.Meta(ge=0.0, le=2.0)] = 1.0
    """Scales how much the trade rate varies (bursts and busy volatile periods); 0 gives Poisson arrivals
    at a constant ``rate_per_s`` (load tests that need an exact rate)."""
    seed: int | None = None
    """Seed of the generator: the same seed and clock give the same ticks. None draws one (logged)."""
    max_ticks: Annotated[int, msgspec.Meta(gt=0)] | None = None
    """Stop after emitting this many ticks (the source then reports finished); None runs until stopped."""
    predictability: Annotated[float, msgspec.Meta(ge=0.0, lt=1.0)] = 0.0
    """Planted predictable component: correlation of a latent factor with the next 60 s return."""
    default_price: _Positive = 100.0
    """Start price of a symbol without a built-in profile or an entry in ``prices``."""
    prices: dict[str, _Positive] = msgspec.field(default_factory=dict)
    """Start prices by symbol, overriding the built-in levels."""
    step_ms: Annotated[int, msgspec.Meta(ge=1, le=1_000)] = 50
    """Time resolution of the latent processes, and how often a block of ticks is emitted."""
    latency_ms: Annotated[float, msgspec.Meta(ge=0.0)] = 2.0
    """Median delay from trade time to receive time."""


class SyntheticMarket:
    """The market model as a plain generator: :meth:`generate` returns the trades of the next steps.

    Steps are ``step_ms`` long and start at ``start_ns``; step ``k`` covers ``[start_ns + k * step,
    start_ns + (k + 1) * step)``. The output depends only on the settings, ``seed``, ``start_ns`` and the
    sequence of step counts asked for.
    """

    def __init__(self, settings: SyntheticSettings, start_ns: int, seed: int) -> None:
        self.start_ns = start_ns
        self.step_ns = settings.step_ms * 1_000_000
        self.steps = 0
        """Steps generated so far."""
        self.symbols = list(dict.fromkeys(settings.symbols))
        self._rng = np.random.default_rng(seed)
        other = replace(OTHER_SYMBOL, price=settings.default_price)
        profiles = [KNOWN_SYMBOLS.get(s, other) for s in self.symbols]
        n = len(self.symbols)
        start_prices = np.array(
            [settings.prices.get(s, p.price) for s, p in zip(self.symbols, profiles, strict=True)]
        )
        weights = np.array([p.weight for p in profiles])
        self._dt_s = self.step_ns / 1e9
        total_vol = np.array([p.annual_vol for p in profiles]) / math.sqrt(_SECONDS_PER_YEAR)
        self._total_vol = total_vol
        self._diffusion_vol = total_vol * math.sqrt(1.0 - _JUMP_VARIANCE_SHARE)
        self._jump_sd = total_vol * math.sqrt(_JUMP_VARIANCE_SHARE / _JUMPS_PER_S)
        self._clustering = settings.clustering
        # exp(c (g + h)) has mean exp(c^2 (sd_g^2 + sd_h^2) / 2): divide it out so the mean is rate_per_s.
        self._base_rate = (
            settings.rate_per_s
            * weights
            / weights.sum()
            * math.exp(-(settings.clustering**2) * (_BURST_SD**2 + _VOL_SD**2) / 2)
        )
        rho = settings.predictability
        self._drift_coef = rho / (math.sqrt(1.0 - rho * rho) * math.sqrt(_HORIZON_S))
        self._tilt = rho
        self._median_notional = np.array([p.median_notional_usd for p in profiles])
        self._price_decimals = np.array([6 - math.floor(math.log10(p)) for p in start_prices])
        self._qty_decimals = np.array([math.ceil(math.log10(p)) for p in start_prices])
        self._latency_median_ns = settings.latency_ms * 1e6
        rng = self._rng
        # Volatility starts where exp(h) has its long-run mean, not at a random draw of a process that
        # takes hours to average out: a run of a minute then sees rate_per_s, not a random multiple of it.
        self._vol_state = np.full(n, _VOL_SD**2 / 2)
        self._burst_state = rng.standard_normal(n) * _BURST_SD
        self._factor_state = rng.standard_normal(n)
        self._log_price = np.log(start_prices)
        self._pending_jump = np.zeros(n)
        self._last_ts = np.full(n, start_ns - 1, dtype=np.int64)
        self._last_id = np.zeros(n, dtype=np.int64)
        self._last_recv = np.zeros(n, dtype=np.int64)
        self._symbol_dictionary = pa.array(self.symbols, type=pa.string())
        self._venue_dictionary = pa.array([VENUE], type=pa.string())

    @property
    def time_ns(self) -> int:
        """End of the simulated time generated so far."""
        return self.start_ns + self.steps * self.step_ns

    def generate(self, n_steps: int) -> TickBatch:
        """The trades of the next ``n_steps`` steps, grouped by symbol, each symbol in time order."""
        rng = self._rng
        dt = self._dt_s
        shape = (n_steps, len(self.symbols))
        h = _ou_path(self._vol_state, _VOL_TAU_S, _VOL_SD, dt, rng.standard_normal(shape))
        g = _ou_path(self._burst_state, _BURST_TAU_S, _BURST_SD, dt, rng.standard_normal(shape))
        f = _ou_path(self._factor_state, _FACTOR_TAU_S, 1.0, dt, rng.standard_normal(shape))
        self._vol_state, self._burst_state, self._factor_state = h[-1], g[-1], f[-1]
        vol_level = np.exp(h - _VOL_SD**2)
        counts = rng.poisson(self._base_rate * np.exp(self._clustering * (g + h)) * dt)
        jump_counts = rng.poisson(_JUMPS_PER_S * dt, shape)
        jumps = np.sqrt(jump_counts) * rng.standard_normal(shape) * self._jump_sd
        first_step_ns = self.start_ns + self.steps * self.step_ns
        parts = [
            self._symbol_ticks(
                i,
                first_step_ns=first_step_ns,
                counts=counts[:, i],
                vol_level=vol_level[:, i],
                factor=f[:, i],
                jumps=jumps[:, i],
            )
            for i in range(len(self.symbols))
        ]
        self.steps += n_steps
        return self._batch(parts, counts.sum(axis=0))

    def _symbol_ticks(
        self,
        i: int,
        *,
        first_step_ns: int,
        counts: npt.NDArray[np.int64],
        vol_level: npt.NDArray[np.float64],
        factor: npt.NDArray[np.float64],
        jumps: npt.NDArray[np.float64],
    ) -> tuple[npt.NDArray[Any], ...] | None:
        rng = self._rng
        # A jump moves the price from the trades of its step on; one after the last trade of the block
        # waits (pending) for the next trade.
        jump_path = self._pending_jump[i] + np.cumsum(jumps)
        n = int(counts.sum())
        if n == 0:
            self._pending_jump[i] = jump_path[-1]
            return None
        step_ns = self.step_ns
        key = np.repeat(np.arange(len(counts), dtype=np.int64) * step_ns, counts)
        key += rng.integers(0, step_ns, n)
        key.sort()
        step = key // step_ns
        order = np.arange(n, dtype=np.int64)
        # Strictly increasing times, also across blocks: t_j = max(t_j, t_{j-1} + 1) as a cumulative max.
        ts = np.maximum.accumulate(np.maximum(first_step_ns + key - order, self._last_ts[i] + 1)) + order
        gaps_s = np.diff(ts, prepend=self._last_ts[i]) / 1e9
        z = rng.standard_normal(n)
        vol = self._diffusion_vol[i] * vol_level[step]
        drift = self._drift_coef * self._total_vol[i] * vol_level[step] * factor[step]
        log_price = (
            self._log_price[i] + np.cumsum(vol * np.sqrt(gaps_s) * z + drift * gaps_s) + jump_path[step]
        )
        price = np.round(np.exp(log_price), self._price_decimals[i])
        side = np.where(
            z + rng.standard_normal(n) + self._tilt * factor[step] > 0, SIDE_BUY, SIDE_SELL
        ).astype(np.int8)
        qty = self._quantities(i, n, price)
        trade_id = np.maximum.accumulate(np.maximum(ts // 1_000 - order, self._last_id[i] + 1)) + order
        latency = self._latency_median_ns * np.exp(rng.standard_normal(n) * _LATENCY_SD)
        recv = np.maximum.accumulate(np.maximum(ts + latency.astype(np.int64), self._last_recv[i]))
        self._log_price[i] = log_price[-1]
        self._pending_jump[i] = jump_path[-1] - jump_path[step[-1]]
        self._last_ts[i], self._last_id[i], self._last_recv[i] = ts[-1], trade_id[-1], recv[-1]
        return trade_id, ts, recv, price, qty, side

    def _quantities(self, i: int, n: int, price: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        rng = self._rng
        size = np.exp(rng.standard_normal(n) * _LOGNORMAL_SD)
        tail = rng.random(n) < _PARETO_SHARE
        size[tail] = np.minimum((rng.pareto(_PARETO_TAIL, int(tail.sum())) + 1.0) * 2.0, _MAX_SIZE_MULTIPLE)
        decimals = int(self._qty_decimals[i])
        lot = 10.0**-decimals
        qty: npt.NDArray[np.float64] = np.maximum(
            np.round(self._median_notional[i] * size / price, decimals), lot
        )
        return qty

    def _batch(
        self, parts: Sequence[tuple[npt.NDArray[Any], ...] | None], per_symbol: npt.NDArray[np.int64]
    ) -> TickBatch:
        present = [p for p in parts if p is not None]
        if not present:
            return TickBatch.empty()
        n = int(per_symbol.sum())
        codes = np.repeat(np.arange(len(per_symbol), dtype=np.int32), per_symbol)
        trade_id, ts, recv, price, qty, side = (np.concatenate(c) for c in zip(*present, strict=True))
        arrays = [
            pa.DictionaryArray.from_arrays(
                pa.array(np.zeros(n, dtype=np.int32)), self._venue_dictionary
            ).cast(pa.string()),
            pa.DictionaryArray.from_arrays(pa.array(codes), self._symbol_dictionary).cast(pa.string()),
            pa.array(trade_id),
            pa.array(ts),
            pa.array(recv),
            pa.array(price),
            pa.array(qty),
            pa.array(side),
        ]
        return TickBatch(pa.RecordBatch.from_arrays(arrays, schema=TICK_SCHEMA))


def _ou_path(
    x0: npt.NDArray[np.float64], tau_s: float, sd: float, dt_s: float, noise: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    """Exact OU path on a grid: ``x_k = a x_{k-1} + sd sqrt(1 - a^2) e_k`` with ``a = exp(-dt / tau)``.

    Vectorised over steps as ``x_k = a^k (x_0 + sum_j a^-j e_j)``, in chunks short enough that ``a^-j``
    stays below e^12 so the cumulative sum keeps its precision.
    """
    a = math.exp(-dt_s / tau_s)
    scaled = noise * (sd * math.sqrt(1.0 - a * a))
    chunk = max(1, int(12.0 * tau_s / dt_s))
    out = np.empty_like(scaled)
    x = x0
    for start in range(0, len(scaled), chunk):
        part = scaled[start : start + chunk]
        powers = a ** np.arange(1, len(part) + 1, dtype=np.float64)[:, None]
        out[start : start + len(part)] = powers * (x + np.cumsum(part / powers, axis=0))
        x = out[start + len(part) - 1]
    return out


def first_by_time(batch: TickBatch, n: int) -> TickBatch:
    """The ``n`` earliest ticks of a batch (by ``ts_ns``), each symbol's rows still in their order."""
    if n >= len(batch):
        return batch
    earliest = np.argsort(batch.np("ts_ns"), kind="stable")[:n]
    keep = np.zeros(len(batch), dtype=bool)
    keep[earliest] = True
    return TickBatch(batch.data.filter(pa.array(keep)))


class SyntheticSource(TickSource[SyntheticSettings]):
    """The synthetic market as a source module (venue ``SYNTH``), paced by the injected clock."""

    Config: ClassVar[type[ModuleSettings]] = SyntheticSettings

    def __init__(self, name: str, config: SyntheticSettings, ctx: Context) -> None:
        super().__init__(name, config, ctx)
        self.seed = config.seed if config.seed is not None else secrets.randbits(63)
        """The generator's seed (drawn when not configured, and logged so that a run can be repeated)."""
        self.market: SyntheticMarket | None = None

    async def on_start(self) -> None:
        """Start the market at the clock's current time, then start pumping."""
        cfg = self.config
        self.market = SyntheticMarket(cfg, self.ctx.clock.now_ns(), self.seed)
        self.log.info(
            "synthetic market: %d symbols, %g trades/s, seed %d, predictability %g",
            len(self.market.symbols),
            cfg.rate_per_s,
            self.seed,
            cfg.predictability,
        )
        await super().on_start()

    async def batches(self) -> AsyncIterator[TickBatch]:
        """Each step's ticks once the clock has passed the step; more steps at once after a stall."""
        cfg = self.config
        clock = self.ctx.clock
        market = self.market
        assert market is not None, "on_start creates the market"
        max_steps = max(1, int(_MAX_CATCH_UP_S * 1e9) // market.step_ns)
        remaining = cfg.max_ticks
        while not self.stopping.is_set():
            now = clock.now_ns()
            due = (now - market.start_ns) // market.step_ns - market.steps
            if due <= 0:
                await self.sleep_until(market.time_ns + market.step_ns)
                continue
            batch = market.generate(min(due, max_steps))
            if remaining is not None:
                batch = first_by_time(batch, remaining)
                remaining -= len(batch)
            if len(batch):
                yield batch
            if remaining == 0:
                return
