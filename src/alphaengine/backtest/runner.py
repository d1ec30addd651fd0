"""The backtest: the live modules (bar builder, predictor, trader) on a simulated clock, as fast as possible.

Trades come from recording or tick files (merged in time order across files) or from the store's
``ticks`` table over a range of days; they go onto an in-memory bus in records of one symbol, as a
source sends them, and the bar builder, the predictor (with the registry's champions) and the trader
run on them exactly as in a live engine (a configuration with an ``ma_cross`` module backtests that
rule instead of the predictor). The run proceeds in steps of ``step_s`` seconds of event time: the
trades of a step are sent, the clock is set to the step's start, and the next step waits until every
module has handled everything before it. With the trader holding ``step_s`` more than its live
``hold_s`` behind the newest trade, no bar's predictions can come after the trader passed it, so the
fills are those a live run without delays makes, and two runs give the same fills to the byte.

The trader's fills, orders and equity curve land in an in-memory store, from which
:mod:`alphaengine.backtest.report` writes the files of the run.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pyarrow as pa

from alphaengine.bus.memory import MemoryBus
from alphaengine.clock import SimClock
from alphaengine.codec import encode_ticks
from alphaengine.config import LoadedConfig
from alphaengine.domain import TICK_SCHEMA, TickBatch
from alphaengine.errors import AlphaEngineError
from alphaengine.kernel.module import Context, ModuleState
from alphaengine.models.ma_cross import MaCross, MaCrossSettings
from alphaengine.models.predictor import Predictor, PredictorSettings
from alphaengine.objectstore.base import ObjectStore
from alphaengine.pipeline.bar_builder import BarBuilder, BarBuilderSettings
from alphaengine.pipeline.consumer import ConsumerModule
from alphaengine.sources.binance import BinanceTradeParser
from alphaengine.sources.replay import open_reader, resolve_files
from alphaengine.store.base import Store
from alphaengine.store.memory import MemoryStore
from alphaengine.trading.module import Trader, TraderSettings

NS = 1_000_000_000
log = logging.getLogger("alphaengine.backtest")

_TICK_COLUMNS = ", ".join(f.name for f in TICK_SCHEMA)


class BacktestError(AlphaEngineError):
    """A backtest that cannot run as asked (no data, a module that failed)."""


@dataclass(frozen=True, slots=True)
class Progress:
    """Where a running backtest is."""

    ticks: int
    event_ns: int
    wall_s: float


@dataclass(frozen=True, slots=True)
class BacktestRun:
    """A finished backtest: the store holding its results and the trader that made them."""

    store: Store
    trader: Trader
    ticks: int
    first_ns: int
    last_ns: int
    wall_s: float
    champions: dict[str, str]
    """The model versions the predictor traded with."""


def _has(loaded: LoadedConfig | None, cls: type[Any]) -> bool:
    return loaded is not None and any(type(m.settings) is cls and m.enabled for m in loaded.modules)


def _settings_of(loaded: LoadedConfig | None, cls: type[Any], **overrides: Any) -> Any:
    """The settings of the first configured module of that settings class, else the defaults."""
    base = None
    if loaded is not None:
        base = next((m.settings for m in loaded.modules if type(m.settings) is cls), None)
    if base is None:
        base = cls()
    return msgspec.structs.replace(base, **overrides)


class Backtest:
    """One backtest over a stream of trades."""

    def __init__(
        self,
        objects: ObjectStore,
        *,
        loaded: LoadedConfig | None = None,
        work_dir: Path,
        step_s: int = 60,
        trader: TraderSettings | None = None,
        predictor: PredictorSettings | MaCrossSettings | None = None,
    ) -> None:
        if step_s < 1:
            raise BacktestError(f"step_s must be at least 1, not {step_s}")
        self.objects = objects
        self.step_s = step_s
        self.work_dir = work_dir
        live_trader = trader or _settings_of(loaded, TraderSettings)
        self.trader_settings = msgspec.structs.replace(
            live_trader, hold_s=live_trader.hold_s + step_s, snapshot_interval_s=1e9
        )
        configured = _settings_of(loaded, MaCrossSettings) if _has(loaded, MaCrossSettings) else None
        chosen = predictor or configured or _settings_of(loaded, PredictorSettings)
        self.predictor_settings: PredictorSettings | MaCrossSettings = (
            msgspec.structs.replace(chosen, warm_up=False)
            if isinstance(chosen, PredictorSettings)
            else chosen
        )
        intervals = sorted({1, self.predictor_settings.bar_interval_s})
        self.bar_settings = _settings_of(loaded, BarBuilderSettings, intervals_s=tuple(intervals))

    async def run(
        self, batches: AsyncIterator[TickBatch], progress: Callable[[Progress], None] | None = None
    ) -> BacktestRun:
        """Run the modules over ``batches`` (trades in time order); the results are in the run's store."""
        started = time.monotonic()
        bus, store = MemoryBus(), MemoryStore()
        await bus.start()
        await store.start()
        clock = SimClock()
        ctx = Context(bus=bus, store=store, objects=self.objects, clock=clock, data_dir=self.work_dir)
        for topic in ("ticks", "bars", "predictions"):
            await bus.create_topic(topic)
        bars = BarBuilder("bar_builder", self.bar_settings, ctx)
        predictor: Predictor | MaCross = (
            Predictor("predictor", self.predictor_settings, ctx)
            if isinstance(self.predictor_settings, PredictorSettings)
            else MaCross("ma_cross", self.predictor_settings, ctx)
        )
        trader = Trader("trader", self.trader_settings, ctx)
        modules: list[ConsumerModule[Any]] = [bars, predictor, trader]
        ticks = first = last = 0
        try:
            step_end = 0
            async for incoming in batches:
                batch = incoming
                ts = batch.np("ts_ns")
                if not len(ts):
                    continue
                if not first:
                    first = int(ts[0])
                    clock.advance_to(first // NS * NS)
                    for module in modules:
                        await module.start()
                    step_end = (first // NS // self.step_s + 1) * self.step_s * NS
                while len(ts):
                    cut = int(np.searchsorted(ts, step_end, side="left"))
                    if cut:
                        await _send(bus, TickBatch(batch.data.slice(0, cut)))
                        ticks += cut
                        last = int(ts[cut - 1])
                    if cut == len(ts):
                        break
                    batch = TickBatch(batch.data.slice(cut))
                    ts = ts[cut:]
                    await _settle(modules)
                    clock.advance_to(step_end)
                    step_end += self.step_s * NS
                    if progress is not None:
                        progress(Progress(ticks, step_end, time.monotonic() - started))
            if not first:
                raise BacktestError("no trades to backtest")
            await _settle(modules)
            await trader.finish(last + 1)
            await _settle(modules)
            for module in modules:
                await module.stop()
        except BaseException:
            for module in modules:
                if module.state not in (ModuleState.INITIALIZED, ModuleState.STOPPED):
                    await module.abort()
            await store.close()
            raise
        finally:
            await bus.close()
        champions = predictor.champions if isinstance(predictor, Predictor) else {"ma_cross": "rule"}
        return BacktestRun(store, trader, ticks, first, last, time.monotonic() - started, champions)


async def _send(bus: MemoryBus, batch: TickBatch) -> None:
    for symbol, part in batch.split_by_symbol():
        await bus.send("ticks", encode_ticks(part), key=symbol.encode())


async def _settle(modules: Sequence[ConsumerModule[Any]]) -> None:
    """Wait until every module has handled everything written to its topics, twice in a row."""
    quiet = 0
    while quiet < 2:
        for module in modules:
            if module.state is ModuleState.FAULTED:
                raise BacktestError(f"module {module.name} failed: {module.detail}")
        done = True
        for module in modules:
            if not await module.caught_up():
                done = False
                break
        quiet = quiet + 1 if done else 0
        await asyncio.sleep(0 if done else 0.001)


# -- where the trades come from ---------------------------------------------------------------------


async def file_batches(patterns: Sequence[str], batch_size: int = 20_000) -> AsyncIterator[TickBatch]:
    """Trades of recording or tick files, merged in time order across the files."""
    paths = resolve_files(patterns, key="--files")
    parser = BinanceTradeParser("backtest", log=log)
    readers = [open_reader(p, parser, batch_size) for p in paths]
    try:
        # One sorted buffer per file; release the trades before the earliest file's newest trade.
        buffers: list[pa.Table | None] = [None] * len(readers)
        ended = [False] * len(readers)
        while True:
            for i, reader in enumerate(readers):
                while not ended[i] and (buffers[i] is None or buffers[i].num_rows == 0):  # type: ignore[union-attr]
                    chunk = await asyncio.to_thread(reader.read)
                    if chunk is None:
                        ended[i] = True
                    elif chunk.num_rows:
                        buffers[i] = _sorted(pa.Table.from_batches([chunk]))
            live = [b for b in buffers if b is not None and b.num_rows]
            if not live:
                return
            horizons = [
                int(b.column("ts_ns")[-1].as_py())
                for i, b in enumerate(buffers)
                if b is not None and b.num_rows and not ended[i]
            ]
            until = min(horizons) + 1 if horizons else None
            parts = []
            for i, b in enumerate(buffers):
                if b is None or not b.num_rows:
                    continue
                ts = b.column("ts_ns").to_numpy()
                cut = len(ts) if until is None else int(np.searchsorted(ts, until, side="left"))
                parts.append(b.slice(0, cut))
                buffers[i] = b.slice(cut)
            merged = _sorted(pa.concat_tables(parts))
            for rb in merged.to_batches(max_chunksize=batch_size):
                yield TickBatch(rb)
    finally:
        for reader in readers:
            reader.close()


async def store_batches(store: Store, first: date, last: date) -> AsyncIterator[TickBatch]:
    """Trades of the store's ``ticks`` table, days ``first`` to ``last`` included, an hour at a time."""
    start = datetime(first.year, first.month, first.day, tzinfo=UTC)
    end = datetime(last.year, last.month, last.day, tzinfo=UTC) + timedelta(days=1)
    hour = start
    while hour < end:
        lo, hi = int(hour.timestamp()) * NS, int((hour + timedelta(hours=1)).timestamp()) * NS
        table = await store.query(
            f"SELECT {_TICK_COLUMNS} FROM ticks FINAL WHERE ts_ns >= {lo} AND ts_ns < {hi} "
            "ORDER BY ts_ns, symbol, trade_id"
        )
        if table.num_rows:
            table = table.select([f.name for f in TICK_SCHEMA]).cast(TICK_SCHEMA)
            for rb in table.to_batches(max_chunksize=20_000):
                yield TickBatch(rb)
        hour += timedelta(hours=1)


def _sorted(table: pa.Table) -> pa.Table:
    return table.sort_by([("ts_ns", "ascending"), ("symbol", "ascending"), ("trade_id", "ascending")])
