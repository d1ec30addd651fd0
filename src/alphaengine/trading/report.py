"""Readable text of the trader's admin answers (``alphaengine admin positions`` and ``risk``)."""

from __future__ import annotations

from typing import Any


def render_positions(result: dict[str, Any]) -> str:
    """The account's equity, PnL, positions and open orders."""
    lines = [
        f"account {result['account']} as of {result['as_of'] or '-'}: equity {result['equity_usd']:,.2f} USD "
        f"(cash {result['cash_usd']:,.2f})",
        f"  realized {result['realized_usd']:+,.2f}  unrealized {result['unrealized_usd']:+,.2f}  "
        f"fees {result['fees_usd']:,.2f}  drawdown {result['drawdown'] * 100:.2f} %  fills {result['fills']}",
        f"  gross exposure {result['gross_exposure_usd']:,.2f}  net {result['net_exposure_usd']:+,.2f}",
    ]
    positions = result["positions"]
    if positions:
        lines.append(f"  {'instrument':<20} {'qty':>14} {'avg price':>12} {'mark':>12} {'realized':>12}")
        for key, p in positions.items():
            mark = "-" if p["mark"] is None else f"{p['mark']:,.4f}"
            qty, avg, realized = p["qty"], p["avg_price"], p["realized_usd"]
            lines.append(f"  {key:<20} {qty:>14,.6f} {avg:>12,.4f} {mark:>12} {realized:>+12,.2f}")
    else:
        lines.append("  no open positions")
    for o in result["open_orders"]:
        lines.append(
            f"  open {o['order_type']} {o['side']} {o['qty']:g} {o['symbol']} "
            f"(limit {o['limit_price']}, filled {o['filled_qty']:g}): {o['order_id']}"
        )
    return "\n".join(lines)


def render_risk(result: dict[str, Any]) -> str:
    """The trading mode and the limits in force."""
    mode = result["mode"].upper()
    head = f"trading {mode}" + (f": {result['reason']}" if result["reason"] else "")
    lines = [head, f"  loss today {result['daily_loss_usd']:+,.2f} USD"]
    lines += [f"  {name:<28} {value:,}" for name, value in result["limits"].items()]
    return "\n".join(lines)
