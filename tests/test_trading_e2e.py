"""Paper trading in the engine as users run it, killed with SIGKILL in the middle and restarted."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path

import msgspec
import polars as pl
import pytest

from alphaengine.bus.base import TopicPartition
from alphaengine.bus.memory import MemoryBus
from alphaengine.clock import LiveClock
from alphaengine.codec import decode_event, decode_ticks
from alphaengine.config import load
from alphaengine.domain import Fill, Prediction
from alphaengine.kernel.engine import resolve_config_paths
from alphaengine.kernel.module import Context
from alphaengine.objectstore import build_objectstore
from alphaengine.store import build_store
from alphaengine.trading import CoreState, Portfolio, TradingCore
from alphaengine.trading.module import TraderSettings
from tests.champions import NS, market, train_champion
from tests.test_engine_e2e import query, start_engine, write_config

pytestmark = pytest.mark.slow

MODULES = """
[modules.source]
type = "synthetic"
symbols = ["BTCUSDT", "ETHUSDT"]
rate_per_s = 400
predictability = 0.5
seed = 11
[modules.predictor]
type = "predictor"
models = ["ridge"]
refresh_s = 1
[modules.trader]
type = "trader"
snapshot_interval_s = 1
equity_interval_s = 5
[modules.trader.limits]
max_orders_per_minute = 60
[modules.trader.sizing]
min_edge_bps = 1
min_volatility_samples = 10
rebalance_fraction = 0.02
"""


async def champion_in(config: Path) -> None:
    """A ridge champion in the engine's registry, trained on synthetic bars with the same signal that end
    now, stored in the engine's store too: the predictor warms up on them and predicts from the start."""
    app = resolve_config_paths(load(config)).app
    store, objects = build_store(app.store), build_objectstore(app.objectstore)
    await store.start()
    await objects.start()
    ctx = Context(
        bus=MemoryBus(), store=store, objects=objects, clock=LiveClock(), data_dir=Path(app.engine.data_dir)
    )
    await store.insert("bars", market(time.time_ns() // NS).to_arrow())
    await train_champion(ctx)
    await objects.close()
    await store.close()


def fills_count(config: Path) -> int:
    return int(query(config, "SELECT count() AS n FROM fills FINAL")["n"][0])


def wait_for_fills(config: Path, proc: subprocess.Popen[str], at_least: int, timeout_s: float = 120) -> int:
    deadline = time.monotonic() + timeout_s
    while (n := fills_count(config)) < at_least:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        if time.monotonic() > deadline:
            pytest.fail(f"only {n} fills after {timeout_s} s (wanted {at_least})")
        time.sleep(1.0)
    return n


async def keep_everything(
    bus_dir: Path, topics: tuple[str, ...] = ("ticks", "predictions"), partitions: int = 4
) -> None:
    """Subscribe the groups the check reads with (``verify-<topic>``) before the engine starts: the local
    bus keeps what a known group has not committed, so the whole run stays readable."""
    bus = MemoryBus(bus_dir, partitions=partitions)
    await bus.start()
    for topic in topics:
        await bus.create_topic(topic)
        consumer = bus.consumer(f"verify-{topic}", [topic])
        await consumer.start()
        await consumer.close()
    await bus.close()


async def replay_uninterrupted(
    bus_dir: Path, settings: TraderSettings, traded: set[str], until_ns: int
) -> TradingCore:
    """One core, never interrupted, over what the engine's bus recorded: the ticks, and the predictions
    of the bars the engine's trader decided on (a bar it found late it did not trade; nor does this)."""
    bus = MemoryBus(bus_dir)
    await bus.start()
    core = TradingCore(settings.core())
    try:
        for topic in ("ticks", "predictions"):
            consumer = bus.consumer(f"verify-{topic}", [topic])
            await consumer.start()
            tps = [TopicPartition(topic, i) for i in range(await bus.partitions(topic))]
            left = {tp: end for tp, end in (await bus.end_offsets(tps)).items() if end}
            while left:
                for r in await consumer.getmany(10_000, 0.2):
                    if r.offset + 1 >= left.get(r.tp, 0):
                        left.pop(r.tp, None)
                    if topic == "ticks":
                        core.add_ticks(decode_ticks(r.value))
                    else:
                        p = decode_event(r.value, Prediction)
                        if f"{p.venue}:{p.symbol}:{p.interval_s}:{p.bar_ts_ns}" in traded:
                            core.add_prediction(p)
            await consumer.close()
    finally:
        await bus.close()
    core.run_until(until_ns)
    return core


def test_sigkill_mid_paper_trading_changes_nothing(tmp_path: Path) -> None:
    config = write_config(tmp_path, MODULES)
    asyncio.run(champion_in(config))
    asyncio.run(keep_everything(tmp_path / "var" / "bus"))
    settings = next(m.settings for m in load(config).modules if m.name == "trader")
    assert isinstance(settings, TraderSettings)

    proc = start_engine(config)
    try:
        before = wait_for_fills(config, proc, 6)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    proc = start_engine(config)
    try:
        wait_for_fills(config, proc, before + 6)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0, proc.communicate()[1][-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)

    fills = query(config, "SELECT * FROM fills FINAL ORDER BY seq")
    assert fills["seq"].to_list() == list(range(1, fills.height + 1))
    assert fills["fill_id"].n_unique() == fills.height
    state_row = query(config, "SELECT state FROM trader_state FINAL")
    state = msgspec.json.decode(state_row["state"][0], type=CoreState)
    assert state.portfolio.fill_seq == fills.height

    # The portfolio folded from the fills log is the one the engine ended with.
    log = list(zip(fills["seq"].to_list(), _fills(fills), strict=True))
    rebuilt = Portfolio.from_fills(settings.initial_cash_usd, log).state()
    assert (
        msgspec.structs.replace(rebuilt, peak_equity_usd=state.portfolio.peak_equity_usd) == state.portfolio
    )

    # And an uninterrupted core over the same data makes the same fills and the same equity curve.
    traded = set(query(config, "SELECT signal_id FROM signals FINAL")["signal_id"].to_list())
    core = asyncio.run(replay_uninterrupted(tmp_path / "var" / "bus", settings, traded, state.now_ns))
    out = core.drain()
    assert [f.fill_id for _, f in out.fills] == fills["fill_id"].to_list()
    assert [f.price for _, f in out.fills] == fills["price"].to_list()
    assert core.portfolio.state() == msgspec.structs.replace(
        rebuilt, peak_equity_usd=core.portfolio.peak_equity_usd
    )
    equity = query(config, "SELECT ts_ns, equity_usd FROM equity FINAL ORDER BY ts_ns")
    assert equity["ts_ns"].to_list() == [p.ts_ns for p in out.equity]
    assert equity["equity_usd"].to_list() == [p.equity_usd for p in out.equity]
    steps = {b - a for a, b in zip(equity["ts_ns"].to_list(), equity["ts_ns"].to_list()[1:], strict=False)}
    assert steps == {5 * NS}  # no point lost or repeated across the crash


def _fills(frame: pl.DataFrame) -> list[Fill]:
    return [
        msgspec.convert({"type": "fill", **{k: r[k] for k in Fill.__struct_fields__}}, Fill)
        for r in frame.to_dicts()
    ]
