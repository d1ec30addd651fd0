"""Prometheus metrics of the engine (served by prometheus-async on ``[metrics] port``).

Names follow Prometheus conventions: ``alphaengine_`` prefix, base units (seconds, bytes), ``_total`` for
counters, and label sets bounded by configuration (module names, symbols, intervals), never by data.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Iterable

import numpy as np
import numpy.typing as npt
from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

TICKS_RECEIVED = Counter(
    "alphaengine_ticks_received_total", "Trades received from a source.", ["source", "symbol"]
)
TICKS_STORED = Counter("alphaengine_ticks_stored_total", "Trades written to the store.", ["symbol"])
BARS = Counter("alphaengine_bars_total", "Bars completed by the bar builder.", ["symbol", "interval"])
BARS_STORED = Counter("alphaengine_bars_stored_total", "Bars written to the store.", ["interval"])
LATE_TICKS = Counter(
    "alphaengine_late_ticks_total", "Trades older than their symbol's open bar (not in any bar).", ["symbol"]
)
DUPLICATE_TICKS = Counter(
    "alphaengine_duplicate_ticks_total",
    "Trades the bar builder had already folded (replays, overlaps, redeliveries) and left out.",
    ["symbol"],
)
SOURCE_REJECTS = Counter(
    "alphaengine_source_rejects_total", "Input a source refused, by reason.", ["source", "reason"]
)
DEAD_LETTERS = Counter(
    "alphaengine_dead_letters_total", "Records sent to a dead-letter topic.", ["topic", "consumer"]
)
STORE_INSERTS = Counter("alphaengine_store_inserts_total", "Insert statements sent to the store.", ["table"])
STORE_INSERT_ERRORS = Counter(
    "alphaengine_store_insert_errors_total", "Insert attempts that failed.", ["table"]
)
STORE_INSERT_SECONDS = Histogram(
    "alphaengine_store_insert_duration_seconds",
    "Time to insert one batch.",
    ["table"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
CONSUMER_LAG = Gauge("alphaengine_consumer_lag_records", "Records not yet read, per consumer.", ["consumer"])
BUS_BACKLOG = Gauge(
    "alphaengine_bus_backlog_bytes",
    "Bytes held by the embedded bus not yet committed by all groups.",
    ["topic"],
)
BUS_SENT = Counter("alphaengine_bus_sent_records_total", "Records sent to a topic of the bus.", ["topic"])
EVENT_LOOP_LAG = Gauge(
    "alphaengine_event_loop_lag_seconds", "How late the event loop ran the last lag probe."
)
EVENT_LOOP_LAG_HIST = Histogram(
    "alphaengine_event_loop_lag_distribution_seconds",
    "Distribution of event-loop lag probes.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
MODULE_STATE = Gauge(
    "alphaengine_module_state", "1 for the state a module is in, 0 for the others.", ["module", "state"]
)
MODULE_RESTARTS = Counter(
    "alphaengine_module_restarts_total", "Restarts of a module by the supervisor.", ["module"]
)
MODULE_FAILURES = Counter("alphaengine_module_failures_total", "Failures of a module.", ["module"])
MODULE_TASKS = Gauge(
    "alphaengine_module_tasks", "asyncio tasks a module owns that have not finished.", ["module"]
)
MODULE_QUEUE = Gauge(
    "alphaengine_module_queue_records",
    "Records a module holds in memory that are not yet durable (consumers: handled but not yet flushed "
    "and committed).",
    ["module"],
)
MODULE_BUSY = Counter(
    "alphaengine_module_busy_seconds_total",
    "Time a consumer module spent handling and flushing records on the event loop (its awaits on the bus "
    "and store included): its rate is the module's share of the loop.",
    ["module"],
)
ASYNCIO_TASKS = Gauge("alphaengine_asyncio_tasks", "asyncio tasks alive on the engine's event loop.")
WORKER_PROCESSES = Gauge(
    "alphaengine_worker_processes", "Child processes of the engine (the trainer's pool workers)."
)
WORKER_MEMORY = Gauge(
    "alphaengine_worker_resident_memory_bytes",
    "Resident memory of the engine's child processes together (the engine's own is "
    "process_resident_memory_bytes).",
)
ARCHIVE_RUNS = Counter(
    "alphaengine_archive_runs_total", "Scheduled archiver runs, by result (success, error).", ["result"]
)
ARCHIVED_ROWS = Counter(
    "alphaengine_archived_rows_total",
    "Rows written to verified archives and dropped from the store.",
    ["table"],
)
ARCHIVE_PARTITIONS_PENDING = Gauge(
    "alphaengine_archive_partitions_pending",
    "Day partitions older than the archive cutoff still in the store (as of the last plan or run).",
    ["table"],
)
ARCHIVE_LAST_SUCCESS = Gauge(
    "alphaengine_archive_last_success_timestamp_seconds",
    "When the last archiver run finished without error (engine clock, seconds since the epoch).",
)


def total(metric: MetricWrapperBase) -> float:
    """The sum of a counter's ``_total`` samples over every label set."""
    value = 0.0
    for family in metric.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                value += sample.value
    return value


