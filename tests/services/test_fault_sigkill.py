"""Fault (a): the engine SIGKILLed three times during a run of 200,000+ ticks, restarted each time.

The engine runs as users run it (``alphaengine run`` on Kafka and the ClickHouse server), replaying the
real Binance recordings in a loop at full speed, and is killed with SIGKILL three times: no drain, no
flush, no commit. The fourth run is stopped gracefully. ClickHouse must then hold every tick the sources
emitted exactly once, and the bars built from them, each once.

Why the replay and not the synthetic source: the synthetic market starts at the clock's time when the
source starts, and its trade ids derive from trade times, so a restarted synthetic source emits different
ticks and what "the sources emitted" across four runs is only known from the engine's own records. The
replay is deterministic: with ``loop`` every pass is the recordings shifted forward in time and, per
symbol, in trade ids by the number of trades of one pass (the recordings' ids are contiguous), so the
replay is endless contiguous data whose ids depend only on their position. A restarted replay starts again
from the beginning, so each run re-emits everything the runs before it emitted and then goes further.
What the sources emitted, as a set, is therefore every id of each symbol from the recording's first to the
furthest one any run reached: contiguous, with no hole. The store must hold exactly that set after
``FINAL``, which must also equal the set of keys in the Kafka topic (every acknowledged tick stored, none
invented).

Redelivery is accounted for exactly, with merges stopped on the ticks table so that ``count()`` without
``FINAL`` is the number of rows inserted:

* the sources re-emitted ``log ticks - unique ticks`` (the restarted replays), and
* after each kill the tick sink read again what it had inserted but not committed: the run killed ``k``-th
  inserted ``raw_k - raw_(k-1)`` rows and had committed ``committed_k - committed_(k-1)`` ticks' worth of
  offsets, which is never more (offsets are committed only after the insert is durable);
* the last run, stopped gracefully, inserts the log from the last committed offset to its end exactly once.

So ``raw - FINAL`` is exactly the sum of these redeliveries, every duplicated key holds identical copies,
and ``FINAL`` collapses them.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import pytest
from aiokafka import AIOKafkaConsumer

from alphaengine.codec import decode_ticks
from alphaengine.config import ClickHouseStoreConfig
from alphaengine.store import ClickHouseStore
from tests.reference import assert_bars_equal, reference_bars
from tests.services.faults import (
    ClickHouseHttp,
    EngineProcess,
    Samples,
    Services,
    committed_offsets,
    engine_toml,
    free_port,
    recorded_symbols,
    replay_source,
    run_id,
    topic_partitions,
)

KILL_AT_UNIQUE = (60_000, 120_000, 180_000)
"""Each killed run is SIGKILLed once the store holds this many distinct ticks..."""
KILL_DELAYS_S = (0.0, 0.9, 1.8)
"""...and this long after: the kills land at different points of the sinks' 2 s flush cycle (just after an
insert, while a buffer fills, about when the next insert and commit go out)."""
STOP_AT_UNIQUE = 240_000
"""The last run is stopped gracefully once the store holds this many."""
MODULES = ("source", "tick_sink", "bar_builder", "bar_sink")
PROGRESS_TIMEOUT_S = 180.0


@dataclass(slots=True)
class TickLog:
    """The ticks topic as it is in Kafka: tick counts by record offset, and every tick's key."""

    offsets: dict[int, list[int]] = field(default_factory=lambda: defaultdict(list))
    """Per partition, the offsets of the records, ascending."""
    cumulative: dict[int, list[int]] = field(default_factory=lambda: defaultdict(list))
    """Per partition, the ticks in the records up to and including each offset."""
    keys: set[tuple[str, str, int]] = field(default_factory=set)
    ticks: int = 0

    def add(self, partition: int, offset: int, keys: list[tuple[str, str, int]]) -> None:
        """Record the next record of a partition and the keys of its ticks."""
        so_far = self.cumulative[partition][-1] if self.cumulative[partition] else 0
        self.offsets[partition].append(offset)
        self.cumulative[partition].append(so_far + len(keys))
        self.keys.update(keys)
        self.ticks += len(keys)

    def ticks_before(self, committed: dict[int, int]) -> int:
        """Ticks in the records before the committed offsets (per partition; none committed is 0)."""
        n = 0
        for partition, offset in committed.items():
            i = bisect.bisect_left(self.offsets[partition], offset)
            n += self.cumulative[partition][i - 1] if i else 0
        return n


async def read_tick_log(bootstrap: str, topic: str) -> TickLog:
    """Every record of the topic, decoded, read without a consumer group."""
    partitions = await topic_partitions(bootstrap, topic)
    log = TickLog()
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        while [tp for tp in partitions if await consumer.position(tp) < ends[tp]]:
            for tp, records in (await consumer.getmany(timeout_ms=1000)).items():
                for record in records:
                    assert record.value is not None
                    data = decode_ticks(record.value).data
                    keys = list(
                        zip(
                            data.column("venue").to_pylist(),
                            data.column("symbol").to_pylist(),
                            data.column("trade_id").to_pylist(),
                            strict=True,
                        )
                    )
                    log.add(tp.partition, record.offset, keys)
    finally:
        await consumer.stop()
    return log


async def create_tables(services: Services, database: str) -> None:
    """The engine's migrations, run before the engine so merges can be stopped before any row lands."""
    store = ClickHouseStore(
        ClickHouseStoreConfig(host=services.clickhouse_host, port=services.clickhouse_port, database=database)
    )
    await store.start()
    await store.close()


