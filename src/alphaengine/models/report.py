"""Readable text of a training cycle's report and of the registry overview.

``alphaengine train`` and ``alphaengine admin retrain --wait`` print :func:`render_cycle`;
``alphaengine admin models`` prints :func:`render_models`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from alphaengine.models.trainer import CycleReport, ModelOutcome
from alphaengine.models.worker import ScoreSummary

_HEADER = (
    f"{'out of sample, net of fees':<28}{'IC':>8}{'t(IC)':>7}{'hit':>7}{'net PnL':>10}{'gross':>9}"
    f"{'fees':>9}{'Sharpe':>8}{'trades':>9}{'exposure':>9}"
)


def _time(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, tz=UTC).strftime("%Y-%m-%d %H:%M")


def _row(label: str, s: ScoreSummary) -> str:
    t_stat = "   n/a" if s.ic_t_stat is None else f"{s.ic_t_stat:6.2f}"
    hit = "   n/a" if s.hit_rate is None else f"{100 * s.hit_rate:5.1f}%"
    return (
        f"  {label:<26}{s.ic:+8.4f} {t_stat}{hit:>7}{s.net_pnl:+10.4f}{s.gross_pnl:+9.4f}{s.fees:9.4f}"
        f"{s.sharpe:+8.2f}{s.trades:9.1f}{100 * s.exposure:8.1f}%"
    )


def render_cycle(report: CycleReport) -> str:
    """The cycle as a few paragraphs: the data, one line of scores per model and baseline, decisions."""
    lines = [
        f"training cycle ({report.reason}) on {report.source}: {report.status} in {report.seconds:.1f} s"
    ]
    if report.detail:
        lines.append(f"  {report.detail}")
    frame = report.frame
    if frame is None:
        return "\n".join(lines)
    lines += [
        f"data: {frame.rows:,} rows from {frame.bars:,} bars of {frame.interval_s} s, "
        f"{len(frame.symbols)} series ({', '.join(frame.symbols)}), {_time(frame.start_ns)} to "
        f"{_time(frame.end_ns)} UTC",
        f"features: {frame.feature_set} ({len(frame.features)}); target: {frame.target} "
        f"({report.horizon_bars} bars = {report.horizon_bars * frame.interval_s} s ahead); fees "
        f"{report.fee_bps:g} bps of the notional traded",
    ]
    done = [m for m in report.models if m.report is not None]
    if done:
        first = done[0].report
        assert first is not None
        folds = first.folds
        lines += [
            f"walk-forward: {len(folds)} folds, test spans from {_time(folds[0].test_start_ns)} to "
            f"{_time(folds[-1].test_end_ns)}, {sum(f.test_rows for f in folds):,} test rows; PnL in units "
            "of one symbol's notional, summed over symbols",
            "",
            _HEADER,
        ]
        for m in done:
            assert m.report is not None
            lines.append(_row(m.model, m.report.candidate))
        for name, scores in first.baselines.items():
            lines.append(_row(f"baseline {name}", scores))
    lines += ["", "decisions:"]
    lines += [_decision(m) for m in report.models]
    return "\n".join(lines)


def _decision(m: ModelOutcome) -> str:
    if m.report is None:
        return f"  {m.model:<7} FAILED ({m.failure}): {m.error}"
    failed = [r.removeprefix("fail: ") for r in m.report.reasons if r.startswith("fail:")]
    why = "every check passed" if not failed else "; ".join(failed)
    line = f"  {m.model:<7} {m.status:<9} {m.version}  {why}  ({m.seconds:.1f} s)"
    if m.demoted:
        check = m.report.champion_check
        reasons = "; ".join(check.reasons) if check is not None else ""
        line += f"\n          champion {m.demoted} demoted: {reasons}"
    return line


def render_models(overview: list[dict[str, Any]]) -> str:
    """One block per model: champion (or none), challenger, earlier champions, the last change."""
    lines: list[str] = []
    for entry in overview:
        lines.append(f"{entry['model']}")
        for role in ("champion", "challenger"):
            v = entry[role]
            if v is None:
                lines.append(f"  {role:<10} none")
                continue
            stale = "  EXPIRED (not traded)" if v["expired"] else ""
            ic = "n/a" if v["ic"] is None else f"{v['ic']:+.4f}"
            pnl = "n/a" if v["net_pnl"] is None else f"{v['net_pnl']:+.4f}"
            lines.append(
                f"  {role:<10} {v['version']}  age {v['age_s'] / 3600:.1f} h  data to {v['data_end']}  "
                f"IC {ic}  net PnL {pnl}{stale}"
            )
        if entry["earlier"]:
            lines.append(f"  earlier    {', '.join(entry['earlier'][-3:])}")
        change = entry["last_change"]
        if change is not None:
            when = _time(change["at_ns"])
            lines.append(f"  last change {when} {change['action']} by {change['by']}: {change['reason']}")
    return "\n".join(lines)