def quantiles_from_samples(samples: Iterable[float], qs: Iterable[float]) -> list[float]:
    """Empirical quantiles (nearest rank) of a finite sample; used by reports and benchmarks."""
    data = sorted(samples)
    if not data:
        return [0.0 for _ in qs]
    return [data[min(len(data) - 1, int(q * len(data)))] for q in qs]


class PeriodicSampler:
    """Runs ``_run`` as one named task on the running loop, from ``start`` until ``stop``."""

    task_name = "sampler"

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start sampling on the running loop."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name=self.task_name)

    async def stop(self) -> None:
        """Stop sampling (idempotent)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        raise NotImplementedError


class LoopLagProbe(PeriodicSampler):
    """Measures event-loop lag: how much later than asked a short sleep wakes up."""

    task_name = "loop-lag-probe"

    def __init__(self, interval_s: float = 0.25) -> None:
        super().__init__(interval_s)
        self.samples: collections.deque[float] = collections.deque(maxlen=100_000)
        """The most recent probes (about seven hours at the default interval), for reports."""

    async def _run(self) -> None:
        while True:
            start = time.perf_counter()
            await asyncio.sleep(self.interval_s)
            lag = max(0.0, time.perf_counter() - start - self.interval_s)
            EVENT_LOOP_LAG.set(lag)
            EVENT_LOOP_LAG_HIST.observe(lag)
            self.samples.append(lag)


# -- live market-data feeds (WebSocket sources and their REST backfill) ---------------------------------
FEED_CONNECTS = Counter(
    "alphaengine_feed_connects_total", "WebSocket connections a feed opened successfully.", ["source"]
)
FEED_CONNECT_FAILURES = Counter(
    "alphaengine_feed_connect_failures_total",
    "Connection attempts that failed, by reason (refused, http_<status>, timeout).",
    ["source", "reason"],
)
FEED_DISCONNECTS = Counter(
    "alphaengine_feed_disconnects_total",
    "Connections that ended, by reason (closed_by_server, dropped, idle_timeout, oversized_frame, "
    "server_shutdown, max_age, replaced, stopping).",
    ["source", "reason"],
)
FEED_RECONNECT_DELAY = Histogram(
    "alphaengine_feed_reconnect_delay_seconds",
    "Backoff waited before a connection attempt.",
    ["source"],
    buckets=(0.0, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0),
)
FEED_DISCONNECTED_SECONDS = Counter(
    "alphaengine_feed_disconnected_seconds_total",
    "Time a feed spent with no open connection while it should have had one.",
    ["source"],
)
FEED_CONNECTIONS = Gauge("alphaengine_feed_connections", "Open WebSocket connections of a feed.", ["source"])
FEED_FRAMES = Counter(
    "alphaengine_feed_frames_total", "WebSocket text frames received and handed to the parser.", ["source"]
)
FEED_LATENCY = Histogram(
    "alphaengine_feed_latency_seconds",
    "Local receive time minus exchange trade time, per trade (negative: the local clock is behind).",
    ["source"],
    buckets=(-1.0, -0.25, 0.0, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
FEED_MIN_LATENCY = Gauge(
    "alphaengine_feed_min_latency_seconds",
    "Lower envelope of receive minus exchange time over the last window: clock offset plus the fastest "
    "network path; below zero the local clock is behind the exchange's.",
    ["source"],
)
FEED_SYMBOL_IDLE = Gauge(
    "alphaengine_feed_symbol_idle_seconds", "Time since a symbol's last live trade.", ["source", "symbol"]
)
FEED_GAPS = Counter(
    "alphaengine_feed_gaps_total",
    "Interruptions of a feed (kind ids: trade-id gaps; time: disconnected windows), by outcome.",
    ["source", "kind", "status"],
)
FEED_BACKFILLED = Counter(
    "alphaengine_feed_backfilled_ticks_total",
    "Trades recovered through REST backfill and emitted.",
    ["source", "symbol"],
)
FEED_UNFILLED_TRADES = Counter(
    "alphaengine_feed_unfilled_trades_total",
    "Trades known to be missing (by trade id) that backfill could not recover.",
    ["source", "symbol"],
)

REST_REQUESTS = Counter(
    "alphaengine_rest_requests_total",
    "REST requests answered (status = HTTP code) or failed without an answer (status = error).",
    ["source", "endpoint", "status"],
)
REST_WEIGHT_USED = Gauge(
    "alphaengine_rest_weight_used", "Request weight used in the exchange's current minute.", ["source"]
)
REST_THROTTLED = Counter(
    "alphaengine_rest_throttled_total",
    "Answers that told the client to slow down (429, 418).",
    ["source", "status"],
)


def observe_many(histogram: Histogram, values: npt.NDArray[np.float64]) -> None:
    """Observe many values at once into a label-less histogram child (``metric.labels(...)``).

    prometheus_client observes one value per call; a feed sees hundreds of thousands of trades a second, so
    the bucket counts are computed with numpy and added in one step per bucket. Uses the client's bucket
    list, the documented layout of its ``Histogram`` (upper bounds ending in +Inf, non-cumulative counts).
    """
    if not len(values):
        return
    bounds = histogram._upper_bounds
    counts = np.bincount(np.searchsorted(bounds, values, side="left"), minlength=len(bounds))
    for bucket, count in zip(histogram._buckets, counts.tolist(), strict=True):
        if count:
            bucket.inc(count)
    histogram._sum.inc(float(values.sum()))


# -- ingest diagnostics (tick sink latency, the monitor module) -----------------------------------------
TICK_STORE_LATENCY = Histogram(
    "alphaengine_tick_store_latency_seconds",
    "Time from a trade's local receive time (recv_ns) until the insert holding it returned, per trade.",
    buckets=(
        0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
        1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 300.0,
    ),
)  # fmt: skip
INGEST_LAG = Gauge(
    "alphaengine_ingest_lag_seconds",
    "Age of the newest stored trade of a symbol at the monitor's last sample, by its exchange time (ts_ns).",
    ["symbol"],
)


# -- the spill journal of the Kafka bus (alphaengine.bus.journal) ------------------------------------
JOURNAL_BYTES = Gauge(
    "alphaengine_bus_journal_bytes", "Bytes of the records in the spill journal not yet replayed to Kafka."
)
JOURNAL_RECORDS = Gauge(
    "alphaengine_bus_journal_records", "Records in the spill journal not yet replayed to Kafka."
)
JOURNAL_FULL = Gauge(
    "alphaengine_bus_journal_full",
    "1 while the spill journal is full and producers wait for space (back-pressure), else 0.",
)
JOURNAL_SPILLED = Counter(
    "alphaengine_bus_journal_spilled_records_total",
    "Records written to the spill journal because the broker did not take them in time.",
)
JOURNAL_REPLAYED = Counter(
    "alphaengine_bus_journal_replayed_records_total",
    "Records replayed from the spill journal to Kafka and acknowledged by the broker.",
)


# -- models and the trainer (alphaengine.models.trainer) ---------------------------------------------
TRAINER_CYCLES = Counter(
    "alphaengine_trainer_cycles_total",
    "Training cycles by outcome: done, skipped (too little data) or failed (data or training frame).",
    ["outcome"],
)
MODEL_TRAIN_FAILURES = Counter(
    "alphaengine_model_train_failures_total",
    "Training jobs that gave no result, by model (or 'prepare' for the training frame) and kind: error, "
    "crashed (the worker died) or timeout (the worker was killed).",
    ["model", "kind"],
)
MODEL_TRAIN_SECONDS = Histogram(
    "alphaengine_model_train_duration_seconds",
    "Time of one model's training job: walk-forward validation and final fit, in a worker process.",
    ["model"],
    buckets=(1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0),
)
MODEL_LAST_TRAIN = Gauge(
    "alphaengine_model_last_train_timestamp_seconds",
    "When a model's last successful training job ended (UNIX time).",
    ["model"],
)
MODEL_VALIDATION = Gauge(
    "alphaengine_model_validation_score",
    "Out-of-sample score of a model's latest candidate over its walk-forward folds: ic, ic_t_stat, "
    "hit_rate, net_pnl (in units of notional) or sharpe.",
    ["model", "score"],
)
MODEL_PROMOTIONS = Counter(
    "alphaengine_model_promotions_total",
    "Versions made champion, by whom (trainer or operator).",
    ["model", "by"],
)
MODEL_DEMOTIONS = Counter(
    "alphaengine_model_demotions_total", "Champions demoted, by whom (trainer or operator).", ["model", "by"]
)
MODEL_ROLLBACKS = Counter("alphaengine_model_rollbacks_total", "Rollbacks to an earlier champion.", ["model"])
MODEL_CHAMPION = Gauge(
    "alphaengine_model_champion", "1 while a model has a champion the engine may trade on, else 0.", ["model"]
)
MODEL_AGE = Gauge(
    "alphaengine_model_age_seconds", "Time since the champion of a model was registered.", ["model"]
)
PREDICTIONS = Counter(
    "alphaengine_predictions_total",
    "Predictions published by the predictor, fresh or stale (model expired, or bar too old).",
    ["model", "status"],
)
PREDICTION_STALENESS = Gauge(
    "alphaengine_prediction_staleness_seconds",
    "Time since the model's champion last made a fresh (tradable) prediction.",
    ["model"],
)
SIGNALS = Counter(
    "alphaengine_signals_total",
    "Bars the signal engine ensembled: outcome 'signal', or 'none' (stale, unweighted or late predictions).",
    ["symbol", "outcome"],
)
RISK_REJECTIONS = Counter(
    "alphaengine_risk_rejections_total",
    "Orders the risk engine rejected, by the check that failed.",
    ["check"],
)
ORDERS = Counter(
    "alphaengine_orders_total",
    "Order events: new, rejected, partially_filled, filled, canceled.",
    ["symbol", "status"],
)
FILLS = Counter(
    "alphaengine_fills_total", "Paper fills, by liquidity (maker or taker).", ["symbol", "liquidity"]
)
FEES = Counter("alphaengine_fees_usd_total", "Fees paid on paper fills, in USD.", ["symbol"])
TRADER_LATE_TICKS = Counter(
    "alphaengine_trader_late_ticks_total",
    "Trades read after the trader had passed their time (left out; counts those read again after a restart).",
)
EQUITY = Gauge("alphaengine_equity_usd", "Equity of the paper account at the last trades, in USD.")
DRAWDOWN = Gauge(
    "alphaengine_drawdown_ratio", "Fall of the equity below its peak at the last equity point (0.05 = 5 %)."
)
TRADING_HALTED = Gauge(
    "alphaengine_trading_halted",
    "1 while trading is halted or reducing-only (kill switch or operator), else 0.",
)
POSITION_NOTIONAL = Gauge(
    "alphaengine_position_notional_usd",
    "Signed notional of the position in a symbol at its last trade.",
    ["symbol"],
)
RISK_LIMIT = Gauge(
    "alphaengine_risk_limit",
    "The risk limits in force, by name (the name carries the unit: _usd, _pct, _s, _bps, per minute).",
    ["limit"],
)


def catalogue() -> str:
    """``docs/metrics.md``: every metric of this module with its type, labels and meaning (Markdown).

    Regenerate with ``.venv/bin/python -m alphaengine.metrics > docs/metrics.md``; a test keeps the file
    equal to this.
    """
    rows = []
    # prometheus_client keeps a metric's name, type, labels and help in private attributes.
    for obj in list(globals().values()):
        if isinstance(obj, MetricWrapperBase):
            kind = obj._type
            name = obj._name + ("_total" if kind == "counter" else "")
            labels = ", ".join(f"`{label}`" for label in obj._labelnames) or "-"
            doc = obj._documentation.replace("|", "\\|")
            rows.append(f"| `{name}` | {kind} | {labels} | {doc} |")
    head = [
        "# Metrics",
        "",
        "Every metric the engine exports on `[metrics] port` (`/metrics`), generated from",
        "`src/alphaengine/metrics.py` by `.venv/bin/python -m alphaengine.metrics > docs/metrics.md`. Names",
        "follow Prometheus conventions: the `alphaengine_` prefix, base units in the name, `_total` on",
        "counters; histograms add `_bucket`, `_sum` and `_count`. Label values are bounded by configuration",
        "(modules, symbols, models, risk checks), never by data.",
        "",
        "Besides these, the client library's standard collectors describe the engine process itself:",
        "`process_resident_memory_bytes`, `process_cpu_seconds_total`, `process_open_fds`,",
        "`process_start_time_seconds` and the others of the `process_` family, `python_gc_*` and",
        "`python_info`.",
        "",
        "| metric | type | labels | meaning |",
        "|---|---|---|---|",
    ]
    return "\n".join([*head, *sorted(rows)]) + "\n"


if __name__ == "__main__":
    print(catalogue(), end="")
