"""The ``monitor`` module: samples the engine's ingest health into the ``diagnostics`` table.

Every ``interval_s`` of the engine's clock (and once more when it stops) the monitor writes one row per
(metric, label) with the sample's time, so the history of the engine's own health can be queried next to
the data (``SELECT ... FROM diagnostics FINAL WHERE metric = 'ingest_lag_seconds'``):

=================================== ========== ==========================================================
metric                              label      value
=================================== ========== ==========================================================
``ticks_stored``                    symbol     trades stored since the previous sample
``ingest_lag_seconds``              symbol     sample time minus the newest stored trade's ``ts_ns``
``ingest_lag_recv_seconds``         symbol     sample time minus the newest stored trade's ``recv_ns``
``tick_store_latency_mean_seconds`` (empty)    mean time from receive to stored over the interval
``tick_store_latency_p99_seconds``  (empty)    its 99th percentile, estimated from histogram buckets
``store_inserts``                   table      insert statements since the previous sample
``store_insert_mean_seconds``       table      mean time of one insert over the interval
``store_insert_p99_seconds``        table      its 99th percentile, estimated from histogram buckets
``consumer_lag_records``            consumer   records not yet read by a consumer module
=================================== ========== ==========================================================

Everything but the ingest lag comes from the Prometheus metrics the sinks, stores and consumers already
keep (:mod:`alphaengine.metrics`), as differences between two samples. The ingest lag needs the store: it
asks only for the rows whose ``ts`` (the partition column, so ClickHouse skips every older part) is
after the previous sample, minus a margin for late inserts, and remembers each symbol's newest trade
between samples, so a symbol that stops trading shows a growing lag rather than none.

Rows that cannot be inserted (the store is down) are kept, up to ``max_pending_rows``, and sent with the
next sample; the module is DEGRADED meanwhile. The table is idempotent by ``(engine, metric, label,
ts_ns)``, so a retried insert that had in fact succeeded changes nothing. The archiver handles only ticks
and bars, so the monitor ages out its own table: day partitions older than ``retention_days`` are dropped
at start and once a day.
"""

from __future__ import annotations

import asyncio
import bisect
import math
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Any, ClassVar

import msgspec
import pyarrow as pa
from prometheus_client.metrics import MetricWrapperBase

from alphaengine.errors import StoreError
from alphaengine.kernel.module import Context, Module, ModuleSettings
from alphaengine.metrics import (
    CONSUMER_LAG,
    INGEST_LAG,
    STORE_INSERT_SECONDS,
    TICK_STORE_LATENCY,
    TICKS_STORED,
)
from alphaengine.store.schema import DIAGNOSTICS

_NS_PER_S = 1_000_000_000
_LATE_MARGIN_S = 60.0
"""How far before the previous sample the ingest-lag query looks, for trades inserted after it."""


class MonitorSettings(ModuleSettings, frozen=True):
    """Settings of the monitor."""

    interval_s: Annotated[float, msgspec.Meta(gt=0)] = 10.0
    """Time between samples (engine clock)."""
    lookback_s: Annotated[float, msgspec.Meta(gt=0)] = 3600.0
    """At start, how far back the store is searched for each symbol's newest trade."""
    retention_days: Annotated[int, msgspec.Meta(ge=1)] = 30
    """Day partitions of ``diagnostics`` older than this many days before today (UTC) are dropped."""
    max_pending_rows: Annotated[int, msgspec.Meta(ge=1)] = 100_000
    """Rows kept for a later insert while the store fails; the oldest are dropped beyond this."""


@dataclass(frozen=True, slots=True)
class HistogramSnapshot:
    """A Prometheus histogram at one moment: cumulative counts per upper bound (the last is +Inf)."""

    bounds: tuple[float, ...]
    cumulative: tuple[float, ...]
    sum: float

    @property
    def count(self) -> float:
        """Observations in total."""
        return self.cumulative[-1] if self.cumulative else 0.0

    @property
    def mean(self) -> float:
        """The mean observation (NaN without observations)."""
        return self.sum / self.count if self.count else math.nan

    def since(self, earlier: HistogramSnapshot | None) -> HistogramSnapshot:
        """The observations made after ``earlier`` (a snapshot of the same histogram)."""
        if earlier is None or earlier.bounds != self.bounds:
            return self
        return HistogramSnapshot(
            self.bounds,
            tuple(now - then for now, then in zip(self.cumulative, earlier.cumulative, strict=True)),
            self.sum - earlier.sum,
        )

    def quantile(self, q: float) -> float:
        """The ``q`` quantile, interpolated linearly inside its bucket as PromQL's ``histogram_quantile``.

        A quantile in the +Inf bucket is the largest finite bound; NaN without observations.
        """
        if not self.count:
            return math.nan
        rank = q * self.count
        i = bisect.bisect_left(self.cumulative, rank)
        upper = self.bounds[i]
        if math.isinf(upper):
            return self.bounds[i - 1] if i > 0 else math.nan
        lower = self.bounds[i - 1] if i > 0 else min(0.0, upper)
        below = self.cumulative[i - 1] if i > 0 else 0.0
        in_bucket = self.cumulative[i] - below
        return lower + (upper - lower) * (rank - below) / in_bucket if in_bucket else upper


