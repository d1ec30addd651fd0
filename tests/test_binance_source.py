"""The live Binance source against the fake Binance server: drops, rotations, backfill, bad input."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import msgspec
import numpy as np
import pyarrow as pa
import pytest

from alphaengine.domain import TickBatch
from alphaengine.kernel.module import Context, ModuleState
from alphaengine.sources.binance_live import BinanceSettings, BinanceSource
from alphaengine.store import TICKS
from alphaengine.testing import FakeBinance, Tape
from tests.conftest import real_file
from tests.feeds import drain, eventually

FIRST_ID = 3735683259
LAST_ID = 3735703162


def btc_tape() -> Tape:
    return Tape.from_recordings(
        [real_file("binance-spot-ws/btcusdt_20240808.gz"), real_file("binance-spot-ws/btcusdt_20240809.gz")]
    )


def source(ctx: Context, fake: FakeBinance, **settings: Any) -> BinanceSource:
    config = msgspec.convert(
        {
            "ws_url": fake.ws_url,
            "rest_url": fake.rest_url,
            "symbols": ["BTCUSDT"],
            "reconnect_initial_s": 0.05,
            "reconnect_max_s": 0.5,
            "gap_grace_s": 0.2,
            "backfill_retry_s": 0.1,
            "heartbeat_s": 1.0,
            "idle_timeout_s": 3.0,
        }
        | settings,
        BinanceSettings,
    )
    return BinanceSource("binance", config, ctx)


async def run_until_caught_up(src: BinanceSource, fake: FakeBinance, last_id: int, timeout_s: float) -> None:
    await src.start()
    try:
        async with asyncio.timeout(timeout_s):
            await fake.wait_finished()
        await eventually(lambda: (src._sequencer.next_id("BTCUSDT") or 0) > last_id, timeout_s)
    finally:
        await src.stop()


async def test_drops_and_a_rotation_lose_nothing_and_duplicate_nothing(ctx: Context) -> None:
    """The two real BTCUSDT recordings (19,904 trades) through a server that drops the connection every
    1.5 s and announces one shutdown: every trade arrives exactly once, in id order, the dropped intervals
    backfilled through REST."""
    async with FakeBinance(btc_tape(), speed=40.0, ping_interval_s=1.0) as fake:
        src = source(ctx, fake)
        fake.drop_every(1.5)

        async def shutdown_later() -> None:
            await asyncio.sleep(5.0)
            await fake.send_server_shutdown(close_after_s=3.0)

        announcer = asyncio.ensure_future(shutdown_later())
        await run_until_caught_up(src, fake, LAST_ID, timeout_s=60.0)
        await announcer
        stats = fake.stats

    ids = (await drain(ctx)).np("trade_id")
    assert len(ids) == LAST_ID - FIRST_ID + 1 == 19_904
    assert ids[0] == FIRST_ID
    assert (np.diff(ids) == 1).all()  # contiguous, in order, no duplicate

    assert stats.connections_closed["dropped"] >= 5
    filled = [g for g in src.gaps.recorded if g.status == "filled"]
    assert filled
    assert all(g.status == "filled" for g in src.gaps.recorded)
    health = src.health()
    assert health["connect_attempts"] >= 6
    assert health["max_reconnect_delay_s"] <= 0.5


def make_tape(
    n: int, symbols: tuple[str, ...] = ("BTCUSDT",), step_ms: int = 10, first_id: int = 1000
) -> Tape:
    """``n`` trades per symbol, ``step_ms`` apart, ids from ``first_id``."""
    rows = [
        (
            s,
            first_id + i,
            f"{100 + (i % 7) + k:.8f}",
            "0.50000000",
            1_723_161_255_000 + i * step_ms,
            i % 2 == 0,
        )
        for i in range(n)
        for k, s in enumerate(symbols)
    ]
    return Tape.from_trades(rows)


def contiguous(batch: TickBatch, symbol: str, first: int, last: int) -> bool:
    part = dict(batch.split_by_symbol()).get(symbol)
    if part is None:
        return False
    ids = part.np("trade_id")
    return bool(
        ids[0] == first and ids[-1] == last and len(ids) == last - first + 1 and (np.diff(ids) == 1).all()
    )


async def test_age_rotation_is_make_before_break_without_backfill(ctx: Context) -> None:
    async with FakeBinance(make_tape(300), speed=1.0) as fake:
        src = source(ctx, fake, max_connection_age_s=0.7)
        await run_until_caught_up(src, fake, 1299, timeout_s=20.0)
        stats = fake.stats

    assert contiguous(await drain(ctx), "BTCUSDT", 1000, 1299)
    assert stats.connections_opened >= 4
    assert stats.connections_closed["client"] >= 3  # each old connection closed by the source
    assert stats.requests == {}  # no gap: the overlap covered every rotation
    assert src.gaps.recorded == []


async def test_refused_upgrades_are_retried_with_capped_full_jitter_backoff(ctx: Context) -> None:
    async with FakeBinance(make_tape(50), speed=1.0) as fake:
        fake.reject_connections(503, 6)
        src = source(ctx, fake, reconnect_initial_s=0.02, reconnect_max_s=0.1)
        await run_until_caught_up(src, fake, 1049, timeout_s=20.0)
        assert fake.stats.upgrades_rejected[503] == 6

    assert contiguous(await drain(ctx), "BTCUSDT", 1000, 1049)
    assert src.connector is not None
    assert src.connector.attempts == 7
    assert 0.0 <= src.connector.max_delay_s <= 0.1


async def test_a_quiet_symbol_is_not_a_dead_connection(ctx: Context) -> None:
    # ETHUSDT trades only at the start; BTCUSDT trades for two seconds; nothing else for a while.
    rows = [("ETHUSDT", 1, "3000.00000000", "1.00000000", 1_723_161_255_000, False)]
    rows += [
        ("BTCUSDT", 1000 + i, "60000.00000000", "0.10000000", 1_723_161_255_000 + 10 * i, True)
        for i in range(200)
    ]
    async with FakeBinance(Tape.from_trades(rows), speed=1.0, ping_interval_s=0.3) as fake:
        src = source(ctx, fake, symbols=["BTCUSDT", "ETHUSDT"], heartbeat_s=0.2, idle_timeout_s=1.0)
        await src.start()
        try:
            await fake.wait_finished()
            fake.silence(2.0)  # no data and no server pings; the connection still answers ours
            await asyncio.sleep(2.5)
            health = src.health()
        finally:
            await src.stop()
        stats = fake.stats

    assert stats.connections_opened == 1  # never reconnected
    assert health["symbols"]["ETHUSDT"]["idle_s"] > 2.0
    assert health["connections"][0]["pings_sent"] >= 1


class FreezingProxy:
    """A TCP proxy on 127.0.0.1 whose connections can be frozen: bytes stop flowing and nothing is closed
    (a network black hole, which only a watchdog can detect)."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.server: asyncio.Server | None = None
        self.port = 0
        self.frozen: list[asyncio.Event] = []
        """One event per connection accepted so far; set: the connection is frozen."""

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()

    def freeze_all(self) -> None:
        for frozen in self.frozen:
            frozen.set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        frozen = asyncio.Event()
        self.frozen.append(frozen)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await src.read(65536):
                    if not frozen.is_set():  # frozen: swallowed, the peer never hears of it
                        dst.write(data)
                        await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


