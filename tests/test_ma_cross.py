"""The moving-average cross rule: its views follow the averages of the closes, and the CLI backtests it."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import orjson
import pytest

from alphaengine.codec import decode_event, encode_bars
from alphaengine.domain import BarBatch, Prediction
from alphaengine.kernel.module import Context
from alphaengine.models.ma_cross import MaCross, MaCrossSettings
from tests.conftest import real_file
from tests.test_engine_e2e import cli

NS = 1_000_000_000
T0 = 1_700_000_000 * NS


def bars(closes: list[float], interval_s: int = 1) -> BarBatch:
    n = len(closes)
    c = np.asarray(closes)
    return BarBatch.from_pydict(
        {
            "venue": ["BINANCE"] * n,
            "symbol": ["BTCUSDT"] * n,
            "interval_s": [interval_s] * n,
            "ts_ns": [T0 + i * interval_s * NS for i in range(n)],
            "open": c,
            "high": c,
            "low": c,
            "close": c,
            "volume": np.ones(n),
            "quote_volume": c,
            "vwap": c,
            "trade_count": [1] * n,
            "buy_volume": np.ones(n),
            "sell_volume": np.zeros(n),
            "first_trade_id": list(range(n)),
            "last_trade_id": list(range(n)),
        }
    )


async def test_the_view_follows_the_fast_and_slow_averages(ctx: Context) -> None:
    closes = [100.0] * 5 + [101.0, 102.0, 103.0] + [99.0] * 6
    module = MaCross("ma_cross", MaCrossSettings(fast=2, slow=4, edge=0.01), ctx)
    await ctx.bus.create_topic("bars")
    await module.start()
    await (await ctx.bus.send("bars", encode_bars(bars(closes)), key=b"BTCUSDT"))
    await (
        await ctx.bus.send("bars", encode_bars(bars([1.0], interval_s=60)), key=b"BTCUSDT")
    )  # other length
    await (await ctx.bus.send("bars", encode_bars(bars(closes[:3])), key=b"BTCUSDT"))  # sent again: ignored
    reader = ctx.bus.consumer("reader", ["predictions"])
    await reader.start()
    got: list[Prediction] = []
    deadline = time.monotonic() + 10
    while len(got) < len(closes) - 3 and time.monotonic() < deadline:
        got += [decode_event(r.value, Prediction) for r in await reader.getmany(100, 0.2)]
    await asyncio.sleep(0.3)
    got += [decode_event(r.value, Prediction) for r in await reader.getmany(100, 0.2)]
    await reader.close()
    await module.stop()
    expected = []
    for i in range(3, len(closes)):
        fast, slow = np.mean(closes[i - 1 : i + 1]), np.mean(closes[i - 3 : i + 1])
        expected.append((T0 + i * NS, 0.01 if fast > slow else -0.01))
    assert [(p.bar_ts_ns, p.value) for p in got] == expected
    assert {(p.model, p.version, p.weight, p.group_size) for p in got} == {("ma_cross", "2x4", 1.0, 1)}


@pytest.mark.slow
def test_the_backtest_command_writes_its_files(tmp_path: Path) -> None:
    config = tmp_path / "bt.toml"
    config.write_text(
        f"""
[engine]
data_dir = "{tmp_path}/var"
[bus]
kind = "memory"
[store]
kind = "memory"
[objectstore]
kind = "local"
path = "{tmp_path}/var/objects"
[metrics]
port = 0
enabled = false
[admin]
socket = "{tmp_path}/var/admin.sock"
[modules.rule]
type = "ma_cross"
[modules.trader]
type = "trader"
[modules.trader.sizing]
min_edge_bps = 0
rebalance_fraction = 1.0
min_volatility_samples = 5
"""
    )
    recordings = str(real_file("binance-spot-ws/btcusdt_20240808.gz").parent / "*.gz")
    out = tmp_path / "out"
    done = cli(
        "backtest",
        "--config",
        str(config),
        "--files",
        recordings,
        "--out",
        str(out),
        "--no-progress",
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "26,010 trades" in done.stdout
    summary = orjson.loads((out / "summary.json").read_bytes())
    assert summary["champions"] == {"ma_cross": "rule"}
    assert summary["performance"]["fills"] > 10
    assert set(summary["models"]) == {"ma_cross"}
    for name in ("fills.csv", "orders.csv", "equity.csv", "tearsheet.html"):
        assert (out / name).stat().st_size > 100
