"""Faults (d) and (e): the archiver killed between its steps, and S3 down while it archives.

The old days are the real recordings (2024-08-08 and 2024-08-09, UTC; long past every retention),
inserted into a fresh database of the ClickHouse server. ``alphaengine archive run`` runs as a subprocess
against that server and the S3 server (moto), exactly as an operator runs it, with one thing between it
and S3: a TCP proxy that forwards every request unchanged and can hold one back. Holding a request stops
the archiver at a known step without touching its code, because each step after the upload begins with
an S3 request (docs/archive.md, "Archiving one day"):

* holding the download of the day's object (step 3, verify) stops it after the upload, before the
  manifest row and the drop;
* holding the listing of the day's prefix (which deletes earlier generations, just before the drop) stops
  it after the manifest row, before the drop.

The archiver records the manifest row before it drops (so a dropped day always has an archive): the
point "between the drop and the manifest" of the issue is, in this order, the second one above. Once the
request is held, the archiver is SIGKILLed; the next run must finish with every day archived exactly
once: one manifest row and one object per day, holding exactly the day's rows, and the partitions gone.

With S3 down (``scripts/services/s3.sh stop``) in the middle of a run, nothing may be dropped: the day
whose upload could not be verified stays in the store, and so do the days after it. Once S3 is back,
the next run archives them and only then drops them. (moto keeps objects in memory, so the stop also
loses the upload that was not verified: the next run must not count on it.)
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import sys
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from urllib.parse import urlsplit

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alphaengine.config import ClickHouseStoreConfig, S3ObjectStoreConfig
from alphaengine.objectstore import S3ObjectStore
from alphaengine.sources.binance import BinanceTradeParser
from alphaengine.sources.replay import open_reader
from alphaengine.store import ClickHouseStore
from tests.conftest import real_file
from tests.services.faults import RECORDINGS, ClickHouseHttp, Services, run_id

DAY1, DAY2 = date(2024, 8, 8), date(2024, 8, 9)
TICK_COLUMNS = ["venue", "symbol", "trade_id", "ts_ns", "recv_ns", "price", "qty", "side"]
KEY = ["venue", "symbol", "trade_id"]
RUN_TIMEOUT_S = 180.0
_DAY_NS = 86_400 * 1_000_000_000
_REQUEST_LINE = re.compile(rb"(GET|PUT|POST|HEAD|DELETE) (\S+) HTTP/1\.[01]\r\n")

Hold = Callable[[str, str], bool]
"""Whether to hold a request, given its method and its target (path and query, percent-decoded)."""


class HoldingProxy:
    """A TCP proxy in front of the S3 server that forwards everything and can hold back one request.

    ``hold`` is asked about every request (the first bytes a client sends after the previous answer,
    which start with the request line); the first request it accepts is never forwarded, and ``held`` is
    set: the client waits for an answer that does not come. Every request line seen is in ``requests``.
    When either side closes, the proxy closes the other: a server that goes away is a closed connection
    to the client, and a server that is not there refuses the client's next connection.
    """

    def __init__(self, upstream_url: str) -> None:
        parts = urlsplit(upstream_url)
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.hold: Hold | None = None
        self.held = asyncio.Event()
        self.requests: list[tuple[str, str]] = []
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for handler in self._handlers:
            handler.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        writers = [client_writer]
        pipes: list[asyncio.Task[None]] = []
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self._upstream)
            writers.append(upstream_writer)
            pipes = [
                asyncio.ensure_future(self._forward_requests(client_reader, upstream_writer)),
                asyncio.ensure_future(self._pipe(upstream_reader, client_writer)),
            ]
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        except OSError:
            pass  # nothing listens upstream: the client sees its connection closed
        finally:
            for writer in writers:
                writer.transport.abort()
            for pipe in pipes:
                pipe.cancel()
            await asyncio.gather(*pipes, return_exceptions=True)
            self._handlers.discard(handler)

    async def _forward_requests(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(64 * 1024):
            line = _REQUEST_LINE.match(data)
            if line is not None:
                request = (line[1].decode(), urllib.parse.unquote(line[2].decode()))
                self.requests.append(request)
                if self.hold is not None and not self.held.is_set() and self.hold(*request):
                    self.held.set()
                    await asyncio.Event().wait()  # never forwarded; ends when the connection does
            writer.write(data)
            await writer.drain()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(64 * 1024):
            writer.write(data)
            await writer.drain()


def object_key(day: date) -> str:
    return f"ticks/date={day.isoformat()}/part-0.parquet"


def verify_download(day: date) -> Hold:
    """The archiver reading the day's object back (step 3): after the upload, before the manifest row."""
    return lambda method, target: method == "GET" and target.endswith("/" + object_key(day))


