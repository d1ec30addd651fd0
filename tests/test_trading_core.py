"""The trading core is a function of the data: the same fills however the input is cut, interleaved or
interrupted by a snapshot and a restore."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alphaengine.domain import OrderStatus
from alphaengine.trading import CoreState, Outbox, TradingCore
from tests.trading_market import MARKET, NS, SECONDS, SETTINGS, SYMBOLS, T0, batch


def record(out: Outbox, into: dict[str, list[object]]) -> None:
    into["fills"].extend(out.fills)
    into["orders"].extend(out.orders)
    into["equity"].extend(out.equity)
    into["signals"].extend(e.signal for e in out.ensembled if e.signal is not None)
    into["late"].append(out.late_ticks)


def empty() -> dict[str, list[object]]:
    return {"fills": [], "orders": [], "equity": [], "signals": [], "late": []}


def run_at_once() -> dict[str, list[object]]:
    core = TradingCore(SETTINGS)
    for symbol in SYMBOLS:
        core.add_ticks(batch(symbol, T0, T0 + SECONDS * NS))
    for p in MARKET.predictions:
        core.add_prediction(p)
    core.run_until(T0 + SECONDS * NS)
    got = empty()
    record(core.drain(), got)
    return got


def run_stepwise(cuts: list[int], snapshot_at: int | None = None) -> dict[str, list[object]]:
    """Feed the market in chunks as a live trader reads it: a bar's predictions arrive with the next
    second's trades; optionally snapshot the core, build a new one from the snapshot and go on."""
    core = TradingCore(SETTINGS)
    got = empty()
    fed: list[tuple[str, int, int]] = []
    preds = iter(sorted(MARKET.predictions, key=lambda p: (p.bar_ts_ns, p.symbol, p.model)))
    nxt = next(preds, None)
    lo = T0
    bounds = [T0 + c * NS // 10 for c in sorted(set(cuts))] + [T0 + SECONDS * NS]
    for i, hi in enumerate(bounds):
        for symbol in SYMBOLS:
            core.add_ticks(batch(symbol, lo, hi))
            fed.append((symbol, lo, hi))
        while nxt is not None and nxt.bar_ts_ns + 2 * NS <= hi:
            core.add_prediction(nxt)
            nxt = next(preds, None)
        core.step()
        if snapshot_at is not None and i == snapshot_at:
            record(core.drain(), got)
            state = msgspec.json.decode(msgspec.json.encode(core.state()), type=CoreState)
            core = TradingCore(SETTINGS)
            core.restore(state)
            for symbol, a, b in fed:  # what a restart reads again: the trades not yet applied
                if b > state.now_ns:
                    core.add_ticks(batch(symbol, max(a, state.now_ns), b))
        lo = hi
    while nxt is not None:
        core.add_prediction(nxt)
        nxt = next(preds, None)
    core.run_until(T0 + SECONDS * NS)
    record(core.drain(), got)
    return got


REFERENCE = run_at_once()


def test_the_reference_run_trades() -> None:
    fills = REFERENCE["fills"]
    assert len(REFERENCE["signals"]) > 1_000
    assert len(fills) >= 20
    assert [seq for seq, _ in fills] == list(range(1, len(fills) + 1))  # type: ignore[misc]
    statuses = {o.status for _, o in REFERENCE["orders"]}  # type: ignore[misc]
    assert OrderStatus.FILLED in statuses
    assert len(REFERENCE["equity"]) == SECONDS // SETTINGS.equity_interval_s + 1  # both ends


@given(st.lists(st.integers(1, SECONDS * 10 - 1), min_size=5, max_size=60))
@settings(max_examples=15, deadline=None)
def test_same_fills_however_the_input_is_cut(cuts: list[int]) -> None:
    got = run_stepwise(cuts)
    assert got["fills"] == REFERENCE["fills"]
    assert got["orders"] == REFERENCE["orders"]
    assert got["equity"] == REFERENCE["equity"]
    assert sum(got["late"]) == 0  # type: ignore[arg-type]


@pytest.mark.parametrize("snapshot_at", [3, 40, 150])
def test_a_restore_from_a_snapshot_continues_exactly(snapshot_at: int) -> None:
    cuts = list(range(13, SECONDS * 10, 37))  # about every 3.7 s
    got = run_stepwise(cuts, snapshot_at=snapshot_at)
    assert got["fills"] == REFERENCE["fills"]
    assert got["orders"] == REFERENCE["orders"]
    assert got["equity"] == REFERENCE["equity"]
