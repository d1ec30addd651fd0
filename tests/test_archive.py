"""The archiver: old days to verified Parquet in the object store, crash-safe, restorable."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from prometheus_client import REGISTRY

from alphaengine.archive import (
    Archive,
    ArchiveError,
    Archiver,
    ArchiverSettings,
    ContentChecksum,
    object_key,
    today_utc,
)
from alphaengine.bus.memory import MemoryBus
from alphaengine.clock import SimClock
from alphaengine.config import loads
from alphaengine.errors import ConfigError, ObjectStoreError
from alphaengine.kernel import admin
from alphaengine.kernel.module import Context, ModuleState
from alphaengine.objectstore import LocalObjectStore, ObjectInfo, ObjectStore
from alphaengine.store import BARS, TICKS, ChdbStore, MemoryStore, Store
from alphaengine.store.schema import ARCHIVE_MANIFEST

NS = 1_000_000_000
DAY_NS = 86_400 * NS
TODAY = date(2026, 11, 24)
NOW_NS = int(datetime(2026, 11, 24, 13, 30, tzinfo=UTC).timestamp()) * NS
SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT")


def day_ns(day: date) -> int:
    return int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()) * NS


def ticks_on(
    day: date, n: int, *, first_id: int | None = None, symbols: tuple[str, ...] = SYMBOLS
) -> pa.Table:
    """``n`` trades spread over one UTC day (its first and last nanosecond included), several venues and
    symbols. Trade ids are unique across days unless ``first_id`` says otherwise.
    """
    if first_id is None:
        first_id = day.toordinal() * 1_000_000
    rng = np.random.default_rng(day.toordinal() + first_id)
    ts = np.sort(rng.integers(0, DAY_NS, n)) + day_ns(day)
    ts[0], ts[-1] = day_ns(day), day_ns(day) + DAY_NS - 1
    return pa.Table.from_pydict(
        {
            "venue": ["okx" if i % 5 == 0 else "binance" for i in range(n)],
            "symbol": [symbols[i % len(symbols)] for i in range(n)],
            "trade_id": np.arange(first_id, first_id + n, dtype=np.int64),
            "ts_ns": ts,
            "recv_ns": ts + rng.integers(100_000, 5_000_000, n),
            "price": 97_000.0 * np.exp(np.cumsum(rng.normal(0, 1e-4, n))),
            "qty": rng.pareto(2.5, n) + 1e-8,
            "side": rng.choice(np.array([-1, 1], dtype=np.int8), n),
        },
        schema=TICKS.input_schema,
    )


def bars_on(day: date, n: int) -> pa.Table:
    """``n`` one-minute bars of two symbols from the start of a day."""
    i = np.arange(n)
    close = 100.0 + np.sin(i / 7.0)
    return pa.Table.from_pydict(
        {
            "venue": ["binance"] * n,
            "symbol": [SYMBOLS[k % 2] for k in range(n)],
            "interval_s": np.full(n, 60, dtype=np.int32),
            "ts_ns": day_ns(day) + (i // 2) * 60 * NS,
            "open": close - 0.1,
            "high": close + 0.3,
            "low": close - 0.4,
            "close": close,
            "volume": 1.5 + i,
            "quote_volume": (1.5 + i) * close,
            "vwap": close - 0.05,
            "trade_count": 10 + i,
            "buy_volume": 1.0 + i / 2,
            "sell_volume": 0.5 + i / 2,
            "first_trade_id": 1000 * i,
            "last_trade_id": 1000 * i + 999,
        },
        schema=BARS.input_schema,
    )


def days_ago(n: int) -> date:
    return TODAY - timedelta(days=n)


async def fill(store: Store, tick_days: range, bar_days: range = range(0), per_day: int = 300) -> None:
    """Ticks on ``TODAY - d`` for d in tick_days, bars likewise."""
    for d in tick_days:
        await store.insert("ticks", ticks_on(days_ago(d), per_day))
    for d in bar_days:
        await store.insert("bars", bars_on(days_ago(d), 40))


KEYS = {"ticks": TICKS.key, "bars": BARS.key}


async def rows(store: Store, table: str) -> list[dict[str, Any]]:
    """Every row of a table in key order."""
    result = await store.query(f"SELECT * FROM {table} FINAL ORDER BY {', '.join(KEYS[table])}")
    return result.to_pylist()  # type: ignore[no-any-return]


def by_key(table: str, found: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(found, key=lambda r: tuple(r[k] for k in KEYS[table]))


def days(partitions: dict[str, int]) -> list[date]:
    return [datetime.strptime(p, "%Y%m%d").replace(tzinfo=UTC).date() for p in partitions]


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def eventually(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.01)


async def restore_everything(source: Store, objects: ObjectStore, scratch: Path) -> MemoryStore:
    """A new, empty store with every archived day restored into it from ``objects``.

    Only the manifest rows are copied from ``source``: the rows themselves come from the archives.
    """
    target = MemoryStore()
    await target.start()
    columns = ", ".join(f'"{c.name}"' for c in ARCHIVE_MANIFEST.input_columns)
    manifest = await source.query(f"SELECT {columns} FROM archive_manifest FINAL")
    await target.insert("archive_manifest", manifest.cast(ARCHIVE_MANIFEST.input_schema))
    archive = Archive(target, objects, scratch, SimClock(NOW_NS))
    for entry in await archive.manifest():
        await archive.restore(entry.table, entry.day)
    return target


@pytest.fixture
async def store() -> AsyncIterator[MemoryStore]:
    store = MemoryStore()
    await store.start()
    yield store
    await store.close()


@pytest.fixture
async def objects(tmp_path: Path) -> AsyncIterator[LocalObjectStore]:
    objects = LocalObjectStore(tmp_path / "objects")
    await objects.start()
    yield objects
    await objects.close()


# -- which days --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["memory", "chdb"])
async def test_days_older_than_the_cutoff_are_archived_and_newer_ones_untouched(
    tmp_path: Path, objects: LocalObjectStore, kind: str
) -> None:
    store: Store = MemoryStore() if kind == "memory" else ChdbStore(tmp_path / "chdb")
    await store.start()
    try:
        await fill(store, tick_days=range(11), bar_days=range(29, 33))
        recent_ticks = [r for r in await rows(store, "ticks") if r["ts"].date() >= days_ago(7)]
        recent_bars = [r for r in await rows(store, "bars") if r["ts"].date() >= days_ago(30)]
        clock = SimClock(NOW_NS)
        archive = Archive(store, objects, tmp_path / "scratch", clock)
        cutoffs = ArchiverSettings().cutoffs(today_utc(clock))
        assert cutoffs == {"ticks": days_ago(7), "bars": days_ago(30)}

        reports = await archive.run(cutoffs)

        archived = [(days_ago(d), "ticks") for d in (10, 9, 8)] + [(days_ago(d), "bars") for d in (32, 31)]
        assert sorted((r.day, r.table) for r in reports) == sorted(archived)
        assert days(await store.partitions("ticks")) == [days_ago(d) for d in range(7, -1, -1)]
        assert days(await store.partitions("bars")) == [days_ago(30), days_ago(29)]
        assert await rows(store, "ticks") == recent_ticks
        assert await rows(store, "bars") == recent_bars
        manifest = await archive.manifest()
        assert [(e.table, e.day, e.rows) for e in manifest] == [
            ("bars", days_ago(32), 40),
            ("bars", days_ago(31), 40),
            ("ticks", days_ago(10), 300),
            ("ticks", days_ago(9), 300),
            ("ticks", days_ago(8), 300),
        ]
        assert [i.key for i in await objects.list()] == sorted(e.object_key for e in manifest)
        assert manifest[2].object_key == "ticks/date=2026-11-14/part-0.parquet"
        assert sample("alphaengine_archive_partitions_pending", table="ticks") == 0
        assert not list((tmp_path / "scratch").iterdir())  # no local file left behind
    finally:
        await store.close()


async def test_an_archive_is_a_plain_sorted_parquet_file_with_every_column(
    tmp_path: Path, store: MemoryStore, objects: LocalObjectStore
) -> None:
    await fill(store, tick_days=[9])
    expected = pl.from_arrow(await store.query("SELECT * FROM ticks FINAL ORDER BY venue, symbol, trade_id"))
    await Archive(store, objects, tmp_path / "scratch", SimClock(NOW_NS)).run({"ticks": days_ago(7)})

    path = tmp_path / "objects" / object_key("ticks", days_ago(9))
    parquet = pq.ParquetFile(path)
    # zstd, a row group per (venue, symbol), sorted by the table key; any Parquet reader can read it.
    assert parquet.metadata.row_group(0).column(0).compression == "ZSTD"
    assert parquet.num_row_groups == 6
    assert parquet.metadata.metadata[b"alphaengine.rows"] == b"300"
    assert pl.read_parquet(path).equals(expected)  # type: ignore[arg-type]


# -- round trip --------------------------------------------------------------------------------------


async def test_the_archive_round_trips_exactly_into_an_empty_store(
    tmp_path: Path, objects: LocalObjectStore
) -> None:
    # Exported from chDB (real ClickHouse SQL, including a symbol that needs quoting), restored into a
    # different, empty store: the rows come back identical, floats and times to the last bit.
    store = ChdbStore(tmp_path / "chdb")
    await store.start()
    try:
        await fill(store, tick_days=range(8, 11), bar_days=[31])
        await store.insert("ticks", ticks_on(days_ago(9), 50, first_id=10_000, symbols=("O'BR\\IEN",)))
        original = {t: await rows(store, t) for t in ("ticks", "bars")}
        await Archive(store, objects, tmp_path / "scratch", SimClock(NOW_NS)).run(
            {"ticks": days_ago(7), "bars": days_ago(30)}
        )
        assert await store.partitions("ticks") == {}
        restored = await restore_everything(store, objects, tmp_path / "scratch")
    finally:
        await store.close()

    assert len(original["ticks"]) == 950
    assert {t: await rows(restored, t) for t in ("ticks", "bars")} == original


async def test_restore_is_idempotent_and_the_next_run_archives_the_day_again_unchanged(
    tmp_path: Path, store: MemoryStore, objects: LocalObjectStore
) -> None:
    await fill(store, tick_days=[9])
    original = await rows(store, "ticks")
    archive = Archive(store, objects, tmp_path / "scratch", SimClock(NOW_NS))
    await archive.run({"ticks": days_ago(7)})
    first = (await archive.manifest())[0]

    assert (await archive.restore("ticks", days_ago(9)))[1] == 300
    assert (await archive.restore("ticks", days_ago(9)))[1] == 300
    assert await rows(store, "ticks") == original

    # The restored day is older than the cutoff: archived again to the same object, with the same content.
    (report,) = await archive.run({"ticks": days_ago(7)})
    assert (report.object_key, report.merged) == (first.object_key, False)
    assert (await archive.manifest())[0].content_checksum == first.content_checksum
    assert await store.partitions("ticks") == {}


async def test_restoring_a_day_that_was_never_archived_is_an_error(
    tmp_path: Path, store: MemoryStore, objects: LocalObjectStore
) -> None:
    with pytest.raises(ArchiveError, match="no archive of ticks for 2026-11-01"):
        await Archive(store, objects, tmp_path, SimClock(NOW_NS)).restore("ticks", date(2026, 11, 1))


# -- late rows -----------------------------------------------------------------------------------------


async def test_late_rows_for_an_archived_day_are_merged_into_a_new_generation(
    tmp_path: Path, store: MemoryStore, objects: LocalObjectStore
) -> None:
    await fill(store, tick_days=[9])
    archive = Archive(store, objects, tmp_path / "scratch", SimClock(NOW_NS))
    await archive.run({"ticks": days_ago(7)})
    # A replay of old recordings: new trades of the archived day, and one trade archived already.
    late = ticks_on(days_ago(9), 20, first_id=5_000)
    again = ticks_on(days_ago(9), 300).slice(17, 1)
    await store.insert("ticks", pa.concat_tables([late, again]))

    (report,) = await archive.run({"ticks": days_ago(7)})

    assert report.merged
    assert report.rows == 320
    assert report.object_key == object_key("ticks", days_ago(9), generation=1)
    assert [i.key for i in await objects.list()] == [report.object_key]  # generation 0 is gone
    assert await store.partitions("ticks") == {}
    restored = await restore_everything(store, objects, tmp_path / "scratch")
    expected = MemoryStore()
    await expected.start()
    await expected.insert("ticks", pa.concat_tables([ticks_on(days_ago(9), 300), late]))
    assert await rows(restored, "ticks") == await rows(expected, "ticks")


# -- crash safety --------------------------------------------------------------------------------------


class Killed(BaseException):
    """The process dies here (a BaseException, so that nothing on the way handles it)."""


class KillSwitch:
    """Kills the process the ``occurrence``-th time the run reaches ``step``."""

    def __init__(self, step: str | None = None, occurrence: int = 1) -> None:
        self.step = step
        self.occurrence = occurrence
        self.seen = 0

    def reached(self, step: str) -> None:
        if step == self.step:
            self.seen += 1
            if self.seen == self.occurrence:
                raise Killed(step)


class FaultyStore:
    """A store that dies at a chosen step (before or after the real operation)."""

    def __init__(self, inner: Store, switch: KillSwitch) -> None:
        self.inner = inner
        self.switch = switch

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()

    async def applied_migrations(self) -> list[int]:
        return await self.inner.applied_migrations()

    async def insert(self, table: str, rows: pa.Table) -> int:
        self.switch.reached(f"insert {table}")
        written = await self.inner.insert(table, rows)
        self.switch.reached(f"inserted {table}")
        return written

    async def query(self, sql: str) -> pa.Table:
        if " AND venue = " in sql:
            self.switch.reached("export a chunk")
        return await self.inner.query(sql)

    async def drop_partition(self, table: str, partition: str) -> None:
        self.switch.reached("drop")
        await self.inner.drop_partition(table, partition)
        self.switch.reached("dropped")

    async def partitions(self, table: str) -> dict[str, int]:
        return await self.inner.partitions(table)


class FaultyObjects:
    """An object store that dies at a chosen step, fails (``down``), or corrupts what it returns."""

    def __init__(self, inner: ObjectStore, switch: KillSwitch | None = None) -> None:
        self.inner = inner
        self.switch = switch or KillSwitch()
        self.down = False
        self.flip_byte_at: int | None = None

    def _check(self, step: str) -> None:
        if self.down:
            raise ObjectStoreError(f"{step}: connection refused (S3 is down)")
        self.switch.reached(step)

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()

    async def put(self, key: str, data: bytes) -> None:
        self._check("put")
        await self.inner.put(key, data)

    async def put_file(self, key: str, path: Path) -> None:
        self._check("upload")
        await self.inner.put_file(key, path)
        self.switch.reached("uploaded")

    async def get(self, key: str) -> bytes:
        self._check("get")
        return await self.inner.get(key)

    async def get_file(self, key: str, path: Path) -> None:
        self._check("download")
        await self.inner.get_file(key, path)
        if self.flip_byte_at is not None:
            await asyncio.to_thread(flip_byte, path, self.flip_byte_at)

    async def head(self, key: str) -> ObjectInfo | None:
        self._check("head")
        return await self.inner.head(key)

    async def list(self, prefix: str = "") -> list[ObjectInfo]:
        self._check("list")
        return await self.inner.list(prefix)

    async def delete(self, key: str) -> None:
        self._check("delete")
        await self.inner.delete(key)


def flip_byte(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


KILL_POINTS = [
    "export a chunk",  # in the middle of exporting a day
    "upload",  # exported, not uploaded
    "uploaded",  # uploaded, not verified
    "download",  # verifying
    "insert archive_manifest",  # verified, no manifest row
    "inserted archive_manifest",  # manifest row, partition not dropped
    "list",  # manifest row, earlier generations not yet removed
    "drop",  # about to drop
    "dropped",  # dropped, not yet reported
]


@pytest.mark.parametrize("step", KILL_POINTS)
async def test_a_kill_at_any_step_then_a_rerun_archives_every_day_exactly_once(
    tmp_path: Path, store: MemoryStore, objects: LocalObjectStore, step: str
) -> None:
    await fill(store, tick_days=range(6, 11), bar_days=[31])
    original = {t: await rows(store, t) for t in ("ticks", "bars")}
    cutoffs = {"ticks": days_ago(7), "bars": days_ago(30)}
    # The second time the step comes: for most steps that is on the second day, after a complete first.
    switch = KillSwitch(step, occurrence=2)
    dying = Archive(
        FaultyStore(store, switch), FaultyObjects(objects, switch), tmp_path / "s", SimClock(NOW_NS)
    )
    with pytest.raises(Killed):
        await dying.run(cutoffs)

    await Archive(store, objects, tmp_path / "s", SimClock(NOW_NS)).run(cutoffs)

    archived = [("bars", days_ago(31))] + [("ticks", days_ago(d)) for d in (10, 9, 8)]
    manifest = await Archive(store, objects, tmp_path / "s", SimClock(NOW_NS)).manifest()
    assert [(e.table, e.day) for e in manifest] == archived
    # Exactly one object per day, and the rows are those of the first attempt: no new generation.
    assert [i.key for i in await objects.list()] == sorted(object_key(t, d) for t, d in archived)
    assert days(await store.partitions("ticks")) == [days_ago(d) for d in (7, 6)]
    assert await store.partitions("bars") == {}
    restored = await restore_everything(store, objects, tmp_path / "s")
    for table in ("ticks", "bars"):
        # Every row is in exactly one place: an archive or the store.
        in_archives, still_hot = await rows(restored, table), await rows(store, table)
        assert by_key(table, in_archives + still_hot) == original[table]


async def test_a_restore_killed_midway_is_completed_by_the_next_run_without_a_new_generation(
    tmp_path: Path, store: MemoryStore, objects: LocalObjectStore
) -> None:
    await fill(store, tick_days=[9])
    original = await rows(store, "ticks")
    archive = Archive(store, objects, tmp_path / "scratch", SimClock(NOW_NS))
    await archive.run({"ticks": days_ago(7)})
    dying = Archive(FaultyStore(store, KillSwitch("inserted ticks", 2)), objects, tmp_path, SimClock(NOW_NS))
    with pytest.raises(Killed):
        await dying.restore("ticks", days_ago(9))
    assert 0 < len(await rows(store, "ticks")) < 300  # some row groups restored, not all

    (report,) = await archive.run({"ticks": days_ago(7)})

    assert (report.rows, report.merged, report.object_key) == (300, False, object_key("ticks", days_ago(9)))
    assert await rows(await restore_everything(store, objects, tmp_path / "scratch"), "ticks") == original


async def test_a_corrupted_upload_is_detected_and_nothing_is_dropped(
    tmp_path: Path, store: MemoryStore, objects: LocalObjectStore
) -> None:
    await fill(store, tick_days=range(8, 11))
    before = await store.partitions("ticks")
    corrupting = FaultyObjects(objects)
    corrupting.flip_byte_at = 1000  # in the data pages, past the magic bytes

    with pytest.raises(ArchiveError, match="3 of 3 partition") as failed:
        await Archive(store, corrupting, tmp_path, SimClock(NOW_NS)).run({"ticks": days_ago(7)})

    assert "differs from the file written" in str(failed.value)
    assert await store.partitions("ticks") == before
    assert await Archive(store, objects, tmp_path, SimClock(NOW_NS)).manifest() == []
    assert sample("alphaengine_archive_partitions_pending", table="ticks") == 3


async def test_rows_arriving_while_a_day_is_archived_are_kept_and_merged_by_the_next_run(
    tmp_path: Path, store: MemoryStore, objects: LocalObjectStore
) -> None:
    await fill(store, tick_days=[9])
    straggler = ticks_on(days_ago(9), 1, first_id=777_777)

    class SinkMeanwhile(FaultyStore):
        """A tick sink inserts a late trade of the day just before the manifest row is written."""

        async def insert(self, table: str, rows: pa.Table) -> int:
            if table == "archive_manifest":
                await self.inner.insert("ticks", straggler)
            return await self.inner.insert(table, rows)

    racing = Archive(SinkMeanwhile(store, KillSwitch()), objects, tmp_path, SimClock(NOW_NS))
    with pytest.raises(ArchiveError, match=r"\+1 row\(s\) arrived while it was archived"):
        await racing.run({"ticks": days_ago(7)})
    assert await store.partitions("ticks") == {"20261115": 301}

    (report,) = await Archive(store, objects, tmp_path, SimClock(NOW_NS)).run({"ticks": days_ago(7)})

    assert (report.rows, report.merged) == (301, True)
    assert await store.partitions("ticks") == {}


# -- the module ----------------------------------------------------------------------------------------


async def test_module_keeps_running_through_an_object_store_outage_and_archives_once_it_is_back(
    tmp_path: Path, store: MemoryStore, objects: LocalObjectStore
) -> None:
    await fill(store, tick_days=range(6, 11))
    s3 = FaultyObjects(objects)
    s3.down = True
    clock = SimClock(NOW_NS)
    ctx = Context(bus=MemoryBus(), store=store, objects=s3, clock=clock, data_dir=tmp_path)
    module = Archiver("archiver", ArchiverSettings(interval_s=600), ctx)
    errors, successes = (
        sample("alphaengine_archive_runs_total", result="error"),
        sample("alphaengine_archive_runs_total", result="success"),
    )
    ticks_archived = sample("alphaengine_archived_rows_total", table="ticks")

    await module.start()
    try:
        await eventually(lambda: sample("alphaengine_archive_runs_total", result="error") == errors + 1)
        assert module.state is ModuleState.RUNNING
        assert "S3 is down" in module.health()["last_error"]
        assert len(await store.partitions("ticks")) == 5  # nothing dropped

        s3.down = False
        clock.advance(600)  # the next interval

        await eventually(lambda: sample("alphaengine_archive_runs_total", result="success") == successes + 1)
        assert days(await store.partitions("ticks")) == [days_ago(7), days_ago(6)]
        assert sample("alphaengine_archived_rows_total", table="ticks") == ticks_archived + 900
        assert sample("alphaengine_archive_last_success_timestamp_seconds") == (NOW_NS + 600 * NS) / 1e9
        assert module.health()["last_error"] == ""
        assert module.state is ModuleState.RUNNING
    finally:
        await module.stop()
    assert module.state is ModuleState.STOPPED


async def test_stopping_the_module_in_the_middle_of_a_day_loses_nothing(
    tmp_path: Path, store: MemoryStore, objects: LocalObjectStore
) -> None:
    await fill(store, tick_days=range(8, 11), per_day=30_000)
    original = await rows(store, "ticks")
    ctx = Context(bus=MemoryBus(), store=store, objects=objects, clock=SimClock(NOW_NS), data_dir=tmp_path)
    module = Archiver("archiver", ArchiverSettings(tables=("ticks",)), ctx)
    scratch = tmp_path / "archive-scratch"

    await module.start()
    await eventually(lambda: scratch.is_dir() and any(scratch.iterdir()))  # a day is being archived
    await module.stop()  # cancels the run wherever it is

    assert module.state is ModuleState.STOPPED
    await Archive(store, objects, tmp_path / "again", SimClock(NOW_NS)).run({"ticks": days_ago(7)})
    assert await store.partitions("ticks") == {}
    assert await rows(await restore_everything(store, objects, tmp_path / "r"), "ticks") == original


async def test_module_settings_are_checked_by_the_config_loader() -> None:
    base = '[metrics]\nport = 0\n[admin]\nsocket = "a.sock"\n[modules.archiver]\ntype = "archiver"\n'
    loaded = loads(base + 'archive_after_days = 3\ntables = ["ticks"]\n')
    settings = loaded.module("archiver").settings
    assert isinstance(settings, ArchiverSettings)
    assert settings.cutoffs(TODAY) == {"ticks": days_ago(3)}
    assert settings.cutoffs(TODAY, tables=("bars",), before=date(2026, 1, 1)) == {"bars": date(2026, 1, 1)}

    with pytest.raises(ConfigError) as bad:
        loads(base + 'archive_after_days = 0\ntables = ["fills"]\nkeep = 1\n')
    problems = sorted(p.split(":")[0] for p in bad.value.problems)
    assert problems == [
        "modules.archiver.archive_after_days",
        "modules.archiver.keep",
        "modules.archiver.tables[0]",
    ]


# -- the content checksum ------------------------------------------------------------------------------


def _checksum(*chunks: pa.Table) -> str:
    checksum = ContentChecksum(
        pa.schema([pa.field(c.name, c.arrow_type, nullable=False) for c in TICKS.columns])
    )
    for chunk in chunks:
        checksum.update(chunk)
    return checksum.hexdigest()


def _with_ts(rows: pa.Table) -> pa.Table:
    ts = pa.array((rows.column("ts_ns").to_numpy() // NS), pa.int64()).cast(pa.timestamp("s", tz="UTC"))
    return rows.add_column(0, "ts", ts)


def test_checksum_ignores_chunking_and_parquet_encoding_but_not_content(tmp_path: Path) -> None:
    rows = _with_ts(ticks_on(days_ago(9), 500))
    reference = _checksum(rows)
    assert _checksum(rows.slice(0, 1), rows.slice(1, 300), rows.slice(301)) == reference
    for options in ({"compression": "snappy", "use_dictionary": False}, {"row_group_size": 7}):
        pq.write_table(rows, tmp_path / "x.parquet", **options)  # type: ignore[arg-type]
        assert _checksum(pq.read_table(tmp_path / "x.parquet")) == reference  # timestamps come back in ms

    price = rows.column("price").to_pylist()
    price[123] = np.nextafter(price[123], np.inf)  # one bit of one value
    changed = rows.set_column(rows.schema.get_field_index("price"), "price", pa.array(price))
    assert _checksum(changed) != reference
    assert _checksum(rows.take([*range(1, 500), 0])) != reference  # the same rows in another order
    assert _checksum(rows.slice(0, 499)) != reference
    # String boundaries count: ("ab", "c") is not ("a", "bc").
    two = rows.slice(0, 2)
    assert _checksum(two.set_column(2, "symbol", pa.array(["ab", "c"]))) != _checksum(
        two.set_column(2, "symbol", pa.array(["a", "bc"]))
    )


# -- the command line ----------------------------------------------------------------------------------


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "alphaengine", *args], capture_output=True, text=True, timeout=120, check=False
    )


def write_config(tmp_path: Path, modules: str = "") -> Path:
    path = tmp_path / "engine.toml"
    path.write_text(
        f"""
