"""The trading pieces on their own: portfolio, risk checks, paper broker, signal engine, statistics."""

from __future__ import annotations

import math

import empyrical
import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alphaengine.domain import Fill, Liquidity, Order, OrderStatus, OrderType, Prediction, Side, Signal
from alphaengine.trading import (
    BrokerSettings,
    EquityPoint,
    MarketState,
    PaperBroker,
    Portfolio,
    Quote,
    RiskEngine,
    RiskLimits,
    SignalEngine,
    SizingSettings,
    TradingMode,
)
from alphaengine.trading.risk import CHECKS
from alphaengine.trading.stats import (
    annual_return,
    annual_volatility,
    max_drawdown,
    sharpe_ratio,
    simple_returns,
    sortino_ratio,
)

NS = 1_000_000_000
T0 = 1_700_000_000 * NS
KEY = "BINANCE:BTCUSDT"


def fill(n: int, side: Side, qty: float, price: float, *, fee: float = 0.0, symbol: str = "BTCUSDT") -> Fill:
    return Fill(
        fill_id=f"f{n}",
        order_id=f"o{n}",
        ts_ns=T0 + n * NS,
        venue="BINANCE",
        symbol=symbol,
        side=side,
        qty=qty,
        price=price,
        fee_usd=fee,
        liquidity=Liquidity.TAKER,
    )


# -- portfolio ------------------------------------------------------------------------------------------


def test_portfolio_accounts_for_adding_reducing_and_flipping() -> None:
    p = Portfolio(10_000.0)
    p.apply(fill(1, Side.BUY, 1.0, 100.0, fee=0.1), 1)
    p.apply(fill(2, Side.BUY, 1.0, 110.0, fee=0.1), 2)
    assert p.qty(KEY) == 2.0
    assert p.holdings[KEY].avg_price == pytest.approx(105.0)
    p.apply(fill(3, Side.SELL, 3.0, 120.0, fee=0.2), 3)  # closes 2 at +15 each, opens 1 short at 120
    h = p.holdings[KEY]
    assert h.qty == pytest.approx(-1.0)
    assert h.avg_price == pytest.approx(120.0)
    assert h.realized_usd == pytest.approx(30.0)
    assert p.fees_usd == pytest.approx(0.4)
    assert p.cash_usd == pytest.approx(10_000 - 100 - 110 + 360 - 0.4)
    assert p.equity({KEY: 125.0}) == pytest.approx(10_000 + 30 - 5 - 0.4)
    p.apply(fill(4, Side.BUY, 1.0, 100.0), 4)
    assert p.qty(KEY) == 0.0
    assert p.holdings[KEY].avg_price == 0.0
    assert p.realized_usd == pytest.approx(50.0)


def test_portfolio_applies_each_fill_once_and_refuses_a_gap() -> None:
    p = Portfolio(1_000.0)
    assert p.apply(fill(1, Side.BUY, 1.0, 10.0), 1) is not None
    assert p.apply(fill(1, Side.BUY, 1.0, 10.0), 1) is None
    assert p.qty(KEY) == 1.0
    with pytest.raises(ValueError, match="expected 2"):
        p.apply(fill(3, Side.BUY, 1.0, 10.0), 3)


_fills = st.lists(
    st.tuples(
        st.sampled_from([Side.BUY, Side.SELL]),
        st.floats(0.001, 5.0),
        st.floats(50.0, 150.0),
        st.floats(0.0, 1.0),
        st.sampled_from(["BTCUSDT", "ETHUSDT"]),
    ),
    min_size=1,
    max_size=40,
)


@given(_fills, st.floats(50.0, 150.0), st.floats(50.0, 150.0))
@settings(max_examples=200, deadline=None)
def test_equity_is_cash_plus_marks_and_initial_plus_pnl(
    fills: list[tuple[Side, float, float, float, str]], mark_btc: float, mark_eth: float
) -> None:
    log = [
        (i + 1, fill(i + 1, side, q, px, fee=fee, symbol=sym))
        for i, (side, q, px, fee, sym) in enumerate(fills)
    ]
    p = Portfolio.from_fills(100_000.0, log)
    marks = {KEY: mark_btc, "BINANCE:ETHUSDT": mark_eth}
    by_pnl = p.initial_cash_usd + p.realized_usd + p.unrealized_usd(marks) - p.fees_usd
    assert p.equity(marks) == pytest.approx(by_pnl, rel=1e-9, abs=1e-6)
    again = Portfolio.from_state(msgspec.json.decode(msgspec.json.encode(p.state()), type=type(p.state())))
    assert again.state() == p.state()


