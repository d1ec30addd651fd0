"""Soak of the live Binance source: a high message rate, random disconnects and server shutdowns, for long.

The source (``BinanceSource``, BTCUSDT and ETHUSDT) runs on in-memory ports against a ``FakeBinance`` that
replays the real recordings looped forever at ``--speed`` times their pace (about 40 trades/s at 1x, so
about 8,000 trades/s at the default 200x), in a child process with its own event loop (so that the
figures below are the source's). The fake drops every connection at random moments
(``drop_randomly``, one every ``--drop-every`` seconds on average, no close frame) and every
``--shutdown-every`` seconds or so announces ``serverShutdown`` and closes its connections
``--shutdown-close-after-s`` later.

Every ``--sample-every`` seconds it prints: the CPU cores this process used, its RSS, the bytes Arrow's
pool holds and the blocks Python's allocator holds, the asyncio tasks of the process, the source's open
connections and the process's TCP sockets, connection attempts, the connector's longest reconnect delay so
far (never beyond ``reconnect_max_s``), gaps filled and unfilled, trades backfilled, trades held behind
gaps, frames waiting to be parsed and ticks/s. The ticks are verified on the fly from the bus by a
consumer that keeps only the next expected trade id per symbol (and commits, so the bus trims what it has
read): memory stays bounded however long it runs.

Exit status non-zero (each failure printed) if:

* a trade id was skipped or emitted twice (ids must be contiguous per symbol from the first one), or the
  source did not stop cleanly;
* RSS grew by more than ``--max-growth-mib`` over its value at the end of the warm-up (``--warmup``),
  counting the samples at which no trade was held behind a gap, or by more than
  ``--max-peak-growth-mib`` at any sample: trades held while their gap's backfill waits are memory in
  use by design, bounded by ``max_held_trades`` per symbol and ``max_gap_hold_s``, not a leak;
* the blocks Python's allocator holds grew by more than ``--max-block-growth-k`` thousand after the
  warm-up (a leak of one object per batch or per tick shows there long before it shows in RSS);
* the task count after the warm-up exceeded the most seen during the warm-up by more than
  ``--task-slack`` (backfills in flight and rotations come and go; a leak grows with every reconnect),
  or a task of the source is left after it stopped;
* more than two connections (a rotation's overlap) were ever open, or any is left after the stop;
* a reconnect delay ever exceeded ``reconnect_max_s``.

    .venv/bin/python bench/feed_soak.py                            # 10 minutes at 200x
    .venv/bin/python bench/feed_soak.py --seconds 120 --speed 0    # 2 minutes, flat out
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import psutil
import pyarrow as pa
import uvloop
from feeds import RECORDINGS, FakeServer, machine_load, recording_paths

from alphaengine import metrics
from alphaengine.bus.base import Consumer, OffsetAndMetadata, TopicPartition
from alphaengine.bus.memory import MemoryBus
from alphaengine.clock import LiveClock
from alphaengine.codec import decode_ticks
from alphaengine.kernel.module import Context, ModuleState
from alphaengine.objectstore.memory import MemoryObjectStore
from alphaengine.sources.base import TICKS_TOPIC
from alphaengine.sources.binance_live import BinanceSettings, BinanceSource
from alphaengine.store.memory import MemoryStore

SOURCE = "binance"
MAX_OPEN_CONNECTIONS = 2
"""One slot of streams: one connection, two during a rotation's overlap."""


@dataclass
class SymbolIds:
    """What the verifier knows about one symbol: the first id, the next expected one, and anomalies."""

    first: int
    next: int
    missing: int = 0
    repeated: int = 0
    """Ids at or below one already seen (a duplicate, or a trade out of order)."""
    first_anomaly: str = ""


