"""The trader module on the bus and the store: the same fills as the core alone, and a crash survived."""

from __future__ import annotations

import asyncio
import logging
import time

import msgspec
import pytest
from prometheus_client import REGISTRY

from alphaengine.codec import decode_event, encode_event, encode_ticks
from alphaengine.domain import Fill
from alphaengine.errors import ConfigError
from alphaengine.kernel.module import Context, ModuleState
from alphaengine.trading import Portfolio, TradingCore
from alphaengine.trading.module import Trader, TraderSettings
from alphaengine.trading.report import render_positions, render_risk
from tests.trading_market import MARKET, NS, SECONDS, SETTINGS, SYMBOLS, T0, batch

CHUNK_S = 2


def trader_settings() -> TraderSettings:
    core = SETTINGS
    return TraderSettings(
        snapshot_interval_s=0.05,
        flush_interval_s=0.05,
        hold_s=core.hold_s,
        limits=core.limits,
        sizing=core.sizing,
    )


async def publish(ctx: Context, first_s: int, last_s: int, *, paced: bool = True) -> None:
    """Ticks in records of a symbol and two seconds each; a bar's predictions after the next second's ticks.

    Paced, as a live feed is, the trader reads the records as they come; unpaced, they are a backlog.
    """
    for topic in ("ticks", "predictions"):
        await ctx.bus.create_topic(topic)
    for lo in range(first_s, last_s, CHUNK_S):
        if paced:
            await asyncio.sleep(0.005)
        hi = T0 + (lo + CHUNK_S) * NS
        for symbol in SYMBOLS:
            await (
                await ctx.bus.send(
                    "ticks", encode_ticks(batch(symbol, T0 + lo * NS, hi)), key=symbol.encode()
                )
            )
        for p in MARKET.predictions:
            if hi - CHUNK_S * NS <= p.bar_ts_ns + 2 * NS <= hi:
                await (await ctx.bus.send("predictions", encode_event(p), key=p.symbol.encode()))


