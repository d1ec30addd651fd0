"""Continuous retraining: the ``trainer`` module and the training cycle it runs.

A cycle (:meth:`Retrainer.cycle`) reads the most recent window of bars (from the store, or from a candle
file for ``alphaengine train --candles``), writes them to a Parquet file, and hands the work to a
:class:`~alphaengine.models.pool.WorkerPool` of spawned processes: one job computes the training frame
(features, target and baseline inputs, as an Arrow IPC file), then one job per model runs the
walk-forward validation, fits the final model and decides on its promotion
(:func:`~alphaengine.models.worker.fit_and_validate`). The event loop only moves files and small
reports. Every fitted model is registered in the :class:`~alphaengine.models.registry.ModelRegistry`
as its model's challenger; the decisions (promote it, demote the champion) are applied there and
counted in metrics. A job that fails, crashes or hangs fails that model's part of the cycle only.

The module runs a cycle ``first_cycle_s`` after start and then every ``interval_s``, and on the admin
command ``retrain``; ``models``, ``promote`` and ``rollback`` show and change the registry. See
``docs/models.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import shutil
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, ClassVar, Final, Literal

import msgspec
import pyarrow as pa
import pyarrow.parquet as pq

from alphaengine import __version__, metrics
from alphaengine.clock import Clock
from alphaengine.config import Strict
from alphaengine.errors import AlphaEngineError, ConfigError
from alphaengine.features import FeatureParams
from alphaengine.kernel.module import Context, Module, ModuleSettings
from alphaengine.models.pool import JobFailed, StartMethod, WorkerPool
from alphaengine.models.registry import DataWindow, ModelRegistry, ModelState, RegistryError, VersionInfo
from alphaengine.models.validation import PromotionRule
from alphaengine.models.worker import (
    ChampionRef,
    FitJob,
    FitReport,
    FrameInfo,
    PrepareJob,
    fit_and_validate,
    prepare_frame,
)
from alphaengine.models.zoo import MODEL_NAMES, build_model
from alphaengine.objectstore.base import ObjectStore
from alphaengine.store.base import Store

log = logging.getLogger("alphaengine.trainer")

SCRATCH_DIR: Final = "trainer-scratch"
"""Under the engine's data directory: each cycle's files, removed when the cycle ends."""
CACHE_DIR: Final = "model-cache"
"""Under the engine's data directory: artifacts downloaded from the registry."""

_BAR_COLUMNS: Final = (
    "venue, symbol, interval_s, ts_ns, open, high, low, close, volume, quote_volume, vwap, trade_count, "
    "buy_volume, sell_volume, first_trade_id, last_trade_id"
)


async def latest_bars(store: Store, where: str, span_ns: int) -> pa.Table | None:
    """The stored bars matching ``where`` (SQL) of the ``span_ns`` up to the newest of them.

    Ordered by venue, symbol and time, each bar once (``FINAL``); ``None`` when none match. The
    trainer's window and the predictor's warm-up read their bars so.
    """
    newest = await store.query(f"SELECT max(ts_ns) AS newest, count() AS n FROM bars WHERE {where}")
    if not newest.num_rows or not newest["n"][0].as_py():
        return None
    start = int(newest["newest"][0].as_py()) - span_ns
    return await store.query(
        f"SELECT {_BAR_COLUMNS} FROM bars FINAL WHERE {where} AND ts_ns > {start} "
        "ORDER BY venue, symbol, ts_ns"
    )


ModelName = Literal["ridge", "forest", "lgbm", "mlp", "seq"]
_Positive = Annotated[int, msgspec.Meta(ge=1)]
_PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]


