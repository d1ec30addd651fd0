"""What the trainer's worker processes run: preparing the training frame, and fitting one model.

Both jobs take a msgspec struct and return one, so that a job crosses the process boundary as a few
hundred bytes: the data itself goes through files. :func:`prepare_frame` reads the window's bars from a
Parquet file, computes the features, the target and the two baseline inputs on the time grid, and writes
the rows as an uncompressed Arrow IPC file; :func:`fit_and_validate` memory-maps that file, runs the
walk-forward validation of one model, fits the final model on every row, saves it, and decides on its
promotion (see ``docs/models.md``).

:func:`init_worker` runs first in every worker process: it lowers the process's scheduling priority (the
engine's event loop shares the machine) and caps the threads of the numerical libraries.
"""

from __future__ import annotations

import contextlib
import os
import resource
import time
from pathlib import Path
from typing import Any, Final

import msgspec
import numpy as np
import numpy.typing as npt

from alphaengine.models.validation import (
    BASELINES,
    Evaluation,
    Fold,
    PromotionRule,
    Scores,
    TradingSpec,
    beats,
    evaluate,
    evaluate_baselines,
    should_demote,
    walk_forward,
)
from alphaengine.models.zoo import Model, build_model, load

NS: Final = 1_000_000_000
SERIES_COLUMN: Final = "series"
"""``VENUE:SYMBOL``: one series of bars (the frame holds one bar interval)."""
PAST_COLUMN: Final = "_past_ret"
LAST_COLUMN: Final = "_last_ret"

_THREAD_VARIABLES: Final = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "POLARS_MAX_THREADS",
)


def init_worker(threads: int, nice: int, keras_backend: str) -> None:
    """Set up a fresh worker process: lower priority, thread caps, the Keras backend.

    The variables reach the libraries that are loaded after this (scikit-learn's and LightGBM's OpenMP,
    polars, Keras); NumPy's BLAS is already loaded, so the jobs also cap it with threadpoolctl.
    """
    if nice:
        os.nice(nice)
    for name in _THREAD_VARIABLES:
        os.environ[name] = str(threads)
    os.environ["KERAS_BACKEND"] = keras_backend


def _thread_limit(threads: int) -> Any:
    from threadpoolctl import threadpool_limits  # noqa: PLC0415  (comes with scikit-learn)

    return threadpool_limits(limits=threads)


def _peak_rss_bytes() -> int:
    """Peak resident memory of the calling process.

    Linux keeps ``ru_maxrss`` across fork and exec, so a spawned worker would report its parent's size;
    ``VmHWM`` is the peak of the process's own memory.
    """
    with contextlib.suppress(OSError), open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ----------------------------------------------------------------------------------------- prepare


class PrepareJob(msgspec.Struct, frozen=True, kw_only=True):
    """Compute the training frame of a window of bars."""

    bars_path: str
    frame_path: str
    feature_params: dict[str, Any]
    horizon_bars: int
    threads: int = 2


class FrameInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What :func:`prepare_frame` wrote: rows, symbols, time span, feature set."""

    rows: int
    bars: int
    symbols: list[str]
    interval_s: int
    start_ns: int
    end_ns: int
    feature_set: str
    features: list[str]
    target: str
    seconds: float
    peak_rss_bytes: int


def prepare_frame(job: PrepareJob) -> FrameInfo:
    """Bars (Parquet) to training rows (Arrow IPC): features, target, baseline inputs, no nulls.

    Each row is one grid bar of one series: ``series`` (``VENUE:SYMBOL``), ``ts_ns``, the features
    (float32), the target ``target_ret_{h}`` and the past ``h``-bar and 1-bar log returns the baselines
    use. Rows without
    every feature or without the target (each series' warm-up and its last ``h`` bars) are left out.
    """
    started = time.perf_counter()
    with _thread_limit(job.threads):
        import polars as pl  # noqa: PLC0415

        from alphaengine.features import KEY, FeatureParams, Targets, core_feature_set, regularize  # noqa: PLC0415
        from alphaengine.features.definitions import log_return  # noqa: PLC0415

        bars = pl.read_parquet(job.bars_path)
        if bars.is_empty():
            raise ValueError("no bars in the training window")
        intervals = bars["interval_s"].unique().to_list()
        if len(intervals) != 1:
            raise ValueError(f"the training window mixes bar intervals {sorted(intervals)}")
        feature_set = core_feature_set(msgspec.convert(job.feature_params, FeatureParams))
        h = job.horizon_bars
        targets = Targets(horizons=(h,))
        target = f"target_ret_{h}"
        grid = regularize(bars)
        features = feature_set.evaluate(grid)
        extra = grid.select(
            targets.evaluate(grid)[target],
            log_return(h).over(KEY).alias(PAST_COLUMN),
            log_return(1).over(KEY).alias(LAST_COLUMN),
        )
        names = feature_set.names
        frame = (
            pl.concat([features, extra], how="horizontal")
            .drop_nulls([*names, target])
            .select(
                pl.concat_str("venue", "symbol", separator=":").alias(SERIES_COLUMN),
                "ts_ns",
                *(pl.col(n).cast(pl.Float32) for n in names),
                target,
                PAST_COLUMN,
                LAST_COLUMN,
            )
        )
        if frame.is_empty():
            raise ValueError(
                f"{bars.height} bars leave no row with every feature and a target "
                f"(each symbol needs more than {feature_set.max_lookback - 1 + h} bars)"
            )
        frame.write_ipc(job.frame_path, compression="uncompressed")
        return FrameInfo(
            rows=frame.height,
            bars=bars.height,
            symbols=sorted(frame[SERIES_COLUMN].unique().to_list()),
            interval_s=int(intervals[0]),
            start_ns=int(frame["ts_ns"].min()),  # type: ignore[arg-type]
            end_ns=int(frame["ts_ns"].max()),  # type: ignore[arg-type]
            feature_set=feature_set.version,
            features=list(names),
            target=target,
            seconds=time.perf_counter() - started,
            peak_rss_bytes=_peak_rss_bytes(),
        )


# --------------------------------------------------------------------------------------------- fit


class ChampionRef(msgspec.Struct, frozen=True, kw_only=True):
    """The current champion, for the head-to-head comparison and the demotion check."""

    version: str
    path: str
    """Local directory of its artifact."""
    data_end_ns: int
    feature_set: str


class FitJob(msgspec.Struct, frozen=True, kw_only=True):
    """Validate and fit one model on a prepared frame."""

    model: str
    params: dict[str, Any]
    fold_max_train_rows: int | None
    """Cap on the rows each walk-forward fold fits on (the final fit uses the model's own caps)."""
    frame_path: str
    out_dir: str
    features: list[str]
    feature_set: str
    target: str
    horizon_bars: int
    interval_s: int
    n_folds: int
    min_train_fraction: float
    embargo_bars: int
    expanding: bool
    fee_bps: float
    sizing: str
    threshold: float
    scale: float
    rule: dict[str, Any]
    min_recent_s: float
    champion: ChampionRef | None
    threads: int = 2


class ScoreSummary(msgspec.Struct, frozen=True, kw_only=True):
    """The scores of one signal over one set of rows (see :class:`~alphaengine.models.Scores`)."""

    rows: int
    ic: float
    ic_t_stat: float | None
    hit_rate: float | None
    net_pnl: float
    gross_pnl: float
    fees: float
    sharpe: float
    turnover: float
    exposure: float
    trades: float


class FoldReport(msgspec.Struct, frozen=True, kw_only=True):
    """One walk-forward fold: its spans, sizes and the candidate's scores on its test rows."""

    index: int
    train_rows: int
    test_rows: int
    test_start_ns: int
    test_end_ns: int
    ic: float
    net_pnl: float


class ChampionCheck(msgspec.Struct, frozen=True, kw_only=True):
    """The champion against the candidate on the rows after the champion's training window."""

    version: str
    recent_rows: int
    recent_s: float
    champion: ScoreSummary | None
    candidate: ScoreSummary | None
    demote: bool
    reasons: list[str]


class FitReport(msgspec.Struct, frozen=True, kw_only=True):
    """What :func:`fit_and_validate` found and wrote."""

    model: str
    promote: bool
    reasons: list[str]
    candidate: ScoreSummary
    baselines: dict[str, ScoreSummary]
    folds: list[FoldReport]
    champion_check: ChampionCheck | None
    fit_info: dict[str, int]
    params: dict[str, Any]
    artifact_dir: str
    validate_s: float
    fit_s: float
    peak_rss_bytes: int


def fit_and_validate(job: FitJob) -> FitReport:
    """Walk-forward validation of ``job.model``, the final fit on every row, and the promotion decision.

    1. Folds by time (:func:`~alphaengine.models.walk_forward`): the first test span starts after
       ``min_train_fraction`` of the window; purge of ``horizon_bars`` and an embargo of
       ``embargo_bars``. Each fold fits a fresh model on its training rows (at most
       ``fold_max_train_rows``) and predicts its test rows: the out-of-sample track.
    2. The track and the baselines are scored net of fees; :func:`~alphaengine.models.beats` decides.
    3. With a champion: both are scored on the rows after the champion's training window (at least
       ``min_recent_s`` of them, or nothing is decided about the champion and the candidate is not
       promoted over it). The champion is demoted when :func:`~alphaengine.models.should_demote` says
       so, or when its feature set is not the current one; otherwise the candidate must also earn more
       than the champion on those rows.
    4. The final model is fitted on every row and saved to ``out_dir``.
    """
    with _thread_limit(job.threads):
        return _fit_and_validate(job)


def _fit_and_validate(job: FitJob) -> FitReport:
    import pyarrow as pa  # noqa: PLC0415

    with pa.memory_map(job.frame_path) as source:
        table = pa.ipc.open_file(source).read_all()
    times = table["ts_ns"].to_numpy().astype(np.int64)
    symbols = np.unique(table[SERIES_COLUMN].to_numpy(zero_copy_only=False), return_inverse=True)[1]
    groups = symbols.astype(np.int64)
    x = np.column_stack([table[name].to_numpy() for name in job.features]).astype(np.float32, copy=False)
    y = table[job.target].to_numpy().astype(np.float64)
    past = table[PAST_COLUMN].to_numpy().astype(np.float64)
    last = table[LAST_COLUMN].to_numpy().astype(np.float64)
    del table

    bar_ns = job.interval_s * NS
    spec = TradingSpec(
        bar_ns=bar_ns,
        horizon_bars=job.horizon_bars,
        fee_bps=job.fee_bps,
        sizing="linear" if job.sizing == "linear" else "sign",
        threshold=job.threshold,
        scale=job.scale,
    )
    rule = PromotionRule(**job.rule)
    span_ns = int(times.max() - times.min()) + bar_ns
    folds = walk_forward(
        times,
        horizon_ns=spec.horizon_ns,
        min_train_span_ns=int(span_ns * job.min_train_fraction),
        n_folds=job.n_folds,
        embargo_ns=job.embargo_bars * bar_ns,
    )

    started = time.perf_counter()
    fold_params = dict(job.params)
    if job.fold_max_train_rows is not None:
        own = fold_params.get("max_train_rows", job.fold_max_train_rows)
        fold_params["max_train_rows"] = min(own or job.fold_max_train_rows, job.fold_max_train_rows)
    oos = np.full(len(y), np.nan)
    for fold in folds:
        model = build_model(job.model, **fold_params).fit(x[fold.train], y[fold.train], groups[fold.train])
        oos[fold.test] = predict_rows(model, x, groups, fold.test)
        del model
    candidate = evaluate(oos, y, folds, times=times, spec=spec, symbols=groups)
    baselines = evaluate_baselines(past, last, y, folds, times=times, spec=spec, symbols=groups)
    decision = beats(candidate, baselines, rule=rule)
    promote, reasons = decision.promote, list(decision.reasons)
    check = None
    if job.champion is not None:
        check = _check_champion(
            job.champion,
            job,
            x=x,
            y=y,
            groups=groups,
            times=times,
            folds=folds,
            oos=oos,
            spec=spec,
            rule=rule,
        )
        if not check.demote:
            # The champion stays unless the candidate does better on the same unseen rows.
            compared = check.candidate is not None and check.champion is not None
            better = compared and check.candidate.net_pnl > check.champion.net_pnl  # type: ignore[union-attr]
            reasons.append(_head_to_head_reason(check, better))
            promote = promote and better
    validate_s = time.perf_counter() - started

    started = time.perf_counter()
    final = build_model(job.model, **job.params).fit(x, y, groups)
    final.save(Path(job.out_dir))
    fit_s = time.perf_counter() - started
    return FitReport(
        model=job.model,
        promote=promote,
        reasons=reasons,
        candidate=_summary(candidate.overall, candidate),
        baselines={name: _summary(baselines[name].overall, baselines[name]) for name in BASELINES},
        folds=[
            FoldReport(
                index=f.index,
                train_rows=len(f.train),
                test_rows=len(f.test),
                test_start_ns=f.test_start_ns,
                test_end_ns=f.test_end_ns,
                ic=s.ic,
                net_pnl=s.net_pnl,
            )
            for f, s in zip(folds, candidate.folds, strict=True)
        ],
        champion_check=check,
        fit_info=final.fit_info,
        params=final.params,
        artifact_dir=job.out_dir,
        validate_s=validate_s,
        fit_s=fit_s,
        peak_rss_bytes=_peak_rss_bytes(),
    )


def _head_to_head_reason(check: ChampionCheck, better: bool) -> str:
    if check.candidate is None or check.champion is None:
        return (
            f"fail: only {check.recent_s:.0f} s of data after champion {check.version}'s window: "
            "too little to show the candidate does better"
        )
    return (
        f"{'pass' if better else 'fail'}: net PnL {check.candidate.net_pnl:.6f} vs champion "
        f"{check.version} {check.champion.net_pnl:.6f} on the {check.recent_rows} rows after its window "
        "(need more)"
    )


def _check_champion(
    champion: ChampionRef,
    job: FitJob,
    *,
    x: npt.NDArray[np.float32],
    y: npt.NDArray[np.float64],
    groups: npt.NDArray[np.int64],
    times: npt.NDArray[np.int64],
    folds: list[Fold],
    oos: npt.NDArray[np.float64],
    spec: TradingSpec,
    rule: PromotionRule,
) -> ChampionCheck:
    if champion.feature_set != job.feature_set:
        return ChampionCheck(
            version=champion.version,
            recent_rows=0,
            recent_s=0.0,
            champion=None,
            candidate=None,
            demote=True,
            reasons=[
                f"fail: trained on feature set {champion.feature_set}, "
                f"the engine now computes {job.feature_set}"
            ],
        )
    recent = [
        Fold(
            f.index,
            f.train,
            rows,
            f.train_start_ns,
            max(f.test_start_ns, champion.data_end_ns + 1),
            f.test_end_ns,
        )
        for f in folds
        if (rows := f.test[times[f.test] > champion.data_end_ns]).size
    ]
    rows = np.concatenate([f.test for f in recent]) if recent else np.empty(0, np.int64)
    recent_s = (int(times[rows].max() - times[rows].min()) + spec.bar_ns) / NS if rows.size else 0.0
    if recent_s < job.min_recent_s:
        return ChampionCheck(
            version=champion.version,
            recent_rows=int(rows.size),
            recent_s=recent_s,
            champion=None,
            candidate=None,
            demote=False,
            reasons=[
                f"kept: {recent_s:.0f} s of data after its window, {job.min_recent_s:.0f} s needed to judge"
            ],
        )
    model = load(Path(champion.path))
    pred = np.full(len(y), np.nan)
    pred[rows] = predict_rows(model, x, groups, np.sort(rows))
    theirs = evaluate(pred, y, recent, times=times, spec=spec, symbols=groups)
    ours = evaluate(oos, y, recent, times=times, spec=spec, symbols=groups)
    demotion = should_demote(theirs, rule=rule)
    return ChampionCheck(
        version=champion.version,
        recent_rows=int(rows.size),
        recent_s=recent_s,
        champion=_summary(theirs.overall, theirs),
        candidate=_summary(ours.overall, ours),
        demote=demotion.demote,
        reasons=demotion.reasons,
    )


def predict_rows(
    model: Model, x: npt.NDArray[np.float32], groups: npt.NDArray[np.int64], rows: npt.NDArray[np.int64]
) -> npt.NDArray[np.float32]:
    """Predictions for ``rows`` (ascending) of ``x``, each with its group's preceding rows as context.

    ``x`` must be sorted by group, then time (as training frames and the predictor's rows are), so the
    ``context_rows - 1`` rows before a group's first wanted row are its history; a sequence model then
    sees the same window it would see live.
    """
    context = int(model.context_rows)
    if context <= 1:
        return np.asarray(model.predict(x[rows], groups[rows]), dtype=np.float32)
    wanted = np.zeros(len(x), dtype=bool)
    wanted[rows] = True
    starts = rows[np.r_[True, (np.diff(rows) != 1) | (groups[rows][1:] != groups[rows][:-1])]]
    extended = wanted.copy()
    for start in starts:
        first = start
        while first > 0 and start - first < context - 1 and groups[first - 1] == groups[start]:
            first -= 1
        extended[first:start] = True
    taken = np.flatnonzero(extended)
    pred = np.asarray(model.predict(x[taken], groups[taken]), dtype=np.float32)
    return pred[wanted[taken]]


def _summary(scores: Scores, evaluation: Evaluation) -> ScoreSummary:
    t_stat = evaluation.ic_t_stat
    return ScoreSummary(
        rows=scores.n_rows,
        ic=scores.ic,
        ic_t_stat=None if not np.isfinite(t_stat) else float(t_stat),
        hit_rate=None if not np.isfinite(scores.hit_rate) else scores.hit_rate,
        net_pnl=scores.net_pnl,
        gross_pnl=scores.gross_pnl,
        fees=scores.fees,
        sharpe=scores.sharpe,
        turnover=scores.turnover,
        exposure=scores.exposure,
        trades=scores.n_trades,
    )
