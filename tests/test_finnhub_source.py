"""The live Finnhub source against the fake Finnhub server (and the fake Binance REST for backfill)."""

from __future__ import annotations

import asyncio
import collections
from typing import Any

import msgspec
import numpy as np

from alphaengine.domain import TickBatch
from alphaengine.errors import FeedAuthError
from alphaengine.kernel.module import Context, ModuleState
from alphaengine.sources.finnhub import FinnhubSettings, FinnhubSource
from alphaengine.testing import FakeBinance, FakeFinnhub, Tape
from tests.conftest import real_file
from tests.feeds import drain, eventually

MS = 1_000_000
Key = tuple[int, float, float]


def source(ctx: Context, fake: FakeFinnhub, rest: FakeBinance | None, **settings: Any) -> FinnhubSource:
    config = msgspec.convert(
        {
            "ws_url": fake.ws_url,
            "token": "secret",
            "binance_rest_url": rest.rest_url if rest is not None else None,
            "symbols": ["BINANCE:BTCUSDT"],
            "reconnect_initial_s": 0.05,
            "reconnect_max_s": 0.3,
            "window_close_s": 0.3,
            "heartbeat_s": 1.0,
            "idle_timeout_s": 3.0,
            "resume_from_store": False,
        }
        | settings,
        FinnhubSettings,
    )
    return FinnhubSource("finnhub", config, ctx)


