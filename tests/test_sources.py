"""The synthetic market (its generator on its own, and as a module) and the replay source."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import msgspec
import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from prometheus_client import REGISTRY

from alphaengine.bus.base import Bus
from alphaengine.bus.memory import MemoryBus
from alphaengine.clock import SimClock
from alphaengine.codec import decode_ticks
from alphaengine.config import loads
from alphaengine.domain import TickBatch
from alphaengine.errors import ConfigError
from alphaengine.kernel.module import Context, ModuleState
from alphaengine.objectstore.memory import MemoryObjectStore
from alphaengine.sources.binance import BinanceTradeParser
from alphaengine.sources.replay import INVALID_ROW, MALFORMED_LINE, ReplayError, ReplaySettings, ReplaySource
from alphaengine.sources.synthetic import (
    KNOWN_SYMBOLS,
    SyntheticMarket,
    SyntheticSettings,
    SyntheticSource,
    first_by_time,
)
from alphaengine.store.memory import MemoryStore
from tests.conftest import real_file

T0 = 1_750_000_000_000_000_000
NS = 1_000_000_000


# -- helpers --------------------------------------------------------------------------------------


def make_market(seed: int = 1, start_ns: int = T0, **settings: object) -> SyntheticMarket:
    return SyntheticMarket(msgspec.convert(settings, SyntheticSettings), start_ns, seed)


def concat(batches: list[TickBatch]) -> TickBatch:
    batches = [b for b in batches if len(b)]
    return TickBatch(pa.concat_batches([b.data for b in batches])) if batches else TickBatch.empty()


def by_symbol(batch: TickBatch) -> dict[str, TickBatch]:
    return dict(batch.split_by_symbol())


def one_symbol_series(
    predictability: float, hours: int, seed: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64], npt.NDArray[np.int8]]:
    """Times, prices and sides of one symbol over many hours (one-second steps keep it fast)."""
    market = make_market(
        seed, 0, symbols=["BTCUSDT"], rate_per_s=3.0, step_ms=1000, predictability=predictability
    )
    batch = concat([market.generate(3_600) for _ in range(hours)])
    return batch.np("ts_ns"), batch.np("price"), batch.np("side")


def window_returns(
    ts: npt.NDArray[np.int64], price: npt.NDArray[np.float64], side: npt.NDArray[np.int8], seconds: int
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Log returns between the last trades of consecutive windows, and each window's order-flow imbalance."""
    window = ts // (seconds * NS)
    window -= window[0]
    n = int(window[-1]) + 1
    last = np.full(n, -1)
    last[window] = np.arange(len(ts))  # later trades overwrite earlier ones: the window's last trade
    last = np.maximum.accumulate(last)  # a window without trades keeps the previous price
    returns = np.diff(np.log(price[last]))
    imbalance = np.bincount(window, weights=side, minlength=n)[1:]
    return returns, imbalance


def kurtosis(x: npt.NDArray[np.float64]) -> float:
    d = x - x.mean()
    return float((d**4).mean() / (d**2).mean() ** 2)


def autocorrelation(x: npt.NDArray[np.float64], lag: int = 1) -> float:
    return float(np.corrcoef(x[:-lag], x[lag:])[0, 1])


def rejects(source: str, reason: str) -> float:
    value = REGISTRY.get_sample_value(
        "alphaengine_source_rejects_total", {"source": source, "reason": reason}
    )
    return value or 0.0