class PromotionSettings(Strict, frozen=True):
    """The promotion and demotion thresholds (:class:`~alphaengine.models.PromotionRule`)."""

    min_folds: Annotated[int, msgspec.Meta(ge=2)] = 3
    min_ic: _PositiveFloat = 0.01
    min_ic_t_stat: float = 3.0
    min_net_pnl: float = 0.0
    keep_min_ic: float = 0.0
    keep_min_net_pnl: float = 0.0

    def __post_init__(self) -> None:
        if self.keep_min_ic > self.min_ic or self.keep_min_net_pnl > self.min_net_pnl:
            raise ValueError("the keep thresholds must not be stricter than the promotion thresholds")

    def rule(self) -> PromotionRule:
        """As the validation's rule object."""
        return PromotionRule(**msgspec.structs.asdict(self))


class TrainerSettings(ModuleSettings, frozen=True):
    """Settings of the trainer (``[modules.<name>]`` with ``type = "trainer"``)."""

    models: Annotated[tuple[ModelName, ...], msgspec.Meta(min_length=1)] = (
        "ridge",
        "forest",
        "lgbm",
        "mlp",
        "seq",
    )
    """The models to retrain, in this order."""
    params: dict[str, dict[str, Any]] = msgspec.field(default_factory=dict)
    """Parameters per model over its defaults (e.g. ``params.lgbm = { num_leaves = 15 }``)."""
    interval_s: _PositiveFloat = 3600.0
    """Time between the starts of two scheduled cycles."""
    first_cycle_s: Annotated[float, msgspec.Meta(ge=0)] = 60.0
    """The first scheduled cycle runs this long after the module starts."""
    bar_interval_s: _Positive = 1
    """Bars of this length are the training rows."""
    window_s: _PositiveFloat = 7 * 86_400.0
    """Train on the bars of this span ending at the newest bar."""
    min_bars: _Positive = 18_000
    """Skip a cycle whose window holds fewer bars (over all symbols): an hour of 1 s bars of 5 symbols."""
    symbols: tuple[str, ...] = ()
    """Only these symbols; empty: every symbol with bars."""
    horizon_bars: _Positive = 60
    """Predict the log return over this many bars."""
    features: FeatureParams = FeatureParams()
    n_folds: Annotated[int, msgspec.Meta(ge=2)] = 5
    min_train_fraction: Annotated[float, msgspec.Meta(gt=0, lt=1)] = 0.5
    """The first test span starts after this share of the window."""
    embargo_bars: Annotated[int, msgspec.Meta(ge=0)] = 0
    fold_max_train_rows: _Positive | None = 150_000
    """Rows each fold's fit may use at most (the final fit uses the model's own ``max_train_rows``)."""
    fee_bps: Annotated[float, msgspec.Meta(ge=0)] = 10.0
    sizing: Literal["sign", "linear"] = "sign"
    threshold: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    scale: _PositiveFloat = 1.0
    promotion: PromotionSettings = PromotionSettings()
    min_recent_s: Annotated[float, msgspec.Meta(ge=0)] = 3600.0
    """A champion is judged (kept, demoted, or beaten by a candidate) on at least this much data after
    its training window; with less, it stays and no candidate replaces it."""
    max_model_age_s: _PositiveFloat | None = 2 * 86_400.0
    """A version's predictions are stale this long after it was registered; None: never."""
    keep_versions: _Positive = 10
    """Versions kept per model besides the champion, the challenger and earlier champions."""
    workers: _Positive = 1
    threads_per_worker: _Positive = 2
    nice: Annotated[int, msgspec.Meta(ge=0, le=19)] = 10
    """Workers run this much below the engine's priority, so that training never starves its loop."""
    job_timeout_s: _PositiveFloat = 1800.0
    """A job still running after this is taken for hung: its worker is killed and the pool rebuilt."""
    keras_backend: Literal["jax", "tensorflow", "torch"] = "jax"
    start_method: StartMethod = "spawn"
    registry_prefix: str = "models"

    def __post_init__(self) -> None:
        if len(set(self.models)) != len(self.models):
            raise ValueError(f"models are listed more than once: {list(self.models)}")
        for name, params in self.params.items():
            if name not in MODEL_NAMES:
                raise ValueError(f"params.{name}: unknown model, expected one of {', '.join(MODEL_NAMES)}")
            try:
                build_model(name, **params)
            except ConfigError as exc:
                # Point the key path of msgspec's message ("... - at `$.key`") at params.<model>.
                where = f"- at `$.params.{name}"
                problems = [
                    p.replace("- at `$", where) if "- at `$" in p else f"{p} {where}`" for p in exc.problems
                ]
                raise ValueError("; ".join(problems)) from None