@dataclass
class IdVerifier:
    """Checks that each symbol's trade ids arrive contiguous and once, keeping O(symbols) state."""

    symbols: dict[str, SymbolIds] = field(default_factory=dict)
    ticks: int = 0

    def check(self, symbol: str, ids: np.ndarray[Any, np.dtype[np.int64]]) -> None:
        """Account for the next trades of ``symbol``, in the order the bus delivered them."""
        if not len(ids):
            return
        self.ticks += len(ids)
        state = self.symbols.get(symbol)
        if state is None:
            state = self.symbols[symbol] = SymbolIds(first=int(ids[0]), next=int(ids[0]))
        if ids[0] == state.next and ids[-1] - ids[0] + 1 == len(ids) and (np.diff(ids) == 1).all():
            state.next = int(ids[-1]) + 1
            return
        for trade_id in ids.tolist():  # only when something is wrong: find out what
            if trade_id < state.next:
                state.repeated += 1
                state.first_anomaly = state.first_anomaly or f"id {trade_id} again after {state.next - 1}"
            else:
                if trade_id > state.next:
                    state.missing += trade_id - state.next
                    state.first_anomaly = state.first_anomaly or f"ids {state.next}..{trade_id - 1} missing"
                state.next = trade_id + 1

    @property
    def ok(self) -> bool:
        """No id missing and none repeated, for every symbol."""
        return all(s.missing == 0 and s.repeated == 0 for s in self.symbols.values())


async def verify(consumer: Consumer, verifier: IdVerifier, stop: asyncio.Event) -> None:
    """Consume (a started consumer), verify the ids and commit, until ``stop`` is set and nothing is left."""
    try:
        while True:
            records = await consumer.getmany(100_000, 0.2)
            if not records:
                if stop.is_set():
                    return
                continue
            offsets: dict[TopicPartition, OffsetAndMetadata] = {}
            for record in records:
                batch = decode_ticks(record.value)
                for symbol, part in batch.split_by_symbol():
                    verifier.check(symbol, part.np("trade_id"))
                offsets[record.tp] = OffsetAndMetadata(record.offset + 1)
            await consumer.commit(offsets)
    finally:
        await consumer.close()


def counter(metric: Any, **labels: str) -> float:
    """The sum of a counter's ``_total`` samples whose labels match ``labels``."""
    value = 0.0
    for family in metric.collect():
        for sample in family.samples:
            if sample.name.endswith("_total") and all(sample.labels.get(k) == v for k, v in labels.items()):
                value += sample.value
    return value


@dataclass(frozen=True)
class Sample:
    """One row of the soak's log."""

    t_s: float
    cpu_s: float
    """CPU time of this process so far (user + system, every thread)."""
    rss_mib: float
    arrow_mib: float
    """Bytes Arrow's memory pool has allocated and not freed (live Arrow buffers)."""
    py_kblocks: float
    """Thousands of memory blocks Python's allocator has handed out and not freed (live objects)."""
    tasks: int
    connections: int
    sockets: int
    attempts: int
    disconnects: int
    max_delay_s: float
    gaps_filled: int
    gaps_unfilled: int
    backfilled: int
    held: int
    buffered: int
    emitted: int

    HEADER = (
        f"{'t s':>5} {'cores':>5} {'RSS MiB':>7} {'arrow':>6} {'py kblk':>7} {'tasks':>5} {'conns':>5} "
        f"{'socks':>5} {'attempts':>8} {'max delay':>9} {'gaps ok':>7} {'unfilled':>8} {'backfilled':>10} "
        f"{'held':>7} {'buffered':>8} {'emitted':>10} {'ticks/s':>7}"
    )

    def row(self, previous: Sample | None) -> str:
        """The sample as a table row; CPU cores and ticks/s since ``previous``."""
        base = previous or Sample(*([0] * len(dataclasses.fields(Sample))))
        span = max(self.t_s - base.t_s, 1e-9)
        cores = (self.cpu_s - base.cpu_s) / span
        return (
            f"{self.t_s:5.0f} {cores:5.2f} {self.rss_mib:7.1f} {self.arrow_mib:6.1f} {self.py_kblocks:7.0f}"
            f" {self.tasks:5d} {self.connections:5d} {self.sockets:5d} "
            f"{self.attempts:8d} {self.max_delay_s:9.3f} {self.gaps_filled:7d} {self.gaps_unfilled:8d} "
            f"{self.backfilled:10,d} {self.held:7,d} {self.buffered:8d} {self.emitted:10,d} "
            f"{(self.emitted - base.emitted) / span:7,.0f}"
        )