async def eventually(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Wait (in real time) until ``predicate`` holds: sources parse in worker threads."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


async def emitted(source: ReplaySource, n: int) -> None:
    await eventually(lambda: source.ticks_emitted == n)


async def drain(bus: Bus, group: str = "test") -> TickBatch:
    """Every tick on the ``ticks`` topic, per symbol in the order sent."""
    consumer = bus.consumer(group, ["ticks"])
    await consumer.start()
    batches = []
    try:
        while records := await consumer.getmany(100_000, 0.05):
            batches.extend(decode_ticks(r.value) for r in records)
    finally:
        await consumer.close()
    return concat(batches)


@pytest.fixture
async def sim_ctx(tmp_path: Path) -> AsyncIterator[Context]:
    """In-memory ports and a simulated clock at T0 that only the test moves."""
    bus, store, objects = MemoryBus(), MemoryStore(), MemoryObjectStore()
    await bus.start()
    await store.start()
    await objects.start()
    yield Context(bus=bus, store=store, objects=objects, clock=SimClock(T0), data_dir=tmp_path)
    await objects.close()
    await store.close()
    await bus.close()


def sim_clock(ctx: Context) -> SimClock:
    assert isinstance(ctx.clock, SimClock)
    return ctx.clock


def recorded_trades(name: str) -> TickBatch:
    with gzip.open(real_file(f"binance-spot-ws/{name}"), "rb") as f:
        parts = [line.partition(b" ") for line in f.read().splitlines()]
    return BinanceTradeParser("expected").parse([p[2] for p in parts], [int(p[0]) for p in parts])


# -- the synthetic market on its own ---------------------------------------------------------------


def test_same_seed_and_clock_give_the_same_ticks_and_another_seed_does_not() -> None:
    first = concat([make_market(7).generate(k) for k in (1, 5, 20)])
    again = concat([make_market(7).generate(k) for k in (1, 5, 20)])
    other = concat([make_market(8).generate(k) for k in (1, 5, 20)])
    assert first.data.equals(again.data)
    assert not first.data.equals(other.data)


def test_times_and_ids_increase_per_symbol_within_and_across_blocks() -> None:
    market = make_market(2, rate_per_s=50_000)
    batch = concat([market.generate(1) for _ in range(20)] + [market.generate(40)])
    assert batch.data.column("venue").unique().to_pylist() == ["SYNTH"]
    parts = by_symbol(batch)
    assert sorted(parts) == sorted(KNOWN_SYMBOLS)
    for part in parts.values():
        ts, ids, recv = part.np("ts_ns"), part.np("trade_id"), part.np("recv_ns")
        assert (np.diff(ts) > 0).all()
        assert (np.diff(ids) > 0).all()
        assert (ids >= ts // 1_000).all()
        assert (recv > ts).all()
        assert (np.diff(recv) >= 0).all()
        assert np.median(recv - ts) < 20_000_000  # a few milliseconds
        assert ts[0] >= T0
        assert ts[-1] < market.time_ns


def test_a_restarted_market_never_reuses_a_trade_id() -> None:
    before = make_market(3, rate_per_s=20_000)
    first = by_symbol(concat([before.generate(20) for _ in range(3)]))
    # A restart keeps no state: a new market from the same seed, started where the clock is now.
    after = by_symbol(make_market(3, start_ns=before.time_ns, rate_per_s=20_000).generate(20))
    for symbol, part in after.items():
        assert part.np("trade_id")[0] > first[symbol].np("trade_id")[-1]


def test_prices_start_at_realistic_levels_and_sizes_are_sensible() -> None:
    market = make_market(
        4,
        symbols=["BTCUSDT", "ETHUSDT", "SOLUSDT", "ADAUSDT", "XRPUSDT", "NEWUSDT", "OWNUSDT"],
        rate_per_s=5_000,
        default_price=42.0,
        prices={"OWNUSDT": 7.5},
    )
    parts = by_symbol(market.generate(20))
    levels = {s: p.price for s, p in KNOWN_SYMBOLS.items()} | {"NEWUSDT": 42.0, "OWNUSDT": 7.5}
    assert (levels["BTCUSDT"], levels["ETHUSDT"], levels["ADAUSDT"]) == (95_000, 3_400, 0.9)
    for symbol, part in parts.items():
        price, qty = part.np("price"), part.np("qty")
        assert np.allclose(price, levels[symbol], rtol=0.02), symbol
        notional = price * qty
        assert 10 < np.median(notional) < 500, symbol
        assert (qty > 0).all()


def test_rate_scales_with_rate_per_s_and_holds_on_average() -> None:
    slow = len(make_market(5, rate_per_s=1_000).generate(1_200))  # 60 s
    fast = len(make_market(5, rate_per_s=4_000).generate(1_200))
    assert fast / slow == pytest.approx(4.0, rel=0.05)
    # Over many hours the clustered rate averages out to rate_per_s.
    market = make_market(6, rate_per_s=20.0, step_ms=1000)
    ticks = sum(len(market.generate(3_600)) for _ in range(40))
    assert ticks / (40 * 3_600) == pytest.approx(20.0, rel=0.1)


def test_activity_weights_make_btc_busier_than_ada() -> None:
    market = make_market(7, rate_per_s=50.0, step_ms=1000)
    counts = {s: len(p) for s, p in by_symbol(concat([market.generate(3_600) for _ in range(2)])).items()}
    assert counts["BTCUSDT"] > 2 * counts["ADAUSDT"]


def test_returns_and_sizes_are_heavy_tailed() -> None:
    ts, price, side = one_symbol_series(0.0, hours=40, seed=8)
    minute, _ = window_returns(ts, price, side, 60)
    assert kurtosis(minute) > 3.5
    tick = np.diff(np.log(price))
    assert kurtosis(tick) > 5.0
    market = make_market(8, symbols=["BTCUSDT"], rate_per_s=20_000)
    part = market.generate(200)
    notional = part.np("price") * part.np("qty")
    assert kurtosis(notional) > 20
    assert np.quantile(notional, 0.999) > 20 * np.median(notional)


def test_trade_arrivals_and_volatility_cluster() -> None:
    market = make_market(9, symbols=["BTCUSDT"], rate_per_s=50.0, step_ms=1000)
    batch = concat([market.generate(3_600) for _ in range(4)])
    ts = batch.np("ts_ns")
    per_second = np.bincount((ts - ts[0]) // NS).astype(np.float64)
    assert autocorrelation(per_second) > 0.3
    ts, price, side = one_symbol_series(0.0, hours=40, seed=9)
    minute, _ = window_returns(ts, price, side, 60)
    assert autocorrelation(np.abs(minute)) > 0.05


def test_without_clustering_arrivals_are_poisson_at_the_exact_rate() -> None:
    market = make_market(13, symbols=["BTCUSDT"], rate_per_s=1_000.0, clustering=0.0, step_ms=1000)
    per_second = np.bincount((market.generate(600).np("ts_ns") - T0) // NS, minlength=600).astype(np.float64)
    assert per_second.mean() == pytest.approx(1_000.0, rel=0.01)
    assert per_second.var() / per_second.mean() == pytest.approx(1.0, abs=0.25)  # Poisson dispersion
    assert abs(autocorrelation(per_second)) < 4 / np.sqrt(600)


def test_aggressor_side_goes_with_the_move() -> None:
    part = make_market(10, symbols=["ETHUSDT"], rate_per_s=5_000).generate(200)
    move = np.diff(np.log(part.np("price")))
    moved = move != 0
    assert np.corrcoef(np.sign(move[moved]), part.np("side")[1:][moved])[0, 1] > 0.3


def test_without_predictability_the_past_does_not_predict_the_next_minute() -> None:
    ts, price, side = one_symbol_series(0.0, hours=100, seed=11)
    returns, imbalance = window_returns(ts, price, side, 60)
    bound = 4 / np.sqrt(len(returns))  # four standard errors of a zero correlation
    assert abs(np.corrcoef(returns[:-1], returns[1:])[0, 1]) < bound
    assert abs(np.corrcoef(imbalance[:-1], returns[1:])[0, 1]) < bound
    assert abs(returns.mean()) < 4 * returns.std() / np.sqrt(len(returns))


def test_planted_predictability_shows_in_past_returns_and_order_flow() -> None:
    ts, price, side = one_symbol_series(0.5, hours=100, seed=11)
    returns, imbalance = window_returns(ts, price, side, 60)
    # About 0.9 * rho^2 for the previous minute's return (see the module docstring).
    assert np.corrcoef(returns[:-1], returns[1:])[0, 1] > 0.15
    assert np.corrcoef(imbalance[:-1], returns[1:])[0, 1] > 0.15


def test_first_by_time_keeps_the_earliest_ticks_in_order() -> None:
    batch = make_market(12, rate_per_s=10_000).generate(10)
    head = first_by_time(batch, 100)
    assert len(head) == 100
    assert head.np("ts_ns").max() <= np.sort(batch.np("ts_ns"))[99]
    for part in by_symbol(head).values():
        assert (np.diff(part.np("ts_ns")) > 0).all()
    assert first_by_time(batch, len(batch) + 1) is batch


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"rate_per_s": 0}, "rate_per_s"),
        ({"predictability": 1.0}, "predictability"),
        ({"symbols": []}, "symbols"),
        ({"step_ms": 0}, "step_ms"),
        ({"prices": {"BTCUSDT": -1.0}}, "prices"),
        ({"rate": 5}, "rate"),
    ],
)
def test_bad_synthetic_settings_name_the_key(settings: dict[str, object], key: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=key):
        msgspec.convert(settings, SyntheticSettings)