# -- risk -----------------------------------------------------------------------------------------------


def order(
    side: Side, qty: float, *, ts: int = T0, kind: OrderType = OrderType.MARKET, limit: float | None = None
) -> Order:
    return Order(
        order_id="o",
        intent_id="s",
        ts_ns=ts,
        venue="BINANCE",
        symbol="BTCUSDT",
        side=side,
        qty=qty,
        order_type=kind,
        limit_price=limit,
    )


QUOTE = Quote(price=100.0, ts_ns=T0 - NS, volatility=1e-4, volatility_samples=100)
LIMITS = RiskLimits(
    max_order_notional_usd=1_000,
    max_position_notional_usd=2_000,
    max_gross_exposure_usd=3_000,
    max_orders_per_minute=2,
    max_daily_loss_usd=100,
    max_drawdown_pct=5,
    max_data_age_s=5,
    price_band_bps=50,
)


def engine(**limits: float) -> RiskEngine:
    return RiskEngine(msgspec.structs.replace(LIMITS, **limits), SizingSettings())


def holding(qty: float, symbol: str = "BTCUSDT", cash: float = 10_000.0) -> Portfolio:
    p = Portfolio(cash)
    if qty:
        p.apply(fill(1, Side.BUY if qty > 0 else Side.SELL, abs(qty), 100.0, symbol=symbol), 1)
    return p


def check(risk: RiskEngine, o: Order, p: Portfolio, quote: Quote = QUOTE, mark: float = 100.0) -> str | None:
    rejection = risk.check(o, quote, p, {KEY: mark, "BINANCE:ETHUSDT": mark})
    if rejection is None:
        return None
    assert rejection.check in CHECKS  # the trader exports a zero for each of these at start
    return rejection.check


def equity_point(equity_usd: float, *, drawdown: float) -> EquityPoint:
    """A point of the equity curve at T0 with only equity and drawdown set."""
    zero = dict.fromkeys(
        ("cash_usd", "realized_usd", "unrealized_usd", "fees_usd", "gross_exposure_usd", "net_exposure_usd"),
        0.0,
    )
    return EquityPoint(ts_ns=T0, equity_usd=equity_usd, drawdown=drawdown, **zero)


def test_halted_rejects_everything_until_resumed() -> None:
    risk = engine()
    risk.pause("operator")
    assert check(risk, order(Side.BUY, 1.0), holding(0)) == "halted"
    risk.resume()
    assert check(risk, order(Side.BUY, 1.0), holding(0)) is None


def test_reducing_only_lets_reducing_orders_through() -> None:
    risk = engine()
    risk.pause("wind down", reducing_only=True)
    assert risk.mode is TradingMode.REDUCING
    assert check(risk, order(Side.BUY, 1.0), holding(2)) == "reducing_only"
    assert check(risk, order(Side.SELL, 3.0), holding(2)) == "reducing_only"  # would flip short
    assert check(risk, order(Side.SELL, 1.0), holding(2)) is None


def test_stale_data_guard() -> None:
    risk = engine()
    old = Quote(100.0, T0 - 6 * NS, 1e-4, 100)
    assert check(risk, order(Side.BUY, 1.0), holding(0), quote=old) == "stale_data"
    assert check(risk, order(Side.BUY, 1.0), holding(0)) is None


def test_price_band_on_limit_orders() -> None:
    risk = engine()
    far = order(Side.BUY, 1.0, kind=OrderType.LIMIT, limit=100.6)  # 60 bps from the last trade
    near = order(Side.BUY, 1.0, kind=OrderType.LIMIT, limit=100.4)
    assert check(risk, far, holding(0)) == "price_band"
    assert check(risk, near, holding(0)) is None


def test_max_order_notional() -> None:
    risk = engine()
    assert check(risk, order(Side.BUY, 11.0), holding(0)) == "max_order_notional"
    assert check(risk, order(Side.BUY, 9.0), holding(0)) is None


def test_max_position_notional() -> None:
    risk = engine()
    assert check(risk, order(Side.BUY, 6.0), holding(15)) == "max_position_notional"
    assert check(risk, order(Side.BUY, 4.0), holding(15)) is None


def test_max_gross_exposure() -> None:
    risk = engine(max_position_notional_usd=3_000)
    eth_short = holding(-18, symbol="ETHUSDT")  # 1,800 USD of ETH
    eth_short.apply(fill(2, Side.BUY, 1.0, 100.0), 2)  # and 100 USD of BTC
    assert check(risk, order(Side.BUY, 9.0), eth_short, mark=100.0) is None  # 2,800 USD gross
    assert check(risk, order(Side.BUY, 9.0), holding(-22, symbol="ETHUSDT")) == "max_gross_exposure"