def take_sample(src: BinanceSource, started: float, process: psutil.Process) -> Sample:
    """Measure the process and the source now."""
    health = src.health()
    connector = src.connector
    assert connector is not None
    cpu = process.cpu_times()
    return Sample(
        t_s=time.monotonic() - started,
        cpu_s=cpu.user + cpu.system,
        rss_mib=process.memory_info().rss / 2**20,
        arrow_mib=pa.total_allocated_bytes() / 2**20,
        py_kblocks=sys.getallocatedblocks() / 1e3,
        tasks=len(asyncio.all_tasks()),
        connections=connector.open_connections,
        sockets=len(process.net_connections(kind="tcp")),
        attempts=int(health["connect_attempts"]),
        disconnects=int(counter(metrics.FEED_DISCONNECTS, source=SOURCE)),
        max_delay_s=connector.max_delay_s,
        gaps_filled=int(counter(metrics.FEED_GAPS, source=SOURCE, status="filled")),
        gaps_unfilled=int(
            counter(metrics.FEED_GAPS, source=SOURCE)
            - counter(metrics.FEED_GAPS, source=SOURCE, status="filled")
        ),
        backfilled=int(counter(metrics.FEED_BACKFILLED, source=SOURCE)),
        held=sum(int(s["held"]) for s in health["symbols"].values()),
        buffered=len(src.buffer),
        emitted=src.ticks_emitted,
    )


async def announce_shutdowns(fake: FakeServer, every_s: float, close_after_s: float | None) -> None:
    """``serverShutdown`` every ``every_s`` on average (uniform between half and one and a half of it)."""
    rng = np.random.default_rng(7)
    while True:
        await asyncio.sleep(float(rng.uniform(0.5, 1.5)) * every_s)
        await fake.command("server_shutdown", close_after_s)


def source_config(args: argparse.Namespace, fake: FakeServer) -> BinanceSettings:
    """The source's settings: production defaults but for the endpoints and the backoff of the soak."""
    return msgspec.convert(
        {
            "ws_url": fake.ws_url,
            "rest_url": fake.rest_url,
            "symbols": ["BTCUSDT", "ETHUSDT"],
            "reconnect_initial_s": args.reconnect_initial_s,
            "reconnect_max_s": args.reconnect_max_s,
            "resume_from_store": False,
        },
        BinanceSettings,
    )


@dataclass
class Outcome:
    """What a soak measured, for the verdict."""

    samples: list[Sample]
    after_stop: Sample
    stop_s: float
    leftover_tasks: list[str]
    loop_lag: list[float]
    fake: dict[str, Any]
    verifier: IdVerifier
    source_state: ModuleState
    rejected: int
    duplicates_dropped: int
    machine_after: str


async def run_soak(args: argparse.Namespace) -> Outcome:
    """Run the source against the fake for ``args.seconds``, printing a sample every ``sample_every``."""
    print(f"machine before: {await asyncio.to_thread(machine_load)}")
    paths = recording_paths(RECORDINGS)
    speed = args.speed or None
    process = psutil.Process()
    probe = metrics.LoopLagProbe()
    bus, store, objects = MemoryBus(), MemoryStore(), MemoryObjectStore()
    for port in (bus, store, objects):
        await port.start()
    await bus.create_topic(TICKS_TOPIC)
    verifier = IdVerifier()
    stop_verifying = asyncio.Event()
    with tempfile.TemporaryDirectory(prefix="alphaengine-soak-") as tmp:
        ctx = Context(bus=bus, store=store, objects=objects, clock=LiveClock(), data_dir=Path(tmp))
        # Subscribed before the source sends anything, so that the bus keeps every record for it.
        consumer = bus.consumer("soak-verifier", [TICKS_TOPIC])
        await consumer.start()
        verifying = asyncio.ensure_future(verify(consumer, verifier, stop_verifying))
        async with FakeServer("binance", paths, speed) as fake:
            src = BinanceSource(SOURCE, source_config(args, fake), ctx)
            probe.start()
            started = time.monotonic()
            await src.start()
            await fake.command("drop_randomly", 1.0 / args.drop_every, args.seed)
            close_after = args.shutdown_close_after_s if args.shutdown_close_after_s > 0 else None
            shutdowns = asyncio.ensure_future(announce_shutdowns(fake, args.shutdown_every, close_after))
            print(
                f"soak: {args.seconds:g} s, speed {speed or 'flat out'}, a drop every {args.drop_every:g} s "
                f"and a serverShutdown every {args.shutdown_every:g} s on average; warm-up {args.warmup:g} s"
            )
            print(Sample.HEADER)
            samples: list[Sample] = []
            previous = take_sample(src, started, process)
            end = started + args.seconds
            while (now := time.monotonic()) < end:
                await asyncio.sleep(min(args.sample_every, end - now))
                sample = take_sample(src, started, process)
                print(sample.row(previous), flush=True)
                samples.append(previous := sample)
            shutdowns.cancel()
            await asyncio.gather(shutdowns, return_exceptions=True)
            loop_lag = list(probe.samples)
            stop_started = time.monotonic()
            await src.stop()
            stop_s = time.monotonic() - stop_started
            after_stop = take_sample(src, started, process)
            stop_verifying.set()
            await verifying
            others = asyncio.all_tasks() - {asyncio.current_task()}
            leftover = [t.get_name() for t in others if t.get_name() != "loop-lag-probe"]
            fake_stats = await fake.command("stats")
        await probe.stop()
    for port in (objects, store, bus):
        await port.close()
    return Outcome(
        samples=samples,
        after_stop=after_stop,
        stop_s=stop_s,
        leftover_tasks=leftover,
        loop_lag=loop_lag,
        fake=fake_stats,
        verifier=verifier,
        source_state=src.state,
        rejected=src.parser.stats.rejected_total,
        duplicates_dropped=int(src.health()["duplicates_dropped"]),
        machine_after=await asyncio.to_thread(machine_load),
    )