def trainer_settings(config: Any) -> TrainerSettings:
    """The settings of a loaded configuration's trainer module, or the defaults if it has none."""
    for module in config.modules:
        if isinstance(module.settings, TrainerSettings):
            return module.settings
    return TrainerSettings()


@cache
def code_version() -> str:
    """``<package version>+<12 hex>``: a hash of the feature and model code that trained a version."""
    sha = hashlib.sha256()
    for package in ("alphaengine.features", "alphaengine.models"):
        for path in sorted(resources.files(package).iterdir(), key=lambda p: p.name):
            if path.name.endswith(".py"):
                sha.update(path.name.encode())
                sha.update(path.read_bytes())
    return f"{__version__}+{sha.hexdigest()[:12]}"


# --------------------------------------------------------------------------------------------- reports


class ModelOutcome(msgspec.Struct, frozen=True, kw_only=True):
    """What a cycle did for one model."""

    model: str
    status: Literal["promoted", "kept", "failed"]
    """``promoted``: the new version is the champion; ``kept``: registered as challenger only."""
    version: str | None = None
    champion: str | None = None
    """The champion after the cycle."""
    demoted: str | None = None
    """A champion demoted in this cycle."""
    error: str | None = None
    failure: str | None = None
    """``error``, ``crashed`` or ``timeout`` when the job failed."""
    report: FitReport | None = None
    seconds: float = 0.0


class CycleReport(msgspec.Struct, frozen=True, kw_only=True):
    """One training cycle."""

    started_ns: int
    reason: str
    status: Literal["done", "skipped", "failed"]
    detail: str = ""
    frame: FrameInfo | None = None
    source: str = ""
    horizon_bars: int = 0
    fee_bps: float = 0.0
    models: list[ModelOutcome] = msgspec.field(default_factory=list)
    seconds: float = 0.0


# ----------------------------------------------------------------------------------------- the cycle


