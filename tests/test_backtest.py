"""The backtest: deterministic to the byte, the same fills as a live paper run over the same recording,
and a report whose model contributions add up to the PnL."""

from __future__ import annotations

import asyncio
import gzip
import time
from pathlib import Path

import msgspec
import pytest

from alphaengine.backtest import Backtest, file_batches
from alphaengine.backtest.report import load_results, read_fills, summarize, write
from alphaengine.bus.memory import MemoryBus
from alphaengine.domain import Fill
from alphaengine.kernel.module import Context, ModuleState
from alphaengine.models.predictor import Predictor, PredictorSettings
from alphaengine.pipeline.bar_builder import BarBuilder, BarBuilderSettings
from alphaengine.sources.replay import ReplaySettings, ReplaySource
from alphaengine.store.memory import MemoryStore
from alphaengine.trading import SizingSettings
from alphaengine.trading.module import Trader, TraderSettings
from tests.champions import NS, market, train_champion
from tests.conftest import real_file

pytestmark = pytest.mark.slow

BTC = ("binance-spot-ws/btcusdt_20240808.gz", "binance-spot-ws/btcusdt_20240809.gz")
TRADER = TraderSettings(
    hold_s=30.0,
    sizing=SizingSettings(min_edge_bps=0.5, min_volatility_samples=10),
)
PREDICTOR = PredictorSettings(models=("ridge",), max_bar_age_s=120.0, refresh_s=3600.0)


@pytest.fixture
async def champion(ctx: Context) -> Context:
    """A ridge champion in the context's registry, trained on synthetic bars with a signal."""
    await ctx.store.insert("bars", market(time.time_ns() // NS).to_arrow())
    await train_champion(ctx)
    return ctx


def files(names: tuple[str, ...]) -> list[str]:
    return [str(real_file(n)) for n in names]


async def backtest(ctx: Context, out: Path, names: tuple[str, ...]) -> tuple[dict[str, object], Path]:
    run = await Backtest(ctx.objects, work_dir=out / "work", trader=TRADER, predictor=PREDICTOR).run(
        file_batches(files(names))
    )
    results = await load_results(run)
    summary = summarize(results, run)
    written = write(out, results, summary)
    core = run.trader.core
    # The models' contributions add up to the run's PnL at the final marks.
    pnl = core.portfolio.equity(core.market.marks()) - TRADER.initial_cash_usd
    assert sum(summary["models"].values()) == pytest.approx(pnl, abs=1e-3)  # type: ignore[union-attr]
    return summary, written["fills"]


async def test_two_backtests_give_the_same_fills_to_the_byte(champion: Context, tmp_path: Path) -> None:
    names = (*BTC, "binance-spot-ws/ethusdt_20240808.gz")
    summary, first = await backtest(champion, tmp_path / "a", names)
    _, second = await backtest(champion, tmp_path / "b", names)
    assert first.read_bytes() == second.read_bytes()
    fills = read_fills(first)
    assert len(fills) >= 20
    assert {f.symbol for f in fills} == {"BTCUSDT", "ETHUSDT"}
    assert summary["data"]["ticks"] == 9_757 + 10_147 + 6_106  # type: ignore[index]
    page = (tmp_path / "a" / "tearsheet.html").read_text()
    assert page.count("<svg") == 5
    for title in ("Equity", "Drawdown", "Positions", "Contribution per model", "Risk rejections"):
        assert title in page


class ShiftedClock:
    """Wall time moved back to a recording's start and sped up: a live engine replaying the past."""

    def __init__(self, start_ns: int, speed: float) -> None:
        self.start_ns, self.speed = start_ns, speed
        self._t0 = time.monotonic_ns()

    def now_ns(self) -> int:
        return self.start_ns + int((time.monotonic_ns() - self._t0) * self.speed)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds / self.speed)


async def live_paper_run(ctx: Context, names: tuple[str, ...], speed: float) -> list[Fill]:
    """The recording replayed at ``speed`` through live modules on one bus, as `alphaengine run` does."""
    first_ns = read_first_ns(names)
    live = Context(
        bus=MemoryBus(),
        store=MemoryStore(),
        objects=ctx.objects,
        clock=ShiftedClock(first_ns, speed),
        data_dir=ctx.data_dir / "live",
    )
    await live.bus.start()
    await live.store.start()
    modules = [
        BarBuilder("bar_builder", BarBuilderSettings(intervals_s=(1,)), live),
        Predictor("predictor", msgspec.structs.replace(PREDICTOR, warm_up=False), live),
        Trader("trader", TRADER, live),
    ]
    # Paced by the shifted clock, which already runs `speed` times faster: as recorded on that clock.
    source = ReplaySource("source", ReplaySettings(files=tuple(files(names)), speed=1.0), live)
    try:
        for module in modules:
            await module.start()
        await source.start()
        await asyncio.wait_for(source.finished.wait(), timeout=120)
        deadline = time.monotonic() + 30
        while not all([await m.caught_up() for m in modules]) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await source.stop()
        trader = modules[2]
        assert isinstance(trader, Trader)
        assert trader.state is ModuleState.RUNNING
        for module in modules:
            await module.stop()
        table = await live.store.query(
            "SELECT fill_id, order_id, ts_ns, venue, symbol, side, qty, price, fee_usd, liquidity "
            "FROM fills FINAL ORDER BY seq"
        )
        return [msgspec.convert({"type": "fill", **r}, Fill) for r in table.to_pylist()]
    finally:
        await live.store.close()
        await live.bus.close()


def read_first_ns(names: tuple[str, ...]) -> int:
    path = real_file(names[0])
    with gzip.open(path, "rb") as f:
        return int(f.readline().split(b" ", 1)[0])


async def test_a_backtest_and_a_live_paper_run_make_the_same_fills(champion: Context, tmp_path: Path) -> None:
    _, fills_csv = await backtest(champion, tmp_path / "bt", BTC)
    backtested = read_fills(fills_csv)
    live = await live_paper_run(champion, BTC, speed=25.0)
    assert len(backtested) >= 10
    # The live run ends hold_s behind its last trade; the backtest runs to the end.
    end = max(f.ts_ns for f in live)
    assert [f for f in backtested if f.ts_ns <= end] == live
    assert len(live) >= len(backtested) - 5