def wait_stored(engine: EngineProcess, ch: ClickHouseHttp, at_least: int) -> None:
    """Until the store holds ``at_least`` distinct ticks (the engine exiting or a timeout fails the test)."""

    def stored(_: Samples) -> bool:
        return ch.scalar("SELECT uniqExact(venue, symbol, trade_id) FROM ticks") >= at_least

    engine.wait_until(f"{at_least} distinct ticks stored", stored, timeout_s=PROGRESS_TIMEOUT_S)


@pytest.fixture
def services(services_env: dict[str, str]) -> Services:
    return Services.from_env(services_env)


def test_sigkill_three_times_then_every_tick_and_bar_is_stored_exactly_once(
    services: Services, tmp_path: Path
) -> None:
    run = run_id()
    ch = ClickHouseHttp(services.clickhouse_url, f"faults_{run}")
    recorded = recorded_symbols()
    metrics_port = free_port()
    config = engine_toml(
        tmp_path / "engine.toml",
        services,
        run=run,
        metrics_port=metrics_port,
        source=replay_source('"max"'),
        # Fewer, larger inserts: merges are stopped, so every insert stays a part of its own.
        sink="flush_interval_s = 2.0",
        stop_deadline_s=120,
    )
    asyncio.run(create_tables(services, ch.database))
    ch.execute("SYSTEM STOP MERGES ticks")
    raw: list[int] = [0]
    committed: list[dict[int, int]] = [{}]
    engine: EngineProcess | None = None
    try:
        for k, (threshold, delay_s) in enumerate(zip(KILL_AT_UNIQUE, KILL_DELAYS_S, strict=True), start=1):
            engine = EngineProcess(config, metrics_port, f"engine-{k}")
            engine.wait_running(MODULES)
            wait_stored(engine, ch, threshold)
            time.sleep(delay_s)
            engine.kill()
            assert engine.proc.returncode == -9
            # A commit or an insert the engine had sent in full before it died still lands: wait for it.
            time.sleep(1.0)
            ch.wait_no_inserts()
            raw.append(ch.scalar("SELECT count() FROM ticks"))
            committed.append(asyncio.run(committed_offsets(services.kafka_bootstrap, f"tick_sink-{run}")))
        engine = EngineProcess(config, metrics_port, "engine-final")
        engine.wait_running(MODULES)
        wait_stored(engine, ch, STOP_AT_UNIQUE)
        engine.stop()

        log = asyncio.run(read_tick_log(services.kafka_bootstrap, f"ticks-{run}"))
        counts = ch.query(
            "SELECT count() AS raw, uniqExact(venue, symbol, trade_id) AS uniq, "
            "(SELECT count() FROM ticks FINAL) AS final FROM ticks"
        ).row(0, named=True)

        # Every emitted tick once: the contiguous ids from each recording's first to the furthest reached.
        per_symbol = ch.query(
            "SELECT symbol, count() AS n, min(trade_id) AS first, max(trade_id) AS last "
            "FROM ticks FINAL GROUP BY symbol ORDER BY symbol"
        )
        assert sorted(per_symbol["symbol"]) == sorted(recorded)
        log_last: dict[str, int] = defaultdict(int)
        for _, symbol, trade_id in log.keys:
            log_last[symbol] = max(log_last[symbol], trade_id)
        for row in per_symbol.iter_rows(named=True):
            recording = recorded[row["symbol"]]
            assert row["first"] == recording.first_id, row
            assert row["last"] - row["first"] + 1 == row["n"], f"ids missing: {row}"
            assert row["last"] == log_last[row["symbol"]], row
            assert row["n"] > recording.trades, f"the replay never looped: {row}"
        assert counts["final"] == counts["uniq"] == per_symbol["n"].sum() == len(log.keys)
        assert counts["final"] >= STOP_AT_UNIQUE >= 200_000
        stored_keys = ch.query("SELECT venue, symbol, trade_id FROM ticks FINAL")
        assert set(stored_keys.iter_rows()) == log.keys

        # Redelivery, exactly: re-emitted by the restarted replays, and read again by the restarted sink.
        re_emitted = log.ticks - len(log.keys)
        assert re_emitted > 0, "the restarted replays re-emitted nothing: the kills did not test dedupe"
        committed_ticks = [log.ticks_before(c) for c in committed]
        sink_reread = 0
        for k in range(1, len(KILL_AT_UNIQUE) + 1):
            inserted = raw[k] - raw[k - 1]
            newly_committed = committed_ticks[k] - committed_ticks[k - 1]
            assert inserted >= newly_committed, (
                f"run {k} committed offsets for {newly_committed} ticks but inserted only {inserted} rows"
            )
            sink_reread += inserted - newly_committed
        assert counts["raw"] - raw[-1] == log.ticks - committed_ticks[-1], (
            "the last run did not insert the log from the last commit to its end exactly once"
        )
        assert counts["raw"] - counts["final"] == re_emitted + sink_reread
        conflicting = ch.scalar(
            "SELECT count() FROM (SELECT venue, symbol, trade_id, "
            "uniqExact(ts_ns, recv_ns, price, qty, side) AS versions FROM ticks "
            "GROUP BY venue, symbol, trade_id HAVING versions > 1)"
        )
        assert conflicting == 0, "a redelivered tick differs from its first copy"

        # Bars: each once, and exactly the bars of the stored ticks.
        bars = ch.query("SELECT * FROM bars FINAL")
        assert bars.height == ch.scalar("SELECT uniqExact(venue, symbol, interval_s, ts_ns) FROM bars") > 0
        ticks = ch.query("SELECT venue, symbol, trade_id, ts_ns, price, qty, side FROM ticks FINAL")
        for interval in (1, 60):
            assert_bars_equal(bars.filter(pl.col("interval_s") == interval), reference_bars(ticks, interval))
    finally:
        if engine is not None:
            engine.ensure_dead()
        ch.drop_database()
