"""The ``archiver`` module: archives old day partitions on a schedule (see :mod:`alphaengine.archive.core`).

It runs once at start, then every ``interval_s`` of the engine's clock. A run that fails (the object store
or the store unreachable, a day that does not verify) is logged and counted, and the next interval tries
again: nothing is dropped unless it was verified, so a failed run loses nothing, and the module keeps
RUNNING; ``alphaengine_archive_last_success_timestamp_seconds`` and the ``error`` runs are what to alert on.
"""

from __future__ import annotations

from datetime import date, timedelta
from typing import Annotated, Any, ClassVar, Literal

import msgspec

from alphaengine.archive.core import SCRATCH_DIR, Archive, today_utc
from alphaengine.config import LoadedConfig
from alphaengine.kernel.module import Context, Module, ModuleSettings
from alphaengine.metrics import ARCHIVE_LAST_SUCCESS, ARCHIVE_RUNS

ArchivedTable = Literal["ticks", "bars"]


class ArchiverSettings(ModuleSettings, frozen=True):
    """Settings of the archiver."""

    archive_after_days: Annotated[int, msgspec.Meta(ge=1)] = 7
    """Ticks stay in the store this many whole days after today (UTC); older days are archived."""
    bars_after_days: Annotated[int, msgspec.Meta(ge=1)] = 30
    """The same for bars."""
    interval_s: Annotated[float, msgspec.Meta(gt=0)] = 3600.0
    """Time between runs (the first run is at start)."""
    tables: Annotated[tuple[ArchivedTable, ...], msgspec.Meta(min_length=1)] = ("ticks", "bars")
    """Tables to archive."""

    def keep_days(self, table: str) -> int:
        """How many days ``table`` stays in the store."""
        return self.archive_after_days if table == "ticks" else self.bars_after_days

    def cutoffs(
        self, today: date, *, tables: tuple[str, ...] | None = None, before: date | None = None
    ) -> dict[str, date]:
        """For each table (``tables``, else the configured ones): days strictly before this are archived.

        ``before`` overrides every table's retention with one date.
        """
        return {
            table: before if before is not None else today - timedelta(days=self.keep_days(table))
            for table in (tables or self.tables)
        }


def configured_settings(config: LoadedConfig) -> ArchiverSettings:
    """The settings of the configuration's archiver module, or the defaults if it has none."""
    for module in config.modules:
        if isinstance(module.settings, ArchiverSettings):
            return module.settings
    return ArchiverSettings()


class Archiver(Module[ArchiverSettings]):
    """Archives ticks and bars older than their retention to Parquet in the object store, then drops them."""

    Config: ClassVar[type[ModuleSettings]] = ArchiverSettings

    def __init__(self, name: str, config: ArchiverSettings, ctx: Context) -> None:
        super().__init__(name, config, ctx)
        self.archive = Archive(ctx.store, ctx.objects, ctx.data_dir / SCRATCH_DIR, ctx.clock)
        self._last_error = ""
        self._last_success_ns: int | None = None

    async def on_start(self) -> None:
        """Clear files a killed run left behind and start the schedule."""
        await self.archive.clear_scratch()
        self.spawn(self._schedule(), "schedule")

    async def _schedule(self) -> None:
        while True:
            await self.run_once()
            await self.ctx.clock.sleep(self.config.interval_s)

    async def run_once(self) -> bool:
        """Archive every pending partition now; returns whether the run succeeded (failures are logged)."""
        cutoffs = self.config.cutoffs(today_utc(self.ctx.clock))
        try:
            reports = await self.archive.run(cutoffs)
        except Exception as exc:  # a failed run must never take the engine down: the next one retries
            ARCHIVE_RUNS.labels("error").inc()
            self._last_error = f"{type(exc).__name__}: {exc}"
            self.log.error("archive run failed, retrying in %.0f s: %s", self.config.interval_s, exc)
            return False
        ARCHIVE_RUNS.labels("success").inc()
        self._last_error = ""
        self._last_success_ns = self.ctx.clock.now_ns()
        ARCHIVE_LAST_SUCCESS.set(self._last_success_ns / 1e9)
        if reports:
            self.log.info("archive run: %d partition(s), %d rows", len(reports), sum(r.rows for r in reports))
        return True

    def health(self) -> dict[str, Any]:
        """The last run's error (empty if it succeeded) and when the last successful run ended."""
        return {"last_error": self._last_error, "last_success_ns": self._last_success_ns}
