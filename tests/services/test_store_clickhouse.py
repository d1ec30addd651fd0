"""ClickHouseStore against the real ClickHouse server (18.16 in this tier): the Store contract, faults.

Each test gets a fresh database, dropped afterwards. The faults are real: a port with nothing listening,
a listener that never answers, a query that outlives its timeout, a proxy that stops reading in the
middle of an insert, and the server stopped and started again (scripts/services/clickhouse.sh) in the
middle of a loop of inserts.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pyarrow as pa
import pytest
from asynch.proto.connection import Connection
from msgspec.structs import replace

from alphaengine.config import ClickHouseStoreConfig
from alphaengine.errors import ConfigError, StoreError
from alphaengine.store import MIGRATIONS, TABLES, ClickHouseStore, Store, StoreRequestError, build_store
from alphaengine.store.clickhouse import _to_arrow
from tests.contracts.store import DAY1_NS, NS, StoreContract, scalar, tick_rows
from tests.services.envfile import require

CLICKHOUSE_SH = Path(__file__).resolve().parents[2] / "scripts" / "services" / "clickhouse.sh"
TIMEOUT_S = 30
OUTAGE_S = 2.0


@pytest.fixture
def config(services_env: dict[str, str]) -> ClickHouseStoreConfig:
    """The test server, a fresh database, and retries short enough for tests."""
    host, port = require(services_env, "CLICKHOUSE_HOST", "CLICKHOUSE_PORT")
    return ClickHouseStoreConfig(
        host=host,
        port=int(port),
        database=f"test_{uuid.uuid4().hex[:16]}",
        pool_size=2,
        connect_timeout_s=2.0,
        query_timeout_s=10.0,
        retry_attempts=2,
        backoff_initial_s=0.05,
        backoff_max_s=0.2,
    )


@pytest.fixture
async def admin(config: ClickHouseStoreConfig) -> AsyncIterator[Connection]:
    """A plain asynch connection, to look behind the store; drops the test's database afterwards."""
    connection = Connection(host=config.host, port=config.port, database="default")
    yield connection
    await connection.execute(f"DROP DATABASE IF EXISTS `{config.database}`")
    await connection.disconnect()


@pytest.fixture
async def store(config: ClickHouseStoreConfig, admin: Connection) -> AsyncIterator[ClickHouseStore]:
    """A started store on the test's fresh database."""
    started = ClickHouseStore(config)
    await started.start()
    yield started
    await started.close()


class TestClickHouseStore(StoreContract):
    @pytest.fixture
    async def store(self, store: ClickHouseStore) -> Store:
        return store


async def test_the_ddl_runs_on_clickhouse_18_16(store: ClickHouseStore, admin: Connection) -> None:
    assert str(await scalar(store, "SELECT version() AS v")).startswith("18.16.")

    described = await admin.execute(
        "SELECT name, engine, partition_key, sorting_key FROM system.tables "
        f"WHERE database = '{store.database}' ORDER BY name"
    )

    assert described == [
        (spec.name, "ReplacingMergeTree", spec.partition_by or "", ", ".join(spec.key))
        for spec in sorted(TABLES.values(), key=lambda spec: spec.name)
    ]


async def test_a_second_start_on_the_same_database_applies_nothing_again(
    store: ClickHouseStore, config: ClickHouseStoreConfig
) -> None:
    again = ClickHouseStore(config)
    await again.start()
    await again.start()
    try:
        assert await again.applied_migrations() == [m.version for m in MIGRATIONS]
        assert await scalar(again, "SELECT count() AS n FROM schema_migrations") == len(MIGRATIONS)
    finally:
        await again.close()


async def test_datetime_columns_of_any_query_are_timestamps(store: ClickHouseStore) -> None:
    await store.insert("ticks", tick_rows([1, 2]))

    result = await store.query(
        "SELECT max(ts) AS last, toDateTime(1795132800) AS plain, toUInt32(7) AS n, toDate(ts) AS day "
        "FROM ticks FINAL GROUP BY day"
    )

    assert [str(t) for t in result.schema.types] == [
        "timestamp[s, tz=UTC]",
        "timestamp[s, tz=UTC]",
        "uint32",
        "date32[day]",
    ]
    assert result.column("plain").to_pylist()[0].timestamp() == DAY1_NS // NS


