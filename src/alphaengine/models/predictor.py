"""The ``predictor`` module: live features and every champion's prediction for each new bar.

It consumes the ``bars`` topic (bars of ``bar_interval_s``), computes the features of each new bar with a
:class:`~alphaengine.features.FeatureStream` (the same definitions the trainer used, so live features
equal training features) and asks the champion of every model for its prediction. Each prediction goes
to the ``predictions`` topic as a :class:`~alphaengine.domain.Prediction` event (``prediction.v1``)
naming the model version, with its ensemble weight (the version's out-of-sample information
coefficient) and the number of predictions made for that bar; the signal engine ensembles them.

A prediction is flagged ``stale`` and must not be traded when its model version is past its expiry
(``max_model_age_s`` of the trainer) or when its bar closed more than ``max_bar_age_s`` ago (a backlog
being caught up, a feed that stopped). A model without a champion (never promoted, or demoted)
predicts nothing. Champions are read from the registry every ``refresh_s`` and swapped in without a
pause: a new version's artifact is downloaded and loaded in a worker thread, then replaces the old one
between two bars.

At start the streams are warmed up with the most recent bars in the store, so the first live bar already
has its full history. Offsets are committed once the predictions of the bars read are acknowledged;
after a crash the bars read again are predicted again (at least once), and bars the warm-up already
covered are skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

import msgspec
import numpy as np
import polars as pl

from alphaengine import metrics
from alphaengine.bus.base import Consumer, OffsetAndMetadata, Record, RecordMetadata, TopicPartition
from alphaengine.codec import SCHEMA_HEADER, decode_bars, encode_event, event_schema
from alphaengine.domain import Prediction
from alphaengine.errors import AlphaEngineError
from alphaengine.features import KEY, FeatureParams, FeatureStream, core_feature_set
from alphaengine.kernel.module import Context, ModuleSettings
from alphaengine.models.registry import ModelRegistry, VersionInfo
from alphaengine.models.trainer import CACHE_DIR, ModelName, latest_bars
from alphaengine.models.worker import predict_rows
from alphaengine.models.zoo import Model, load
from alphaengine.pipeline.consumer import ConsumerModule, ConsumerSettings

NS = 1_000_000_000


class PredictorSettings(ConsumerSettings, frozen=True):
    """Settings of the predictor (``type = "predictor"``)."""

    input_topic: str = "bars"
    output_topic: str = "predictions"
    bar_interval_s: Annotated[int, msgspec.Meta(ge=1)] = 1
    """Predict on bars of this length (the trainer's ``bar_interval_s``)."""
    models: tuple[ModelName, ...] = ("ridge", "forest", "lgbm", "mlp", "seq")
    refresh_s: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    """How often the champions are read from the registry."""
    max_bar_age_s: Annotated[float, msgspec.Meta(gt=0)] = 10.0
    """A prediction on a bar that closed longer ago than this is stale."""
    warm_up: bool = True
    """Read the most recent bars from the store at start, so the first live bar has its history."""
    registry_prefix: str = "models"


@dataclass(frozen=True, slots=True)
class _Champion:
    info: VersionInfo
    model: Model
    columns: tuple[str, ...]


class Predictor(ConsumerModule[PredictorSettings]):
    """Streams features from bars and publishes every champion's prediction of each new bar."""

    Config: ClassVar[type[ModuleSettings]] = PredictorSettings

    def __init__(self, name: str, config: PredictorSettings, ctx: Context) -> None:
        super().__init__(name, config, ctx)
        self.registry = ModelRegistry(
            ctx.objects, ctx.clock, ctx.data_dir / CACHE_DIR, config.registry_prefix
        )
        self._champions: dict[str, _Champion] = {}
        self._streams: dict[str, FeatureStream] = {}
        """Per feature-set version: one stream, shared by the champions trained on it."""
        self._recent: dict[str, pl.DataFrame] = {}
        """Per feature-set version: the last feature rows of each series (context of sequence models)."""
        self._pending: list[asyncio.Future[RecordMetadata]] = []
        self._next_offset: dict[TopicPartition, int] = {}
        self._last_fresh_ns: dict[str, int] = {}
        self._helpers: list[asyncio.Task[None]] = []
        self._lock = asyncio.Lock()
        """Held while the streams or the champions are used or changed (handle, refresh)."""
        self.predictions = 0

    def topics(self) -> Sequence[str]:
        """The bar topic."""
        return [self.config.input_topic]

    async def on_assigned(self, consumer: Consumer) -> None:
        """Create the output topic, load the champions, warm the streams up, start the refresh loop."""
        await self.ctx.bus.create_topic(self.config.output_topic)
        await self.refresh()
        self._helpers = [
            self.spawn(self._refresh_loop(), "refresh"),
            self.spawn(self._staleness_loop(), "staleness"),
        ]

    async def on_stop(self) -> None:
        """Stop the refresh and staleness loops, then drain the bars and commit (the consumer's stop)."""
        for task in self._helpers:
            task.cancel()
        await asyncio.gather(*self._helpers, return_exceptions=True)
        await super().on_stop()

    # -- champions --------------------------------------------------------------------------------

    @property
    def champions(self) -> dict[str, str]:
        """The version each model predicts with now."""
        return {name: c.info.version for name, c in self._champions.items()}

    async def refresh(self) -> None:
        """Read the champions from the registry; load new ones, drop demoted ones.

        A champion whose feature set has no stream yet gets one, warmed up from the store.
        """
        for name in self.config.models:
            info = await self.registry.champion(name)
            current = self._champions.get(name)
            metrics.MODEL_CHAMPION.labels(name).set(0.0 if info is None else 1.0)
            if info is None:
                if current is not None:
                    self.log.warning("%s: no champion any more (was %s)", name, current.info.version)
                    async with self._lock:
                        del self._champions[name]
                continue
            if current is not None and current.info.version == info.version:
                continue
            path = await self.registry.fetch(name, info.version)
            model = await asyncio.to_thread(load, path)
            champion = _Champion(info, model, tuple(info.features))
            async with self._lock:
                if info.feature_set not in self._streams:
                    self._streams[info.feature_set] = self._new_stream(info)
                    await self._warm_up(info.feature_set, model.context_rows)
                self._champions[name] = champion
            self.log.info("%s: predicting with %s", name, info.version)
        async with self._lock:
            for feature_set in set(self._streams) - {c.info.feature_set for c in self._champions.values()}:
                del self._streams[feature_set]
                self._recent.pop(feature_set, None)

    @staticmethod
    def _new_stream(info: VersionInfo) -> FeatureStream:
        feature_set = core_feature_set(msgspec.convert(info.feature_params, FeatureParams))
        if feature_set.version != info.feature_set:
            raise AlphaEngineError(
                f"{info.model} {info.version} was trained on feature set {info.feature_set}; this code "
                f"computes {feature_set.version} from the same parameters: retrain it"
            )
        return feature_set.stream()

    async def _refresh_loop(self) -> None:
        while True:
            await self.ctx.clock.sleep(self.config.refresh_s)
            try:
                await self.refresh()
            except AlphaEngineError as exc:  # the object store is down: keep predicting with what we have
                self.log.error("reading the champions failed (keeping the current ones): %s", exc)

    async def _staleness_loop(self) -> None:
        while True:
            now = self.ctx.clock.now_ns()
            for name in self.config.models:
                last = self._last_fresh_ns.get(name)
                if name in self._champions and last is not None:
                    metrics.PREDICTION_STALENESS.labels(name).set((now - last) / NS)
                else:
                    with contextlib.suppress(KeyError):
                        metrics.PREDICTION_STALENESS.remove(name)
            await self.ctx.clock.sleep(1.0)

    async def _warm_up(self, feature_set: str, context_rows: int) -> None:
        """Feed a new stream the most recent bars of the store: enough for every feature and context."""
        if not self.config.warm_up:
            return
        stream = self._streams[feature_set]
        lookback = stream.feature_set.max_lookback + context_rows
        interval = self.config.bar_interval_s
        table = await latest_bars(self.ctx.store, f"interval_s = {interval}", lookback * interval * NS)
        if table is not None and table.num_rows:
            await asyncio.to_thread(self._update, feature_set, pl.DataFrame(table))
            self.log.info("feature set %s warmed up on %d bars", feature_set, table.num_rows)

    # -- bars in, predictions out -----------------------------------------------------------------

    async def handle(self, records: list[Record]) -> None:
        """Predict the new bars of the records and send the predictions."""
        parts: list[pl.DataFrame] = []
        for record in records:
            batch = await self.decode_or_dead_letter(record, decode_bars)
            self._next_offset[record.tp] = record.offset + 1
            if batch is not None and len(batch):
                parts.append(pl.DataFrame(batch.data))
        if not parts or not self._champions:
            return
        bars = pl.concat(parts).filter(pl.col("interval_s") == self.config.bar_interval_s)
        if bars.is_empty():
            return
        async with self._lock:
            predictions = await asyncio.to_thread(self._predict, bars)
        headers = ((SCHEMA_HEADER, event_schema(predictions[0])),) if predictions else ()
        for p in predictions:
            key = f"{p.venue}:{p.symbol}".encode()
            self._pending.append(
                await self.ctx.bus.send(self.config.output_topic, encode_event(p), key=key, headers=headers)
            )

    async def flush(self) -> dict[TopicPartition, OffsetAndMetadata]:
        """Wait for the predictions sent; the bars read may then be committed."""
        if self._pending:
            await asyncio.gather(*self._pending)
            self._pending.clear()
        offsets = {tp: OffsetAndMetadata(offset) for tp, offset in self._next_offset.items()}
        self._next_offset.clear()
        return offsets

    def _update(self, feature_set: str, bars: pl.DataFrame) -> pl.DataFrame:
        """Features of the new bars for one feature set, after its series' recent rows (``new`` False).

        Runs in a worker thread, under the lock. The result is sorted by series and time; the last rows
        of each series are kept as the context of the next update.
        """
        keep = max((c.model.context_rows for c in self._champions.values()), default=1)
        fresh = self._streams[feature_set].update(bars).with_columns(pl.lit(True).alias("new"))
        recent = self._recent.get(feature_set)
        rows = fresh if recent is None else pl.concat([recent, fresh])
        rows = rows.sort(*KEY, "ts_ns")
        self._recent[feature_set] = (
            rows.group_by(KEY, maintain_order=True)
            .tail(keep)
            .select(rows.columns)
            .with_columns(pl.lit(False).alias("new"))
        )
        return rows

    def _predict(self, bars: pl.DataFrame) -> list[Prediction]:
        """Every champion's prediction of each new, traded (not filled) bar with complete features."""
        frames = {version: self._update(version, bars) for version in self._streams}
        now = self.ctx.clock.now_ns()
        out: list[Prediction] = []
        for name, champion in self._champions.items():
            frame = frames.get(champion.info.feature_set)
            if frame is None:
                continue
            usable = frame.drop_nulls(list(champion.columns))
            wanted = np.flatnonzero((usable["new"] & ~usable["filled"]).to_numpy())
            if not wanted.size:
                continue
            x = usable.select(champion.columns).to_numpy().astype(np.float32)
            series = usable.select(pl.concat_str("venue", "symbol", separator=":")).to_series()
            groups = np.unique(series.to_numpy(), return_inverse=True)[1].astype(np.int64)
            values = predict_rows(champion.model, x, groups, wanted.astype(np.int64))
            expired = champion.info.expired(now)
            weight = _ensemble_weight(champion.info)
            horizon_s = champion.info.horizon_bars * champion.info.data.interval_s
            picked = usable[wanted]
            for row, value in zip(picked.iter_rows(named=True), values.tolist(), strict=True):
                closed_ns = row["ts_ns"] + row["interval_s"] * NS
                age_s = (now - closed_ns) / NS
                reason = (
                    "model expired"
                    if expired
                    else f"bar closed {age_s:.1f} s ago"
                    if age_s > self.config.max_bar_age_s
                    else ""
                )
                out.append(
                    Prediction(
                        ts_ns=now,
                        venue=row["venue"],
                        symbol=row["symbol"],
                        interval_s=row["interval_s"],
                        bar_ts_ns=row["ts_ns"],
                        model=name,
                        version=champion.info.version,
                        horizon_s=horizon_s,
                        value=float(value),
                        stale=bool(reason),
                        stale_reason=reason,
                        weight=weight,
                    )
                )
                metrics.PREDICTIONS.labels(name, "stale" if reason else "fresh").inc()
                if not reason:
                    self._last_fresh_ns[name] = now
        self.predictions += len(out)
        sizes = Counter((p.venue, p.symbol, p.bar_ts_ns) for p in out)
        return [msgspec.structs.replace(p, group_size=sizes[p.venue, p.symbol, p.bar_ts_ns]) for p in out]

    def health(self) -> dict[str, Any]:
        """The champions predicted with, and the predictions made."""
        return {"champions": self.champions, "predictions": self.predictions}


def _ensemble_weight(info: VersionInfo) -> float:
    """A version's weight in the signal: its out-of-sample information coefficient, 0 unless positive."""
    ic = info.validation.get("candidate", {}).get("ic")
    return float(ic) if isinstance(ic, int | float) and ic > 0 else 0.0
