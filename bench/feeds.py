"""Live-feed benchmarks: parser throughput, and end-to-end from a fake exchange at full speed into chDB.

``parsers``: frames/s and ticks/s of :class:`~alphaengine.sources.binance.BinanceTradeParser` and
:class:`~alphaengine.sources.finnhub_parser.FinnhubParser` on realistic frames, parsed in batches as the
live sources do (they hand the parser every frame waiting, typically hundreds), beside a bare
``orjson.loads`` + two float conversions loop (the baseline ``VERIFIED.md`` quotes):

* Binance: the ``@trade`` messages of the real recordings in ``binance-spot-ws/`` (raw combined-stream
  bytes, as the WebSocket delivers them);
* Finnhub: the same trades as Finnhub trade messages, built as the fake sends them: the trades of one
  millisecond in one message (what the fake sends at the tape's pace), and 50 trades a message (what it
  sends flat out).

``e2e``: the fake exchange flat out (``speed=None``) over the real BTCUSDT tape looped forever -> the live
source -> the bus -> the tick sink -> chDB, the engine built from a configuration string as
``bench/pipeline.py`` does, with the source's ``ws_url``/``rest_url`` pointed at the fake. After a warm-up
it measures a window of ``--seconds``: ticks/s stored, event-loop lag and the CPU used by this process and
by the fake; after a graceful stop it reads the store back and checks that every emitted tick is stored
exactly once (Binance: ``count()`` = ``uniqExact`` = ticks acknowledged by the bus = ``max - min + 1`` of
the trade ids). By default the fake runs in a child process with its own event loop, so that the figures
are the client's (on a 2-core machine the two processes still share the cores); ``--fake-in-process``
runs it on the engine's event loop instead.

    .venv/bin/python bench/feeds.py parsers
    .venv/bin/python bench/feeds.py e2e --provider binance --seconds 30
    .venv/bin/python bench/feeds.py e2e --provider finnhub --seconds 30 --fake-in-process

The recordings are found as the tests find them (``tests.conftest.real_data_dir``:
``$ALPHAENGINE_REAL_DATA``, else ``../shared/data`` beside the checkout).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gzip
import itertools
import logging
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import orjson
import psutil
import uvloop

from alphaengine import metrics
from alphaengine.config import ChdbStoreConfig, loads
from alphaengine.kernel.engine import Engine
from alphaengine.sources.binance import BinanceTradeParser
from alphaengine.sources.finnhub_parser import FinnhubParser
from alphaengine.store import build_store
from alphaengine.testing import VENUE_PREFIX, FakeBinance, FakeFinnhub, Tape

REPO = Path(__file__).resolve().parents[1]
RECORDINGS = ("btcusdt_20240808.gz", "btcusdt_20240809.gz", "ethusdt_20240808.gz")
BTC_RECORDINGS = RECORDINGS[:2]
FINNHUB_TOKEN = "bench-token"
FAKE_TRADES_PER_MESSAGE = 50
"""``FakeFinnhub``'s default ``max_trades_per_message``: what it sends flat out."""