def test_daily_loss_limit_allows_only_reducing() -> None:
    risk = engine()
    p = holding(10)
    risk.on_equity(equity_point(10_000.0, drawdown=0.0))
    assert check(risk, order(Side.BUY, 1.0), p, mark=100.0) is None
    # The mark falls 11 USD: 110 USD lost today on 10 BTC.
    assert check(risk, order(Side.BUY, 1.0), p, mark=89.0) == "daily_loss"
    assert check(risk, order(Side.SELL, 1.0), p, mark=89.0) is None


def test_drawdown_kill_switch_fires_and_holds_until_resume() -> None:
    risk = engine(max_daily_loss_usd=1e9)
    p = holding(10, cash=1_000.0)  # 1,000 USD of equity in 10 units at 100
    assert check(risk, order(Side.SELL, 1.0), p, mark=96.0) is None  # 4 % down
    assert check(risk, order(Side.SELL, 1.0), p, mark=94.0) == "max_drawdown"
    assert risk.mode is TradingMode.HALTED
    assert "kill switch" in risk.mode_reason
    assert check(risk, order(Side.SELL, 1.0), p, mark=100.0) == "halted"
    risk.resume()
    assert check(risk, order(Side.SELL, 1.0), p, mark=100.0) is None
    # And from the equity curve:
    point = equity_point(940.0, drawdown=0.06)
    fired = risk.on_equity(point)
    assert fired is not None
    assert fired.check == "max_drawdown"
    assert risk.mode is TradingMode.HALTED


def test_order_rate_limit_over_a_sliding_minute() -> None:
    risk = engine()
    p = holding(0)

    def at(s: int) -> str | None:
        return check(
            risk, order(Side.BUY, 1.0, ts=T0 + s * NS), p, quote=Quote(100.0, T0 + s * NS, 1e-4, 100)
        )

    assert at(0) is None
    assert at(10) is None
    assert at(20) == "rate_limit"
    assert at(61) is None  # the order at 0 has left the minute


def test_sizing_targets_volatility_within_the_limits() -> None:
    risk = RiskEngine(
        RiskLimits(
            max_position_notional_usd=50_000, max_order_notional_usd=50_000, max_gross_exposure_usd=1e6
        ),
        SizingSettings(risk_bps=10),
    )
    signal = Signal(
        signal_id="s",
        ts_ns=T0,
        venue="BINANCE",
        symbol="BTCUSDT",
        bar_ts_ns=T0 - NS,
        horizon_s=100,
        score=0.004,
        confidence=1.0,
    )
    p = Portfolio(100_000.0)
    # sigma over 100 s = 1e-4 * 10 = 0.1 %: 10 bps of 100,000 USD at risk -> 100,000 USD, capped at 50,000.
    o = risk.order_for(signal, QUOTE, p, {})
    assert o is not None
    assert o.side is Side.BUY
    assert o.qty == pytest.approx(500.0)
    assert o.limit_price == pytest.approx(100.5)  # the protection price, the band
    calm = Quote(100.0, T0, 1e-3, 100)  # ten times the volatility: a tenth of the position
    o = risk.order_for(signal, calm, p, {})
    assert o is not None
    assert o.qty == pytest.approx(100.0)
    weak = msgspec.structs.replace(signal, score=0.001)  # under the 25 bps edge: flat, nothing to do
    assert risk.order_for(weak, calm, p, {}) is None
    short = msgspec.structs.replace(signal, score=-0.003)
    o = risk.order_for(short, calm, holding(50, cash=100_000.0), {KEY: 100.0})
    assert o is not None
    assert o.side is Side.SELL
    assert o.qty == pytest.approx(150.0)


# -- paper broker --------------------------------------------------------------------------------------


