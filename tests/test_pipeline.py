"""The pipeline on in-memory fakes: ticks -> sinks and bar builder, exactly once across crashes."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import polars as pl
import pytest
from prometheus_client import REGISTRY

from alphaengine.bus.base import TopicPartition
from alphaengine.codec import SCHEMA_HEADER, TICKS_V1, encode_ticks
from alphaengine.domain import TickBatch
from alphaengine.kernel.module import Context, Module
from alphaengine.pipeline.bar_builder import BarBuilder, BarBuilderSettings
from alphaengine.pipeline.sinks import BarSink, SinkSettings, TickSink
from tests.reference import assert_bars_equal, reference_bars

NS = 1_000_000_000
T0 = 1_723_161_600 * NS  # 2024-08-09 00:00:00 UTC


def make_ticks(symbol: str, n: int, start_id: int, start_ns: int, seed: int) -> TickBatch:
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(0.05 * NS, n).astype(np.int64) + 1
    ts = start_ns + np.cumsum(gaps)
    price = 100.0 * np.exp(np.cumsum(rng.normal(0, 1e-4, n)))
    return TickBatch.from_columns(
        venue="TEST",
        symbol=symbol,
        trade_id=np.arange(start_id, start_id + n),
        ts_ns=ts,
        recv_ns=ts + 1000,
        price=price,
        qty=rng.pareto(2.5, n) + 0.01,
        side=rng.choice([-1, 1], n),
    )


async def publish(ctx: Context, batches: list[TickBatch], chunk: int = 97) -> pl.DataFrame:
    """Send the ticks as records of ``chunk`` trades keyed by symbol; returns them all as a frame."""
    for batch in batches:
        for start in range(0, len(batch), chunk):
            part = TickBatch(batch.data.slice(start, chunk))
            symbol = part.symbols()[0]
            fut = await ctx.bus.send(
                "ticks", encode_ticks(part), key=symbol.encode(), headers=((SCHEMA_HEADER, TICKS_V1),)
            )
            await fut
    return pl.concat([pl.from_arrow(b.data) for b in batches])  # type: ignore[misc]


async def drained(ctx: Context, module: Module[Any], topic: str) -> None:
    """Wait until a consumer module has read everything in ``topic`` and committed what it can.

    A sink commits up to the end; the bar builder commits at the start of its open bars, so for it
    "drained" means nothing left to read and a commit made after the last read.
    """
    parts = await ctx.bus.partitions(topic)
    tps = [TopicPartition(topic, p) for p in range(parts)]
    consumer = module.consumer  # type: ignore[attr-defined]
    async with asyncio.timeout(20):
        while await consumer.lag() > 0:
            await asyncio.sleep(0.02)
        ends = await ctx.bus.end_offsets(tps)
        if isinstance(module, BarBuilder):
            await asyncio.sleep(3 * module.config.flush_interval_s)
            return
        for tp in tps:
            while ends[tp] and ((c := await consumer.committed(tp)) is None or c.offset < ends[tp]):
                await asyncio.sleep(0.02)


async def stored_bars(ctx: Context) -> pl.DataFrame:
    table = await ctx.store.query("SELECT * FROM bars FINAL")
    return pl.from_arrow(table)  # type: ignore[return-value]


async def test_ticks_and_bars_end_to_end(ctx: Context) -> None:
    await ctx.bus.create_topic("ticks")
    sinks = [
        TickSink("tick_sink", SinkSettings(), ctx),
        BarBuilder("bar_builder", BarBuilderSettings(intervals_s=(1, 60)), ctx),
        BarSink("bar_sink", SinkSettings(), ctx),
    ]
    for m in sinks:
        await m.start()
    ticks = await publish(
        ctx, [make_ticks("AAAUSDT", 6000, 1, T0, 1), make_ticks("BBBUSDT", 4000, 500, T0 + 7 * NS, 2)]
    )
    await drained(ctx, sinks[0], "ticks")
    await drained(ctx, sinks[1], "ticks")
    for m in sinks:
        await m.stop()
    stored = pl.from_arrow(await ctx.store.query("SELECT count() AS n FROM ticks FINAL"))
    assert stored["n"][0] == 10_000  # type: ignore[index]
    bars = await stored_bars(ctx)
    for interval in (1, 60):
        assert_bars_equal(bars.filter(pl.col("interval_s") == interval), reference_bars(ticks, interval))


async def test_bar_builder_crash_and_restart_emits_no_partial_or_missing_bar(ctx: Context) -> None:
    await ctx.bus.create_topic("ticks")
    sink = BarSink("bar_sink", SinkSettings(), ctx)
    await sink.start()
    settings = BarBuilderSettings(intervals_s=(1, 5), flush_interval_s=0.01)
    batches = [make_ticks("AAAUSDT", 3000, 1, T0, 3), make_ticks("BBBUSDT", 3000, 1, T0, 4)]
    first = BarBuilder("bar_builder", settings, ctx)
    await first.start()
    half = [TickBatch(b.data.slice(0, 1700)) for b in batches]
    rest = [TickBatch(b.data.slice(1700)) for b in batches]
    await publish(ctx, half)
    await drained(ctx, first, "ticks")
    # A crash: no graceful drain, whatever was not committed is read again by the next instance.
    await first.abort()
    second = BarBuilder("bar_builder", settings, ctx)
    await second.start()
    ticks = pl.concat([pl.from_arrow(b.data) for b in batches])  # type: ignore[misc]
    await publish(ctx, rest)
    await drained(ctx, second, "ticks")
    await second.stop()
    await drained(ctx, sink, "bars")
    await sink.stop()
    bars = await stored_bars(ctx)
    for interval in (1, 5):
        assert_bars_equal(bars.filter(pl.col("interval_s") == interval), reference_bars(ticks, interval))


async def test_late_ticks_are_left_out_of_bars(ctx: Context) -> None:
    builder = BarBuilder("bar_builder", BarBuilderSettings(intervals_s=(1,)), ctx)
    await builder.start()
    ontime = make_ticks("LATEUSDT", 200, 1, T0 + 5 * NS, 5)
    late = make_ticks("LATEUSDT", 10, 1000, T0, 6)  # one record, five seconds in the past
    await publish(ctx, [ontime, late])
    await drained(ctx, builder, "ticks")
    await builder.stop()
    assert REGISTRY.get_sample_value("alphaengine_late_ticks_total", {"symbol": "LATEUSDT"}) == 10


@pytest.mark.parametrize("garbage", [b"not arrow at all", b""])
async def test_undecodable_records_go_to_the_dead_letter_topic(ctx: Context, garbage: bytes) -> None:
    sink = TickSink("tick_sink", SinkSettings(), ctx)
    await sink.start()
    await (await ctx.bus.send("ticks", garbage, key=b"X"))
    await publish(ctx, [make_ticks("AAAUSDT", 50, 1, T0, 7)])
    await drained(ctx, sink, "ticks")
    await sink.stop()
    n = pl.from_arrow(await ctx.store.query("SELECT count() AS n FROM ticks FINAL"))["n"][0]  # type: ignore[index]
    assert n == 50
    dlq = ctx.bus.consumer("inspect", ["ticks.dlq"])
    await dlq.start()
    async with asyncio.timeout(10):
        records = []
        while not records:
            records = await dlq.getmany(10, 0.1)
    await dlq.close()
    headers = dict(records[0].headers)
    assert records[0].value == garbage
    assert b"Arrow" in headers["reason"] or b"arrow" in headers["reason"].lower()
    assert headers["consumer"] == b"tick_sink"


async def test_open_minute_bars_do_not_hold_back_a_full_embedded_bus(tmp_path: Any) -> None:
    """The bar builder must commit its true position: with a small backlog limit and one-minute bars,
    the producer would otherwise wait for a commit that waits for the trade closing the bar."""
    from alphaengine.bus.memory import MemoryBus
    from alphaengine.clock import LiveClock
    from alphaengine.objectstore.memory import MemoryObjectStore
    from alphaengine.store.memory import MemoryStore

    bus = MemoryBus(max_backlog_bytes=64 * 1024)
    await bus.start()
    ctx = Context(bus, MemoryStore(), MemoryObjectStore(), LiveClock(), tmp_path)
    await ctx.store.start()
    builder = BarBuilder("bar_builder", BarBuilderSettings(intervals_s=(60,), flush_interval_s=0.05), ctx)
    await builder.start()
    ticks = make_ticks("AAAUSDT", 20_000, 1, T0, 8)  # about 15 minutes of trades, far over 64 KiB
    async with asyncio.timeout(30):
        await publish(ctx, [ticks], chunk=200)
    await drained(ctx, builder, "ticks")
    await builder.stop()
    await bus.close()


class FailingStore:
    """A store whose first ``failures`` inserts fail as a ClickHouse outage would (retriable)."""

    def __init__(self, inner: Any, failures: int) -> None:
        self.inner = inner
        self.failures = failures
        self.attempts = 0

    async def insert(self, table: str, rows: Any) -> int:
        self.attempts += 1
        if self.attempts <= self.failures:
            from alphaengine.errors import StoreError

            raise StoreError("connection refused")
        return int(await self.inner.insert(table, rows))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_sink_backs_off_while_the_store_fails_and_commits_only_after_the_insert(ctx: Context) -> None:
    store = FailingStore(ctx.store, failures=3)
    flaky = Context(ctx.bus, store, ctx.objects, ctx.clock, ctx.data_dir)  # type: ignore[arg-type]
    sink = TickSink("tick_sink", SinkSettings(retry_initial_s=0.05, retry_max_s=0.1), flaky)
    await sink.start()
    await publish(ctx, [make_ticks("FAILUSDT", 500, 1, T0, 9)])
    async with asyncio.timeout(10):
        while store.attempts < 2:
            await asyncio.sleep(0.01)
    assert sink.state.value == "DEGRADED"
    assert "connection refused" in sink.detail
    for partition in range(await ctx.bus.partitions("ticks")):
        assert await sink.consumer.committed(TopicPartition("ticks", partition)) is None
    await drained(ctx, sink, "ticks")
    assert sink.state.value == "RUNNING"
    await sink.stop()
    n = pl.from_arrow(await ctx.store.query("SELECT count() AS n FROM ticks FINAL"))["n"][0]  # type: ignore[index]
    assert n == 500
    assert store.attempts == 4