def verdict(args: argparse.Namespace, out: Outcome) -> int:
    """Print the summary and every failed check; returns the exit status."""
    samples, end, verifier, fake = out.samples, out.after_stop, out.verifier, out.fake
    cap = args.reconnect_max_s
    warm = [s for s in samples if s.t_s <= args.warmup + 1e-6] or samples[:1]
    after = [s for s in samples if s.t_s > args.warmup + 1e-6] or warm
    base_rss = warm[-1].rss_mib
    # Trades held behind a gap while its backfill waits are memory in use by design (bounded by
    # max_held_trades and max_gap_hold_s): the steady figure leaves those moments out, the peak keeps them.
    steady = [s for s in after if s.held == 0] or after
    growth = max(s.rss_mib for s in steady) - base_rss
    peak_growth = max(s.rss_mib for s in after) - base_rss
    held_max = max(s.held for s in samples)
    block_growth = max(s.py_kblocks for s in after) - warm[-1].py_kblocks
    base_tasks = max(s.tasks for s in warm)
    lag = metrics.quantiles_from_samples(out.loop_lag, (0.5, 0.99, 1.0)) if out.loop_lag else [0.0] * 3
    run_s = samples[-1].t_s

    print("\nsummary")
    print(f"  ticks emitted       {end.emitted:,} in {run_s:.0f} s ({end.emitted / run_s:,.0f}/s)")
    print(f"  ticks verified      {verifier.ticks:,}")
    for symbol, state in verifier.symbols.items():
        print(
            f"  {symbol:<19} ids {state.first}..{state.next - 1} ({state.next - state.first:,}), "
            f"missing {state.missing}, repeated {state.repeated} {state.first_anomaly}"
        )
    print(
        f"  RSS                 start {samples[0].rss_mib:.1f} MiB, after warm-up {base_rss:.1f} MiB, "
        f"end {samples[-1].rss_mib:.1f} MiB, max {max(s.rss_mib for s in samples):.1f} MiB"
    )
    print(
        f"  RSS growth          steady (nothing held) {growth:.1f} MiB (bound {args.max_growth_mib:g}); "
        f"peak {peak_growth:.1f} MiB (bound {args.max_peak_growth_mib:g}), with up to {held_max:,} "
        f"trades held behind gaps"
    )
    print(
        f"  arrow, python       arrow {samples[0].arrow_mib:.1f} -> {samples[-1].arrow_mib:.1f} MiB "
        f"(max {max(s.arrow_mib for s in samples):.1f}); python blocks {samples[0].py_kblocks:,.0f}k -> "
        f"{samples[-1].py_kblocks:,.0f}k (max {max(s.py_kblocks for s in samples):,.0f}k, growth after "
        f"warm-up {block_growth:,.0f}k, bound {args.max_block_growth_k:g}k); CPU "
        f"{(samples[-1].cpu_s - samples[0].cpu_s) / max(run_s - samples[0].t_s, 1e-9):.2f} cores"
    )
    print(
        f"  asyncio tasks       warm-up max {base_tasks}, after it {min(s.tasks for s in after)}"
        f"..{max(s.tasks for s in after)} (slack {args.task_slack}); "
        f"left after stop: {len(out.leftover_tasks)}"
    )
    print(
        f"  connections         max open {max(s.connections for s in samples)}, after stop "
        f"{end.connections} (fake side: {fake['connections']}); TCP sockets max "
        f"{max(s.sockets for s in samples)}"
    )
    print(
        f"  reconnects          attempts {end.attempts}, disconnects {end.disconnects} "
        f"(fake: opened {fake['connections_opened']}, closed {fake['connections_closed']}, "
        f"drops {fake['drops']}, shutdowns {fake['server_shutdowns_sent']})"
    )
    print(f"  max reconnect delay {end.max_delay_s:.3f} s (cap reconnect_max_s {cap:g} s)")
    print(
        f"  gaps                filled {end.gaps_filled}, unfilled {end.gaps_unfilled}; "
        f"trades backfilled {end.backfilled:,}; REST requests {fake['requests']}"
    )
    print(
        f"  event-loop lag      p50 {lag[0] * 1e3:.1f} ms, p99 {lag[1] * 1e3:.1f} ms, "
        f"max {lag[2] * 1e3:.1f} ms"
    )
    print(f"  fake published      {fake['published']:,} trades; the source stopped in {out.stop_s:.2f} s")
    print(f"  rejected            {out.rejected}; duplicates dropped {out.duplicates_dropped:,}")
    print(f"  machine after       {out.machine_after}")

    failures = []
    if not verifier.ok:
        failures.append("trade ids skipped or repeated")
    if verifier.ticks != end.emitted:
        failures.append(f"verified {verifier.ticks} ticks but the source emitted {end.emitted}")
    if out.source_state is not ModuleState.STOPPED:
        failures.append(f"the source ended {out.source_state.name}, not STOPPED")
    if growth > args.max_growth_mib:
        failures.append(f"RSS grew {growth:.1f} MiB after the warm-up (bound {args.max_growth_mib:g} MiB)")
    if peak_growth > args.max_peak_growth_mib:
        failures.append(f"RSS peaked {peak_growth:.1f} MiB above the warm-up's end")
    if block_growth > args.max_block_growth_k:
        failures.append(f"Python's allocated blocks grew by {block_growth:,.0f}k after the warm-up")
    if any(s.tasks > base_tasks + args.task_slack for s in after):
        failures.append(f"task count beyond {base_tasks} + {args.task_slack} after the warm-up")
    if out.leftover_tasks:
        failures.append(f"tasks left after the stop: {out.leftover_tasks}")
    if max(s.connections for s in samples) > MAX_OPEN_CONNECTIONS or end.connections:
        failures.append("too many connections open, or some left after the stop")
    if end.max_delay_s > cap:
        failures.append(f"a reconnect delay of {end.max_delay_s:.3f} s beyond the cap {cap:g} s")
    for failure in failures:
        print(f"FAILED: {failure}")
    print("soak passed" if not failures else "soak FAILED")
    return 1 if failures else 0


