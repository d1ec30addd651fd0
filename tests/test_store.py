from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pyarrow as pa
import pytest
from prometheus_client import REGISTRY

from alphaengine.config import ChdbStoreConfig, ClickHouseStoreConfig, MemoryStoreConfig
from alphaengine.errors import ConfigError, StoreError, StoreLockedError
from alphaengine.store import (
    MIGRATIONS,
    TABLES,
    ChdbStore,
    MemoryStore,
    Store,
    StoreRequestError,
    build_store,
)
from tests.contracts.store import StoreContract, scalar, tick_rows


def _inserts(table: str) -> float:
    return REGISTRY.get_sample_value("alphaengine_store_inserts_total", {"table": table}) or 0.0


def _insert_errors(table: str) -> float:
    return REGISTRY.get_sample_value("alphaengine_store_insert_errors_total", {"table": table}) or 0.0


class TestMemoryStore(StoreContract):
    @pytest.fixture
    async def store(self) -> AsyncIterator[Store]:
        store = MemoryStore()
        await store.start()
        yield store
        await store.close()

    async def test_sql_polars_cannot_run_is_refused_naming_the_problem(self, store: Store) -> None:
        with pytest.raises(StoreRequestError, match="toyyyymmdd"):
            await store.query("SELECT toYYYYMMDD(ts) AS day FROM ticks")

    async def test_final_and_count_inside_string_literals_are_left_alone(self, store: Store) -> None:
        result = await store.query("SELECT 'FINAL count()' AS s, count() AS n FROM ticks FINAL")

        assert result.to_pylist() == [{"s": "FINAL count()", "n": 0}]

    async def test_counts_inserts_and_failed_inserts(self, store: Store) -> None:
        ticks, bars, bar_errors = _inserts("ticks"), _inserts("bars"), _insert_errors("bars")

        await store.insert("ticks", tick_rows([1]))
        with pytest.raises(StoreError):
            await store.insert("bars", tick_rows([1]))

        assert (_inserts("ticks"), _inserts("bars"), _insert_errors("bars")) == (
            ticks + 1,
            bars,
            bar_errors + 1,
        )

    async def test_a_closed_store_refuses_work(self) -> None:
        store = MemoryStore()
        await store.start()
        await store.close()
        await store.close()

        with pytest.raises(StoreError, match="not started"):
            await store.query("SELECT count() AS n FROM ticks")


class TestChdbStore(StoreContract):
    @pytest.fixture
    async def store(self, tmp_path: Path) -> AsyncIterator[Store]:
        store = ChdbStore(tmp_path / "chdb")
        await store.start()
        yield store
        await store.close()

    async def test_datetime_columns_of_any_query_are_timestamps(self, store: Store) -> None:
        await store.insert("ticks", tick_rows([1, 2]))

        result = await store.query("SELECT max(ts) AS last, toUInt32(7) AS n FROM ticks FINAL -- latest")

        assert result.schema.types == [pa.timestamp("s", tz="UTC"), pa.uint32()]

    async def test_statements_other_than_select_still_answer(self, store: Store) -> None:
        result = await store.query("SHOW TABLES")

        assert sorted(result.column(0).to_pylist()) == sorted(TABLES)

    async def test_counts_inserts_and_their_duration(self, store: Store) -> None:
        inserts = _inserts("ticks")
        observed = REGISTRY.get_sample_value(
            "alphaengine_store_insert_duration_seconds_count", {"table": "ticks"}
        )

        await store.insert("ticks", tick_rows([1, 2]))

        assert _inserts("ticks") == inserts + 1
        after = REGISTRY.get_sample_value(
            "alphaengine_store_insert_duration_seconds_count", {"table": "ticks"}
        )
        assert after == (observed or 0.0) + 1


async def test_chdb_reopened_keeps_data_and_does_not_reapply_migrations(tmp_path: Path) -> None:
    first = ChdbStore(tmp_path)
    await first.start()
    await first.insert("ticks", tick_rows([1, 2, 3]))
    applied = await first.query("SELECT version, name, applied_ns FROM schema_migrations ORDER BY version")
    await first.close()
    await first.close()

    again = ChdbStore(tmp_path)
    await again.start()
    try:
        assert await scalar(again, "SELECT count() AS n FROM ticks FINAL") == 3
        assert await again.applied_migrations() == [m.version for m in MIGRATIONS]
        # No FINAL: a re-applied migration would show as a second row even before a merge.
        reopened = await again.query(
            "SELECT version, name, applied_ns FROM schema_migrations ORDER BY version"
        )
        assert reopened.to_pylist() == applied.to_pylist()
    finally:
        await again.close()


async def test_chdb_resolves_unqualified_names_in_its_database(tmp_path: Path) -> None:
    store = ChdbStore(tmp_path, database="research")
    await store.start()
    try:
        await store.insert("ticks", tick_rows([1]))
        assert await scalar(store, "SELECT count() AS n FROM ticks") == 1
        where = await store.query("SELECT database FROM system.tables WHERE name = 'ticks'")
        assert where.column("database").to_pylist() == ["research"]
    finally:
        await store.close()


async def test_chdb_directory_held_by_another_process_is_locked(tmp_path: Path) -> None:
    holder_code = (
        "import sys; from chdb import session; s = session.Session(sys.argv[1]); s.query('SELECT 1'); "
        "print('ready', flush=True); sys.stdin.read()"
    )
    holder = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        holder_code,
        str(tmp_path),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert holder.stdin is not None
    assert holder.stdout is not None
    try:
        assert await asyncio.wait_for(holder.stdout.readline(), 30) == b"ready\n"
        store = ChdbStore(tmp_path)
        with pytest.raises(StoreLockedError, match="admin socket") as caught:
            await store.start()
        assert not caught.value.retriable
        with pytest.raises(StoreError, match="not started"):
            await store.query("SELECT 1")
    finally:
        holder.stdin.close()
        await holder.wait()

    store = ChdbStore(tmp_path)
    await store.start()
    try:
        assert await store.applied_migrations() == [m.version for m in MIGRATIONS]
    finally:
        await store.close()


def test_chdb_refuses_a_database_name_that_is_not_an_identifier(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="database"):
        ChdbStore(tmp_path, database="x`; DROP DATABASE y")


def test_build_store_builds_memory_and_chdb(tmp_path: Path) -> None:
    assert isinstance(build_store(MemoryStoreConfig()), MemoryStore)
    chdb = build_store(ChdbStoreConfig(path=str(tmp_path), database="research"))
    assert isinstance(chdb, ChdbStore)
    assert (chdb.path, chdb.database) == (tmp_path, "research")


def test_build_store_builds_the_clickhouse_store_without_connecting() -> None:
    from alphaengine.store.clickhouse import ClickHouseStore

    assert isinstance(build_store(ClickHouseStoreConfig(host="db.invalid")), ClickHouseStore)
