"""The monitor module on in-memory fakes: samples of the engine's metrics land in ``diagnostics``."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from prometheus_client import REGISTRY

from alphaengine.clock import SimClock
from alphaengine.codec import SCHEMA_HEADER, TICKS_V1, encode_ticks
from alphaengine.domain import TickBatch
from alphaengine.errors import StoreError
from alphaengine.kernel.module import Context, ModuleState
from alphaengine.metrics import TICK_STORE_LATENCY
from alphaengine.pipeline.monitor import HistogramSnapshot, Monitor, MonitorSettings, histograms
from alphaengine.pipeline.sinks import SinkSettings, TickSink
from alphaengine.store.memory import MemoryStore

NS = 1_000_000_000
T0 = 1_723_161_600 * NS  # 2024-08-09 00:00:00 UTC
SINK = "monitor_test_sink"


def ticks(symbol: str, n: int, first_id: int, newest_ns: int, seed: int) -> TickBatch:
    """``n`` trades within the half second before ``newest_ns`` (the last one at exactly it)."""
    rng = np.random.default_rng(seed)
    ts = np.sort(newest_ns - rng.integers(0, NS // 2, n))
    ts[-1] = newest_ns
    return TickBatch.from_columns(
        venue="TEST",
        symbol=symbol,
        trade_id=np.arange(first_id, first_id + n),
        ts_ns=ts,
        recv_ns=ts + 1_000_000,
        price=np.full(n, 100.0),
        qty=np.full(n, 0.5),
        side=np.ones(n, dtype=np.int8),
    )


async def publish(ctx: Context, batch: TickBatch) -> None:
    for start in range(0, len(batch), 100):
        part = TickBatch(batch.data.slice(start, 100))
        fut = await ctx.bus.send(
            "ticks", encode_ticks(part), key=part.symbols()[0].encode(), headers=((SCHEMA_HEADER, TICKS_V1),)
        )
        await fut


async def stored_by(ctx: Context, symbol: str, n: int) -> None:
    """Wait until the store holds ``n`` ticks of ``symbol`` and the sink reports no lag."""
    async with asyncio.timeout(20):
        while True:
            found = await ctx.store.query(f"SELECT count() AS n FROM ticks WHERE symbol = '{symbol}'")
            lag = REGISTRY.get_sample_value("alphaengine_consumer_lag_records", {"consumer": SINK})
            if found.column("n")[0].as_py() == n and lag == 0:
                return
            await asyncio.sleep(0.05)


async def diagnostics(ctx: Context) -> dict[tuple[str, str], list[tuple[int, float]]]:
    """``(metric, label) -> [(ts_ns, value), ...]`` in time order, of engine ``test``."""
    rows = await ctx.store.query(
        "SELECT metric, label, ts_ns, value FROM diagnostics FINAL WHERE engine = 'test' ORDER BY ts_ns"
    )
    found: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for row in rows.to_pylist():
        found.setdefault((row["metric"], row["label"]), []).append((row["ts_ns"], row["value"]))
    return found


@pytest.fixture
def sim(ctx: Context) -> tuple[Context, SimClock]:
    clock = SimClock(T0)
    return dataclasses.replace(ctx, clock=clock, engine_name="test"), clock


def bucket_of(value: float) -> tuple[float, float]:
    bounds = [0.0, *histograms(TICK_STORE_LATENCY)[""].bounds]
    i = int(np.searchsorted(bounds, value, side="left"))
    return bounds[i - 1], bounds[i]


async def test_samples_hold_rows_stored_ingest_lag_latencies_and_consumer_lag(
    sim: tuple[Context, SimClock],
) -> None:
    ctx, clock = sim
    monitor = Monitor("monitor", MonitorSettings(interval_s=3600), ctx)
    sink = TickSink(SINK, SinkSettings(flush_interval_s=0.05), ctx)
    await monitor.start()
    await sink.start()
    try:
        # The sink reads the clock as its insert returns: every trade's latency is T0 - recv_ns.
        a, b = ticks("MONA", 700, 1, T0 - NS // 100, 1), ticks("MONB", 300, 1, T0 - NS // 20, 2)
        await publish(ctx, a)
        await publish(ctx, b)
        await stored_by(ctx, "MONA", 700)
        await stored_by(ctx, "MONB", 300)

        assert await monitor.sample() > 0
        found = await diagnostics(ctx)
        assert found["ticks_stored", "MONA"] == [(T0, 700.0)]
        assert found["ticks_stored", "MONB"] == [(T0, 300.0)]
        assert found["ingest_lag_seconds", "MONA"] == [(T0, 0.01)]
        assert found["ingest_lag_seconds", "MONB"] == [(T0, 0.05)]
        assert found["ingest_lag_recv_seconds", "MONA"] == [(T0, pytest.approx(0.009))]
        assert found["consumer_lag_records", SINK] == [(T0, 0.0)]

        latencies = (T0 - np.concatenate([a.np("recv_ns"), b.np("recv_ns")])) / NS
        ((_, mean),) = found["tick_store_latency_mean_seconds", ""]
        assert mean == pytest.approx(latencies.mean())
        ((_, p99),) = found["tick_store_latency_p99_seconds", ""]
        low, high = bucket_of(float(np.quantile(latencies, 0.99)))
        assert low <= p99 <= high

        ((_, inserts),) = found["store_inserts", "ticks"]
        assert inserts >= 1
        ((_, insert_mean),) = found["store_insert_mean_seconds", "ticks"]
        ((_, insert_p99),) = found["store_insert_p99_seconds", "ticks"]
        assert insert_mean > 0
        assert insert_p99 > 0

        # Ten seconds later, MONA traded again and MONB did not: counts are per interval, and the lag
        # of the quiet symbol grows from what the previous sample saw.
        clock.advance(10)
        more = ticks("MONA", 50, 701, T0 + 9 * NS, 3)
        await publish(ctx, more)
        await stored_by(ctx, "MONA", 750)
        await monitor.sample()
        found = await diagnostics(ctx)
        later = T0 + 10 * NS
        assert found["ticks_stored", "MONA"][1] == (later, 50.0)
        assert found["ticks_stored", "MONB"][1] == (later, 0.0)
        assert found["ingest_lag_seconds", "MONA"][1] == (later, 1.0)
        assert found["ingest_lag_seconds", "MONB"][1] == (later, pytest.approx(10.05))
        assert REGISTRY.get_sample_value("alphaengine_ingest_lag_seconds", {"symbol": "MONA"}) == 1.0
        ((_, mean),) = [row for row in found["tick_store_latency_mean_seconds", ""] if row[0] == later]
        assert mean == pytest.approx(((T0 + 10 * NS - more.np("recv_ns")) / NS).mean())
    finally:
        await sink.stop()
        await monitor.stop()


async def test_samples_on_the_engine_clock_and_once_more_at_stop(sim: tuple[Context, SimClock]) -> None:
    ctx, clock = sim
    await ctx.store.insert("ticks", pa.Table.from_batches([ticks("MONC", 10, 1, T0 - NS, 4).data]))
    monitor = Monitor("monitor", MonitorSettings(interval_s=10), ctx)
    await monitor.start()
    for _ in range(5):  # let the schedule start its first sleep, which is timed from the clock's now
        await asyncio.sleep(0)
    clock.advance(10)
    async with asyncio.timeout(10):
        while monitor.samples < 1:
            await asyncio.sleep(0.01)
    clock.advance(5)  # a stop between two intervals still records what happened since the last sample
    await monitor.stop()
    assert monitor.samples == 2
    found = await diagnostics(ctx)
    assert found["ingest_lag_seconds", "MONC"] == [(T0 + 10 * NS, 11.0), (T0 + 15 * NS, 16.0)]


class FlakyStore(MemoryStore):
    """The in-memory store, with an outage that can be switched on and off."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise StoreError("connection refused (test outage)")

    async def insert(self, table: str, rows: pa.Table) -> int:
        self._check()
        return await super().insert(table, rows)

    async def query(self, sql: str) -> pa.Table:
        self._check()
        return await super().query(sql)