async def test_a_query_without_rows_keeps_its_column_types(store: ClickHouseStore) -> None:
    result = await store.query("SELECT ts, symbol, price, side FROM ticks WHERE trade_id < 0")

    assert result.num_rows == 0
    assert [str(t) for t in result.schema.types] == ["timestamp[s, tz=UTC]", "string", "double", "int8"]


async def test_a_sql_error_carries_the_servers_message_and_is_not_retriable(store: ClickHouseStore) -> None:
    with pytest.raises(StoreRequestError, match="no_such_column") as caught:
        await store.query("SELECT no_such_column FROM ticks")
    assert not caught.value.retriable

    with pytest.raises(StoreRequestError, match="Syntax error"):
        await store.query("SELEKT 1")


async def _client_port(store: ClickHouseStore) -> int:
    """The local port of the connection the store ran this query on, as the server saw it."""
    marker = uuid.uuid4().hex
    port = await scalar(store, f"SELECT port FROM system.processes WHERE query LIKE '%{marker}%'")
    return int(port)


async def test_a_connection_that_saw_an_error_is_never_reused(
    config: ClickHouseStoreConfig, admin: Connection
) -> None:
    store = ClickHouseStore(replace(config, pool_size=1))
    await store.start()
    try:
        first = await _client_port(store)
        assert await _client_port(store) == first
        with pytest.raises(StoreRequestError):
            await store.query("SELECT count() AS n FROM no_such_table")

        assert await _client_port(store) != first
    finally:
        await store.close()


async def test_concurrent_requests_share_the_pool(config: ClickHouseStoreConfig, admin: Connection) -> None:
    store = ClickHouseStore(replace(config, pool_size=2))
    await store.start()
    try:
        ports = await asyncio.gather(*(_client_port(store) for _ in range(12)))
    finally:
        await store.close()

    assert len(set(ports)) == 2


async def test_a_query_that_outlives_its_timeout_is_a_retriable_error(
    config: ClickHouseStoreConfig, store: ClickHouseStore
) -> None:
    impatient = ClickHouseStore(replace(config, query_timeout_s=0.3, retry_attempts=1))
    await impatient.start()
    try:
        with pytest.raises(StoreError, match=r"no answer within 0\.3s") as caught:
            await impatient.query("SELECT sleep(2) AS s")
        assert caught.value.retriable
        assert await scalar(impatient, "SELECT 1 AS one") == 1
    finally:
        await impatient.close()


@pytest.fixture
def closed_port() -> int:
    """A loopback port with nothing listening on it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def test_an_unreachable_server_is_a_retriable_error_naming_it(
    config: ClickHouseStoreConfig, closed_port: int
) -> None:
    store = ClickHouseStore(replace(config, port=closed_port))

    with pytest.raises(StoreError, match=f"127.0.0.1:{closed_port}") as caught:
        await store.start()

    assert caught.value.retriable
    assert "2 attempt" in str(caught.value)
    with pytest.raises(StoreError, match="not started"):
        await store.query("SELECT 1")


@pytest.fixture
async def silent_port() -> AsyncIterator[int]:
    """A listener that accepts connections and never answers: a hung server."""
    held: list[asyncio.StreamWriter] = []

    async def hold(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    for writer in held:
        writer.close()
    server.close()
    await server.wait_closed()


async def test_a_server_that_never_answers_fails_within_the_connect_timeout(
    config: ClickHouseStoreConfig, silent_port: int
) -> None:
    store = ClickHouseStore(replace(config, port=silent_port, connect_timeout_s=0.3))

    async with asyncio.timeout(5):
        with pytest.raises(StoreError, match=f"127.0.0.1:{silent_port}") as caught:
            await store.start()

    assert caught.value.retriable


class FreezingProxy:
    """A TCP proxy in front of ClickHouse that can stop reading what the client sends, like a partition.

    Once frozen, the client's data piles up in the socket buffers until its writes block: the state in
    which closing a connection politely waits forever.
    """

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = 0
        self._limit: int | None = None
        self._forwarded = 0
        self._thawed = asyncio.Event()
        self._thawed.set()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        self.thaw()
        for writer in self._writers:
            writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def freeze_after(self, n_bytes: int) -> None:
        """Stop forwarding the client's data once another ``n_bytes`` have gone through."""
        self._limit = self._forwarded + n_bytes
        self._thawed.clear()

    def thaw(self) -> None:
        self._limit = None
        self._thawed.set()

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection(*self.target)
        self._writers |= {client_writer, server_writer}
        try:
            await asyncio.gather(
                self._pipe(client_reader, server_writer, upstream=True),
                self._pipe(server_reader, client_writer, upstream=False),
            )
        except OSError:
            pass  # a side that went away ends the connection: that is what the tests cause
        finally:
            client_writer.close()
            server_writer.close()

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, upstream: bool
    ) -> None:
        while data := await reader.read(64 * 1024):
            writer.write(data)
            await writer.drain()
            if upstream:
                self._forwarded += len(data)
                if self._limit is not None and self._forwarded >= self._limit:
                    await self._thawed.wait()
        writer.close()