def _samples(metric: MetricWrapperBase, suffix: str) -> Iterator[tuple[dict[str, str], float]]:
    for family in metric.collect():
        for sample in family.samples:
            if sample.name == family.name + suffix:
                yield sample.labels, sample.value


def _by_label(metric: MetricWrapperBase, label: str, suffix: str = "") -> dict[str, float]:
    """The values of a counter (``suffix="_total"``) or gauge by one label."""
    return {labels[label]: value for labels, value in _samples(metric, suffix)}


def histograms(metric: MetricWrapperBase, label: str | None = None) -> dict[str, HistogramSnapshot]:
    """Snapshots of a histogram's children by the value of ``label`` (``""`` for a label-less one)."""
    buckets: dict[str, list[tuple[float, float]]] = {}
    for labels, value in _samples(metric, "_bucket"):
        key = labels[label] if label else ""
        buckets.setdefault(key, []).append((float(labels["le"]), value))
    sums = {(labels[label] if label else ""): value for labels, value in _samples(metric, "_sum")}
    found = {}
    for key, pairs in buckets.items():
        pairs.sort()
        found[key] = HistogramSnapshot(
            tuple(b for b, _ in pairs), tuple(c for _, c in pairs), sums.get(key, 0.0)
        )
    return found


@dataclass(frozen=True, slots=True)
class MetricsSnapshot:
    """The metrics the monitor reports, read at one moment."""

    ticks_stored: dict[str, float]
    insert_seconds: dict[str, HistogramSnapshot]
    tick_store_latency: HistogramSnapshot | None
    consumer_lag: dict[str, float]

    @classmethod
    def read(cls) -> MetricsSnapshot:
        """Read them from this process's metrics."""
        return cls(
            ticks_stored=_by_label(TICKS_STORED, "symbol", "_total"),
            insert_seconds=histograms(STORE_INSERT_SECONDS, "table"),
            tick_store_latency=histograms(TICK_STORE_LATENCY).get(""),
            consumer_lag=_by_label(CONSUMER_LAG, "consumer"),
        )


def _latency_rows(prefix: str, label: str, interval: HistogramSnapshot) -> Iterator[tuple[str, str, float]]:
    if interval.count:
        yield f"{prefix}_mean_seconds", label, interval.mean
        yield f"{prefix}_p99_seconds", label, interval.quantile(0.99)


def metric_rows(now: MetricsSnapshot, before: MetricsSnapshot) -> Iterator[tuple[str, str, float]]:
    """``(metric, label, value)`` of everything that comes from the metrics, over ``before`` to ``now``."""
    for symbol, total in sorted(now.ticks_stored.items()):
        yield "ticks_stored", symbol, total - before.ticks_stored.get(symbol, 0.0)
    if now.tick_store_latency is not None:
        interval = now.tick_store_latency.since(before.tick_store_latency)
        yield from _latency_rows("tick_store_latency", "", interval)
    for table, histogram in sorted(now.insert_seconds.items()):
        interval = histogram.since(before.insert_seconds.get(table))
        yield "store_inserts", table, interval.count
        yield from _latency_rows("store_insert", table, interval)
    for consumer, lag in sorted(now.consumer_lag.items()):
        yield "consumer_lag_records", consumer, lag


