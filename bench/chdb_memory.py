"""Memory of the embedded store: does chDB's RSS grow as bars are appended and the training window read?

The trainer's side of a cycle in the engine process is a read of its window of bars from the store
(:func:`~alphaengine.models.trainer.latest_bars`) written to Parquet for the workers. This benchmark repeats
that against a fresh chDB store in a temporary directory, in rounds: each round appends ``--rows`` 1-second
bars to each of five symbols (as the bar sink does) and reads the last ``--window`` seconds as the trainer
does. ``--mode insert`` only appends, ``--mode query`` appends once (``--rounds`` x ``--rows`` bars a
symbol) and then only reads. Every ``--every`` rounds it prints the process's RSS, what chDB's own memory
tracker counts (``system.metrics`` ``MemoryTracking``), the active parts of the table and the process's
threads.

    .venv/bin/python bench/chdb_memory.py                     # 1,000 rounds of both, about 2 minutes
    .venv/bin/python bench/chdb_memory.py --mode insert --rounds 300
    .venv/bin/python bench/chdb_memory.py --mode query --rounds 300
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

from alphaengine.models.trainer import latest_bars
from alphaengine.store.chdb import ChdbStore

MIB = 1024 * 1024
SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT", "ADAUSDT", "XRPUSDT")
T0_S = 1_780_000_000


def bars(symbol: str, first_s: int, n: int, rng: np.random.Generator) -> pa.Table:
    """``n`` 1-second bars of ``symbol`` from ``first_s``, as the bar sink writes them."""
    ts_ns = np.arange(first_s, first_s + n, dtype=np.int64) * 1_000_000_000
    price = 100.0 + np.cumsum(rng.normal(0.0, 0.01, n))
    volume = rng.exponential(1.0, n)
    ids = np.arange(n, dtype=np.int64) + first_s * 10
    return pa.table(
        {
            "venue": pa.array(["binance"] * n),
            "symbol": pa.array([symbol] * n),
            "interval_s": pa.array(np.ones(n, np.int32)),
            "ts_ns": ts_ns,
            "open": price,
            "high": price + 0.01,
            "low": price - 0.01,
            "close": price,
            "volume": volume,
            "quote_volume": volume * price,
            "vwap": price,
            "trade_count": np.full(n, 3, np.int64),
            "buy_volume": volume / 2,
            "sell_volume": volume / 2,
            "first_trade_id": ids,
            "last_trade_id": ids + 2,
        }
    )


async def append(store: ChdbStore, first_s: int, n: int, rng: np.random.Generator) -> None:
    for symbol in SYMBOLS:
        await store.insert("bars", bars(symbol, first_s, n, rng))


async def look(store: ChdbStore, proc: psutil.Process) -> tuple[float, float, int, int]:
    """RSS, chDB's tracked memory (MiB), active parts of ``bars``, threads."""
    tracked = await store.query(
        "SELECT toInt64(value) AS v FROM system.metrics WHERE metric = 'MemoryTracking'"
    )
    parts = await store.query(
        "SELECT toInt64(count()) AS n FROM system.parts WHERE table = 'bars' AND active"
    )
    return (
        proc.memory_info().rss / MIB,
        tracked["v"][0].as_py() / MIB,
        parts["n"][0].as_py(),
        proc.num_threads(),
    )


async def main(args: argparse.Namespace) -> None:
    rng = np.random.default_rng(7)
    proc = psutil.Process()
    with tempfile.TemporaryDirectory(prefix="alphaengine-chdb-memory-") as tmp:
        store = ChdbStore(Path(tmp) / "store")
        await store.start()
        newest_s = T0_S
        if args.mode == "query":
            await append(store, newest_s, args.rounds * args.rows, rng)
            newest_s += args.rounds * args.rows
        began = time.monotonic()
        first = await look(store, proc)
        print(f"{'round':>6} {'s':>6} {'RSS MiB':>8} {'tracked MiB':>12} {'parts':>6} {'threads':>8}")
        for i in range(args.rounds + 1):
            if args.mode != "query":
                await append(store, newest_s, args.rows, rng)
                newest_s += args.rows
            if args.mode != "insert":
                window = await latest_bars(store, "interval_s = 1", int(args.window * 1e9))
                assert window is not None
                pq.write_table(window, Path(tmp) / "bars.parquet", compression="zstd")
                del window
            if i % args.every == 0:
                rss, tracked, parts, threads = await look(store, proc)
                print(
                    f"{i:>6} {time.monotonic() - began:>6.0f} {rss:>8.1f} {tracked:>12.1f} {parts:>6}"
                    f" {threads:>8}",
                    flush=True,
                )
        rss, tracked, _, _ = await look(store, proc)
        rows = (newest_s - T0_S) * len(SYMBOLS)
        print(
            f"{args.mode}: RSS {first[0]:.0f} -> {rss:.0f} MiB,"
            f" chDB tracked {first[1]:.1f} -> {tracked:.1f} MiB, {rows:,} bars in the table"
        )
        await store.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", choices=("both", "insert", "query"), default="both")
    parser.add_argument("--rounds", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=120, help="bars appended to each symbol a round")
    parser.add_argument("--window", type=float, default=900.0, help="seconds of bars read a round")
    parser.add_argument("--every", type=int, default=50, help="print every this many rounds")
    asyncio.run(main(parser.parse_args()))