# -- the synthetic market as a module ---------------------------------------------------------------


async def test_synthetic_source_emits_each_step_when_the_clock_reaches_it(sim_ctx: Context) -> None:
    settings = SyntheticSettings(rate_per_s=2_000, seed=21, max_in_flight=1)
    source = SyntheticSource("synthetic", settings, sim_ctx)
    clock = sim_clock(sim_ctx)
    reference = SyntheticMarket(settings, T0, 21)
    await source.start()
    try:
        await asyncio.sleep(0.05)
        assert source.ticks_emitted == 0  # nothing before the first step has passed
        expected = len(reference.generate(1))
        clock.advance(0.05)
        await eventually(lambda: source.ticks_emitted == expected)
        # After a stall the source catches up in blocks of at most one second.
        expected += sum(len(reference.generate(20)) for _ in range(3))
        clock.advance(3.0)
        await eventually(lambda: source.ticks_emitted == expected)
        await asyncio.sleep(0.05)
        assert source.ticks_emitted == expected
    finally:
        await asyncio.wait_for(source.stop(), 2.0)  # prompt, although the clock stands still
    assert source.state is ModuleState.STOPPED
    ticks = await drain(sim_ctx.bus)
    assert len(ticks) == expected
    assert ticks.np("ts_ns").max() < T0 + 3_050_000_000


