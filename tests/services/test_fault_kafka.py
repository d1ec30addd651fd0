"""Fault (b): the Kafka broker stopped for 20 s in the middle of a run, then started again.

The engine runs as users run it (``alphaengine run`` on Kafka and the ClickHouse server, with the spill
journal configured), on the synthetic market at a few thousand trades a second, and the broker is stopped
with ``scripts/services/kafka.sh stop`` (same state directory and ports as the running services), left
down for 20 s, and started again. Meanwhile the source must go on: its sends are acknowledged from the
journal, so the trades it counts keep growing at its rate (a source that merely paused would catch up
afterwards with the same total, so the count is taken *during* the outage). Afterwards the journal is
replayed and emptied, and after a graceful stop ClickHouse holds every trade the source emitted exactly
once, and bars that match the trades.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest

from tests.reference import assert_bars_equal, reference_bars
from tests.services.faults import (
    ClickHouseHttp,
    EngineProcess,
    Samples,
    Services,
    engine_toml,
    free_port,
    run_id,
    summary_counts,
    total,
)

OUTAGE_S = 20.0
RATE_PER_S = 3000
MODULES = ("source", "tick_sink", "bar_builder", "bar_sink")
STORED_BEFORE_OUTAGE = 10_000
RECEIVED = "alphaengine_ticks_received_total"
STORED = "alphaengine_ticks_stored_total"
JOURNAL_RECORDS = "alphaengine_bus_journal_records"
SPILLED = "alphaengine_bus_journal_spilled_records_total"
REPLAYED = "alphaengine_bus_journal_replayed_records_total"


@pytest.fixture
def services(services_env: dict[str, str]) -> Services:
    return Services.from_env(services_env)


@pytest.fixture
def ch(services: Services) -> Iterator[ClickHouseHttp]:
    """The test's database; afterwards the broker runs again (whatever happened) and the database goes."""
    database = ClickHouseHttp(services.clickhouse_url, f"faults_{run_id()}")
    yield database
    services.script("kafka", "start")
    database.drop_database()


def test_kafka_down_for_20_s_the_source_goes_on_into_the_journal_and_every_tick_is_stored_once(
    services: Services, ch: ClickHouseHttp, tmp_path: Path
) -> None:
    run = ch.database.removeprefix("faults_")
    metrics_port = free_port()
    # The synthetic market at a steady rate; the bus spills to a journal after 1 s without an answer.
    config = engine_toml(
        tmp_path / "engine.toml",
        services,
        run=run,
        metrics_port=metrics_port,
        source=f'type = "synthetic"\nrate_per_s = {RATE_PER_S}\nclustering = 0\nseed = 11',
        bus=f'journal_path = "{tmp_path / f"var-{run}" / "journal"}"\njournal_after_s = 1.0',
    )
    journal = tmp_path / f"var-{run}" / "journal"
    engine = EngineProcess(config, metrics_port, "engine")
    try:
        engine.wait_running(MODULES)
        engine.wait_until(
            f"{STORED_BEFORE_OUTAGE} ticks stored", lambda s: total(s, STORED) >= STORED_BEFORE_OUTAGE
        )

        services.script("kafka", "stop")
        down_at = time.monotonic()
        # The bus notices (no acknowledgement within journal_after_s) and spills.
        engine.wait_until("the bus spilling to the journal", lambda s: total(s, JOURNAL_RECORDS) > 0)
        first = engine.samples()
        first_at = time.monotonic()
        while time.monotonic() < down_at + OUTAGE_S:
            assert engine.samples(), f"the engine stopped answering with Kafka down:\n{engine.stderr_tail()}"
            time.sleep(0.5)
        during = engine.samples()
        during_at = time.monotonic()
        services.script("kafka", "start")

        # The source went on while the broker was away, acknowledged by the journal: a good share of what
        # it generates in that time (a source that paused for the outage would show next to nothing here).
        received_while_down = total(during, RECEIVED) - total(first, RECEIVED)
        assert received_while_down > 0.25 * RATE_PER_S * (during_at - first_at), (
            received_while_down,
            during_at - first_at,
        )
        assert total(during, SPILLED) > total(first, SPILLED)  # into the journal, one record per batch
        assert total(during, JOURNAL_RECORDS) > 0
        assert total(during, "alphaengine_bus_journal_full") == 0

        # The journal is replayed and emptied; the sinks catch up.
        def replayed(samples: Samples) -> bool:
            states = engine.module_states(samples)
            assert not any(row["gave_up"] for row in engine.admin_status().values()), (
                f"a module FAULTED for good: {engine.admin_status()}"
            )
            return (
                total(samples, JOURNAL_RECORDS) == 0
                and total(samples, REPLAYED) > 0
                and all(states.get(m) == "RUNNING" for m in MODULES)
                and total(samples, STORED) >= total(during, RECEIVED)
            )

        engine.wait_until("the journal replayed and the sinks caught up", replayed)
        emitted, _ = summary_counts(engine.stop())
    finally:
        engine.ensure_dead()

    # Empty at the end: every segment file of the journal holds nothing.
    segments = list(journal.glob("topics/*/*.log"))
    assert segments
    assert sum(p.stat().st_size for p in segments) == 0

    counts = ch.query(
        "SELECT count() AS raw, uniqExact(venue, symbol, trade_id) AS uniq, "
        "(SELECT count() FROM ticks FINAL) AS final FROM ticks"
    ).row(0, named=True)
    assert counts["final"] == counts["uniq"] == emitted
    assert emitted > received_while_down > 0

    bars = ch.query("SELECT * FROM bars FINAL")
    assert bars.height == ch.scalar("SELECT uniqExact(venue, symbol, interval_s, ts_ns) FROM bars") > 0
    ticks = ch.query("SELECT venue, symbol, trade_id, ts_ns, price, qty, side FROM ticks FINAL")
    for interval in (1, 60):
        assert_bars_equal(bars.filter(pl.col("interval_s") == interval), reference_bars(ticks, interval))
