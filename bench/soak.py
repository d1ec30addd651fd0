"""Soak of the whole engine on its embedded defaults: every module on, for half an hour or more.

Runs ``alphaengine run`` on ``config/dev.toml`` (synthetic market at 2,000 trades/s, embedded bus, chDB,
local archive; the source, sinks, bar builder, predictor, trader, archiver, trainer and monitor) as a
subprocess in a temporary directory, with changes so that the half hour exercises everything: the
synthetic market has a predictable component (``predictability = 0.5``) and the trainer counts fees of
1 bp, so that models are promoted and traded on; the trainer starts after two minutes, retrains every ten
and needs 3,000 bars instead of 18,000 (five hours of data on the defaults); the trader acts on an edge of
1 bp and rebalances in steps of 2 % of its target, as the trading tests do.

Every ``--sample-every`` seconds it reads the engine's ``/metrics`` and its process tree and prints: the
engine's RSS, the trainer workers' RSS, the asyncio tasks, ticks received and stored, bars, training
cycles, fills, the module states and the event-loop lag. At the end it stops the engine (SIGTERM) and
prints a summary: RSS after the warm-up (first, min, max, least-squares slope in MiB per hour), event-loop
lag quantiles from the engine's histogram over the window after the warm-up, and whether any module was
ever FAULTED. ``--json`` writes the samples and the summary to a file, ``--log`` keeps the engine's log.
``--retrain-every`` and ``--train-window`` change the trainer's schedule and window: with the defaults the
window (the trainer's 7 days) grows for the whole soak, and so does each cycle's load of bars.

The default warm-up (15 minutes) covers the first training cycle that has enough bars (at 12 minutes)
and the predictor loading the champions it promotes: a step of about 115 MiB in the engine's RSS.

Exit status non-zero if a module was ever FAULTED, the engine did not stop cleanly, or the RSS after the
warm-up ranged over more than ``--max-rss-range-mib``.

    .venv/bin/python bench/soak.py                         # 30 minutes, 15 of them warm-up
    .venv/bin/python bench/soak.py --seconds 120 --warmup 30
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import psutil
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024


@dataclass
class Sample:
    """One look at the engine."""

    t_s: float
    rss_mib: float
    workers_rss_mib: float
    tasks: int
    ticks_received: int
    ticks_stored: int
    bars: int
    cycles: int
    fills: int
    faulted: list[str]
    states: dict[str, str]
    lag_buckets: dict[float, float]
    """Cumulative counts of the event-loop lag histogram, by upper bound."""


def soak_config(root: Path, retrain_every_s: float = 600.0, train_window_s: float | None = None) -> str:
    """config/dev.toml with its paths under ``root`` and the soak's changes (see the docstring)."""
    text = (REPO / "config" / "dev.toml").read_text()
    window = "" if train_window_s is None else f"window_s = {train_window_s}\n"
    changes = {
        '"var/dev': f'"{root}/var',
        "rate_per_s = 2000\n": "rate_per_s = 2000\npredictability = 0.5\nseed = 5\n",
        "first_cycle_s = 300\n": "first_cycle_s = 120\n",
        "interval_s = 3600\nmin_bars = 18_000\n": (
            f"interval_s = {retrain_every_s}\n{window}min_bars = 3_000\nfee_bps = 1.0\n"
        ),
        "initial_cash_usd = 100_000\n": (
            "initial_cash_usd = 100_000\n[modules.trader.sizing]\nmin_edge_bps = 1\n"
            "min_volatility_samples = 10\nrebalance_fraction = 0.02\n"
        ),
    }
    for old, new in changes.items():
        if old not in text:
            raise SystemExit(f"config/dev.toml has changed: {old!r} not found; update bench/soak.py")
        text = text.replace(old, new)
    return text


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Every sample of ``/metrics`` by sample name: (labels, value)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def total(samples: dict[str, list[tuple[dict[str, str], float]]], name: str) -> int:
    return int(sum(value for _, value in samples.get(name, [])))


def take(port: int, proc: psutil.Process, began: float) -> Sample:
    m = scrape(port)
    children = proc.children(recursive=True)
    workers = 0
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            workers += child.memory_info().rss
    states = {
        labels["module"]: labels["state"] for labels, value in m["alphaengine_module_state"] if value == 1
    }
    return Sample(
        t_s=round(time.monotonic() - began, 1),
        rss_mib=round(proc.memory_info().rss / MIB, 1),
        workers_rss_mib=round(workers / MIB, 1),
        tasks=total(m, "alphaengine_asyncio_tasks"),
        ticks_received=total(m, "alphaengine_ticks_received_total"),
        ticks_stored=total(m, "alphaengine_ticks_stored_total"),
        bars=total(m, "alphaengine_bars_total"),
        cycles=total(m, "alphaengine_trainer_cycles_total"),
        fills=total(m, "alphaengine_fills_total"),
        faulted=sorted(module for module, state in states.items() if state == "FAULTED"),
        states=states,
        lag_buckets={
            float(labels["le"]): value
            for labels, value in m["alphaengine_event_loop_lag_distribution_seconds_bucket"]
        },
    )


