"""Fault (c): the ClickHouse server stopped for 30 s in the middle of a run, then started again.

The engine runs as users run it (``alphaengine run`` on Kafka and the ClickHouse server), replaying the
real Binance recordings in a loop at 100 times their speed (a few thousand ticks a second), and the server
is stopped with ``scripts/services/clickhouse.sh stop`` (same state directory and ports as the running
services), left down for 30 s, and started again. Meanwhile the sinks must back off and say so (DEGRADED,
never FAULTED), the source must keep going into Kafka (the backlog waits there, not in the engine), and
afterwards the sinks must catch up. After a graceful stop the store holds every tick the source emitted
exactly once: one run of the replay emits each id once, so the emitted set is each symbol's ids from the
recording's first, contiguous, as many as the engine's summary says it received.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pytest

from tests.reference import assert_bars_equal, reference_bars
from tests.services.faults import (
    ClickHouseHttp,
    EngineProcess,
    Samples,
    Services,
    committed_offsets,
    end_offsets,
    engine_toml,
    free_port,
    recorded_symbols,
    replay_source,
    run_id,
    summary_counts,
    total,
)

OUTAGE_S = 30.0
MODULES = ("source", "tick_sink", "bar_builder", "bar_sink")
SINKS = ("tick_sink", "bar_sink")
STORED_BEFORE_OUTAGE = 10_000
LAG = "alphaengine_consumer_lag_records"


@pytest.fixture
def services(services_env: dict[str, str]) -> Services:
    return Services.from_env(services_env)


@pytest.fixture
def ch(services: Services) -> Iterator[ClickHouseHttp]:
    """The test's database; afterwards the server runs again (whatever happened) and the database goes."""
    database = ClickHouseHttp(services.clickhouse_url, f"faults_{run_id()}")
    yield database
    services.script("clickhouse", "start")
    database.drop_database()


@dataclass(frozen=True, slots=True)
class KafkaPositions:
    """Where the tick sink's group is in the ticks topic."""

    committed: dict[int, int]
    ends: dict[int, int]

    @property
    def backlog(self) -> int:
        """Records in the topic the group has not committed."""
        return sum(end - self.committed.get(p, 0) for p, end in self.ends.items())


def kafka_positions(services: Services, run: str) -> KafkaPositions:
    bootstrap = services.kafka_bootstrap
    committed = asyncio.run(committed_offsets(bootstrap, f"tick_sink-{run}"))
    return KafkaPositions(committed, asyncio.run(end_offsets(bootstrap, f"ticks-{run}")))


def test_clickhouse_down_for_30_s_sinks_back_off_kafka_holds_and_every_tick_is_stored_once(
    services: Services, ch: ClickHouseHttp, tmp_path: Path
) -> None:
    run = ch.database.removeprefix("faults_")
    recorded = recorded_symbols()
    metrics_port = free_port()
    config = engine_toml(
        tmp_path / "engine.toml",
        services,
        run=run,
        metrics_port=metrics_port,
        source=replay_source("100.0"),
        # A short backoff cap, so that the sinks try again within 2 s of the server's return.
        sink="retry_initial_s = 0.2\nretry_max_s = 2.0",
    )
    engine = EngineProcess(config, metrics_port, "engine")
    try:
        engine.wait_running(MODULES)
        engine.wait_until(
            f"{STORED_BEFORE_OUTAGE} ticks stored",
            lambda s: total(s, "alphaengine_ticks_stored_total") >= STORED_BEFORE_OUTAGE,
        )

        services.script("clickhouse", "stop")
        back_at = time.monotonic() + OUTAGE_S
        seen: dict[str, set[str]] = {}

        def record(samples: Samples) -> None:
            for module, state in engine.module_states(samples).items():
                seen.setdefault(module, set()).add(state)

        def tick_sink_degraded(samples: Samples) -> bool:
            record(samples)
            return "DEGRADED" in seen.get("tick_sink", ())

        engine.wait_until("the tick sink DEGRADED", tick_sink_degraded)
        # The sink is now retrying an insert, and commits only after it: its group's offsets must stay.
        before = engine.samples()
        kafka_before = kafka_positions(services, run)
        status_during = engine.admin_status()
        while time.monotonic() < back_at:
            samples = engine.samples()
            assert samples, f"the engine stopped answering while ClickHouse was down:\n{engine.stderr_tail()}"
            record(samples)
            time.sleep(0.5)
        during = engine.samples()
        kafka_during = kafka_positions(services, run)
        services.script("clickhouse", "start")

        # The sinks backed off (DEGRADED, with the reason), nothing FAULTED, the engine kept running.
        assert all("FAULTED" not in states for states in seen.values()), seen
        assert status_during["tick_sink"]["state"] == "DEGRADED"
        assert "insert into ticks failed, retrying" in str(status_during["tick_sink"]["detail"])
        assert "DEGRADED" in seen["bar_sink"], seen
        # Kafka held: the source went on into the topic while nothing was stored or committed.
        assert total(during, "alphaengine_ticks_received_total") > total(
            before, "alphaengine_ticks_received_total"
        )
        assert total(during, "alphaengine_ticks_stored_total") == total(
            before, "alphaengine_ticks_stored_total"
        )
        assert kafka_during.committed == kafka_before.committed
        assert kafka_during.backlog > kafka_before.backlog

        # The sinks catch up: RUNNING again and nothing left to read.
        def caught_up(samples: Samples) -> bool:
            states = engine.module_states(samples)
            assert "FAULTED" not in states.values(), states
            return all(states.get(m) == "RUNNING" for m in SINKS) and all(
                total(samples, LAG, consumer=m) == 0 for m in SINKS
            )

        after = engine.wait_until("the sinks caught up", caught_up)
        assert total(after, "alphaengine_ticks_stored_total") > total(
            during, "alphaengine_ticks_stored_total"
        )
        emitted, _ = summary_counts(engine.stop())
    finally:
        engine.ensure_dead()

    counts = ch.query(
        "SELECT count() AS raw, uniqExact(venue, symbol, trade_id) AS uniq, "
        "(SELECT count() FROM ticks FINAL) AS final FROM ticks"
    ).row(0, named=True)
    assert counts["final"] == counts["uniq"] == emitted
    per_symbol = ch.query(
        "SELECT symbol, count() AS n, min(trade_id) AS first, max(trade_id) AS last "
        "FROM ticks FINAL GROUP BY symbol ORDER BY symbol"
    )
    for row in per_symbol.iter_rows(named=True):
        assert row["first"] == recorded[row["symbol"]].first_id, row
        assert row["last"] - row["first"] + 1 == row["n"], f"ids missing: {row}"
    # An insert cut by the server's stop may have landed before the client saw the error: its retry
    # then inserted the same rows again, which FINAL collapses. They must be identical copies.
    assert counts["raw"] >= counts["final"]
    conflicting = ch.scalar(
        "SELECT count() FROM (SELECT venue, symbol, trade_id, "
        "uniqExact(ts_ns, recv_ns, price, qty, side) AS versions FROM ticks "
        "GROUP BY venue, symbol, trade_id HAVING versions > 1)"
    )
    assert conflicting == 0

    bars = ch.query("SELECT * FROM bars FINAL")
    assert bars.height == ch.scalar("SELECT uniqExact(venue, symbol, interval_s, ts_ns) FROM bars") > 0
    ticks = ch.query("SELECT venue, symbol, trade_id, ts_ns, price, qty, side FROM ticks FINAL")
    for interval in (1, 60):
        assert_bars_equal(bars.filter(pl.col("interval_s") == interval), reference_bars(ticks, interval))