async def test_a_black_holed_connection_is_detected_by_the_watchdog(ctx: Context) -> None:
    async with FakeBinance(make_tape(400), speed=1.0) as fake:
        proxy = FreezingProxy(fake.port)
        await proxy.start()
        src = source(ctx, fake, ws_url=f"ws://127.0.0.1:{proxy.port}", heartbeat_s=0.2, idle_timeout_s=0.8)
        await src.start()
        try:
            await asyncio.sleep(1.0)
            proxy.freeze_all()
            await fake.wait_finished()
            await eventually(lambda: (src._sequencer.next_id("BTCUSDT") or 0) > 1399)
        finally:
            await src.stop()
            await proxy.close()

    assert contiguous(await drain(ctx), "BTCUSDT", 1000, 1399)
    assert any(g.status == "filled" for g in src.gaps.recorded)
    assert len(proxy.frozen) >= 2  # reconnected through the proxy after the watchdog fired


async def test_bad_frames_are_counted_by_reason_and_the_feed_goes_on(ctx: Context) -> None:
    trade = (
        '{"stream":"%s@trade","data":{"e":"trade","E":1,"s":"%s","t":%d,"p":"%s","q":"1.0",'
        '"T":1723161255000,"m":true,"M":true}}'
    )
    async with FakeBinance(make_tape(300), speed=1.0) as fake:
        src = source(ctx, fake, max_frame_bytes=4096)
        await src.start()
        try:
            await eventually(lambda: src.parser.stats.trades > 20)
            for frame in (
                "not json at all",
                b"\x00\x01binary",
                "x" * 10_000,
                '{"code": 3, "msg": "Invalid JSON: expected value at line 1 column 1"}',
                trade % ("dogeusdt", "DOGEUSDT", 5, "0.1"),
                trade % ("btcusdt", "BTCUSDT", 10**6, "NaN"),
                trade % ("btcusdt", "BTCUSDT", 10**6 + 1, "-5"),
                '{"stream":"btcusdt@trade","data":{"e":"trade","s":"BTCUSDT"}}',
            ):
                assert await fake.inject(frame) == 1
            await fake.wait_finished()
            await eventually(lambda: (src._sequencer.next_id("BTCUSDT") or 0) > 1299)
        finally:
            await src.stop()

    assert contiguous(await drain(ctx), "BTCUSDT", 1000, 1299)
    rejected = {k: v for k, v in src.parser.stats.rejected.items() if v}
    assert rejected == {
        "malformed_json": 1,
        "binary_frame": 1,
        "oversized_frame": 1,
        "provider_error": 1,
        "unknown_symbol": 1,
        "bad_number": 1,
        "non_positive": 1,
        "missing_field": 1,
    }
    assert src.state is ModuleState.STOPPED