async def test_rows_are_kept_while_the_store_is_down_and_inserted_when_it_is_back(
    sim: tuple[Context, SimClock],
) -> None:
    ctx, clock = sim
    store = FlakyStore()
    await store.start()
    await store.insert("ticks", pa.Table.from_batches([ticks("MOND", 10, 1, T0 - NS, 5).data]))
    ctx = dataclasses.replace(ctx, store=store)
    monitor = Monitor("monitor", MonitorSettings(interval_s=3600), ctx)
    await monitor.start()
    try:
        store.down = True
        assert await monitor.sample() == 0
        assert monitor.state is ModuleState.DEGRADED
        assert "test outage" in monitor.detail
        pending: Any = monitor.health()["pending_rows"]
        assert pending > 0

        store.down = False
        clock.advance(10)
        assert await monitor.sample() > pending
        assert monitor.state is ModuleState.RUNNING
        assert monitor.health()["pending_rows"] == 0
        found = await diagnostics(ctx)
        assert [ts for ts, _ in found["store_inserts", "ticks"]] == [T0, T0 + 10 * NS]
    finally:
        await monitor.stop()
        await store.close()


async def test_diagnostics_older_than_the_retention_are_dropped(sim: tuple[Context, SimClock]) -> None:
    ctx, _ = sim
    day_ns = 86_400 * NS
    old = [T0 - 40 * day_ns, T0 - 31 * day_ns, T0 - 29 * day_ns, T0]
    await ctx.store.insert(
        "diagnostics",
        pa.table(
            {
                "engine": ["test"] * 4,
                "metric": ["ticks_stored"] * 4,
                "label": ["X"] * 4,
                "ts_ns": pa.array(old, pa.int64()),
                "value": [1.0] * 4,
            }
        ),
    )
    monitor = Monitor("monitor", MonitorSettings(interval_s=3600, retention_days=30), ctx)
    await monitor.start()
    await monitor.stop()
    assert list(await ctx.store.partitions("diagnostics")) == ["20240711", "20240809"]


def test_quantile_interpolates_within_the_bucket_like_promql() -> None:
    inf = float("inf")
    histogram = HistogramSnapshot((0.1, 0.5, 1.0, inf), (10.0, 30.0, 40.0, 40.0), 12.0)
    assert histogram.mean == 0.3
    assert histogram.quantile(0.25) == pytest.approx(0.1)  # rank 10: the top of the first bucket
    assert histogram.quantile(0.5) == pytest.approx(0.3)  # rank 20: halfway through (0.1, 0.5]
    assert histogram.quantile(0.99) == pytest.approx(0.5 + 0.5 * 9.6 / 10)
    beyond = HistogramSnapshot((0.1, inf), (1.0, 5.0), 50.0)
    assert beyond.quantile(0.99) == 0.1  # in the +Inf bucket: the largest finite bound
    earlier = HistogramSnapshot((0.1, 0.5, 1.0, inf), (10.0, 10.0, 10.0, 10.0), 0.5)
    assert histogram.since(earlier) == HistogramSnapshot((0.1, 0.5, 1.0, inf), (0.0, 20.0, 30.0, 30.0), 11.5)
