"""Pipeline benchmark: synthetic source -> in-memory bus -> chDB, with 1 s and 1 min bars.

Runs the real engine in this process for ``--seconds`` at a target rate, then checks that every emitted
tick is stored exactly once, and reports sustained ticks/s, peak memory (RSS) and event-loop lag.

    .venv/bin/python bench/pipeline.py --rate 150000 --seconds 60
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import resource
import sys
import tempfile
import time
from pathlib import Path

import uvloop

from alphaengine.config import ChdbStoreConfig, loads
from alphaengine.kernel.engine import Engine
from alphaengine.metrics import quantiles_from_samples
from alphaengine.store import build_store


def config_text(root: Path, rate: int, bus: str) -> str:
    bus_section = f'kind = "local"\npath = "{root}/bus"' if bus == "local" else 'kind = "memory"'
    return f"""
[engine]
name = "bench"
data_dir = "{root}"
stop_deadline_s = 120
log_level = "INFO"
[bus]
{bus_section}
[store]
kind = "chdb"
path = "{root}/chdb"
[objectstore]
kind = "memory"
[metrics]
port = 0
enabled = false
[admin]
socket = "{root}/admin.sock"
[modules.source]
type = "synthetic"
rate_per_s = {rate}
clustering = 0  # Poisson arrivals at exactly the target rate, so "sustained" compares with it
[modules.tick_sink]
type = "tick_sink"
[modules.bar_builder]
type = "bar_builder"
intervals_s = [1, 60]
[modules.bar_sink]
type = "bar_sink"
"""


async def bench(rate: int, seconds: float, bus: str) -> int:
    with tempfile.TemporaryDirectory(prefix="alphaengine-bench-") as tmp:
        root = Path(tmp)
        engine = Engine(loads(config_text(root, rate, bus), source="bench"))
        started = time.perf_counter()
        summary = await engine.run(seconds, handle_signals=False)
        wall = time.perf_counter() - started
        lag = quantiles_from_samples(engine.loop_lag.samples, (0.5, 0.99, 1.0))
        # Read the result back with a fresh store handle, as a user would.
        store = build_store(ChdbStoreConfig(path=str(root / "chdb")))
        await store.start()
        counts = (
            await store.query("SELECT count() AS raw, uniqExact(symbol, trade_id) AS u FROM ticks")
        ).to_pylist()[0]
        await store.close()
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"target rate        {rate:,} ticks/s for {seconds:g} s ({bus} bus, chDB store)")
    print(f"ticks emitted      {summary.ticks_received:,}")
    print(f"ticks stored       {counts['raw']:,} rows, {counts['u']:,} unique")
    print(f"bars               {summary.bars:,}")
    print(
        f"sustained          {summary.ticks_received / seconds:,.0f} ticks/s emitted and stored "
        f"(run incl. start and drain: {wall:.1f} s)"
    )
    print(f"peak memory (RSS)  {peak_rss_mib:,.0f} MiB")
    print(
        f"event-loop lag     p50 {lag[0] * 1e3:.1f} ms, p99 {lag[1] * 1e3:.1f} ms, max {lag[2] * 1e3:.1f} ms"
    )
    ok = counts["raw"] == counts["u"] == summary.ticks_received
    print("every emitted tick stored exactly once:", "yes" if ok else "NO")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=int, default=150_000, help="target ticks/s of the synthetic source")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--bus", choices=["memory", "local"], default="memory")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(bench(args.rate, args.seconds, args.bus))


if __name__ == "__main__":
    sys.exit(main())