async def test_synthetic_source_stops_after_max_ticks(sim_ctx: Context) -> None:
    settings = SyntheticSettings(rate_per_s=5_000, seed=22, max_ticks=1_234)
    source = SyntheticSource("synthetic", settings, sim_ctx)
    await source.start()
    sim_clock(sim_ctx).advance(2.0)
    await asyncio.wait_for(source.finished.wait(), 5.0)
    await source.stop()
    ticks = await drain(sim_ctx.bus)
    assert len(ticks) == source.ticks_emitted == 1_234
    everything = SyntheticMarket(settings, T0, 22).generate(20)
    assert np.array_equal(np.sort(ticks.np("ts_ns")), np.sort(everything.np("ts_ns"))[:1_234])


# -- replay -------------------------------------------------------------------------------------------


async def run_replay(
    ctx: Context, name: str = "replay", **settings: object
) -> tuple[ReplaySource, TickBatch]:
    source = ReplaySource(name, msgspec.convert(settings, ReplaySettings), ctx)
    await source.start()
    await asyncio.wait_for(source.finished.wait(), 20.0)
    await source.stop()
    return source, await drain(ctx.bus)


async def test_replay_of_a_recording_sends_every_trade(sim_ctx: Context) -> None:
    source, ticks = await run_replay(
        sim_ctx, files=[str(real_file("binance-spot-ws/btcusdt_20240808.gz"))], batch_size=1_000
    )
    assert source.ticks_emitted == 9_757
    assert ticks.data.equals(recorded_trades("btcusdt_20240808.gz").data)
    assert source.health()["rejected"] == 0


async def test_replay_follows_the_file_order_and_expands_globs(sim_ctx: Context) -> None:
    folder = real_file("binance-spot-ws/btcusdt_20240808.gz").parent
    _, ticks = await run_replay(sim_ctx, files=[str(folder / "btcusdt_2024080[89].gz")])
    ids = ticks.np("trade_id")
    assert len(ids) == 19_904
    assert (np.diff(ids) == 1).all()
    assert (ids[0], ids[-1]) == (3_735_683_259, 3_735_703_162)


