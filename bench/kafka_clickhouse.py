"""Kafka -> ClickHouse benchmark: synthetic source -> Kafka -> tick sink -> ClickHouse (and bars).

Runs the real engine in this process against the local services of ``scripts/services/all.sh`` (their env
file: ``$ALPHAENGINE_SERVICES_ENV``, else ``$STATE_DIR/services.env``, else
``/tmp/alphaengine-services/services.env``), with fresh topics, consumer groups and a fresh ClickHouse
database per run, for ``--seconds`` at a target rate. It reports:

* sustained throughput: ticks emitted (acknowledged by Kafka) and ticks stored (inserted into ClickHouse,
  offsets committed right after) per second over the measured window, which starts ``--warmup`` seconds
  after every module runs, and the consumer lag at its end;
* tick-to-stored latency p50/p99: from the source's ``recv_ns`` to the moment the tick sink's insert
  returned, as recorded by ``alphaengine_tick_store_latency_seconds`` (quantiles interpolated inside
  its buckets) over the window; the synthetic source emits a 50 ms block at a time, so half a block is
  part of it;
* after a graceful stop and drain: every emitted tick stored exactly once (``count()`` after ``FINAL``
  equals ``uniqExact`` equals the ticks emitted).

    scripts/services/all.sh start
    .venv/bin/python bench/kafka_clickhouse.py --rate 150000 --seconds 60     # throughput
    .venv/bin/python bench/kafka_clickhouse.py --rate 10000 --seconds 60      # latency
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import resource
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import uvloop

from alphaengine import metrics
from alphaengine.config import ClickHouseStoreConfig, loads
from alphaengine.kernel.engine import Engine
from alphaengine.pipeline.monitor import HistogramSnapshot, histograms
from alphaengine.store import build_store


def services_env() -> dict[str, str]:
    configured = os.environ.get("ALPHAENGINE_SERVICES_ENV")
    state_dir = os.environ.get("STATE_DIR", "/tmp/alphaengine-services")
    path = Path(configured) if configured else Path(state_dir) / "services.env"
    if not path.is_file():
        sys.exit(f"{path} is missing: start the services first (scripts/services/all.sh start)")
    env = {}
    for line in path.read_text().splitlines():
        name, sep, value = line.removeprefix("export ").partition("=")
        if sep and not line.startswith("#"):
            env[name.strip()] = value.strip().strip("'\"")
    return env


def config_text(args: argparse.Namespace, env: dict[str, str], root: Path, run_id: str) -> str:
    ticks, bars = f"bench-{run_id}-ticks", f"bench-{run_id}-bars"
    bar_modules = f"""
[modules.bar_builder]
type = "bar_builder"
group = "bench-{run_id}-bar-builder"
input_topic = "{ticks}"
output_topic = "{bars}"
intervals_s = [1, 60]
max_records = {args.max_records}
[modules.bar_sink]
type = "bar_sink"
group = "bench-{run_id}-bar-sink"
topic = "{bars}"
"""
    return f"""