async def settle(trader: Trader, until_ns: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if trader.core.now_ns >= until_ns and await trader.consumer.lag() == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the trader reached {trader.core.now_ns}, not {until_ns}")


def reference_fills(until_ns: int) -> list[tuple[int, Fill]]:
    """The core alone on the whole market: its fills before ``until_ns``."""
    core = TradingCore(SETTINGS)
    for symbol in SYMBOLS:
        core.add_ticks(batch(symbol, T0, T0 + SECONDS * NS))
    for p in MARKET.predictions:
        core.add_prediction(p)
    core.run_until(until_ns)
    return [(seq, f) for seq, f in core.drain().fills if f.ts_ns < until_ns]


async def stored_fills(ctx: Context) -> list[tuple[int, Fill]]:
    table = await ctx.store.query(
        "SELECT seq, fill_id, order_id, ts_ns, venue, symbol, side, qty, price, fee_usd, liquidity "
        "FROM fills FINAL WHERE account = 'paper' ORDER BY seq"
    )
    return [(int(r["seq"]), msgspec.convert({"type": "fill", **r}, Fill)) for r in table.to_pylist()]


async def test_the_trader_fills_as_the_core_does_and_publishes_them(ctx: Context) -> None:
    for topic in ("ticks", "predictions"):
        await ctx.bus.create_topic(topic)
    trader = Trader("trader", trader_settings(), ctx)
    await trader.start()
    await publish(ctx, 0, SECONDS)
    end = T0 + (SECONDS - 10) * NS
    await settle(trader, end)
    await trader.stop()
    got = await stored_fills(ctx)
    want = reference_fills(trader.core.now_ns)
    assert len(want) > 20
    assert got == want
    fills_topic = ctx.bus.consumer("reader", ["fills"])
    await fills_topic.start()
    published = [decode_event(r.value, Fill) for r in await fills_topic.getmany(10_000, 0.5)]
    await fills_topic.close()
    assert sorted(f.fill_id for f in published) == sorted(f.fill_id for _, f in want)
    equity = await ctx.store.query("SELECT count() AS n FROM equity WHERE account = 'paper'")
    assert equity["n"][0].as_py() > 80


async def test_a_crash_loses_nothing_and_applies_no_fill_twice(ctx: Context) -> None:
    for topic in ("ticks", "predictions"):
        await ctx.bus.create_topic(topic)
    first = Trader("trader", trader_settings(), ctx)
    await first.start()
    await publish(ctx, 0, SECONDS // 2)
    await settle(first, T0 + (SECONDS // 2 - 10) * NS)
    crashed_at = first.core.portfolio.fill_seq
    await first.abort()  # no flush, no commit: what a SIGKILL leaves behind
    assert crashed_at > 5

    await publish(ctx, SECONDS // 2, SECONDS, paced=False)  # what came in while it was down
    second = Trader("trader", trader_settings(), ctx)
    await second.start()
    end = T0 + (SECONDS - 10) * NS
    await settle(second, end)
    await second.stop()
    got = await stored_fills(ctx)
    assert [seq for seq, _ in got] == list(range(1, len(got) + 1))
    assert got == reference_fills(second.core.now_ns)
    rebuilt = Portfolio.from_fills(SETTINGS.initial_cash_usd, got)
    assert rebuilt.state() == msgspec.structs.replace(
        second.core.portfolio.state(), peak_equity_usd=rebuilt.peak_equity_usd
    )


async def test_a_backlog_is_traded_as_live(ctx: Context) -> None:
    """Everything published before the trader starts: trades are read far ahead of the predictions, and
    the trader waits for the predictions rather than passing their bars."""
    await publish(ctx, 0, SECONDS, paced=False)
    trader = Trader("trader", trader_settings(), ctx)
    await trader.start()
    await settle(trader, T0 + (SECONDS - 10) * NS)
    await trader.stop()
    assert await stored_fills(ctx) == reference_fills(trader.core.now_ns)


async def test_the_kill_switch_halts_until_resumed(ctx: Context, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    settings = msgspec.structs.replace(
        trader_settings(), limits=msgspec.structs.replace(SETTINGS.limits, max_drawdown_pct=0.1)
    )
    for topic in ("ticks", "predictions"):
        await ctx.bus.create_topic(topic)
    trader = Trader("trader", settings, ctx)
    await trader.start()
    await publish(ctx, 0, 600)
    await settle(trader, T0 + 590 * NS)

    assert trader.state is ModuleState.DEGRADED
    assert "kill switch" in trader.detail
    assert REGISTRY.get_sample_value("alphaengine_trading_halted") == 1.0
    assert REGISTRY.get_sample_value("alphaengine_risk_limit", {"limit": "max_drawdown_pct"}) == 0.1
    assert any("trading halted: kill switch" in r.getMessage() for r in caplog.records)
    orders = (
        await ctx.store.query("SELECT ts_ns, status, reason FROM orders FINAL ORDER BY ts_ns")
    ).to_pylist()
    fired = min(o["ts_ns"] for o in orders if o["reason"].startswith(("max_drawdown:", "halted:")))
    after = [o for o in orders if o["ts_ns"] > fired]
    assert after, "signals kept coming after the halt"
    assert all(
        o["status"] == "rejected" and o["reason"].startswith("halted: trading is halted") for o in after
    )

    answer = await trader.commands()["resume"]({})
    assert answer["mode"] == "active"
    assert trader.state is ModuleState.RUNNING
    await publish(ctx, 600, SECONDS)
    await settle(trader, T0 + (SECONDS - 10) * NS)
    await trader.stop()
    orders = (await ctx.store.query("SELECT ts_ns, status FROM orders FINAL WHERE ts_ns > 0")).to_pylist()
    assert any(o["status"] == "filled" and o["ts_ns"] > T0 + 600 * NS for o in orders)


async def test_limits_set_at_run_time_are_checked_and_survive_a_restart(ctx: Context) -> None:
    for topic in ("ticks", "predictions"):
        await ctx.bus.create_topic(topic)
    trader = Trader("trader", trader_settings(), ctx)
    await trader.start()
    await publish(ctx, 0, 120)
    await settle(trader, T0 + 110 * NS)
    commands = trader.commands()
    answer = await commands["set-limits"]({"max_order_notional_usd": 1234.0, "max_orders_per_minute": 7})
    assert answer["limits"]["max_order_notional_usd"] == 1234.0
    with pytest.raises(ConfigError, match="max_drawdown_pct"):
        await commands["set-limits"]({"max_drawdown_pct": -1})
    with pytest.raises(ConfigError, match="no_such_limit"):
        await commands["set-limits"]({"no_such_limit": 1})
    await commands["pause"]({"reducing_only": True, "reason": "end of day"})
    text = render_positions(await commands["positions"]({})) + render_risk(await commands["risk"]({}))
    assert "trading REDUCING: end of day" in text
    assert "max_order_notional_usd" in text
    await asyncio.sleep(0.3)  # the next flush saves the change
    await trader.abort()

    again = Trader("trader", trader_settings(), ctx)
    await again.start()
    risk = await again.commands()["risk"]({})
    await again.stop()
    assert risk["limits"]["max_order_notional_usd"] == 1234.0
    assert risk["limits"]["max_orders_per_minute"] == 7
    assert (risk["mode"], risk["reason"]) == ("reducing", "end of day")