async def test_replay_in_the_given_order(sim_ctx: Context) -> None:
    later, earlier = (real_file(f"binance-spot-ws/btcusdt_2024080{d}.gz") for d in (9, 8))
    _, ticks = await run_replay(sim_ctx, files=[str(later), str(earlier)])
    ids = ticks.np("trade_id")
    assert ids[0] == 3_735_693_016
    assert ids[10_147] == 3_735_683_259


async def test_replay_paces_by_exchange_time(sim_ctx: Context) -> None:
    path = real_file("binance-spot-ws/btcusdt_20240809.gz")
    ts = recorded_trades("btcusdt_20240809.gz").np("ts_ns")
    pace = np.maximum.accumulate(ts)
    due_after_s = ((pace - ts[0]) / 10.0).astype(np.int64) / 1e9
    source = ReplaySource("replay", ReplaySettings(files=(str(path),), speed=10.0, max_in_flight=1), sim_ctx)
    clock = sim_clock(sim_ctx)
    await source.start()
    try:
        await emitted(source, int((due_after_s <= 0).sum()))
        for elapsed_s in (1.0, 10.0):
            clock.advance_to(T0 + int(elapsed_s * NS))
            expected = int((due_after_s <= elapsed_s).sum())
            await emitted(source, expected)
            await asyncio.sleep(0.05)
            assert source.ticks_emitted == expected  # nothing ahead of time
        assert not source.finished.is_set()
        clock.advance(60.0)
        await asyncio.wait_for(source.finished.wait(), 10.0)
    finally:
        await source.stop()
    assert source.ticks_emitted == 10_147


async def test_paced_replay_stops_promptly(sim_ctx: Context) -> None:
    path = real_file("binance-spot-ws/btcusdt_20240809.gz")
    source = ReplaySource("replay", ReplaySettings(files=(str(path),), speed=1.0), sim_ctx)
    await source.start()
    await asyncio.sleep(0.1)
    await asyncio.wait_for(source.stop(), 2.0)
    assert source.state is ModuleState.STOPPED


def write_tick_files(folder: Path, ticks: TickBatch) -> tuple[Path, Path]:
    table = pa.Table.from_batches([ticks.data]).append_column("extra", pa.array(np.zeros(len(ticks))))
    parquet, csv = folder / "ticks.parquet", folder / "ticks.csv"
    pq.write_table(table, parquet)
    pacsv.write_csv(table, csv)
    return parquet, csv


async def test_replay_of_parquet_and_csv_tick_files(sim_ctx: Context, tmp_path: Path) -> None:
    expected = recorded_trades("ethusdt_20240808.gz")
    parquet, csv = write_tick_files(tmp_path, expected)
    source, ticks = await run_replay(sim_ctx, files=[str(parquet), str(csv)], batch_size=2_500)
    assert source.ticks_emitted == 2 * 6_106
    assert ticks.data.slice(0, 6_106).equals(expected.data)
    assert ticks.data.slice(6_106).equals(expected.data)


async def test_invalid_tick_rows_are_rejected_and_counted(sim_ctx: Context, tmp_path: Path) -> None:
    good = TickBatch.from_columns(
        venue="X",
        symbol="AAA",
        trade_id=[1, 2, 3, 4, 5],
        ts_ns=[1, 2, 3, 4, 5],
        recv_ns=[1, 2, 3, 4, 5],
        price=[1.0, 0.0, float("nan"), 2.0, 3.0],
        qty=[1.0, 1.0, 1.0, -1.0, 1.0],
        side=[1, -1, 0, 1, 7],
    )
    path = tmp_path / "ticks.parquet"
    pq.write_table(pa.Table.from_batches([good.data]), path)
    before = rejects("bad-rows", INVALID_ROW)
    _, ticks = await run_replay(sim_ctx, "bad-rows", files=[str(path)])
    assert ticks.np("trade_id").tolist() == [1]
    assert rejects("bad-rows", INVALID_ROW) == before + 4