[engine]
name = "bench"
data_dir = "{root}"
stop_deadline_s = 120
report_interval_s = 10
[bus]
kind = "kafka"
bootstrap_servers = "{env["KAFKA_BOOTSTRAP_SERVERS"]}"
partitions = {args.partitions}
linger_ms = {args.linger_ms}
max_batch_bytes = {args.max_batch_bytes}
[store]
kind = "clickhouse"
host = "{env["CLICKHOUSE_HOST"]}"
port = {env["CLICKHOUSE_PORT"]}
database = "bench_{run_id}"
[objectstore]
kind = "memory"
[metrics]
port = 0
enabled = false
[admin]
socket = "{root}/admin.sock"
[modules.source]
type = "synthetic"
topic = "{ticks}"
rate_per_s = {args.rate}
clustering = 0  # Poisson arrivals at exactly the target rate, so "sustained" compares with it
max_in_flight = {args.max_in_flight}
[modules.tick_sink]
type = "tick_sink"
group = "bench-{run_id}-tick-sink"
topic = "{ticks}"
flush_rows = {args.flush_rows}
flush_interval_s = {args.flush_interval_s}
max_records = {args.max_records}
{bar_modules if args.bars else ""}
"""


def latency_histogram() -> HistogramSnapshot:
    return histograms(metrics.TICK_STORE_LATENCY)[""]


def drop_database(env: dict[str, str], database: str) -> None:
    request = urllib.request.Request(
        env["CLICKHOUSE_URL"], data=f"DROP DATABASE IF EXISTS {database}".encode()
    )
    with urllib.request.urlopen(request, timeout=60):
        pass


async def bench(args: argparse.Namespace) -> int:
    env = services_env()
    run_id = uuid.uuid4().hex[:10]
    with tempfile.TemporaryDirectory(prefix="alphaengine-bench-") as tmp:
        return await run(args, env, run_id, Path(tmp))


async def run(args: argparse.Namespace, env: dict[str, str], run_id: str, root: Path) -> int:
    engine = Engine(loads(config_text(args, env, root, run_id), source="bench"))
    running = asyncio.ensure_future(engine.run(handle_signals=False))
    ready = asyncio.ensure_future(engine.ready.wait())
    await asyncio.wait({running, ready}, return_when=asyncio.FIRST_COMPLETED)
    if running.done():
        running.result()  # raises what stopped the engine before it was ready
    # The window starts once every module runs (consumers have joined their groups) and the backlog of
    # the start-up has been worked off.
    await asyncio.sleep(args.warmup)
    latency_before = latency_histogram()
    received_0, stored_0 = metrics.total(metrics.TICKS_RECEIVED), metrics.total(metrics.TICKS_STORED)
    started = time.perf_counter()
    await asyncio.sleep(args.seconds)
    window = time.perf_counter() - started
    received = metrics.total(metrics.TICKS_RECEIVED) - received_0
    stored = metrics.total(metrics.TICKS_STORED) - stored_0
    lag: dict[str, Any] = {
        s.labels["consumer"]: int(s.value)
        for family in metrics.CONSUMER_LAG.collect()
        for s in family.samples
        if s.labels["consumer"] in ("tick_sink", "bar_builder", "bar_sink")
    }
    latency = latency_histogram().since(latency_before)
    engine.request_stop("benchmark window over")
    stop_started = time.perf_counter()
    summary = await running
    drain = time.perf_counter() - stop_started
    loop_lag = metrics.quantiles_from_samples(engine.loop_lag.samples, (0.5, 0.99, 1.0))

    database = f"bench_{run_id}"
    store = build_store(
        ClickHouseStoreConfig(
            host=env["CLICKHOUSE_HOST"], port=int(env["CLICKHOUSE_PORT"]), database=database
        )
    )
    await store.start()
    try:
        counts = (
            await store.query(
                "SELECT count() AS raw, uniqExact(venue, symbol, trade_id) AS u FROM ticks FINAL"
            )
        ).to_pylist()[0]
    finally:
        await store.close()
    if not args.keep:
        await asyncio.to_thread(drop_database, env, database)
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    ms = [latency.quantile(0.5) * 1e3, latency.quantile(0.99) * 1e3, latency.mean * 1e3]
    setup = (
        f"Kafka {env.get('KAFKA_VERSION', '?')}, ClickHouse {env.get('CLICKHOUSE_VERSION', '?')}, "
        f"bars {'on' if args.bars else 'off'}, {args.partitions} partitions, linger {args.linger_ms} ms, "
        f"flush_rows {args.flush_rows:,}, flush_interval_s {args.flush_interval_s:g}"
    )
    report = {
        "target rate": f"{args.rate:,} ticks/s for {args.seconds:g} s after {args.warmup:g} s ({setup})",
        "emitted in window": f"{received:,.0f} ticks = {received / window:,.0f} ticks/s (Kafka acked)",
        "stored in window": f"{stored:,.0f} ticks = {stored / window:,.0f} ticks/s (inserted+committed)",
        "lag at window end": f"{lag} records",
        "tick-to-stored": f"p50 {ms[0]:,.0f} ms, p99 {ms[1]:,.0f} ms, mean {ms[2]:,.0f} ms "
        f"over {latency.count:,.0f} ticks",
        "stop and drain": f"{drain:.1f} s; whole run {summary.ticks_received:,} emitted, "
        f"{summary.ticks_stored:,} stored",
        "ClickHouse": f"{counts['raw']:,} rows after FINAL, {counts['u']:,} unique",
        "peak memory (RSS)": f"{peak_rss_mib:,.0f} MiB",
        "event-loop lag": f"p50 {loop_lag[0] * 1e3:.1f} ms, p99 {loop_lag[1] * 1e3:.1f} ms, "
        f"max {loop_lag[2] * 1e3:.1f} ms",
    }
    for what, figure in report.items():
        print(f"{what:<20}{figure}")
    ok = counts["raw"] == counts["u"] == summary.ticks_received == summary.ticks_stored
    print("every emitted tick stored exactly once:", "yes" if ok else "NO")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=int, default=150_000, help="target ticks/s of the synthetic source")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the measured window")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds run before the window starts")
    parser.add_argument(
        "--bars", action=argparse.BooleanOptionalAction, default=True, help="run the bar builder too"
    )
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--linger-ms", type=int, default=5)
    parser.add_argument("--max-batch-bytes", type=int, default=256 * 1024)
    parser.add_argument("--max-in-flight", type=int, default=64)
    parser.add_argument("--flush-rows", type=int, default=200_000)
    parser.add_argument("--flush-interval-s", type=float, default=0.5)
    parser.add_argument("--max-records", type=int, default=500)
    parser.add_argument("--keep", action="store_true", help="keep the run's ClickHouse database")
    parser.add_argument("--profile", metavar="FILE", help="write a cProfile of the run to FILE")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        if not args.profile:
            return runner.run(bench(args))
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
        try:
            return runner.run(bench(args))
        finally:
            profiler.disable()
            profiler.dump_stats(args.profile)


if __name__ == "__main__":
    sys.exit(main())
