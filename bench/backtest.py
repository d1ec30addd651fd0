"""Backtest throughput side by side with NautilusTrader, on the same trades and the same simple rule.

    .venv/bin/python bench/backtest.py                     # 1,000,000 trades, 2 symbols
    .venv/bin/python bench/backtest.py --trades 200000 --no-nautilus

Writes a tick file of a random-walk market (two Binance spot symbols, 40 trades a second in all), then
backtests a moving-average cross (10 and 20 one-second bars, market orders, long or short on each cross)
over it twice: with alphaengine's backtest (bar builder, ``ma_cross`` module and trader on the bus,
the same modules as live) and with NautilusTrader's ``BacktestEngine`` (``bench/nautilus_ma_cross.py``,
run in ``.venv-nautilus``, made on first use with ``pip install nautilus_trader==1.221.0``). Reports
trades per second of each and their ratio. Nautilus's time is its ``engine.run()`` alone (building its
tick objects is reported apart); alphaengine's is the whole run from the file to the stored fills.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from alphaengine.backtest import Backtest, file_batches
from alphaengine.domain import TICK_SCHEMA
from alphaengine.models.ma_cross import MaCrossSettings
from alphaengine.objectstore.memory import MemoryObjectStore
from alphaengine.trading import RiskLimits, SizingSettings
from alphaengine.trading.module import TraderSettings

REPO = Path(__file__).resolve().parents[1]
NAUTILUS_VENV = REPO / ".venv-nautilus"
NAUTILUS_VERSION = "1.221.0"
NS = 1_000_000_000


def make_ticks(path: Path, trades: int, seed: int = 3) -> None:
    """A random walk per symbol, trades at random times, 40 a second in all."""
    rng = np.random.default_rng(seed)
    start = 1_722_470_400 * NS  # 2024-08-01
    span = int(trades / 40 * NS)
    parts = []
    for i, (symbol, price0) in enumerate((("BTCUSDT", 60_000.0), ("ETHUSDT", 2_600.0))):
        n = trades // 2 + (trades % 2 if i == 0 else 0)
        ts = np.sort(rng.integers(start, start + span, n)).astype(np.int64)
        price = np.round(price0 * np.exp(np.cumsum(rng.normal(0, 1.5e-4, n))), 2)
        parts.append(
            pa.table(
                {
                    "venue": pa.array(["BINANCE"] * n),
                    "symbol": pa.array([symbol] * n),
                    "trade_id": np.arange(1, n + 1, dtype=np.int64),
                    "ts_ns": ts,
                    "recv_ns": ts,
                    "price": price,
                    "qty": np.round(rng.exponential(0.05, n) + 0.0001, 5),
                    "side": rng.choice(np.array([-1, 1], dtype=np.int8), n),
                },
                schema=TICK_SCHEMA,
            )
        )
    table = pa.concat_tables(parts).sort_by([("ts_ns", "ascending"), ("symbol", "ascending")])
    pq.write_table(table, path)


async def run_alphaengine(path: Path, work: Path) -> dict[str, float]:
    trader = TraderSettings(
        limits=RiskLimits(
            max_order_notional_usd=1e9,
            max_position_notional_usd=1e9,
            max_gross_exposure_usd=1e9,
            max_orders_per_minute=10_000,
            max_daily_loss_usd=1e9,
            max_drawdown_pct=100,
        ),
        sizing=SizingSettings(min_edge_bps=0, rebalance_fraction=1.0, min_volatility_samples=2),
    )
    rule = MaCrossSettings(fast=10, slow=20)
    objects = MemoryObjectStore()
    await objects.start()
    started = time.perf_counter()
    run = await Backtest(objects, work_dir=work, trader=trader, predictor=rule).run(
        file_batches([str(path)], batch_size=50_000)
    )
    elapsed = time.perf_counter() - started
    fills = (await run.store.query("SELECT count() AS n FROM fills"))["n"][0].as_py()
    await run.store.close()
    return {"trades": run.ticks, "fills": fills, "run_s": elapsed}


def ensure_nautilus() -> Path:
    python = NAUTILUS_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(NAUTILUS_VENV)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", f"nautilus_trader=={NAUTILUS_VERSION}"],
            check=True,
        )
    return python


def run_nautilus(path: Path) -> dict[str, float]:
    python = ensure_nautilus()
    done = subprocess.run(
        [str(python), str(REPO / "bench" / "nautilus_ma_cross.py"), str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trades", type=int, default=1_000_000)
    parser.add_argument("--no-nautilus", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ticks.parquet"
        make_ticks(path, args.trades)
        ours = asyncio.run(run_alphaengine(path, Path(tmp) / "work"))
        rate = ours["trades"] / ours["run_s"]
        print(
            f"alphaengine: {ours['trades']:,} trades in {ours['run_s']:.2f} s = {rate:,.0f} trades/s, "
            f"{ours['fills']} fills"
        )
        if args.no_nautilus:
            return
        theirs = run_nautilus(path)
        their_rate = theirs["trades"] / theirs["run_s"]
        print(
            f"NautilusTrader {NAUTILUS_VERSION}: {theirs['trades']:,} trades in {theirs['run_s']:.2f} s "
            f"= {their_rate:,.0f} trades/s, {theirs['fills']} fills "
            f"(building its ticks: {theirs['build_s']:.2f} s)"
        )
        print(f"ratio alphaengine / NautilusTrader: {rate / their_rate:.2f}")


if __name__ == "__main__":
    main()
