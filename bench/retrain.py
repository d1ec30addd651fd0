"""Retraining benchmark: full training cycles of the five models inside a running engine.

The engine runs in this process on the embedded default's parts (memory bus, chDB, local object store)
with the live pipeline busy: the synthetic market at ``--rate`` trades/s, tick sink, bar builder, bar
sink, and the trainer module (``--rate 0``: the trainer alone). Before the first cycle, ``--days`` of
1-second bars of 5 symbols (the synthetic market with ``--predictability``) are written to the store,
ending a minute ago, so the trainer's default 7-day window holds about 3 million rows. Then
``--cycles`` cycles run back to back through the admin socket (``retrain`` with ``wait``), with the
trainer's default settings: every model's walk-forward (5 folds) and final fit, in spawned workers at
lower priority.

Reported per cycle: wall time (and per model), peak RSS of the whole process tree (engine and workers,
sampled every 50 ms), the engine process's RSS after the cycle with its Python allocator blocks, Arrow
pool and asyncio tasks (does memory stay flat over cycles?), and the engine's event-loop lag while the
cycle ran (p50 / p99 / max of a probe every 250 ms), with the ticks the pipeline stored meanwhile (does
training stall ingestion?).

    .venv/bin/python bench/retrain.py                        # 7 days, 1 cycle
    .venv/bin/python bench/retrain.py --days 1 --cycles 5    # memory over cycles
    .venv/bin/python bench/retrain.py --days 1 --cycles 5 --rate 0   # the same, trainer alone
    .venv/bin/python bench/retrain.py --workers 2 --threads 1  # two jobs at a time, one thread each
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import uvloop
from models import TreeSampler, machine_load  # bench/models.py

from alphaengine import metrics
from alphaengine.config import loads
from alphaengine.kernel import admin
from alphaengine.kernel.engine import Engine
from alphaengine.sources.synthetic import SyntheticSettings
from alphaengine.testing.bars import synthetic_bars

NS = 1_000_000_000
SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT", "ADAUSDT", "XRPUSDT")


def config_text(root: Path, rate: int, workers: int, threads: int) -> str:
    pipeline = f"""
[modules.source]
type = "synthetic"
symbols = {list(SYMBOLS)}
rate_per_s = {rate}
[modules.tick_sink]
type = "tick_sink"
[modules.bar_builder]
type = "bar_builder"
intervals_s = [1, 60]
[modules.bar_sink]
type = "bar_sink"
"""
    return f"""
[engine]
name = "bench"
data_dir = "{root}"
stop_deadline_s = 60
report_interval_s = 0
[bus]
kind = "memory"
[store]
kind = "chdb"
path = "{root}/chdb"
[objectstore]
kind = "local"
path = "{root}/objects"
[metrics]
port = 0
enabled = false
[admin]
socket = "{root}/admin.sock"
{pipeline if rate else ""}
[modules.trainer]
type = "trainer"
first_cycle_s = 86400
workers = {workers}
threads_per_worker = {threads}
"""


def lag_summary(samples: list[float]) -> str:
    if not samples:
        return "no samples"
    ms = np.array(samples) * 1e3
    return f"{np.percentile(ms, 50):.1f} / {np.percentile(ms, 99):.1f} / {ms.max():.1f} ms"


async def bench(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="bench-retrain-") as tmp:
        root = Path(tmp)
        engine = Engine(loads(config_text(root, args.rate, args.workers, args.threads)))
        run = asyncio.ensure_future(engine.run(handle_signals=False))
        await asyncio.wait_for(engine.ready.wait(), 60)
        assert engine.supervisor is not None
        store = engine.supervisor.ctx.store

        started = time.perf_counter()
        seconds = int(args.days * 86_400)
        end_ns = (time.time_ns() // NS - 60) * NS
        settings = SyntheticSettings(symbols=SYMBOLS, rate_per_s=20.0, predictability=args.predictability)
        bars = synthetic_bars(settings, seconds=seconds, start_ns=end_ns - seconds * NS, seed=1)
        await store.insert("bars", bars.to_arrow())
        print(
            f"history: {bars.height:,} bars of 1 s, {len(SYMBOLS)} symbols, {args.days:g} days, written in "
            f"{time.perf_counter() - started:.1f} s; live pipeline at {args.rate:,} trades/s",
            flush=True,
        )
        del bars
        me = psutil.Process()
        print(f"engine RSS before the first cycle: {me.memory_info().rss / 2**20:,.0f} MiB", flush=True)
        print(f"before: {await asyncio.to_thread(machine_load)}", flush=True)
        sock = root / "admin.sock"
        for cycle in range(args.cycles):
            lag_from = len(engine.loop_lag.samples)
            stored_from = metrics.total(metrics.TICKS_STORED)
            with TreeSampler() as sampler:
                started = time.perf_counter()
                report = await admin.request(sock, "retrain", {"wait": True}, timeout_s=7200)
                wall = time.perf_counter() - started
            lag = list(engine.loop_lag.samples)[lag_from:]
            stored = metrics.total(metrics.TICKS_STORED) - stored_from
            frame = report["frame"] or {}
            gc.collect()
            print(
                f"cycle {cycle + 1}: {report['status']} in {wall:.1f} s on {frame.get('rows', 0):,} rows; "
                f"tree peak RSS {sampler.peak_bytes / 2**20:,.0f} MiB; engine RSS after "
                f"{me.memory_info().rss / 2**20:,.0f} MiB (Python blocks {sys.getallocatedblocks():,}, "
                f"Arrow pool {pa.total_allocated_bytes() / 2**20:,.1f} MiB, "
                f"{len(asyncio.all_tasks())} tasks); event-loop lag p50/p99/max {lag_summary(lag)}; "
                f"ticks stored meanwhile {stored:,.0f} ({stored / wall:,.0f}/s)",
                flush=True,
            )
            if frame:
                print(
                    f"  training frame: {frame['seconds']:.1f} s in its worker, worker peak RSS "
                    f"{frame['peak_rss_bytes'] / 2**20:,.0f} MiB",
                    flush=True,
                )
            for m in report["models"]:
                r = m["report"]
                if r is None:
                    print(f"  {m['model']:>6}: FAILED {m['failure']}: {m['error']}", flush=True)
                    continue
                print(
                    f"  {m['model']:>6}: {m['seconds']:6.1f} s (validation {r['validate_s']:.1f} s, "
                    f"final fit {r['fit_s']:.1f} s), worker peak RSS {r['peak_rss_bytes'] / 2**20:,.0f} MiB; "
                    f"OOS IC {r['candidate']['ic']:+.4f}, {m['status']}",
                    flush=True,
                )
        print(f"after: {await asyncio.to_thread(machine_load)}", flush=True)
        engine.request_stop("benchmark over")
        await run
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--days", type=float, default=7.0)
    parser.add_argument("--cycles", type=int, default=1)
    parser.add_argument(
        "--rate", type=int, default=2_000, help="live trades/s while training (0: no live pipeline)"
    )
    parser.add_argument("--predictability", type=float, default=0.3)
    parser.add_argument("--workers", type=int, default=1, help="the trainer's worker processes")
    parser.add_argument("--threads", type=int, default=2, help="threads per worker")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return uvloop.run(bench(args))


if __name__ == "__main__":
    sys.exit(main())