def main() -> int:
    """Command line."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=600.0, help="duration of the soak")
    parser.add_argument("--speed", type=float, default=200.0, help="multiple of the tape's pace; 0: flat out")
    parser.add_argument("--drop-every", type=float, default=10.0, help="mean seconds between random drops")
    parser.add_argument("--shutdown-every", type=float, default=60.0, help="mean seconds between shutdowns")
    parser.add_argument(
        "--shutdown-close-after-s", type=float, default=3.0, help="the fake closes this later; 0: never"
    )
    parser.add_argument("--reconnect-initial-s", type=float, default=0.5)
    parser.add_argument("--reconnect-max-s", type=float, default=5.0)
    parser.add_argument("--sample-every", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=60.0, help="seconds before the memory baseline")
    parser.add_argument(
        "--max-growth-mib", type=float, default=64.0, help="bound of the steady RSS growth after warm-up"
    )
    parser.add_argument(
        "--max-peak-growth-mib", type=float, default=256.0, help="bound of the peak RSS growth after warm-up"
    )
    parser.add_argument(
        "--max-block-growth-k",
        type=float,
        default=100.0,
        help="bound of the growth of Python's allocated blocks after warm-up, in thousands",
    )
    parser.add_argument("--task-slack", type=int, default=8, help="tasks allowed above the warm-up's max")
    parser.add_argument("--seed", type=int, default=1, help="seed of the random drops")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args()
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        outcome = runner.run(run_soak(args))
    return verdict(args, outcome)


if __name__ == "__main__":
    sys.exit(main())