def keys(batch: TickBatch) -> collections.Counter[Key]:
    t_ms = (batch.np("ts_ns") // MS).tolist()
    return collections.Counter(zip(t_ms, batch.np("price").tolist(), batch.np("qty").tolist(), strict=True))


def tape_keys(tape: Tape, indices: range | list[int]) -> collections.Counter[Key]:
    out: collections.Counter[Key] = collections.Counter()
    for g in indices:
        trade = tape.trade(g)
        out[(trade.time_ms, float(trade.price), float(trade.qty))] += 1
    return out


def assert_ids_unique_and_increasing(batch: TickBatch) -> None:
    ids = batch.np("trade_id")
    assert (np.diff(ids) > 0).all()


def btc_tape() -> Tape:
    return Tape.from_recordings(
        [real_file("binance-spot-ws/btcusdt_20240808.gz"), real_file("binance-spot-ws/btcusdt_20240809.gz")]
    )


async def test_disconnected_windows_are_recorded_and_backfilled_from_binance(ctx: Context) -> None:
    """The real BTCUSDT trades served as Finnhub messages, the connection dropped every 1.5 s: with
    Binance's REST filling the windows, the store gets every one of the 19,904 trades exactly once."""
    tape = btc_tape()
    async with (
        FakeBinance(tape, speed=40.0, autostart=False) as rest,
        FakeFinnhub(tape, speed=40.0, autostart=False) as fake,
    ):
        src = source(ctx, fake, rest)
        await src.start()
        try:
            await eventually(lambda: fake.subscribed)  # else the first trades are gone before it listens
            rest.start_market()
            fake.start_market()
            fake.drop_every(1.5)
            async with asyncio.timeout(60):
                await fake.wait_finished()
            fake.stop_drops()
            await eventually(lambda: not any(lane.in_window for lane in src.lanes.values()))
        finally:
            await src.stop()
        windows = list(fake.windows)

    stored = await drain(ctx)
    assert len(stored) == 19_904
    assert keys(stored) == tape_keys(tape, range(len(tape)))
    assert_ids_unique_and_increasing(stored)
    recorded = [g for g in src.gaps.recorded if g.kind == "time"]
    assert len(recorded) == len(windows) >= 5
    assert all(g.status == "filled" for g in recorded)
    assert sum(g.ticks for g in recorded) > 0
    for gap, (from_ms, to_ms) in zip(recorded, windows, strict=True):
        assert gap.from_value <= from_ms * MS  # the recorded window covers the server's
        assert gap.to_value >= to_ms * MS - 1_000 * MS


async def test_without_backfill_every_trade_outside_the_windows_is_stored_once(ctx: Context) -> None:
    tape = btc_tape()
    async with FakeFinnhub(tape, speed=60.0) as fake:
        src = source(ctx, fake, None)
        await src.start()
        try:
            fake.drop_every(1.0)
            async with asyncio.timeout(60):
                await fake.wait_finished()
            await eventually(lambda: not any(lane.in_window for lane in src.lanes.values()))
        finally:
            await src.stop()
        missed = [g for first, stop in fake.windows_published for g in range(first, stop)]

    stored = await drain(ctx)
    outside = set(range(len(tape))) - set(missed)
    assert missed
    assert keys(stored) == tape_keys(tape, sorted(outside))
    assert_ids_unique_and_increasing(stored)
    assert {g.status for g in src.gaps.recorded} == {"unfilled"}


async def test_identical_trades_in_one_millisecond_count_with_multiplicity(ctx: Context) -> None:
    """Four identical trades in one millisecond, the connection dropped after the second: the backfill
    adds exactly the two that were missed, not one and not four."""
    t0 = 1_723_161_255_000
    rows = [("BTCUSDT", 1 + i, "60000.00000000", "0.10000000", t0 + i * 20, False) for i in range(50)]
    rows += [("BTCUSDT", 100 + i, "60001.00000000", "0.25000000", t0 + 1_010, True) for i in range(4)]
    rows += [
        ("BTCUSDT", 200 + i, "60002.00000000", "0.10000000", t0 + 1_100 + i * 20, False) for i in range(50)
    ]
    tape = Tape.from_trades(rows)
    async with (
        FakeBinance(tape, speed=1.0, autostart=False) as rest,
        FakeFinnhub(tape, speed=1.0, autostart=False, max_trades_per_message=1) as fake,
    ):
        src = source(ctx, fake, rest)
        await src.start()
        try:
            await eventually(lambda: fake.subscribed)
            fake.drop_at([52])  # the first 52 trades are sent: two of the four identical ones
            rest.start_market()
            fake.start_market()
            await fake.wait_finished()
            await eventually(lambda: not any(lane.in_window for lane in src.lanes.values()))
        finally:
            await src.stop()

    stored = await drain(ctx)
    assert keys(stored) == tape_keys(tape, range(len(tape)))
    assert keys(stored)[(t0 + 1_010, 60001.0, 0.25)] == 4
    assert_ids_unique_and_increasing(stored)


async def test_a_refused_token_faults_the_module_without_retrying(ctx: Context) -> None:
    async with FakeFinnhub(Tape.from_trades([("BTCUSDT", 1, "1.0", "1.0", 1, False)]), token="right") as fake:
        src = source(ctx, fake, None, token="wrong")
        await src.start()
        await eventually(lambda: src.state is ModuleState.FAULTED)
        await asyncio.sleep(0.3)
        refused = fake.stats.upgrades_rejected[401]
        await src.stop()

    assert refused == 1
    assert isinstance(src.failure, FeedAuthError)
    assert "wrong" not in str(src.failure)  # the token is never shown
    assert "***" in str(src.failure)


async def test_reconnects_resubscribe_and_price_updates_are_not_trades(ctx: Context) -> None:
    rows = [
        ("BTCUSDT", 1 + i, "60000.00000000", "0.10000000", 1_723_161_255_000 + i * 10, False)
        for i in range(300)
    ]
    async with FakeFinnhub(Tape.from_trades(rows), speed=1.0, extra_symbols=["BINANCE:ETHUSDT"]) as fake:
        src = source(ctx, fake, None, symbols=["BINANCE:BTCUSDT", "BINANCE:ETHUSDT"])
        await src.start()
        try:
            await eventually(lambda: src.parser.stats.trades > 20)
            assert await fake.inject_price_update("BINANCE:ETHUSDT", 3000.5) == 1
            await fake.deploy()  # the server closes on purpose; the source reconnects and resubscribes
            await fake.wait_finished()
            await eventually(lambda: not any(lane.in_window for lane in src.lanes.values()))
            await eventually(lambda: src.parser.stats.price_updates == 1)
        finally:
            await src.stop()
        stats = fake.stats

    stored = await drain(ctx)
    assert stats.connections_opened == 2
    assert set(dict(stored.split_by_symbol())) == {"BTCUSDT"}  # the price update is not a trade
    assert len(stored) > 200  # trades kept flowing after the resubscription
    assert_ids_unique_and_increasing(stored)


async def test_provider_errors_are_counted_and_too_many_symbols_degrades(ctx: Context) -> None:
    rows = [
        ("BTCUSDT", 1 + i, "60000.00000000", "0.10000000", 1_723_161_255_000 + i * 10, False)
        for i in range(200)
    ]
    tape = Tape.from_trades(rows)
    async with FakeFinnhub(tape, speed=1.0, max_symbols=1, extra_symbols=["BINANCE:ETHUSDT"]) as fake:
        src = source(ctx, fake, None, symbols=["BINANCE:BTCUSDT", "BINANCE:ETHUSDT", "BINANCE:NOSUCH"])
        await src.start()
        try:
            await eventually(lambda: src.state is ModuleState.DEGRADED)
            await fake.wait_finished()
        finally:
            await src.stop()

    assert src.parser.stats.rejected["provider_error"] == 2
    assert sorted(src.provider_errors) == ["Invalid symbol", "Subscribing to too many symbols"]
    assert len(await drain(ctx)) == 200