class Retrainer:
    """Runs training cycles: data window to files, jobs in the pool, versions and decisions in the registry.

    Used by the ``trainer`` module and by ``alphaengine train`` outside an engine. ``candles`` (a CSV
    path) replaces the store as the source of bars.
    """

    def __init__(
        self,
        settings: TrainerSettings,
        *,
        store: Store | None,
        objects: ObjectStore,
        clock: Clock,
        data_dir: Path,
        candles: Path | None = None,
    ) -> None:
        if store is None and candles is None:
            raise ValueError("a retrainer needs a store or a candle file")
        self.settings = settings
        self.store = store
        self.clock = clock
        self.candles = candles
        self.scratch = data_dir / SCRATCH_DIR
        self.registry = ModelRegistry(objects, clock, data_dir / CACHE_DIR, settings.registry_prefix)
        self.pool = WorkerPool(
            workers=settings.workers,
            threads=settings.threads_per_worker,
            nice=settings.nice,
            keras_backend=settings.keras_backend,
            start_method=settings.start_method,
        )
        self._cycle_lock = asyncio.Lock()
        self.last_report: CycleReport | None = None

    async def close(self) -> None:
        """Stop the worker processes (idempotent)."""
        await self.pool.close()

    @property
    def running(self) -> bool:
        """Whether a cycle is in progress."""
        return self._cycle_lock.locked()

    async def cycle(self, models: Sequence[str] | None = None, *, reason: str = "schedule") -> CycleReport:
        """One cycle for ``models`` (default: every configured model); cycles never overlap."""
        names: list[str] = list(models) if models else list(self.settings.models)
        unknown = [m for m in names if m not in MODEL_NAMES]
        if unknown:
            raise RegistryError(f"unknown model(s) {unknown}: expected some of {', '.join(MODEL_NAMES)}")
        async with self._cycle_lock:
            started, started_ns = time.monotonic(), self.clock.now_ns()
            directory = self.scratch / f"cycle-{started_ns}"
            try:
                report = await self._cycle(names, reason, directory, started_ns)
            except JobFailed as exc:
                metrics.MODEL_TRAIN_FAILURES.labels("prepare", exc.kind).inc()
                report = CycleReport(started_ns=started_ns, reason=reason, status="failed", detail=str(exc))
            except Exception as exc:  # the store, the object store, a file: the next cycle tries again
                log.exception("training cycle failed")
                detail = str(exc) if isinstance(exc, AlphaEngineError) else f"{type(exc).__name__}: {exc}"
                report = CycleReport(started_ns=started_ns, reason=reason, status="failed", detail=detail)
            finally:
                await asyncio.to_thread(shutil.rmtree, directory, True)
            report = msgspec.structs.replace(report, seconds=time.monotonic() - started)
            metrics.TRAINER_CYCLES.labels(report.status).inc()
            self.last_report = report
            return report

    async def _cycle(self, names: list[str], reason: str, directory: Path, started_ns: int) -> CycleReport:
        s = self.settings
        bars = await self._load_bars()
        source = str(self.candles) if self.candles is not None else "store"
        head = CycleReport(
            started_ns=started_ns,
            reason=reason,
            status="done",
            source=source,
            horizon_bars=s.horizon_bars,
            fee_bps=s.fee_bps,
        )
        if bars.num_rows < s.min_bars:
            detail = f"{bars.num_rows} bars in the window, {s.min_bars} needed (min_bars)"
            return msgspec.structs.replace(head, status="skipped", detail=detail)
        await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=True)
        bars_path = directory / "bars.parquet"
        await asyncio.to_thread(pq.write_table, bars, bars_path, compression="zstd")
        del bars
        prepare = PrepareJob(
            bars_path=str(bars_path),
            frame_path=str(directory / "frame.arrow"),
            feature_params=msgspec.to_builtins(s.features),
            horizon_bars=s.horizon_bars,
            threads=s.threads_per_worker,
        )
        frame = await self.pool.run(prepare_frame, prepare, timeout_s=s.job_timeout_s, what="training frame")
        semaphore = asyncio.Semaphore(s.workers)

        async def one(name: str) -> ModelOutcome:
            async with semaphore:
                return await self._train_model(name, frame, directory, source)

        outcomes = await asyncio.gather(*(one(name) for name in names))
        for name in names:
            with contextlib.suppress(AlphaEngineError):
                await self.registry.prune(name, s.keep_versions)
        return msgspec.structs.replace(head, frame=frame, models=list(outcomes))

    async def _load_bars(self) -> pa.Table:
        s = self.settings
        if self.candles is not None:
            from alphaengine.features import bars_from_candles_csv  # noqa: PLC0415

            frame = await asyncio.to_thread(bars_from_candles_csv, self.candles)
            if frame.is_empty():
                return frame.to_arrow()
            end = frame["ts_ns"].max()
            start = int(end) - int(s.window_s * 1e9)  # type: ignore[arg-type]
            return frame.filter(frame["ts_ns"] > start).to_arrow()
        assert self.store is not None
        where = f"interval_s = {int(s.bar_interval_s)}"
        if s.symbols:
            where += " AND symbol IN (" + ", ".join(_sql_string(x) for x in s.symbols) + ")"
        bars = await latest_bars(self.store, where, int(s.window_s * 1e9))
        return pa.table({"ts_ns": pa.array([], pa.int64())}) if bars is None else bars

    async def _train_model(self, name: str, frame: FrameInfo, directory: Path, source: str) -> ModelOutcome:
        s = self.settings
        started = time.monotonic()
        try:
            champion = await self._champion_ref(name)
            job = FitJob(
                model=name,
                params=dict(s.params.get(name, {})),
                fold_max_train_rows=s.fold_max_train_rows,
                frame_path=str(directory / "frame.arrow"),
                out_dir=str(directory / name),
                features=frame.features,
                feature_set=frame.feature_set,
                target=frame.target,
                horizon_bars=s.horizon_bars,
                interval_s=frame.interval_s,
                n_folds=s.n_folds,
                min_train_fraction=s.min_train_fraction,
                embargo_bars=s.embargo_bars,
                expanding=True,
                fee_bps=s.fee_bps,
                sizing=s.sizing,
                threshold=s.threshold,
                scale=s.scale,
                rule=msgspec.structs.asdict(s.promotion),
                min_recent_s=s.min_recent_s,
                champion=champion,
                threads=s.threads_per_worker,
            )
            report = await self.pool.run(
                fit_and_validate, job, timeout_s=s.job_timeout_s, what=f"model {name}"
            )
        except JobFailed as exc:
            metrics.MODEL_TRAIN_FAILURES.labels(name, exc.kind).inc()
            return ModelOutcome(
                model=name,
                status="failed",
                error=str(exc),
                failure=exc.kind,
                seconds=time.monotonic() - started,
            )
        seconds = time.monotonic() - started
        metrics.MODEL_TRAIN_SECONDS.labels(name).observe(seconds)
        metrics.MODEL_LAST_TRAIN.labels(name).set(self.clock.now_ns() / 1e9)
        for score, value in (
            ("ic", report.candidate.ic),
            ("ic_t_stat", report.candidate.ic_t_stat),
            ("hit_rate", report.candidate.hit_rate),
            ("net_pnl", report.candidate.net_pnl),
            ("sharpe", report.candidate.sharpe),
        ):
            metrics.MODEL_VALIDATION.labels(name, score).set(float("nan") if value is None else value)
        info = {
            "model": name,
            "data": DataWindow(
                start_ns=frame.start_ns,
                end_ns=frame.end_ns,
                rows=frame.rows,
                symbols=frame.symbols,
                interval_s=frame.interval_s,
                source=source,
            ),
            "feature_set": frame.feature_set,
            "feature_params": msgspec.to_builtins(s.features),
            "features": frame.features,
            "target": frame.target,
            "horizon_bars": s.horizon_bars,
            "params": report.params,
            "code_version": code_version(),
            "validation": msgspec.to_builtins(
                {
                    "candidate": report.candidate,
                    "baselines": report.baselines,
                    "folds": report.folds,
                    "champion_check": report.champion_check,
                    "fee_bps": s.fee_bps,
                }
            ),
            "decision": report.reasons,
        }
        try:
            version, state, demoted = await self._apply(name, report, info)
        except AlphaEngineError as exc:  # the object store failed: nothing of this model changed
            metrics.MODEL_TRAIN_FAILURES.labels(name, "error").inc()
            error = f"registering the new version failed: {exc}"
            return ModelOutcome(model=name, status="failed", error=error, failure="error", seconds=seconds)
        return ModelOutcome(
            model=name,
            status="promoted" if report.promote else "kept",
            version=version.version,
            champion=state.champion,
            demoted=demoted,
            report=report,
            seconds=seconds,
        )

    async def _apply(
        self, name: str, report: FitReport, info: dict[str, Any]
    ) -> tuple[VersionInfo, ModelState, str | None]:
        """Register the new version, then demote the champion and promote the version as decided."""
        version = await self.registry.register(
            Path(report.artifact_dir), info, max_age_s=self.settings.max_model_age_s
        )
        demoted = None
        check = report.champion_check
        if check is not None and check.demote:
            with contextlib.suppress(RegistryError):  # an operator may have changed it meanwhile
                await self.registry.demote(name, by="trainer", reason="; ".join(check.reasons))
                metrics.MODEL_DEMOTIONS.labels(name, "trainer").inc()
                demoted = check.version
        if report.promote:
            state = await self.registry.promote(
                name, version.version, by="trainer", reason="beat the baselines out of sample"
            )
            metrics.MODEL_PROMOTIONS.labels(name, "trainer").inc()
        else:
            state = await self.registry.state(name)
        return version, state, demoted

    async def _champion_ref(self, name: str) -> ChampionRef | None:
        champion = await self.registry.champion(name)
        if champion is None:
            return None
        path = await self.registry.fetch(name, champion.version)
        return ChampionRef(
            version=champion.version,
            path=str(path),
            data_end_ns=champion.data.end_ns,
            feature_set=champion.feature_set,
        )

    # -- what the admin commands show and change ----------------------------------------------------

    async def overview(self) -> list[dict[str, Any]]:
        """Per model: champion (with age, expiry and scores), challenger, earlier champions, last change."""
        now = self.clock.now_ns()
        out: list[dict[str, Any]] = []
        for name in self.settings.models:
            state = await self.registry.state(name)
            champion = None if state.champion is None else await self.registry.version(name, state.champion)
            challenger = (
                None if state.challenger is None else await self.registry.version(name, state.challenger)
            )
            out.append(
                {
                    "model": name,
                    "champion": None if champion is None else _version_view(champion, now),
                    "challenger": None if challenger is None else _version_view(challenger, now),
                    "earlier": state.earlier,
                    "last_change": msgspec.to_builtins(state.history[-1]) if state.history else None,
                }
            )
        return out

    async def refresh_gauges(self) -> None:
        """Set the champion and model-age gauges from the registry."""
        now = self.clock.now_ns()
        for name in self.settings.models:
            champion = await self.registry.champion(name)
            metrics.MODEL_CHAMPION.labels(name).set(0.0 if champion is None else 1.0)
            if champion is None:
                with contextlib.suppress(KeyError):
                    metrics.MODEL_AGE.remove(name)
            else:
                metrics.MODEL_AGE.labels(name).set((now - champion.created_ns) / 1e9)


