"""The files of a backtest: fills, orders and equity as CSV, a JSON summary and an HTML tearsheet.

``fills.csv`` is the run's fingerprint: floats are written with Python's shortest round-trip repr, so
two runs on the same data give the same file to the byte. ``summary.json`` holds the statistics
(:func:`alphaengine.trading.stats.performance`), the orders by status, the risk rejections by check and
each model's contribution. ``tearsheet.html`` is one self-contained page (plots as inline SVG): equity,
drawdown, positions, per-model contribution and risk rejections.

Per-model contribution: each fill's quantity is credited to the models behind its signal in their
shares of the score; a fill that reduces a position takes from every model's part in proportion. Each
model then earns its part of the position times the price moves from fill to fill (and to the final
marks), less its share of the fees. The contributions add up to the run's PnL.
"""

from __future__ import annotations

import csv
import html
import io
import math
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt
import orjson

from alphaengine.backtest.runner import BacktestRun
from alphaengine.domain import Fill, Side
from alphaengine.trading.portfolio import Holding, instrument
from alphaengine.trading.stats import performance

NS = 1_000_000_000

_FILL_COLUMNS = (
    "seq",
    "fill_id",
    "order_id",
    "ts_ns",
    "venue",
    "symbol",
    "side",
    "qty",
    "price",
    "fee_usd",
    "liquidity",
)
_ORDER_COLUMNS = (
    "order_id",
    "signal_id",
    "ts_ns",
    "updated_ns",
    "venue",
    "symbol",
    "side",
    "qty",
    "order_type",
    "limit_price",
    "status",
    "filled_qty",
    "reason",
)
_EQUITY_COLUMNS = (
    "ts_ns",
    "equity_usd",
    "cash_usd",
    "realized_usd",
    "unrealized_usd",
    "fees_usd",
    "gross_exposure_usd",
    "net_exposure_usd",
    "drawdown",
)


@dataclass(frozen=True, slots=True)
class Results:
    """What a backtest's trader recorded, as plain rows."""

    fills: list[dict[str, Any]]
    orders: list[dict[str, Any]]
    equity: list[dict[str, Any]]
    signals: dict[str, dict[str, Any]]
    final_marks: dict[str, float]
    initial_cash_usd: float
    equity_interval_s: int


async def load_results(run: BacktestRun) -> Results:
    """Read the run's store."""
    store = run.store

    async def rows(sql: str) -> list[dict[str, Any]]:
        table = await store.query(sql)
        return list(table.to_pylist())

    fills = await rows(f"SELECT {', '.join(_FILL_COLUMNS)} FROM fills FINAL ORDER BY seq")
    orders = await rows(
        f"SELECT {', '.join(_ORDER_COLUMNS)} FROM orders FINAL ORDER BY updated_ns, order_id, status"
    )
    equity = await rows(f"SELECT {', '.join(_EQUITY_COLUMNS)} FROM equity FINAL ORDER BY ts_ns")
    signals = {
        r["signal_id"]: r for r in await rows("SELECT signal_id, models, model_weights FROM signals FINAL")
    }
    settings = run.trader.config
    return Results(
        fills=fills,
        orders=orders,
        equity=equity,
        signals=signals,
        final_marks=run.trader.core.market.marks(),
        initial_cash_usd=settings.initial_cash_usd,
        equity_interval_s=settings.equity_interval_s,
    )


# -- figures ---------------------------------------------------------------------------------------


def model_contributions(results: Results) -> dict[str, float]:
    """Each model's PnL in USD (after fees), by the rule in the module docstring."""
    orders = {o["order_id"]: o["signal_id"] for o in results.orders}
    parts: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    last_price: dict[str, float] = {}
    pnl: dict[str, float] = defaultdict(float)
    for f in results.fills:
        key = instrument(f["venue"], f["symbol"])
        held = parts[key]
        if key in last_price:
            for model, qty in held.items():
                pnl[model] += qty * (f["price"] - last_price[key])
        last_price[key] = f["price"]
        shares = _shares(results.signals.get(orders.get(f["order_id"], "")))
        for model, share in shares.items():
            pnl[model] -= f["fee_usd"] * share
        signed = f["qty"] if f["side"] == Side.BUY.value else -f["qty"]
        position = math.fsum(held.values())
        if position and math.copysign(1.0, signed) != math.copysign(1.0, position):
            reduce = min(abs(signed), abs(position))
            for model in held:
                held[model] *= 1.0 - reduce / abs(position)
            signed = math.copysign(abs(signed) - reduce, signed)
        if signed:
            for model, share in shares.items():
                held[model] += signed * share
    for key, held in parts.items():
        mark = results.final_marks.get(key, last_price[key])
        for model, qty in held.items():
            pnl[model] += qty * (mark - last_price[key])
    return dict(sorted(pnl.items()))