def lag_quantiles(first: Sample, last: Sample, qs: tuple[float, ...]) -> list[float]:
    """Quantiles of the lag probes between two samples, as the upper bound of the bucket holding them."""
    bounds = sorted(last.lag_buckets)
    counts = [last.lag_buckets[b] - first.lag_buckets.get(b, 0.0) for b in bounds]
    n = counts[-1]
    out = []
    for q in qs:
        rank = q * n
        out.append(next((b for b, c in zip(bounds, counts, strict=True) if c >= rank), float("inf")))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=1800.0)
    parser.add_argument("--warmup", type=float, default=900.0)
    parser.add_argument("--sample-every", type=float, default=30.0)
    parser.add_argument("--max-rss-range-mib", type=float, default=150.0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--log", type=Path, default=None, help="keep the engine's log in this file")
    parser.add_argument(
        "--retrain-every", type=float, default=600.0, help="seconds between training cycles (default 600)"
    )
    parser.add_argument(
        "--train-window",
        type=float,
        default=None,
        help="train on the bars of this many seconds (default: the trainer's 7 days, never full in a soak)",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="alphaengine-soak-") as tmp:
        root = Path(tmp)
        port = free_port()
        config = root / "dev.toml"
        config.write_text(
            soak_config(root, args.retrain_every, args.train_window).replace("port = 9464", f"port = {port}")
        )
        log = (root / "engine.log").open("w")
        engine = subprocess.Popen(
            [sys.executable, "-m", "alphaengine", "run", "--config", str(config)], stdout=log, stderr=log
        )
        proc = psutil.Process(engine.pid)
        began = time.monotonic()
        samples: list[Sample] = []
        ever_faulted: set[str] = set()
        try:
            time.sleep(10)
            while time.monotonic() - began < args.seconds:
                if engine.poll() is not None:
                    print((root / "engine.log").read_text()[-5000:], file=sys.stderr)
                    raise SystemExit(f"the engine exited early with status {engine.returncode}")
                sample = take(port, proc, began)
                samples.append(sample)
                ever_faulted.update(sample.faulted)
                not_running = [m for m, s in sample.states.items() if s != "RUNNING"] or "-"
                print(
                    f"{sample.t_s:7.0f} s  rss {sample.rss_mib:7.1f} MiB"
                    f"  workers {sample.workers_rss_mib:7.1f} MiB  tasks {sample.tasks:4d}"
                    f"  ticks {sample.ticks_received:>10,d} stored {sample.ticks_stored:>10,d}"
                    f"  bars {sample.bars:>8,d}  cycles {sample.cycles}  fills {sample.fills:>6,d}"
                    f"  not running: {not_running}",
                    flush=True,
                )
                time.sleep(args.sample_every)
        finally:
            engine.send_signal(signal.SIGTERM)
            try:
                status = engine.wait(120)
            except subprocess.TimeoutExpired:
                engine.kill()
                status = engine.wait()
            log.close()
            engine_log = (root / "engine.log").read_text()
            if args.log is not None:
                args.log.write_text(engine_log)
            tail = engine_log.splitlines()[-3:]

    steady = [s for s in samples if s.t_s >= args.warmup]
    rss = np.array([s.rss_mib for s in steady])
    hours = np.array([s.t_s for s in steady]) / 3600.0
    slope = float(np.polyfit(hours, rss, 1)[0]) if len(steady) > 2 else float("nan")
    p50, p99, p999 = lag_quantiles(steady[0], steady[-1], (0.5, 0.99, 0.999))
    summary = {
        "seconds": args.seconds,
        "warmup_s": args.warmup,
        "rss_after_warmup_mib": {"first": rss[0], "min": rss.min(), "max": rss.max(), "last": rss[-1]},
        "rss_range_mib": float(rss.max() - rss.min()),
        "rss_slope_mib_per_h": round(slope, 1),
        "rss_last_third_mib": [
            min(s.rss_mib for s in samples if s.t_s >= 2 * args.seconds / 3),
            max(s.rss_mib for s in samples if s.t_s >= 2 * args.seconds / 3),
        ],
        "workers_rss_max_mib": max(s.workers_rss_mib for s in samples),
        "tasks_after_warmup": [min(s.tasks for s in steady), max(s.tasks for s in steady)],
        "event_loop_lag_s": {"p50_le": p50, "p99_le": p99, "p999_le": p999},
        "ticks_received": samples[-1].ticks_received,
        "ticks_stored": samples[-1].ticks_stored,
        "training_cycles": samples[-1].cycles,
        "fills": samples[-1].fills,
        "ever_faulted": sorted(ever_faulted),
        "exit_status": status,
        "engine_log_tail": tail,
    }
    print(json.dumps(summary, indent=2, default=float))
    if args.json is not None:
        args.json.write_text(
            json.dumps({"summary": summary, "samples": [asdict(s) for s in samples]}, indent=1, default=float)
        )
    failures = []
    if ever_faulted:
        failures.append(f"modules FAULTED: {sorted(ever_faulted)}")
    if status != 0:
        failures.append(f"the engine exited with status {status}")
    if summary["rss_range_mib"] > args.max_rss_range_mib:
        failures.append(f"RSS ranged over {summary['rss_range_mib']:.0f} MiB after the warm-up")
    for failure in failures:
        print(f"FAIL: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