@pytest.fixture
async def proxy(config: ClickHouseStoreConfig) -> AsyncIterator[FreezingProxy]:
    started = FreezingProxy(config.host, config.port)
    await started.start()
    yield started
    await started.close()


async def test_a_server_that_stops_reading_mid_insert_fails_within_the_query_timeout(
    config: ClickHouseStoreConfig, admin: Connection, proxy: FreezingProxy
) -> None:
    store = ClickHouseStore(replace(config, port=proxy.port, query_timeout_s=1.0, retry_attempts=1))
    await store.start()
    try:
        rows = tick_rows(list(range(400_000)))  # about 24 MB: more than the socket buffers hold
        proxy.freeze_after(1024 * 1024)

        async with asyncio.timeout(5):
            with pytest.raises(StoreError, match=r"no answer within 1\.0s") as caught:
                await store.insert("ticks", rows)

        assert caught.value.retriable
        proxy.thaw()
        assert await store.insert("ticks", rows.slice(0, 10)) == 10
    finally:
        await store.close()


async def test_a_closed_store_refuses_work(store: ClickHouseStore) -> None:
    await store.close()
    await store.close()

    with pytest.raises(StoreError, match="not started"):
        await store.insert("ticks", tick_rows([1]))


async def test_query_results_map_clickhouse_types_to_arrow(store: ClickHouseStore) -> None:
    result = await store.query(
        "SELECT toInt16(-3) AS i16, toUInt64(18446744073709551615) AS u64, toFloat32(1.5) AS f32, "
        "toNullable(toInt32(7)) AS maybe, [1, 2] AS xs, toFixedString('ab', 2) AS fixed, "
        "CAST('b' AS Enum8('a' = 1, 'b' = 2)) AS e, toDecimal64(1.25, 2) AS dec, NULL AS nothing"
    )

    assert [str(t) for t in result.schema.types] == [
        "int16",
        "uint64",
        "float",
        "int32",
        "list<item: uint8>",
        "string",
        "string",
        "decimal128(18, 2)",
        "null",
    ]
    assert result.to_pylist()[0] | {"dec": str(result.column("dec")[0])} == {
        "i16": -3,
        "u64": 2**64 - 1,
        "f32": 1.5,
        "maybe": 7,
        "xs": [1, 2],
        "fixed": "ab",
        "e": "b",
        "dec": "1.25",
        "nothing": None,
    }


async def test_a_result_arrow_cannot_hold_is_refused_naming_the_column(store: ClickHouseStore) -> None:
    with pytest.raises(StoreRequestError, match=r"'pair'.*toString"):
        await store.query("SELECT (1, 'x') AS pair")