[engine]
data_dir = "{tmp_path}/var"
[store]
kind = "chdb"
path = "{tmp_path}/var/chdb"
[objectstore]
kind = "local"
path = "{tmp_path}/var/objects"
[metrics]
port = 0
enabled = false
[admin]
socket = "{tmp_path}/var/admin.sock"
{modules}
"""
    )
    return path


def real_days_ago(n: int) -> date:
    return datetime.now(UTC).date() - timedelta(days=n)


def seed_chdb(path: Path) -> list[dict[str, Any]]:
    """Ticks 10 days and 2 days before today's real date (the CLI runs on the live clock)."""

    async def seed() -> list[dict[str, Any]]:
        store = ChdbStore(path)
        await store.start()
        try:
            await store.insert("ticks", ticks_on(real_days_ago(10), 2_000))
            await store.insert("ticks", ticks_on(real_days_ago(2), 100))
            return await rows(store, "ticks")
        finally:
            await store.close()

    return asyncio.run(seed())


def chdb_ticks(path: Path) -> list[dict[str, Any]]:
    async def read() -> list[dict[str, Any]]:
        store = ChdbStore(path)
        await store.start()
        try:
            return await rows(store, "ticks")
        finally:
            await store.close()

    return asyncio.run(read())


def ask_engine(config: Path, cmd: str, args: dict[str, Any] | None = None) -> Any:
    """One admin request from the test process (cheaper than starting the CLI for it)."""
    return asyncio.run(admin.request(tmp_socket(config), cmd, args))


