"""Feature engine benchmarks: streaming cost per update and per bar, batch cost on a week of 1 s bars.

``stream``: a :class:`~alphaengine.features.FeatureStream` of the core feature set, warmed up, then fed
one 1-second bar per symbol per update (what the live engine sees each second) for ``--updates``
updates, for each symbol count in ``--symbols``; prints the time per update (median, p99) and per bar.
About 10 % of the seconds of each symbol have no bar, so the gap rule runs too.

``batch``: ``training_frame`` (grid, features, targets, null rows dropped) on ``--days`` days of 1-second
bars of 5 symbols (7 days: about 3 million rows), with its wall time and the process' peak RSS.

    .venv/bin/python bench/features.py stream --symbols 1 5 50
    .venv/bin/python bench/features.py batch --days 7

Bars are random walks built with numpy (the synthetic market at that scale would take longer to generate
than the benchmark takes to run); the feature code does not care where bars come from.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

import numpy as np
import polars as pl

from alphaengine.features import Targets, core_feature_set, training_frame

NS = 1_000_000_000
T0 = 1_723_161_600 * NS


def random_bars(symbols: int, seconds: int, seed: int = 1, missing: float = 0.1) -> pl.DataFrame:
    """1-second bars of random-walk symbols, ``missing`` of the seconds without a bar, in time order."""
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(symbols):
        keep = rng.random(seconds) >= missing
        keep[0] = True
        ts = T0 + np.flatnonzero(keep).astype(np.int64) * NS
        n = len(ts)
        close = 100.0 * np.exp(np.cumsum(rng.normal(0.0, 1e-4, n)))
        spread = np.abs(rng.normal(0.0, 5e-5, n))
        volume = rng.exponential(1.0, n)
        buy = volume * rng.random(n)
        frames.append(
            pl.DataFrame(
                {
                    "venue": "BENCH",
                    "symbol": f"S{i:03d}",
                    "interval_s": np.ones(n, dtype=np.int32),
                    "ts_ns": ts,
                    "open": close,
                    "high": close * (1 + spread),
                    "low": close * (1 - spread),
                    "close": close,
                    "volume": volume,
                    "quote_volume": volume * close,
                    "vwap": close,
                    "trade_count": rng.poisson(5.0, n) + 1,
                    "buy_volume": buy,
                    "sell_volume": volume - buy,
                    "first_trade_id": ts // 1000,
                    "last_trade_id": ts // 1000,
                }
            )
        )
    return pl.concat(frames).sort("ts_ns", "symbol")


def bench_stream(symbol_counts: list[int], updates: int) -> None:
    feature_set = core_feature_set()
    warm = feature_set.max_lookback
    print(f"feature set {feature_set.version}: {len(feature_set.names)} features, lookback {warm} bars")
    print(
        f"polars {pl.__version__}, POLARS_MAX_THREADS={os.environ.get('POLARS_MAX_THREADS', 'default')}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    for symbols in symbol_counts:
        bars = random_bars(symbols, warm + updates + 1)
        stream = feature_set.stream()
        stream.update(bars.filter(pl.col("ts_ns") < T0 + warm * NS))
        seconds = bars.filter(pl.col("ts_ns") >= T0 + warm * NS).partition_by("ts_ns", maintain_order=True)
        times = []
        bar_count = 0
        for part in seconds[:updates]:
            started = time.perf_counter()
            stream.update(part)
            times.append(time.perf_counter() - started)
            bar_count += part.height
        total = sum(times)
        p99 = statistics.quantiles(times, n=100)[98]
        print(
            f"{symbols:4d} symbols: {len(times)} updates, median {statistics.median(times) * 1e3:.2f} ms, "
            f"p99 {p99 * 1e3:.2f} ms per update; {total / bar_count * 1e6:.0f} us per bar"
        )


def bench_batch(days: float) -> None:
    seconds = int(days * 86_400)
    started = time.perf_counter()
    bars = random_bars(5, seconds)
    built = time.perf_counter() - started
    feature_set, targets = core_feature_set(), Targets()
    started = time.perf_counter()
    frame = training_frame(bars, feature_set, targets)
    elapsed = time.perf_counter() - started
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"{bars.height:,} bars (built in {built:.1f} s) -> training frame {frame.height:,} x {frame.width} "
        f"in {elapsed:.1f} s; peak RSS {peak_mib:,.0f} MiB; load average {os.getloadavg()[0]:.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    stream = sub.add_parser("stream")
    stream.add_argument("--symbols", type=int, nargs="+", default=[1, 5, 50])
    stream.add_argument("--updates", type=int, default=600)
    batch = sub.add_parser("batch")
    batch.add_argument("--days", type=float, default=7.0)
    args = parser.parse_args()
    if args.command == "stream":
        bench_stream(args.symbols, args.updates)
    else:
        bench_batch(args.days)


if __name__ == "__main__":
    main()