def prefix_listing(day: date) -> Hold:
    """The archiver listing the day's objects (to delete old ones): after the manifest, before the drop."""
    return lambda method, target: (
        method == "GET" and "list-type=2" in target and f"prefix=ticks/date={day.isoformat()}/" in target
    )


@dataclass(frozen=True, slots=True)
class Setup:
    """One test's database, bucket, configuration and the ticks it put in the store."""

    services: Services
    ch: ClickHouseHttp
    store_config: ClickHouseStoreConfig
    s3_config: S3ObjectStoreConfig
    config: Path
    proxy: HoldingProxy
    ticks: pl.DataFrame
    """Every tick inserted, as the store holds it, sorted by key."""

    def day_rows(self, day: date) -> pl.DataFrame:
        days = (pl.col("ts_ns") // _DAY_NS).cast(pl.Int64)
        return self.ticks.filter(days == (day - date(1970, 1, 1)).days)


async def insert_recordings(config: ClickHouseStoreConfig) -> pl.DataFrame:
    """The recordings' trades into the store's ticks table; returns what the store then holds."""
    store = ClickHouseStore(config)
    await store.start()
    try:
        parser = BinanceTradeParser("faults")
        for name in RECORDINGS:
            reader = open_reader(real_file(name), parser, 5_000)
            try:
                while (chunk := reader.read()) is not None:
                    if chunk.num_rows:
                        await store.insert("ticks", pa.Table.from_batches([chunk]))
            finally:
                reader.close()
        stored = await store.query(
            f"SELECT {', '.join(TICK_COLUMNS)} FROM ticks FINAL ORDER BY {', '.join(KEY)}"
        )
    finally:
        await store.close()
    return pl.from_arrow(stored)  # type: ignore[return-value]


@pytest.fixture
async def setup(services_env: dict[str, str], tmp_path: Path) -> AsyncIterator[Setup]:
    services = Services.from_env(services_env)
    run = run_id()
    store_config = ClickHouseStoreConfig(
        host=services.clickhouse_host, port=services.clickhouse_port, database=f"faults_{run}"
    )
    proxy = HoldingProxy(services.s3_endpoint_url)
    await proxy.start()
    s3_config = S3ObjectStoreConfig(
        bucket=f"faults-{run}",
        endpoint_url=services.s3_endpoint_url,
        access_key_id="test",
        secret_access_key="test",
    )
    config = tmp_path / "archive.toml"
    config.write_text(
        f"""
[engine]
name = "faults-{run}"
data_dir = "{tmp_path}/var"

[store]
kind = "clickhouse"
host = "{store_config.host}"
port = {store_config.port}
database = "{store_config.database}"

[objectstore]
kind = "s3"
bucket = "{s3_config.bucket}"
endpoint_url = "{proxy.url}"
access_key_id = "test"
secret_access_key = "test"

[metrics]
port = 0
enabled = false

[admin]
socket = "{tmp_path}/var/admin.sock"
"""
    )
    ch = ClickHouseHttp(services.clickhouse_url, store_config.database)
    try:
        ticks = await insert_recordings(store_config)
        yield Setup(services, ch, store_config, s3_config, config, proxy, ticks)
    finally:
        await proxy.close()
        ch.drop_database()


class ArchiveRun:
    """``alphaengine archive run --config <config> --table ticks`` as a subprocess."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, config: Path) -> ArchiveRun:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "alphaengine",
            "archive",
            "run",
            "--config",
            str(config),
            "--table",
            "ticks",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        return cls(proc)

    async def finish(self) -> tuple[int, str, str]:
        """Exit status, stdout and stderr once it exits."""
        async with asyncio.timeout(RUN_TIMEOUT_S):
            out, err = await self.proc.communicate()
        assert self.proc.returncode is not None
        return self.proc.returncode, out.decode(), err.decode()

    async def wait_for(self, event: asyncio.Event) -> None:
        """Until ``event`` is set (the proxy held the request); the run ending first fails the test."""
        waiter = asyncio.ensure_future(event.wait())
        exited = asyncio.ensure_future(self.proc.wait())
        try:
            await asyncio.wait({waiter, exited}, timeout=RUN_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            exited.cancel()
        if not event.is_set():
            code, out, err = await self.finish()
            pytest.fail(f"the archive run ended ({code}) before it reached the fault:\n{out}\n{err}")

    async def kill(self) -> None:
        """SIGKILL: the archiver stops where it is, with no cleanup."""
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.communicate()
        assert self.proc.returncode == -signal.SIGKILL


async def start_archive(setup: Setup, hold: Hold | None = None) -> ArchiveRun:
    """Start an archive run whose S3 requests go through the proxy, holding the one ``hold`` picks."""
    setup.proxy.hold = hold
    setup.proxy.held.clear()
    return await ArchiveRun.start(setup.config)


async def archive(setup: Setup) -> tuple[int, str, str]:
    """One archive run to its end: exit status, stdout, stderr."""
    return await (await start_archive(setup)).finish()


async def archive_killed_at(setup: Setup, hold: Hold) -> None:
    """One archive run, SIGKILLed as soon as the proxy holds the request ``hold`` picks."""
    run = await start_archive(setup, hold)
    await run.wait_for(setup.proxy.held)
    await run.kill()


@contextlib.asynccontextmanager
async def direct_s3(setup: Setup) -> AsyncIterator[S3ObjectStore]:
    """The bucket, straight from the S3 server (not through the proxy)."""
    objects = S3ObjectStore(setup.s3_config)
    await objects.start()
    try:
        yield objects
    finally:
        await objects.close()


def manifest(setup: Setup) -> list[tuple[int, str, int]]:
    """(day, object key, rows) of every archived day."""
    rows = setup.ch.query(
        "SELECT day, object_key, rows FROM archive_manifest FINAL WHERE \"table\" = 'ticks' ORDER BY day"
    )
    return list(rows.iter_rows())


def stored_days(setup: Setup) -> dict[date, int]:
    """Ticks left in the store by UTC day (after FINAL)."""
    rows = setup.ch.query("SELECT toDate(ts) AS day, count() AS n FROM ticks FINAL GROUP BY day ORDER BY day")
    return {date.fromisoformat(day): n for day, n in rows.iter_rows()}


def entry(day: date, setup: Setup) -> tuple[int, str, int]:
    """The manifest row a day archived once, completely, has."""
    return int(day.strftime("%Y%m%d")), object_key(day), setup.day_rows(day).height


async def object_keys(setup: Setup) -> list[str]:
    """The keys of the bucket's tick archives, as the S3 server lists them."""
    async with direct_s3(setup) as objects:
        return [info.key for info in await objects.list("ticks/")]


async def assert_archived_exactly_once(setup: Setup) -> None:
    """Both days: one manifest row, one object holding exactly the day's rows, nothing left in the store."""
    assert manifest(setup) == [entry(DAY1, setup), entry(DAY2, setup)]
    assert stored_days(setup) == {}
    parts = f"SELECT count() FROM system.parts WHERE database = '{setup.ch.database}' AND table = 'ticks'"
    assert setup.ch.scalar(f"{parts} AND active") == 0
    async with direct_s3(setup) as objects:
        assert [info.key for info in await objects.list("ticks/")] == [object_key(DAY1), object_key(DAY2)]
        for day in (DAY1, DAY2):
            data = await objects.get(object_key(day))
            archived = pl.from_arrow(pq.read_table(pa.BufferReader(data), columns=TICK_COLUMNS))
            assert isinstance(archived, pl.DataFrame)
            assert archived.equals(setup.day_rows(day)), f"{day}: the archive differs from the day's rows"


async def test_killed_after_the_upload_before_the_manifest_the_next_run_archives_every_day_once(
    setup: Setup,
) -> None:
    days = stored_days(setup)
    assert set(days) == {DAY1, DAY2}
    assert sum(days.values()) == setup.ticks.height

    await archive_killed_at(setup, verify_download(DAY2))

    # DAY1 went through every step; DAY2 is uploaded, not yet verified, recorded or dropped.
    assert ("PUT", f"/{setup.s3_config.bucket}/{object_key(DAY2)}") in setup.proxy.requests
    assert manifest(setup) == [entry(DAY1, setup)]
    assert stored_days(setup) == {DAY2: days[DAY2]}
    assert await object_keys(setup) == [object_key(DAY1), object_key(DAY2)]

    code, out, err = await archive(setup)

    assert code == 0, err
    assert "archived 1 partition(s)" in out
    await assert_archived_exactly_once(setup)


async def test_killed_after_the_manifest_before_the_drop_the_next_run_archives_every_day_once(
    setup: Setup,
) -> None:
    days = stored_days(setup)

    await archive_killed_at(setup, prefix_listing(DAY1))

    # DAY1 is uploaded, verified and recorded, but still in the store; DAY2 was not begun.
    assert manifest(setup) == [entry(DAY1, setup)]
    assert stored_days(setup) == days
    assert await object_keys(setup) == [object_key(DAY1)]

    code, out, err = await archive(setup)

    assert code == 0, err
    assert "archived 2 partition(s)" in out
    assert "merged" not in out  # DAY1's rows are the recorded ones: the same object again, no new part
    await assert_archived_exactly_once(setup)


@pytest.fixture
def s3_comes_back(setup: Setup) -> Iterator[None]:
    """Whatever happens in the test, the S3 server runs again afterwards."""
    yield
    setup.services.script("s3", "start")


async def test_s3_down_while_archiving_nothing_is_dropped_and_the_next_run_archives_then_drops(
    setup: Setup, s3_comes_back: None
) -> None:
    days = stored_days(setup)
    run = await start_archive(setup, verify_download(DAY1))
    await run.wait_for(setup.proxy.held)
    # DAY1 is uploaded; S3 goes away before the archiver reads it back.
    await asyncio.to_thread(setup.services.script, "s3", "stop")

    code, out, err = await run.finish()

    assert code == 1, out + err
    assert ("PUT", f"/{setup.s3_config.bucket}/{object_key(DAY1)}") in setup.proxy.requests
    assert re.search(r"S3 get_file .*(cannot reach S3|the connection to S3 failed)", err), err
    assert stored_days(setup) == days  # nothing dropped: no day had a verified archive
    assert manifest(setup) == []

    code, _, err = await archive(setup)  # S3 still down: the run fails before it touches a day

    assert code == 1
    assert re.search(r"S3 start .*(cannot reach S3|the connection to S3 failed)", err), err
    assert stored_days(setup) == days
    assert manifest(setup) == []

    await asyncio.to_thread(setup.services.script, "s3", "start")
    code, out, err = await archive(setup)

    assert code == 0, err
    assert "archived 2 partition(s)" in out
    await assert_archived_exactly_once(setup)