def recording_paths(names: Sequence[str]) -> list[Path]:
    """The shared recordings, found as the tests find them."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from tests.conftest import real_data_dir

    paths = [real_data_dir() / "binance-spot-ws" / name for name in names]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        sys.exit(f"missing recordings {missing}: set ALPHAENGINE_REAL_DATA to the shared data directory")
    return paths


def machine_load() -> str:
    """The load averages and the other processes busy over the last second, to say how shared it was."""
    one, five, fifteen = os.getloadavg()
    mine = {os.getpid()} | {child.pid for child in psutil.Process().children(recursive=True)}
    busy = []
    for proc in psutil.process_iter():  # the first cpu_percent of a process only starts its count
        with contextlib.suppress(psutil.Error):
            proc.cpu_percent()
    time.sleep(1.0)
    for proc in psutil.process_iter(["pid", "name", "cpu_percent", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            if proc.info["pid"] not in mine and (proc.info["cpu_percent"] or 0) >= 20:
                cmd = " ".join(proc.info["cmdline"] or [proc.info["name"]])[:70]
                busy.append(f"{proc.info['cpu_percent']:.0f}% {cmd}")
    others = f"; busy: {', '.join(busy)}" if busy else ""
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} cores{others}"


# -- (a) parser throughput ----------------------------------------------------------------------------


def binance_frames(paths: Sequence[Path]) -> tuple[list[bytes], list[int]]:
    """The ``@trade`` messages of raw recordings as the WebSocket delivers them, and their receive times."""
    frames: list[bytes] = []
    recv_ns: list[int] = []
    for path in paths:
        with gzip.open(path, "rb") as lines:
            for line in lines:
                if b'@trade"' not in line:
                    continue
                received, _, message = line.rstrip(b"\n").partition(b" ")
                frames.append(message)
                recv_ns.append(int(received))
    return frames, recv_ns


def finnhub_frames(tape: Tape, per_message: int | None) -> tuple[list[bytes], list[int], list[int]]:
    """The tape's trades as Finnhub trade messages, built as ``FakeFinnhub`` builds them.

    ``per_message`` None: the trades of one millisecond (of all symbols) in one message, as the fake sends
    them at the tape's pace; a number: that many trades a message, as it sends them flat out. Returns the
    frames, their receive times (trade time + 50 ms) and the trades in each.
    """
    names = [VENUE_PREFIX + s for s in tape.symbols]
    items = [
        {"p": float(p), "s": names[k], "t": t, "v": float(q)}
        for p, k, t, q in zip(
            tape.price, tape.symbol_index.tolist(), tape.time_ms.tolist(), tape.qty, strict=True
        )
    ]
    times = tape.time_ms.tolist()
    if per_message is None:
        groups = [list(g) for _, g in itertools.groupby(range(len(items)), key=times.__getitem__)]
        groups = [
            g[k : k + FAKE_TRADES_PER_MESSAGE]
            for g in groups
            for k in range(0, len(g), FAKE_TRADES_PER_MESSAGE)
        ]
    else:
        groups = [list(range(k, min(k + per_message, len(items)))) for k in range(0, len(items), per_message)]
    frames = [orjson.dumps({"data": [items[i] for i in g], "type": "trade"}) for g in groups]
    recv_ns = [(times[g[-1]] + 50) * 1_000_000 for g in groups]
    return frames, recv_ns, [len(g) for g in groups]


def interleaved(runs: Sequence[Callable[[], None]], repeat: int) -> list[tuple[float, float]]:
    """Seconds per call of each run: the best (least disturbed) and the median of ``repeat`` calls.

    The runs take turns (one pass of each, ``repeat`` times over), so that a change in the load of a
    shared machine affects them alike and the comparison within one run stays fair.
    """
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(repeat):
        for run, spent in zip(runs, times, strict=True):
            started = time.perf_counter()
            run()
            spent.append(time.perf_counter() - started)
    return [(min(spent), statistics.median(spent)) for spent in times]


def batched(
    parse: Callable[[list[bytes], list[int]], object],
    frames: list[bytes],
    recv_ns: list[int],
    trades: list[int],
    *,
    size: int,
    max_calls: int,
) -> tuple[Callable[[], None], int, int]:
    """One pass over the frames, ``size`` at a time, as the live source hands them to its parser.

    At most ``max_calls`` calls a pass (the first frames), so that small batches do not take minutes.
    Returns the pass, and the frames and trades it parses.
    """
    n = min(len(frames), size * max_calls)
    chunks = [(frames[i : min(i + size, n)], recv_ns[i : min(i + size, n)]) for i in range(0, n, size)]

    def run() -> None:
        for chunk, recv in chunks:
            parse(chunk, recv)

    return run, n, sum(trades[:n])


def binance_baseline(frames: list[bytes]) -> Callable[[], None]:
    """A bare ``orjson.loads`` plus two float conversions per message (``VERIFIED.md``'s baseline)."""

    def run() -> None:
        loads_ = orjson.loads
        for raw in frames:
            data = loads_(raw)["data"]
            float(data["p"])
            float(data["q"])

    return run


def finnhub_baseline(frames: list[bytes]) -> Callable[[], None]:
    """The same baseline for Finnhub messages: ``orjson.loads`` and two floats per trade."""

    def run() -> None:
        loads_ = orjson.loads
        for raw in frames:
            for entry in loads_(raw)["data"]:
                float(entry["p"])
                float(entry["v"])

    return run


def bench_parsers(batch_sizes: Sequence[int], repeat: int, max_calls: int) -> int:
    """Print the parser table; returns an exit status (non-zero if a parser rejected a realistic frame)."""
    paths = recording_paths(RECORDINGS)
    print(f"machine: {machine_load()}")
    frames, recv_ns = binance_frames(paths)
    tape = Tape.from_recordings(paths)
    print(f"recordings: {', '.join(p.name for p in paths)}: {len(frames):,} trade messages")
    rows: list[tuple[str, int | str, Callable[[], None], int, int]] = []

    def add(label: str, size: int | str, run: Callable[[], None], n_frames: int, n_ticks: int) -> None:
        rows.append((label, size, run, n_frames, n_ticks))

    binance = BinanceTradeParser("bench-binance")
    ones = [1] * len(frames)
    add("orjson.loads + 2 floats (baseline)", "-", binance_baseline(frames), len(frames), len(frames))
    for size in batch_sizes:
        add(
            "BinanceTradeParser",
            size,
            *batched(binance.parse, frames, recv_ns, ones, size=size, max_calls=max_calls),
        )

    finnhub_sets = {
        "trades of one ms a message": finnhub_frames(tape, None),
        f"{FAKE_TRADES_PER_MESSAGE} trades a message": finnhub_frames(tape, FAKE_TRADES_PER_MESSAGE),
    }
    finnhub = FinnhubParser("bench-finnhub", [VENUE_PREFIX + s for s in tape.symbols])
    for label, (fh_frames, fh_recv, fh_trades) in finnhub_sets.items():
        print(
            f"Finnhub frames, {label}: {len(fh_frames):,} messages, "
            f"{sum(fh_trades) / len(fh_frames):.2f} trades a message on average"
        )
        baseline = finnhub_baseline(fh_frames)
        add(f"orjson.loads + 2 floats a trade ({label})", "-", baseline, len(fh_frames), sum(fh_trades))
        for size in batch_sizes:
            run, n_frames, n_trades = batched(
                finnhub.parse, fh_frames, fh_recv, fh_trades, size=size, max_calls=max_calls
            )
            add(f"FinnhubParser ({label})", size, run, n_frames, n_trades)

    timings = interleaved([run for _, _, run, _, _ in rows], repeat)
    print(f"\nbest of {repeat} passes (median in brackets); frames handed to the parser per call = batch")
    print(f"{'what':<58} {'batch':>6} {'frames/s':>22} {'ticks/s':>22}")
    for (label, batch, _, n_frames, n_ticks), (best, median) in zip(rows, timings, strict=True):
        frames_s = f"{n_frames / best:,.0f} ({n_frames / median:,.0f})"
        ticks_s = f"{n_ticks / best:,.0f} ({n_ticks / median:,.0f})"
        print(f"{label:<58} {batch!s:>6} {frames_s:>22} {ticks_s:>22}")
    print(f"\nmachine: {machine_load()}")
    rejected = binance.stats.rejected_total + finnhub.stats.rejected_total
    if rejected:
        print(f"PARSERS REJECTED {rejected} realistic messages")
    return 1 if rejected else 0


# -- the fake exchange, in this process or in a child process ---------------------------------------


def fake_stats(fake: FakeBinance | FakeFinnhub) -> dict[str, Any]:
    """The fake's counters as plain, picklable values."""
    stats: dict[str, Any] = {}
    for f in dataclasses.fields(fake.stats):
        value = getattr(fake.stats, f.name)
        stats[f.name] = dict(value) if isinstance(value, dict) else value
    stats["published"] = fake.published
    stats["connections"] = fake.connections
    return stats


async def execute(fake: FakeBinance | FakeFinnhub, command: tuple[Any, ...]) -> Any:
    """Carry out one scripting command on a fake; the answer is picklable."""
    name, *args = command
    if name == "drop_randomly":
        fake.drop_randomly(*args)
    elif name == "server_shutdown":
        if not isinstance(fake, FakeBinance):
            raise ValueError("server_shutdown is a Binance event")
        return await fake.send_server_shutdown(*args)
    elif name == "deploy":
        if not isinstance(fake, FakeFinnhub):
            raise ValueError("deploy is a Finnhub event")
        return await fake.deploy()
    elif name != "stats":
        raise ValueError(f"unknown command {name!r}")
    return fake_stats(fake)


def make_fake(provider: str, paths: Sequence[str | Path], speed: float | None) -> FakeBinance | FakeFinnhub:
    """A fake of ``provider`` publishing the recordings' trades looped forever."""
    tape = Tape.from_recordings(paths).loop(None)
    if provider == "binance":
        return FakeBinance(tape, speed=speed)
    return FakeFinnhub(tape, speed=speed, token=FINNHUB_TOKEN)


def serve_fake(provider: str, paths: list[str], speed: float | None, pipe: Connection) -> None:
    """Child process: serve a fake on its own event loop; answer commands from ``pipe`` until "stop"."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s fake %(levelname)s %(name)s: %(message)s")

    async def serve() -> None:
        commands: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()

        def readable() -> None:
            try:
                commands.put_nowait(pipe.recv())
            except EOFError:  # the parent went away
                asyncio.get_running_loop().remove_reader(pipe.fileno())
                commands.put_nowait(("stop",))

        async with make_fake(provider, paths, speed) as fake:
            pipe.send(fake.port)
            asyncio.get_running_loop().add_reader(pipe.fileno(), readable)
            while True:
                command = await commands.get()
                if command[0] == "stop":
                    with contextlib.suppress(OSError):
                        pipe.send(fake_stats(fake))
                    return
                try:
                    answer = await execute(fake, command)
                except Exception as exc:  # reported to the parent, which raises it
                    answer = exc
                pipe.send(answer)

    uvloop.run(serve())


class FakeServer:
    """A fake exchange for a benchmark, in a child process (default) or on this event loop.

    ``async with FakeServer(...) as fake``: ``fake.port`` is bound; :meth:`command` scripts it;
    :attr:`final_stats` holds its counters once closed; :attr:`pid` is the process serving it.
    """

    def __init__(
        self, provider: str, paths: Sequence[Path], speed: float | None, *, in_process: bool = False
    ) -> None:
        self.provider = provider
        self.paths = [str(p) for p in paths]
        self.speed = speed
        self.in_process = in_process
        self.port = 0
        self.pid = os.getpid()
        self.final_stats: dict[str, Any] = {}
        self._fake: FakeBinance | FakeFinnhub | None = None
        self._process: multiprocessing.process.BaseProcess | None = None
        self._pipe: Connection | None = None
        self._lock = asyncio.Lock()

    @property
    def ws_url(self) -> str:
        """The fake's WebSocket base URL."""
        return f"ws://127.0.0.1:{self.port}"

    @property
    def rest_url(self) -> str:
        """The fake's REST base URL (Binance)."""
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> Self:
        if self.in_process:
            self._fake = make_fake(self.provider, self.paths, self.speed)
            await self._fake.start()
            self.port = self._fake.port
            return self
        # spawn, not fork: this process may already hold threads (chDB) and an event loop.
        context = multiprocessing.get_context("spawn")
        ours, theirs = context.Pipe()
        self._process = context.Process(
            target=serve_fake, args=(self.provider, self.paths, self.speed, theirs), daemon=True
        )
        self._process.start()
        theirs.close()
        self._pipe = ours
        self.pid = self._process.pid or 0
        self.port = await self._receive()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._fake is not None:
            self.final_stats = fake_stats(self._fake)
            await self._fake.close()
            return
        assert self._process is not None
        assert self._pipe is not None
        try:
            async with self._lock:
                self._pipe.send(("stop",))
                self.final_stats = await self._receive()
        finally:
            await asyncio.to_thread(self._process.join, 10.0)
            if self._process.is_alive():
                self._process.kill()
            self._pipe.close()

    async def command(self, *command: Any) -> Any:
        """Run a scripting command (see :func:`execute`) on the fake and return its answer."""
        if self._fake is not None:
            return await execute(self._fake, command)
        assert self._pipe is not None
        async with self._lock:
            self._pipe.send(command)
            answer = await self._receive()
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def _receive(self) -> Any:
        pipe = self._pipe
        assert pipe is not None
        if not await asyncio.to_thread(pipe.poll, 60.0):
            raise TimeoutError("the fake exchange process did not answer within 60 s")
        return pipe.recv()

    def cpu_seconds(self) -> float:
        """CPU time (user + system) of the process serving the fake so far."""
        times = psutil.Process(self.pid).cpu_times()
        return float(times.user + times.system)


# -- (b) end to end ----------------------------------------------------------------------------------


def engine_config(root: Path, provider: str, fake: FakeServer, bus: str) -> str:
    """The engine: the live source pointed at the fake, and the tick sink into chDB."""
    bus_section = f'kind = "local"\npath = "{root}/bus"' if bus == "local" else 'kind = "memory"'
    if provider == "binance":
        source = f"""
[modules.source]
type = "binance"
ws_url = "{fake.ws_url}"
rest_url = "{fake.rest_url}"
symbols = ["BTCUSDT"]
"""
    else:
        source = f"""
[modules.source]
type = "finnhub"
ws_url = "{fake.ws_url}"
token = "{FINNHUB_TOKEN}"
binance_rest_url = ""  # no disconnects in this run: nothing to backfill
symbols = ["{VENUE_PREFIX}BTCUSDT"]
"""
    return f"""
[engine]
name = "bench-feeds"
data_dir = "{root}"
stop_deadline_s = 60
log_level = "INFO"
report_interval_s = 10
[bus]
{bus_section}
[store]
kind = "chdb"
path = "{root}/chdb"
[objectstore]
kind = "memory"
[metrics]
port = 0
enabled = false
[admin]
socket = "{root}/admin.sock"
{source}
[modules.tick_sink]
type = "tick_sink"
"""


def own_cpu_seconds() -> float:
    """CPU time (user + system) of this process so far, every thread included."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def bench_e2e(provider: str, seconds: float, warmup: float, bus: str, in_process: bool) -> int:
    """Run the engine against the fake flat out; print the figures; returns an exit status."""
    paths = recording_paths(BTC_RECORDINGS)
    print(f"machine before: {await asyncio.to_thread(machine_load)}")
    where = "on the engine's event loop" if in_process else "in a child process with its own event loop"
    with tempfile.TemporaryDirectory(prefix="alphaengine-bench-feeds-") as tmp:
        root = Path(tmp)
        async with FakeServer(provider, paths, None, in_process=in_process) as fake:
            engine = Engine(loads(engine_config(root, provider, fake, bus), source="bench-feeds"))
            run = asyncio.ensure_future(engine.run(handle_signals=False))
            await engine.ready.wait()
            await asyncio.sleep(warmup)
            stored0 = metrics.total(metrics.TICKS_STORED)
            received0 = metrics.total(metrics.TICKS_RECEIVED)
            lag0 = len(engine.loop_lag.samples)
            published0 = (await fake.command("stats"))["published"]
            cpu0, fake_cpu0, t0 = own_cpu_seconds(), fake.cpu_seconds(), time.perf_counter()
            await asyncio.sleep(seconds)
            window = time.perf_counter() - t0
            cpu, fake_cpu = own_cpu_seconds() - cpu0, fake.cpu_seconds() - fake_cpu0
            stored = metrics.total(metrics.TICKS_STORED) - stored0
            received = metrics.total(metrics.TICKS_RECEIVED) - received0
            lag = list(engine.loop_lag.samples)[lag0:]
            published = (await fake.command("stats"))["published"] - published0
            machine_during = await asyncio.to_thread(machine_load)
            engine.request_stop("benchmark window over")
            summary = await run
        fake_final = fake.final_stats
        store = build_store(ChdbStoreConfig(path=str(root / "chdb")))
        await store.start()
        counts = (
            await store.query(
                "SELECT count() AS n, uniqExact(venue, symbol, trade_id) AS u, "
                "min(trade_id) AS lo, max(trade_id) AS hi FROM ticks"
            )
        ).to_pylist()[0]
        await store.close()
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    lag_q = metrics.quantiles_from_samples(lag, (0.5, 0.99, 1.0)) if lag else [0.0, 0.0, 0.0]
    print(f"\n{provider}: fake flat out {where} -> {provider} source -> {bus} bus -> tick sink -> chDB")
    print(f"window             {window:.1f} s after {warmup:g} s of warm-up")
    print(f"fake published     {published / window:,.0f} trades/s in the window")
    print(f"source emitted     {received / window:,.0f} ticks/s in the window (acknowledged by the bus)")
    print(f"stored             {stored / window:,.0f} ticks/s in the window")
    print(
        f"CPU in the window  this process {cpu / window:.2f} cores"
        + ("" if in_process else f", the fake's process {fake_cpu / window:.2f} cores")
    )
    print(
        f"event-loop lag     p50 {lag_q[0] * 1e3:.1f} ms, p99 {lag_q[1] * 1e3:.1f} ms, "
        f"max {lag_q[2] * 1e3:.1f} ms"
    )
    print(f"peak RSS           {peak_rss_mib:,.0f} MiB (this process)")
    print(f"whole run          {summary.line()}")
    print(
        f"fake connections   opened {fake_final['connections_opened']}, "
        f"closed {fake_final['connections_closed']}"
    )
    print(
        f"fake published     {fake_final['published']:,} trades in the whole run; the last "
        f"{fake_final['published'] - counts['n']:,} were in flight when the source closed its connection"
    )
    print(
        f"store              {counts['n']:,} rows, {counts['u']:,} unique, ids {counts['lo']}..{counts['hi']}"
    )
    ok = counts["n"] == counts["u"] == summary.ticks_received == summary.ticks_stored
    if provider == "binance":
        ok = ok and counts["hi"] - counts["lo"] + 1 == counts["n"]
    check = "every emitted tick stored exactly once" + (", ids contiguous" if provider == "binance" else "")
    print(f"{check}: {'yes' if ok else 'NO'}")
    print(f"machine during     {machine_during}")
    return 0 if ok else 1


def main() -> int:
    """Command line: ``parsers`` or ``e2e``."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    parsers = commands.add_parser("parsers", help="parser throughput on the real recordings")
    parsers.add_argument("--batch", type=int, nargs="+", default=[1, 16, 256, 2048], help="frames per call")
    parsers.add_argument("--repeat", type=int, default=7, help="passes per measurement (best and median)")
    parsers.add_argument("--max-calls", type=int, default=1000, help="most parser calls a pass")
    e2e = commands.add_parser("e2e", help="fake exchange flat out -> source -> bus -> tick sink -> chDB")
    e2e.add_argument("--provider", choices=["binance", "finnhub"], default="binance")
    e2e.add_argument("--seconds", type=float, default=30.0, help="measured window")
    e2e.add_argument("--warmup", type=float, default=5.0, help="seconds before the window starts")
    e2e.add_argument("--bus", choices=["memory", "local"], default="memory")
    e2e.add_argument("--fake-in-process", action="store_true", help="serve the fake on the engine's loop")
    args = parser.parse_args()
    if args.command == "parsers":
        return bench_parsers(args.batch, args.repeat, args.max_calls)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(bench_e2e(args.provider, args.seconds, args.warmup, args.bus, args.fake_in_process))


if __name__ == "__main__":
    sys.exit(main())