async def test_a_tick_file_without_a_column_fails_the_start_with_its_name(
    sim_ctx: Context, tmp_path: Path
) -> None:
    ticks = recorded_trades("ethusdt_20240808.gz")
    parquet, csv = write_tick_files(tmp_path, ticks)
    table = pa.Table.from_batches([ticks.data]).drop_columns(["recv_ns", "side"])
    pq.write_table(table, parquet)
    pacsv.write_csv(table, csv)
    for path in (parquet, csv):
        source = ReplaySource("replay", ReplaySettings(files=(str(path),)), sim_ctx)
        with pytest.raises(ReplayError, match="missing tick column\\(s\\) recv_ns, side"):
            await source.start()
        assert source.state is ModuleState.FAULTED


@pytest.mark.parametrize(
    ("files", "message"),
    [
        (["{tmp}/nothing.gz"], "modules.replay.files: no such file"),
        (["{tmp}/*.gz"], "modules.replay.files: .* matches no file"),
        (["{tmp}/notes.md"], "unknown format"),
    ],
)
async def test_bad_files_fail_the_start_naming_the_key(
    sim_ctx: Context, tmp_path: Path, files: list[str], message: str
) -> None:
    (tmp_path / "notes.md").write_text("not ticks")
    settings = ReplaySettings(files=tuple(f.format(tmp=tmp_path) for f in files))
    with pytest.raises(ReplayError, match=message):
        await ReplaySource("replay", settings, sim_ctx).start()


async def test_bad_lines_of_a_recording_are_rejected(sim_ctx: Context, tmp_path: Path) -> None:
    with gzip.open(real_file("binance-spot-ws/ethusdt_20240808.gz"), "rb") as f:
        lines = f.read().splitlines()[:400]
    trades = sum(b"@trade" in line for line in lines)
    path = tmp_path / "recording.txt"
    path.write_bytes(b"\n".join([b"no-time-here {}", *lines, b"", b"123 {broken", b"\n"]))
    before = {r: rejects("bad-lines", r) for r in (MALFORMED_LINE, "malformed_json")}
    _, ticks = await run_replay(sim_ctx, "bad-lines", files=[str(path)])
    assert len(ticks) == trades > 0
    assert rejects("bad-lines", MALFORMED_LINE) == before[MALFORMED_LINE] + 1
    assert rejects("bad-lines", "malformed_json") == before["malformed_json"] + 1


async def test_loop_replays_again_as_new_data(sim_ctx: Context, tmp_path: Path) -> None:
    n = 30
    ticks = TickBatch.from_columns(
        venue="X",
        symbol=["AAA", "BBB"] * (n // 2),
        trade_id=np.arange(n) // 2 + 100,
        ts_ns=np.arange(n) * NS,
        recv_ns=np.arange(n) * NS + 5,
        price=np.ones(n),
        qty=np.ones(n),
        side=np.ones(n),
    )
    path = tmp_path / "ticks.parquet"
    pq.write_table(pa.Table.from_batches([ticks.data]), path)
    source = ReplaySource(
        "replay", ReplaySettings(files=(str(path),), loop=True, batch_size=7, max_in_flight=1), sim_ctx
    )
    await source.start()
    await eventually(lambda: source.ticks_emitted >= 4 * n)
    await source.stop()
    for part in by_symbol(await drain(sim_ctx.bus)).values():
        ids, ts = part.np("trade_id"), part.np("ts_ns")
        assert len(ids) >= 3 * n // 2
        assert (np.diff(ids) == 1).all()  # each pass continues the ids where the last one ended
        assert (np.diff(ts) > 0).all()


@pytest.mark.parametrize(
    ("speed", "message"),
    [("0", "modules.source.speed: expected float > 0.0"), ('"fast"', "modules.source.speed: invalid")],
)
def test_replay_speed_is_validated_naming_the_key(speed: str, message: str) -> None:
    config = f"""
[metrics]
port = 0
[admin]
socket = "x.sock"
[modules.source]
type = "replay"
files = ["a.gz"]
speed = {speed}
"""
    with pytest.raises(ConfigError, match=message):
        loads(config)
    assert msgspec.convert({"files": ["a.gz"], "speed": 2}, ReplaySettings).speed == 2.0
    assert ReplaySettings(files=("a.gz",)).speed == "max"
