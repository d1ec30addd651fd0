"""``alphaengine backtest``: a configuration's modules and registry over trades, with progress and files."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from alphaengine.backtest import report
from alphaengine.backtest.runner import (
    Backtest,
    BacktestError,
    file_batches,
    store_batches,
)
from alphaengine.backtest.runner import (
    Progress as RunProgress,
)
from alphaengine.config import LoadedConfig
from alphaengine.domain import TickBatch
from alphaengine.kernel.engine import resolve_config_paths
from alphaengine.objectstore import build_objectstore
from alphaengine.store import build_store

NS = 1_000_000_000


async def run_backtest(
    loaded: LoadedConfig,
    *,
    files: Sequence[str] = (),
    days: tuple[date, date] | None = None,
    out_dir: Path,
    step_s: int = 60,
    show_progress: bool = True,
) -> tuple[dict[str, Any], dict[str, Path]]:
    """Backtest the configured bar builder, predictor and trader over files or the store's days.

    Returns the summary and the files written. Exactly one of ``files`` and ``days`` is given.
    """
    if bool(files) == (days is not None):
        raise BacktestError("give either files to replay or a range of days from the store")
    app = resolve_config_paths(loaded).app
    objects = build_objectstore(app.objectstore)
    await objects.start()
    try:
        async with _input(loaded, files, days) as batches:
            backtest = Backtest(objects, loaded=loaded, work_dir=out_dir / "work", step_s=step_s)
            span = None if days is None else (_day_ns(days[0]), _day_ns(days[1]) + 86_400 * NS)
            with _Bar(show_progress, span) as bar:
                run = await backtest.run(batches, bar.update)
        results = await report.load_results(run)
        summary = report.summarize(results, run)
        await run.store.close()
        return summary, report.write(out_dir, results, summary)
    finally:
        await objects.close()


@contextlib.asynccontextmanager
async def _input(
    loaded: LoadedConfig, files: Sequence[str], days: tuple[date, date] | None
) -> AsyncIterator[AsyncIterator[TickBatch]]:
    if days is None:
        yield file_batches(files)
        return
    store = build_store(resolve_config_paths(loaded).app.store)
    await store.start()
    try:
        yield store_batches(store, *days)
    finally:
        await store.close()


def _day_ns(day: date) -> int:
    return int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()) * NS


class _Bar:
    """A rich progress bar over event time (a spinner when the span is not known ahead)."""

    def __init__(self, enabled: bool, span: tuple[int, int] | None) -> None:
        self.span = span
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]backtest"),
            BarColumn(),
            TextColumn("{task.fields[when]}  {task.fields[ticks]:,} trades  {task.fields[rate]:,.0f}/s"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            disable=not enabled,
            transient=False,
        )
        total = None if span is None else (span[1] - span[0]) / NS
        self.task = self.progress.add_task("backtest", total=total, when="", ticks=0, rate=0.0)

    def __enter__(self) -> _Bar:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def update(self, p: RunProgress) -> None:
        when = datetime.fromtimestamp(p.event_ns / NS, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")
        done = None if self.span is None else max(0.0, (p.event_ns - self.span[0]) / NS)
        self.progress.update(
            self.task, completed=done, when=when, ticks=p.ticks, rate=p.ticks / p.wall_s if p.wall_s else 0.0
        )