def _shares(signal: dict[str, Any] | None) -> dict[str, float]:
    """Model name -> share of the signal (``unattributed`` when the order had no signal on record)."""
    if signal is None:
        return {"unattributed": 1.0}
    models = [m.partition("@")[0] for m in orjson.loads(signal["models"])]
    shares: dict[str, float] = defaultdict(float)
    for model, weight in zip(models, orjson.loads(signal["model_weights"]), strict=True):
        shares[model] += weight
    return dict(shares)


def summarize(results: Results, run: BacktestRun) -> dict[str, Any]:
    """The JSON summary of the run."""
    holdings: dict[str, Holding] = defaultdict(Holding)
    realized: list[float] = []
    for f in results.fills:
        signed = f["qty"] if f["side"] == Side.BUY.value else -f["qty"]
        realized.append(holdings[instrument(f["venue"], f["symbol"])].apply(signed, f["price"], f["fee_usd"]))
    equity = [p["equity_usd"] for p in results.equity] or [results.initial_cash_usd]
    perf = performance(
        equity,
        [p["gross_exposure_usd"] for p in results.equity] or [0.0],
        results.equity_interval_s,
        realized_per_fill_usd=realized,
        traded_usd=math.fsum(h.traded_usd for h in holdings.values()),
        fees_usd=math.fsum(f["fee_usd"] for f in results.fills),
    )
    rejections = Counter(o["reason"].partition(":")[0] for o in results.orders if o["status"] == "rejected")
    return {
        "data": {
            "first": _iso(run.first_ns),
            "last": _iso(run.last_ns),
            "span_s": (run.last_ns - run.first_ns) / NS,
            "ticks": run.ticks,
            "symbols": sorted({f["symbol"] for f in results.fills}),
        },
        "run": {
            "wall_s": round(run.wall_s, 3),
            "ticks_per_s": round(run.ticks / run.wall_s) if run.wall_s else None,
        },
        "champions": run.champions,
        "performance": _finite(asdict(perf)),
        "equity": {
            "initial_usd": results.initial_cash_usd,
            "final_usd": equity[-1],
            "points": len(results.equity),
        },
        "orders": dict(sorted(Counter(o["status"] for o in results.orders).items())),
        "rejections": dict(sorted(rejections.items())),
        "models": {m: round(v, 6) for m, v in model_contributions(results).items()},
    }


def _finite(values: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()}


def _iso(ts_ns: int) -> str:
    return datetime.fromtimestamp(ts_ns / NS, tz=UTC).isoformat().replace("+00:00", "Z")


# -- files -----------------------------------------------------------------------------------------