async def test_pings_are_answered_within_the_message_rate_rule(ctx: Context) -> None:
    # Three pings a second: with the pongs that is as much as the source may send, so its own heartbeat
    # pings must give way.
    async with FakeBinance(make_tape(300), speed=1.0, ping_interval_s=0.3, pong_timeout_s=1.0) as fake:
        src = source(ctx, fake, heartbeat_s=0.1)
        await run_until_caught_up(src, fake, 1299, timeout_s=20.0)
        stats = fake.stats

    assert stats.pings_sent >= 8
    assert stats.pongs_received >= stats.pings_sent - 1
    assert stats.rate_violations == 0
    assert stats.connections_opened == 1


async def test_backfill_waits_out_rate_limits(ctx: Context) -> None:
    async with FakeBinance(make_tape(400), speed=1.0) as fake:
        src = source(ctx, fake)
        await src.start()
        try:
            await eventually(lambda: src.parser.stats.trades > 50)
            fake.throttle(2, retry_after_s=0.2)
            fake.drop_all()
            await fake.wait_finished()
            await eventually(lambda: (src._sequencer.next_id("BTCUSDT") or 0) > 1399)
        finally:
            await src.stop()
        requests = fake.stats.requests

    assert contiguous(await drain(ctx), "BTCUSDT", 1000, 1399)
    assert requests[("/api/v3/historicalTrades", 429)] == 2
    assert requests[("/api/v3/historicalTrades", 200)] >= 1


async def test_a_restart_resumes_after_the_highest_stored_id(ctx: Context) -> None:
    """Trades up to id 1099 are stored; the market has moved on meanwhile: the source catches up from
    1100 through REST before (and in order with) the live trades."""
    stored = make_tape(100)
    rows = [
        {
            "venue": "BINANCE",
            "symbol": "BTCUSDT",
            "trade_id": 1000 + i,
            "ts_ns": 1,
            "recv_ns": 1,
            "price": 1.0,
            "qty": 1.0,
            "side": 1,
        }
        for i in range(100)
    ]
    del stored
    await ctx.store.insert("ticks", pa.Table.from_pylist(rows).cast(TICKS.input_schema))
    async with FakeBinance(make_tape(400), speed=1.0, autostart=False) as fake:
        fake.start_market()
        await asyncio.sleep(1.5)  # about 150 trades happen before the source starts
        src = source(ctx, fake)
        await run_until_caught_up(src, fake, 1399, timeout_s=20.0)

    assert contiguous(await drain(ctx), "BTCUSDT", 1100, 1399)
    assert src.gaps.recorded[0].from_value == 1100


async def test_aggregate_trade_streams_are_sequenced_and_backfilled_too(ctx: Context) -> None:
    """``stream = "aggTrade"``: the real BTCUSDT aggregates with drops; aggregate ids contiguous, each once,
    and together they hold exactly the volume of the recorded trades."""
    tape = btc_tape()
    history = tape.history("BTCUSDT")
    first, n = history.first_agg_id, history.n_aggregates
    async with FakeBinance(tape, speed=60.0) as fake:
        src = source(ctx, fake, stream="aggTrade")
        fake.drop_every(1.5)
        await run_until_caught_up(src, fake, first + n - 1, timeout_s=60.0)
        rest_requests = fake.stats.requests

    stored = await drain(ctx)
    assert contiguous(stored, "BTCUSDT", first, first + n - 1)
    assert n < 19_904
    recorded_volume = sum(float(tape.trade(g).qty) for g in range(len(tape)))
    assert stored.np("qty").sum() == pytest.approx(recorded_volume, rel=1e-12)
    assert rest_requests[("/api/v3/aggTrades", 200)] >= 1
    assert ("/api/v3/historicalTrades", 200) not in rest_requests