def test_datetimes_without_a_zone_are_read_in_the_servers_time_zone() -> None:
    # asynch gives a tz-less DateTime as a naive wall time of the server's zone: 09:00 in Tokyo is 00:00 UTC.
    wall = datetime(2026, 11, 20, 9, 0)
    midnight_utc = datetime(2026, 11, 20, tzinfo=UTC)

    result = _to_arrow(
        [(wall,), ([wall, None],), (wall.replace(tzinfo=UTC),)],
        [("at", "DateTime"), ("all", "Array(Nullable(DateTime))"), ("utc", "DateTime('UTC')")],
        ZoneInfo("Asia/Tokyo"),
    )

    assert result.to_pylist() == [
        {"at": midnight_utc, "all": [midnight_utc, None], "utc": wall.replace(tzinfo=UTC)}
    ]
    assert result.schema.field("at").type == pa.timestamp("s", tz="UTC")


def test_bad_configurations_name_their_keys() -> None:
    with pytest.raises(ConfigError) as caught:
        ClickHouseStore(
            ClickHouseStoreConfig(
                database="x`; DROP DATABASE y", pool_size=0, query_timeout_s=0, backoff_initial_s=5
            )
        )

    problems = "\n".join(caught.value.problems)
    for key in ("store.database", "store.pool_size", "store.query_timeout_s", "store.backoff_initial_s"):
        assert key in problems


def test_build_store_builds_the_clickhouse_store(config: ClickHouseStoreConfig) -> None:
    built = build_store(config)

    assert isinstance(built, ClickHouseStore)
    assert built.database == config.database


# -- the server stopped in the middle of a loop of inserts -------------------------------------------


@pytest.fixture
def clickhouse_env(services_env: dict[str, str]) -> Iterator[dict[str, str]]:
    """The environment for scripts/services/clickhouse.sh; the server is running again after the test."""
    (state_dir,) = require(services_env, "ALPHAENGINE_SERVICES_STATE_DIR")
    env = {**os.environ, "STATE_DIR": state_dir}
    yield env
    subprocess.run(["bash", str(CLICKHOUSE_SH), "start"], env=env, check=True, capture_output=True)


async def _clickhouse_sh(env: dict[str, str], command: str) -> None:
    process = await asyncio.create_subprocess_exec(
        "bash",
        str(CLICKHOUSE_SH),
        command,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await process.communicate()
    assert process.returncode == 0, f"clickhouse.sh {command} failed: {stderr.decode(errors='replace')}"


async def test_a_server_outage_mid_insert_loop_is_retriable_and_redelivery_is_idempotent(
    store: ClickHouseStore, clickhouse_env: dict[str, str], config: ClickHouseStoreConfig
) -> None:
    """A sink's view: a batch that failed is sent again until it is stored; nothing is stored twice."""
    batches: list[pa.Table] = []
    failures: list[StoreError] = []
    stored_after_restart = 0
    restarted = asyncio.Event()

    async def outage() -> None:
        await _clickhouse_sh(clickhouse_env, "stop")
        await asyncio.sleep(OUTAGE_S)
        await _clickhouse_sh(clickhouse_env, "start")
        restarted.set()

    async with asyncio.timeout(TIMEOUT_S):
        outage_task: asyncio.Task[None] | None = None
        while stored_after_restart < 3:
            i = len(batches)
            batch = tick_rows(list(range(i * 500, (i + 1) * 500)), start_ns=DAY1_NS + i * 600 * NS)
            batches.append(batch)
            while True:
                try:
                    await store.insert("ticks", batch)
                    break
                except StoreError as exc:
                    failures.append(exc)
                    await asyncio.sleep(0.2)
            if restarted.is_set():
                stored_after_restart += 1
            if i == 3:
                outage_task = asyncio.create_task(outage())
        assert outage_task is not None
        await outage_task

    assert failures, "no insert failed while the server was down"
    assert all(f.retriable and f"{config.host}:{config.port}" in str(f) for f in failures), failures
    unique = sum(b.num_rows for b in batches)
    assert await scalar(store, "SELECT count() AS n FROM ticks FINAL") == unique

    for batch in batches:  # everything delivered again, as after a consumer restart
        await store.insert("ticks", batch)

    assert await scalar(store, "SELECT count() AS n FROM ticks FINAL") == unique