def _datetime_literal(ts_ns: int) -> str:
    """A ``DateTime`` literal (UTC, whole seconds) to compare with a ``ts`` column."""
    return datetime.fromtimestamp(ts_ns // _NS_PER_S, UTC).strftime("'%Y-%m-%d %H:%M:%S'")


class Monitor(Module[MonitorSettings]):
    """Records ingest lag, rows stored, insert latency and consumer lag in ``diagnostics`` periodically."""

    Config: ClassVar[type[ModuleSettings]] = MonitorSettings

    def __init__(self, name: str, config: MonitorSettings, ctx: Context) -> None:
        super().__init__(name, config, ctx)
        # The engine builds every module before it starts any, so counting from here includes everything
        # the other modules do in this run, their start-up included.
        self._metrics = MetricsSnapshot.read()
        self._since_ns = 0
        self._newest: dict[str, tuple[int, int]] = {}
        """Per symbol, the newest stored trade's ``(ts_ns, recv_ns)`` seen so far."""
        self._pending: list[pa.Table] = []
        self._aged_out: date | None = None
        self._lock = asyncio.Lock()
        self.samples = 0
        """Samples taken (inserted or pending)."""

    async def on_start(self) -> None:
        """Age out old diagnostics and start sampling."""
        self._since_ns = self.ctx.clock.now_ns() - int(self.config.lookback_s * _NS_PER_S)
        await self._age_out()
        self.spawn(self._schedule(), "sample")

    async def on_stop(self) -> None:
        """Take a last sample (after the modules before it flushed) and stop."""
        await self.wait_tasks()

    async def _schedule(self) -> None:
        while not self.stopping.is_set():
            await self._sleep(self.config.interval_s)
            await self.sample()
            await self._age_out()

    async def _sleep(self, seconds: float) -> None:
        """Sleep on the engine's clock; return early once a stop is requested."""
        sleeper = asyncio.ensure_future(self.ctx.clock.sleep(seconds))
        stopper = asyncio.ensure_future(self.stopping.wait())
        try:
            await asyncio.wait((sleeper, stopper), return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            stopper.cancel()

    async def sample(self) -> int:
        """Take one sample now and insert it with any pending rows; returns the rows inserted (0 if kept).

        A store that fails (retriably) makes the module DEGRADED until a sample succeeds again.
        """
        async with self._lock:
            problems: list[str] = []
            now_ns = self.ctx.clock.now_ns()
            metrics = MetricsSnapshot.read()
            rows = list(metric_rows(metrics, self._metrics))
            self._metrics = metrics
            rows += await self._ingest_lag_rows(now_ns, problems)
            self.samples += 1
            self._pending.append(self._table(now_ns, rows))
            inserted = await self._insert_pending(problems)
            if problems:
                self.set_degraded("; ".join(problems))
            else:
                self.set_healthy()
            return inserted

    async def _ingest_lag_rows(self, now_ns: int, problems: list[str]) -> list[tuple[str, str, float]]:
        since_ns = min(self._since_ns, now_ns - int(_LATE_MARGIN_S * _NS_PER_S))
        try:
            found = await self.ctx.store.query(
                "SELECT symbol, max(ts_ns) AS ts_ns, max(recv_ns) AS recv_ns FROM ticks "
                f"WHERE ts >= {_datetime_literal(since_ns)} GROUP BY symbol"
            )
        except StoreError as exc:
            if not exc.retriable:
                raise
            problems.append(f"cannot read the newest ticks: {exc}")
            return []
        # The next query starts at this sample: rows with older times cannot be the newest.
        self._since_ns = now_ns
        for item in found.to_pylist():
            ts_ns, recv_ns = self._newest.get(item["symbol"], (item["ts_ns"], item["recv_ns"]))
            self._newest[item["symbol"]] = (max(ts_ns, item["ts_ns"]), max(recv_ns, item["recv_ns"]))
        rows = []
        for symbol, (ts_ns, recv_ns) in sorted(self._newest.items()):
            lag_s = (now_ns - ts_ns) / _NS_PER_S
            INGEST_LAG.labels(symbol).set(lag_s)
            rows.append(("ingest_lag_seconds", symbol, lag_s))
            rows.append(("ingest_lag_recv_seconds", symbol, (now_ns - recv_ns) / _NS_PER_S))
        return rows

    def _table(self, ts_ns: int, rows: list[tuple[str, str, float]]) -> pa.Table:
        """The rows of one sample, in the input schema of ``diagnostics``."""
        return pa.table(
            {
                "engine": pa.array([self.ctx.engine_name] * len(rows), pa.string()),
                "metric": pa.array([metric for metric, _, _ in rows], pa.string()),
                "label": pa.array([label for _, label, _ in rows], pa.string()),
                "ts_ns": pa.array([ts_ns] * len(rows), pa.int64()),
                "value": pa.array([value for _, _, value in rows], pa.float64()),
            }
        )

    async def _insert_pending(self, problems: list[str]) -> int:
        rows = pa.concat_tables(self._pending)
        try:
            inserted = await self.ctx.store.insert(DIAGNOSTICS.name, rows)
        except StoreError as exc:
            if not exc.retriable:
                raise
            if rows.num_rows > self.config.max_pending_rows:
                dropped = rows.num_rows - self.config.max_pending_rows
                self.log.warning("store unavailable: dropping the %d oldest diagnostics rows", dropped)
                rows = rows.slice(dropped)
            self._pending = [rows]
            problems.append(f"cannot insert diagnostics, keeping {rows.num_rows} rows for later: {exc}")
            return 0
        self._pending = []
        return inserted

    async def _age_out(self) -> None:
        """Drop day partitions older than the retention, once per day of the clock (UTC)."""
        today = datetime.fromtimestamp(self.ctx.clock.now_ns() // _NS_PER_S, UTC).date()
        if self._aged_out == today:
            return
        days = self.config.retention_days
        cutoff = (today - timedelta(days=days)).strftime("%Y%m%d")
        try:
            for partition in await self.ctx.store.partitions(DIAGNOSTICS.name):
                if partition < cutoff:
                    await self.ctx.store.drop_partition(DIAGNOSTICS.name, partition)
                    self.log.info("dropped the diagnostics of %s (retention %d days)", partition, days)
        except StoreError as exc:
            if not exc.retriable:
                raise
            self.log.warning("cannot age out old diagnostics, trying again later: %s", exc)
            return
        self._aged_out = today

    def health(self) -> dict[str, Any]:
        """Samples taken, rows waiting for the store, and the symbols whose newest trade is known."""
        return {
            "samples": self.samples,
            "pending_rows": sum(t.num_rows for t in self._pending),
            "symbols": len(self._newest),
        }