def _version_view(info: VersionInfo, now_ns: int) -> dict[str, Any]:
    candidate = info.validation.get("candidate", {})
    return {
        "version": info.version,
        "age_s": round((now_ns - info.created_ns) / 1e9, 1),
        "expired": info.expired(now_ns),
        "data_end": _iso(info.data.end_ns),
        "rows": info.data.rows,
        "ic": candidate.get("ic"),
        "ic_t_stat": candidate.get("ic_t_stat"),
        "net_pnl": candidate.get("net_pnl"),
        "code_version": info.code_version,
    }


def _iso(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")


def _sql_string(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


# -------------------------------------------------------------------------------------------- module


class Trainer(Module[TrainerSettings]):
    """Retrains the models on a schedule and on demand, in a process pool; see the module docstring."""

    Config: ClassVar[type[ModuleSettings]] = TrainerSettings
    _GAUGE_INTERVAL_S: ClassVar[float] = 15.0

    def __init__(self, name: str, config: TrainerSettings, ctx: Context) -> None:
        super().__init__(name, config, ctx)
        self.retrainer = Retrainer(
            config, store=ctx.store, objects=ctx.objects, clock=ctx.clock, data_dir=ctx.data_dir
        )
        self._wake = asyncio.Event()
        self._requested: list[str] | None = None

    async def on_start(self) -> None:
        """Clear what a killed cycle left and start the schedule."""
        await asyncio.to_thread(shutil.rmtree, self.retrainer.scratch, True)
        for model in self.config.models:  # zeros, so that increase() sees the first event
            metrics.MODEL_ROLLBACKS.labels(model)
            for by in ("trainer", "operator"):
                metrics.MODEL_PROMOTIONS.labels(model, by)
                metrics.MODEL_DEMOTIONS.labels(model, by)
            for kind in ("error", "crashed", "timeout"):
                metrics.MODEL_TRAIN_FAILURES.labels(model, kind)
        self.spawn(self._schedule(), "schedule")
        self.spawn(self._gauges(), "gauges")

    async def on_stop(self) -> None:
        """Abandon a cycle in progress (nothing of it is registered) and stop the workers."""
        await self._cancel_tasks()
        await self.retrainer.close()

    async def on_abort(self) -> None:
        """Stop the workers."""
        await self.retrainer.close()

    async def _schedule(self) -> None:
        delay = self.config.first_cycle_s
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=max(delay, 0.0))
            self._wake.clear()
            models, self._requested = self._requested, None
            started = time.monotonic()
            report = await self.retrainer.cycle(models, reason="schedule" if models is None else "admin")
            self._log(report)
            delay = self.config.interval_s - (time.monotonic() - started)

    async def _gauges(self) -> None:
        while True:
            with contextlib.suppress(AlphaEngineError):
                await self.retrainer.refresh_gauges()
            await self.ctx.clock.sleep(self._GAUGE_INTERVAL_S)

    def _log(self, report: CycleReport) -> None:
        if report.status == "skipped":  # a young engine has too few bars yet: expected, not a problem
            self.log.info("training cycle skipped: %s", report.detail)
            return
        if report.status == "failed":
            self.log.warning("training cycle failed: %s", report.detail)
            return
        for m in report.models:
            if m.status == "failed":
                self.log.error("%s: training failed (%s): %s", m.model, m.failure, m.error)
            else:
                self.log.info("%s: %s %s (champion %s)", m.model, m.status, m.version, m.champion)
        self.log.info("training cycle done in %.1f s", report.seconds)

    def health(self) -> dict[str, Any]:
        """Whether a cycle runs, and how the last one went."""
        last = self.retrainer.last_report
        return {
            "cycle_running": self.retrainer.running,
            "last_cycle": None if last is None else {"status": last.status, "detail": last.detail},
            "pool_rebuilds": self.retrainer.pool.rebuilds,
        }

    def commands(self) -> Mapping[str, Any]:
        """Admin commands: ``models``, ``retrain``, ``promote``, ``rollback``, ``demote``."""
        return {
            "models": self._cmd_models,
            "retrain": self._cmd_retrain,
            "promote": self._cmd_promote,
            "rollback": self._cmd_rollback,
            "demote": self._cmd_demote,
        }

    async def _cmd_models(self, args: dict[str, Any]) -> Any:
        return await self.retrainer.overview()

    async def _cmd_retrain(self, args: dict[str, Any]) -> Any:
        """``{"models": [...], "wait": true}``: a cycle now; with ``wait``, its report when it ends."""
        models = args.get("models") or None
        if args.get("wait"):
            report = await self.retrainer.cycle(models, reason="admin")
            return msgspec.to_builtins(report)
        self._requested = models
        self._wake.set()
        return {"scheduled": True, "models": models or list(self.config.models)}

    async def _cmd_promote(self, args: dict[str, Any]) -> Any:
        model = _model_arg(args)
        state = await self.retrainer.registry.promote(
            model, args.get("version"), by="operator", reason=str(args.get("reason") or "admin promote")
        )
        metrics.MODEL_PROMOTIONS.labels(model, "operator").inc()
        return msgspec.to_builtins(state)

    async def _cmd_rollback(self, args: dict[str, Any]) -> Any:
        model = _model_arg(args)
        state = await self.retrainer.registry.rollback(
            model, by="operator", reason=str(args.get("reason") or "admin rollback")
        )
        metrics.MODEL_ROLLBACKS.labels(model).inc()
        return msgspec.to_builtins(state)

    async def _cmd_demote(self, args: dict[str, Any]) -> Any:
        model = _model_arg(args)
        state = await self.retrainer.registry.demote(
            model, by="operator", reason=str(args.get("reason") or "admin demote")
        )
        metrics.MODEL_DEMOTIONS.labels(model, "operator").inc()
        return msgspec.to_builtins(state)


def _model_arg(args: dict[str, Any]) -> str:
    model = args.get("model")
    if model not in MODEL_NAMES:
        raise RegistryError(f'expected {{"model": one of {", ".join(MODEL_NAMES)}}}, got {model!r}')
    return str(model)