def _csv(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([repr(v) if isinstance(v, float) else v for v in (row[c] for c in columns)])
    return out.getvalue()


def write(out_dir: Path, results: Results, summary: dict[str, Any]) -> dict[str, Path]:
    """Write the run's files into ``out_dir``; returns them by name."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "fills": out_dir / "fills.csv",
        "orders": out_dir / "orders.csv",
        "equity": out_dir / "equity.csv",
        "summary": out_dir / "summary.json",
        "tearsheet": out_dir / "tearsheet.html",
    }
    files["fills"].write_text(_csv(results.fills, _FILL_COLUMNS))
    files["orders"].write_text(_csv(results.orders, _ORDER_COLUMNS))
    files["equity"].write_text(_csv(results.equity, _EQUITY_COLUMNS))
    files["summary"].write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2) + b"\n")
    files["tearsheet"].write_text(tearsheet(results, summary))
    return files


def read_fills(path: Path) -> list[Fill]:
    """The fills of a ``fills.csv``."""
    with path.open(newline="") as f:  # CSV gives strings: strict=False converts the numbers
        return [msgspec.convert({"type": "fill", **r}, Fill, strict=False) for r in csv.DictReader(f)]


# -- the tearsheet ---------------------------------------------------------------------------------


def tearsheet(results: Results, summary: dict[str, Any]) -> str:
    """One self-contained HTML page: the figures and the plots."""
    import matplotlib  # noqa: PLC0415  (heavy: only a report needs it)

    matplotlib.use("Agg")
    matplotlib.rcParams["svg.hashsalt"] = "alphaengine"  # stable element ids from run to run
    from matplotlib import pyplot as plt  # noqa: PLC0415

    times = _times([p["ts_ns"] for p in results.equity])
    plots: list[tuple[str, str]] = []

    def svg(fig: Any) -> str:
        buf = io.StringIO()
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
        plt.close(fig)
        return buf.getvalue()

    fig, ax = plt.subplots(figsize=(10, 3))
    ax.plot(times, [p["equity_usd"] for p in results.equity], color="#1f5fa8", linewidth=1)
    ax.set_ylabel("USD")
    ax.grid(alpha=0.3)
    plots.append(("Equity", svg(fig)))

    fig, ax = plt.subplots(figsize=(10, 2.2))
    ax.fill_between(times, [-100 * p["drawdown"] for p in results.equity], 0, color="#b33", alpha=0.5)
    ax.set_ylabel("drawdown, %")
    ax.grid(alpha=0.3)
    plots.append(("Drawdown", svg(fig)))

    fig, ax = plt.subplots(figsize=(10, 3))
    positions: dict[str, float] = defaultdict(float)
    series: dict[str, tuple[list[int], list[float]]] = defaultdict(lambda: ([], []))
    for f in results.fills:
        positions[f["symbol"]] += f["qty"] if f["side"] == Side.BUY.value else -f["qty"]
        xs, ys = series[f["symbol"]]
        xs.append(f["ts_ns"])
        ys.append(positions[f["symbol"]] * f["price"])
    for symbol, (xs, ys) in sorted(series.items()):
        ax.step(_times(xs), ys, where="post", linewidth=1, label=symbol)
    ax.set_ylabel("position, USD at fill")
    ax.grid(alpha=0.3)
    if series:
        ax.legend(loc="upper left", fontsize="small")
    plots.append(("Positions", svg(fig)))

    for title, data, label in (
        ("Contribution per model (USD, after fees)", summary["models"], "USD"),
        ("Risk rejections by check", summary["rejections"], "orders"),
    ):
        fig, ax = plt.subplots(figsize=(10, 2.5))
        names = list(data) or ["(none)"]
        values = [data[n] for n in data] or [0]
        ax.barh(names, values, color=["#2a8" if v >= 0 else "#b33" for v in values])
        ax.set_xlabel(label)
        ax.grid(alpha=0.3, axis="x")
        plots.append((title, svg(fig)))

    perf = summary["performance"]
    rows = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{_fmt(v)}</td></tr>"
        for k, v in [
            *summary["data"].items(),
            *perf.items(),
            ("final equity, USD", summary["equity"]["final_usd"]),
            ("orders", summary["orders"]),
            ("champions", summary["champions"]),
        ]
    )
    body = "".join(f"<h2>{html.escape(t)}</h2>{s[s.index('<svg') :]}" for t, s in plots)
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>alphaengine backtest</title>"
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}"
        "th{text-align:left;padding-right:2em}td{font-family:monospace}</style></head><body>"
        f"<h1>Backtest {html.escape(summary['data']['first'])} to {html.escape(summary['data']['last'])}</h1>"
        f"<table>{rows}</table>{body}</body></html>\n"
    )


def _times(ts_ns: list[int]) -> npt.NDArray[np.datetime64]:
    return np.asarray(ts_ns, dtype=np.int64).astype("datetime64[ns]")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.6g}"
    if isinstance(value, dict | list):
        return html.escape(msgspec.json.encode(value).decode())
    return html.escape(str(value))