def tmp_socket(config: Path) -> Path:
    return config.parent / "var" / "admin.sock"


@pytest.mark.slow
def test_cli_archives_lists_and_restores_on_its_own(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    original = seed_chdb(tmp_path / "var" / "chdb")
    old = real_days_ago(10)

    done = cli("archive", "run", "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("archived 1 partition(s): 2000 rows")
    assert f"ticks  {old}" in done.stdout
    assert (tmp_path / "var" / "objects" / object_key("ticks", old)).is_file()
    assert len(chdb_ticks(tmp_path / "var" / "chdb")) == 100

    listed = cli("archive", "list", "--config", str(config))
    assert listed.returncode == 0, listed.stderr
    header, line = listed.stdout.splitlines()
    assert header.split() == ["table", "date", "rows", "bytes", "key"]
    assert line.split()[:3] == ["ticks", str(old), "2000"]
    assert line.split()[4] == object_key("ticks", old)

    again = cli("archive", "run", "--config", str(config))
    assert again.stdout.startswith("nothing to archive (ticks before"), again.stderr

    restored = cli("archive", "restore", "--config", str(config), str(old))
    assert restored.returncode == 0, restored.stderr
    assert restored.stdout.startswith(f"restored 2000 rows of ticks {old} from ")
    assert chdb_ticks(tmp_path / "var" / "chdb") == original

    missing = cli("archive", "restore", "--config", str(config), "--table", "bars", str(old))
    assert missing.returncode == 1
    assert f"no archive of bars for {old}" in missing.stderr


@pytest.mark.slow
def test_cli_goes_through_a_running_engine(tmp_path: Path) -> None:
    # The engine's own archiver keeps 30 days, so only the CLI archives here (with --before).
    config = write_config(tmp_path, '[modules.archiver]\ntype = "archiver"\narchive_after_days = 30\n')
    seed_chdb(tmp_path / "var" / "chdb")
    old = real_days_ago(10)
    engine = subprocess.Popen(
        [sys.executable, "-m", "alphaengine", "run", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not (tmp_socket(config).exists() and ask_engine(config, "health")["healthy"]):
            assert engine.poll() is None, engine.communicate()[1]
            assert time.monotonic() < deadline, "the engine did not become healthy"
            time.sleep(0.1)
        count = {"sql": "SELECT count() AS n FROM ticks FINAL"}

        # chDB lets one process open the directory: these only work through the engine.
        done = cli("archive", "run", "--config", str(config), "--before", str(real_days_ago(5)))
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("archived 1 partition(s): 2000 rows")
        listed = cli("archive", "list", "--config", str(config))
        assert listed.stdout.splitlines()[1].split()[:3] == ["ticks", str(old), "2000"]
        assert ask_engine(config, "query", count)["rows"] == [[100]]

        restored = cli("archive", "restore", "--config", str(config), str(old))
        assert restored.returncode == 0, restored.stderr
        assert restored.stdout.startswith(f"restored 2000 rows of ticks {old}")
        assert ask_engine(config, "query", count)["rows"] == [[2100]]

        modules = ask_engine(config, "status")["modules"]
        assert [(m["module"], m["state"]) for m in modules] == [("archiver", "RUNNING")]
        ask_engine(config, "stop")
        engine.communicate(timeout=60)
    finally:
        if engine.poll() is None:
            engine.kill()
            engine.communicate()
    assert engine.returncode == 0