def trades(*rows: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ts = np.array([T0 + int(r[0] * NS) for r in rows], dtype=np.int64)
    return ts, np.array([r[1] for r in rows]), np.array([r[2] for r in rows])


BROKER = BrokerSettings(
    taker_fee_bps=10,
    maker_fee_bps=2,
    spread_bps=2,
    impact_bps=10,
    impact_notional_usd=1_000_000,
    latency_ms=100,
    limit_ttl_s=5,
)


def test_market_order_fills_after_its_latency_with_slippage_and_fee() -> None:
    broker = PaperBroker(BROKER)
    broker.submit(KEY, order(Side.BUY, 100.0, limit=101.0))  # 10,000 USD
    done = broker.on_trades(KEY, *trades((0.05, 99.0, 1.0), (0.2, 100.0, 1.0)), until_ns=T0 + NS)
    assert len(done) == 1
    assert done[0].fill is not None
    f = done[0].fill
    slip_bps = 1.0 + 10.0 * math.sqrt(10_000 / 1_000_000)  # half the spread + impact: 2 bps
    assert f.ts_ns == T0 + int(0.2 * NS)
    assert f.price == pytest.approx(100.0 * (1 + slip_bps / 1e4))
    assert f.fee_usd == pytest.approx(100.0 * f.price * 10 / 1e4)
    assert f.fill_id == "o:f1"
    assert f.liquidity is Liquidity.TAKER
    assert done[0].order.status is OrderStatus.FILLED
    assert broker.open_orders == []


def test_market_order_beyond_its_protection_is_canceled() -> None:
    broker = PaperBroker(BROKER)
    broker.submit(KEY, order(Side.SELL, 1.0, limit=99.5))
    done = broker.on_trades(KEY, *trades((0.5, 99.0, 1.0)), until_ns=T0 + NS)
    assert done[0].fill is None
    assert done[0].order.status is OrderStatus.CANCELED
    assert "protection" in done[0].order.reason


def test_limit_order_rests_fills_in_parts_as_maker_and_expires() -> None:
    broker = PaperBroker(BROKER)
    broker.submit(KEY, order(Side.BUY, 3.0, kind=OrderType.LIMIT, limit=99.0))
    done = broker.on_trades(
        KEY,
        *trades((0.5, 99.5, 1.0), (1.0, 99.0, 5.0), (2.0, 98.9, 1.0), (3.0, 98.5, 0.5)),
        until_ns=T0 + 4 * NS,
    )
    fills = [e.fill for e in done if e.fill is not None]
    assert [f.qty for f in fills] == [1.0, 0.5]  # 99.0 only touches the price: no fill
    assert all(f.price == 99.0 and f.liquidity is Liquidity.MAKER for f in fills)
    assert fills[0].fee_usd == pytest.approx(99.0 * 2 / 1e4)
    assert done[-1].order.status is OrderStatus.PARTIALLY_FILLED
    done = broker.on_trades(KEY, *trades((4.5, 98.0, 10.0)), until_ns=T0 + 6 * NS)
    assert done[0].fill is not None
    assert done[0].fill.qty == pytest.approx(1.5)
    assert done[0].fill.fill_id == "o:f3"
    assert done[0].order.status is OrderStatus.FILLED

    broker.submit(KEY, order(Side.BUY, 1.0, kind=OrderType.LIMIT, limit=90.0))
    assert broker.on_trades(KEY, *trades((1.0, 95.0, 1.0)), until_ns=T0 + 4 * NS) == []
    done = broker.on_trades(KEY, *trades(), until_ns=T0 + 5 * NS)
    assert done[0].order.status is OrderStatus.CANCELED
    assert done[0].ts_ns == T0 + 5 * NS


def test_marketable_limit_order_takes_at_most_its_price() -> None:
    broker = PaperBroker(BROKER)
    broker.submit(KEY, order(Side.BUY, 1.0, kind=OrderType.LIMIT, limit=100.01))
    done = broker.on_trades(KEY, *trades((0.5, 100.0, 1.0)), until_ns=T0 + NS)
    assert done[0].fill is not None
    assert done[0].fill.price == pytest.approx(100.01)
    assert done[0].fill.liquidity is Liquidity.TAKER


@given(st.lists(st.integers(1, 59), max_size=6, unique=True))
@settings(max_examples=50, deadline=None)
def test_broker_fills_do_not_depend_on_how_the_trades_are_cut(cuts: list[int]) -> None:
    rng = np.random.default_rng(7)
    ts = np.sort(rng.integers(0, 60 * NS, 400)).astype(np.int64) + T0
    price = 100 + np.cumsum(rng.normal(0, 0.05, 400))
    qty = rng.uniform(0.01, 1.0, 400)

    def run(bounds: list[int]) -> list[tuple[str, int, float, float]]:
        broker = PaperBroker(BROKER)
        broker.submit(KEY, order(Side.BUY, 5.0, kind=OrderType.LIMIT, limit=99.9, ts=T0 + NS))
        broker.submit(KEY, order(Side.SELL, 2.0, ts=T0 + 3 * NS, limit=90.0))
        out = []
        lo = T0
        for hi in [*(T0 + b * NS for b in sorted(bounds)), T0 + 60 * NS]:
            sel = (ts >= lo) & (ts < hi)
            for e in broker.on_trades(KEY, ts[sel], price[sel], qty[sel], until_ns=hi):
                if e.fill is not None:
                    out.append((e.fill.fill_id, e.fill.ts_ns, e.fill.qty, e.fill.price))
            lo = hi
        return out

    assert run(cuts) == run([])


# -- market state --------------------------------------------------------------------------------------


def test_volatility_estimate_does_not_depend_on_the_steps() -> None:
    rng = np.random.default_rng(3)
    ts = np.sort(rng.integers(0, 600 * NS, 5_000)).astype(np.int64) + T0
    price = 100 * np.exp(np.cumsum(rng.normal(0, 2e-4, 5_000)))
    one = MarketState(60.0)
    one.update(KEY, ts, price, T0 + 600 * NS)
    many = MarketState(60.0)
    lo = T0
    for hi in [*np.sort(rng.integers(T0, T0 + 600 * NS, 50)).tolist(), T0 + 600 * NS]:
        sel = (ts >= lo) & (ts < hi)
        many.update(KEY, ts[sel], price[sel], hi)
        lo = hi
    assert one.state() == many.state()
    quote = one.quote(KEY)
    assert quote is not None
    assert quote.volatility_samples > 500
    # About 8 trades a second, each moving the log price by 2e-4: sigma per second near 5.8e-4.
    assert 3e-4 < quote.volatility < 9e-4


# -- signal engine -------------------------------------------------------------------------------------


def prediction(
    model: str, value: float, *, weight: float = 0.1, size: int = 3, stale: bool = False, bar: int = 0
) -> Prediction:
    return Prediction(
        ts_ns=T0,
        venue="BINANCE",
        symbol="BTCUSDT",
        interval_s=1,
        bar_ts_ns=T0 + bar * NS,
        model=model,
        version=f"v-{model}",
        horizon_s=60,
        value=value,
        stale=stale,
        stale_reason="model expired" if stale else "",
        weight=weight,
        group_size=size,
    )


def test_signal_is_the_weighted_mean_of_fresh_predictions_once_the_bar_is_complete() -> None:
    engine_ = SignalEngine()
    assert engine_.add(prediction("ridge", 0.002, weight=0.3)) == []
    assert engine_.add(prediction("lgbm", -0.001, weight=0.1)) == []
    assert engine_.add(prediction("ridge", 0.002, weight=0.3)) == []  # a redelivery: still two of three
    (done,) = engine_.add(prediction("mlp", 0.009, stale=True))
    s = done.signal
    assert s is not None
    assert s.signal_id == f"BINANCE:BTCUSDT:1:{T0}"
    assert s.ts_ns == T0 + NS
    assert s.score == pytest.approx((0.3 * 0.002 - 0.1 * 0.001) / 0.4)
    assert s.confidence == pytest.approx(0.5)
    assert s.model_versions == ("lgbm@v-lgbm", "ridge@v-ridge")
    assert engine_.add(prediction("mlp", 0.009)) == []  # the bar is done


def test_no_signal_from_stale_or_unweighted_predictions() -> None:
    engine_ = SignalEngine()
    (done,) = engine_.add(prediction("ridge", 0.01, size=1, stale=True))
    assert done.signal is None
    assert "stale" in done.reason
    (done,) = engine_.add(prediction("ridge", 0.01, size=1, weight=0.0, bar=1))
    assert done.signal is None
    assert "weight" in done.reason


def test_an_incomplete_bar_is_ensembled_once_time_passes_it() -> None:
    engine_ = SignalEngine()
    engine_.add(prediction("ridge", 0.002))
    assert engine_.due(T0 + NS) == []
    (done,) = engine_.due(T0 + NS + 1)
    assert done.signal is not None
    assert done.signal.model_versions == ("ridge@v-ridge",)


# -- statistics ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_statistics_equal_empyrical_on_the_same_returns(seed: int) -> None:
    rng = np.random.default_rng(seed)
    equity = 100_000 * np.cumprod(1 + rng.normal(0.0002, 0.01, 500))
    r = simple_returns(equity)
    per_year = 365.0
    assert sharpe_ratio(r, per_year) == pytest.approx(
        empyrical.sharpe_ratio(r, annualization=per_year), rel=1e-12
    )
    assert sortino_ratio(r, per_year) == pytest.approx(
        empyrical.sortino_ratio(r, annualization=per_year), rel=1e-12
    )
    assert max_drawdown(r) == pytest.approx(empyrical.max_drawdown(r), rel=1e-12)
    assert annual_volatility(r, per_year) == pytest.approx(
        empyrical.annual_volatility(r, annualization=per_year), rel=1e-12
    )
    assert annual_return(r, per_year) == pytest.approx(
        empyrical.annual_return(r, annualization=per_year), rel=1e-9
    )
