"""The Kafka bus against the real broker of scripts/services: the Bus contract, unchanged, plus what only
Kafka promises here (records and committed offsets survive a broker restart; the producer is idempotent),
the spill journal (sends keep flowing while the broker is down, and are replayed in order), topic
provisioning (a consumer module's dead-letter topic, with the configured partitions and retention) and
how the Kafka bus refuses misuse."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import msgspec
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from prometheus_client import REGISTRY

from alphaengine.bus import KafkaBus, OffsetAndMetadata, Record, TopicPartition, build_bus
from alphaengine.bus.journal import Journal
from alphaengine.clock import LiveClock
from alphaengine.codec import SCHEMA_HEADER, TICKS_V1, encode_ticks
from alphaengine.config import KafkaBusConfig
from alphaengine.config._schema import KafkaTopicConfig
from alphaengine.domain import TickBatch
from alphaengine.errors import BusError
from alphaengine.kernel.module import Context
from alphaengine.objectstore.memory import MemoryObjectStore
from alphaengine.pipeline.sinks import SinkSettings, TickSink
from alphaengine.store.memory import MemoryStore
from tests.contracts.bus import BusContract, collect, key_for, new_group, send_all
from tests.services.envfile import require

REPO = Path(__file__).resolve().parents[2]
KAFKA_SH = REPO / "scripts" / "services" / "kafka.sh"
RESTART_TIMEOUT_S = 120

# The header of a record batch in a Kafka log segment (message format v2, big endian): base offset,
# batch length, partition leader epoch, magic, CRC, attributes, last offset delta, base and max
# timestamps, producer id, producer epoch, base sequence, record count.
BATCH_HEADER = struct.Struct(">qiibIhiqqqhii")


@pytest.fixture
def kafka_config(services_env: dict[str, str]) -> KafkaBusConfig:
    (bootstrap,) = require(services_env, "KAFKA_BOOTSTRAP_SERVERS")
    # The broker's smallest session timeout, and frequent heartbeats: members learn of a rebalance at
    # their next heartbeat, which is most of what a rebalance costs a test.
    return KafkaBusConfig(
        bootstrap_servers=bootstrap,
        partitions=4,
        session_timeout_ms=6000,
        heartbeat_interval_ms=200,
    )


@pytest.fixture
async def bus(kafka_config: KafkaBusConfig) -> AsyncIterator[KafkaBus]:
    bus = KafkaBus(kafka_config)
    await bus.start()
    yield bus
    await bus.close()


@pytest.fixture
def topic() -> str:
    return f"kafka-bus-{uuid.uuid4().hex[:12]}"


class TestKafkaBusContract(BusContract):
    """The Bus contract, against the broker (the ``bus`` fixture above)."""


class TestKafkaBusWithJournalContract(BusContract):
    """The same contract with a spill journal configured: while the broker answers, nothing changes."""

    @pytest.fixture
    async def bus(self, kafka_config: KafkaBusConfig, tmp_path: Path) -> AsyncIterator[KafkaBus]:
        bus = KafkaBus(msgspec.structs.replace(kafka_config, journal_path=str(tmp_path / "journal")))
        await bus.start()
        yield bus
        assert not bus.spilling
        await bus.close()


# -- durability -----------------------------------------------------------------------------------


async def kafka_sh(services_env: dict[str, str], command: str) -> None:
    """Run ``scripts/services/kafka.sh <command>`` on the services' state directory (data and port kept)."""
    (state_dir,) = require(services_env, "ALPHAENGINE_SERVICES_STATE_DIR")
    done = await asyncio.to_thread(
        subprocess.run,
        ["bash", str(KAFKA_SH), command],
        env={**os.environ, "STATE_DIR": state_dir},
        capture_output=True,
        text=True,
        timeout=RESTART_TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, f"kafka.sh {command} failed:\n{done.stderr}"


async def test_records_and_committed_offsets_survive_a_broker_restart(
    bus: KafkaBus, topic: str, services_env: dict[str, str]
) -> None:
    await bus.create_topic(topic, 2)
    tps = [TopicPartition(topic, p) for p in range(2)]
    for tp in tps:
        await send_all(bus, topic, [b"before %d" % i for i in range(50)], key=key_for(tp.partition, 2))
    group = new_group()
    first = bus.consumer(group, [topic])
    await first.start()
    try:
        assert len(await collect(first, 100)) == 100
        await first.commit({tps[0]: OffsetAndMetadata(30, "bars to 12:30"), tps[1]: OffsetAndMetadata(45)})
    finally:
        await first.close()

    await kafka_sh(services_env, "stop")
    try:
        # Sent while the broker is down: buffered, then delivered by the same bus once it is back.
        pending = [await bus.send(topic, b"during %d" % i, key=key_for(i % 2, 2)) for i in range(10)]
    finally:
        await kafka_sh(services_env, "start")
    await asyncio.gather(*pending)
    await send_all(bus, topic, [b"after"] * 4, key=key_for(1, 2))

    assert await bus.end_offsets(tps) == {tps[0]: 55, tps[1]: 59}
    second = bus.consumer(group, [topic])
    await second.start()
    try:
        assert await second.committed(tps[0]) == OffsetAndMetadata(30, "bars to 12:30")
        assert await second.committed(tps[1]) == OffsetAndMetadata(45, "")
        records = await collect(second, 25 + 14)
    finally:
        await second.close()
    by_partition = {tp: [r for r in records if r.tp == tp] for tp in tps}
    assert [r.offset for r in by_partition[tps[0]]] == list(range(30, 55))
    assert [r.offset for r in by_partition[tps[1]]] == list(range(45, 59))
    assert [r.value for r in by_partition[tps[0]]] == [b"before %d" % i for i in range(30, 50)] + [
        b"during %d" % i for i in range(0, 10, 2)
    ]
    assert [r.value for r in by_partition[tps[1]]] == [b"before %d" % i for i in range(45, 50)] + [
        b"during %d" % i for i in range(1, 10, 2)
    ] + [b"after"] * 4


def read_batch_headers(segment: Path) -> list[tuple[int, int, int, int]]:
    """``(base offset, producer id, base sequence, record count)`` of each record batch in a segment."""
    data = segment.read_bytes()
    headers = []
    pos = 0
    while pos + BATCH_HEADER.size <= len(data):
        (base_offset, length, _, magic, _, _, _, _, _, producer_id, _, base_sequence, count) = (
            BATCH_HEADER.unpack_from(data, pos)
        )
        assert magic == 2
        headers.append((base_offset, producer_id, base_sequence, count))
        pos += 12 + length  # the base offset and the length field precede the length
    return headers


async def test_the_broker_sees_an_idempotent_producer(
    bus: KafkaBus, topic: str, services_env: dict[str, str]
) -> None:
    assert bus.producer_settings["enable_idempotence"] is True
    assert bus.producer_settings["acks"] == "all"
    (state_dir,) = require(services_env, "ALPHAENGINE_SERVICES_STATE_DIR")
    await bus.create_topic(topic, 1)
    for round_ in range(3):
        await send_all(bus, topic, [b"%d-%d" % (round_, i) for i in range(20)])

    # What the broker stored: an idempotent producer's batches carry its producer id and consecutive
    # sequence numbers, by which the broker drops a batch retried after a lost acknowledgement.
    # A producer without idempotence writes -1 in both.
    segment = Path(state_dir) / "kafka" / "data" / f"{topic}-0" / f"{0:020d}.log"
    batches = read_batch_headers(segment)
    assert sum(count for _, _, _, count in batches) == 60
    producer_ids = {producer_id for _, producer_id, _, _ in batches}
    assert len(producer_ids) == 1
    assert min(producer_ids) >= 0
    for base_offset, _, base_sequence, _ in batches:
        assert base_sequence == base_offset  # one producer from offset 0: sequence numbers match offsets


# -- configuration and misuse -----------------------------------------------------------------------


def test_build_bus_makes_a_kafka_bus(kafka_config: KafkaBusConfig) -> None:
    bus = build_bus(kafka_config)
    assert isinstance(bus, KafkaBus)
    assert bus.config is kafka_config
    assert bus.producer_settings["compression_type"] == "zstd"
    assert bus.producer_settings["max_request_size"] == kafka_config.max_message_bytes


async def test_an_unreachable_broker_is_a_bus_error() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bus = KafkaBus(KafkaBusConfig(bootstrap_servers=f"127.0.0.1:{port}"))
    with pytest.raises(BusError, match="connect to Kafka"):
        await bus.start()
    await bus.close()


async def test_misuse_is_refused(kafka_config: KafkaBusConfig, topic: str) -> None:
    bus = KafkaBus(kafka_config)
    with pytest.raises(BusError, match="not started"):
        await bus.send(topic, b"v")
    await bus.start()
    with pytest.raises(ValueError, match="invalid"):
        await bus.send("no spaces", b"v")
    with pytest.raises(ValueError, match="auto_offset_reset"):
        bus.consumer("g", [topic], auto_offset_reset="none")
    with pytest.raises(BusError, match="unknown topic"):
        await bus.partitions(f"missing-{uuid.uuid4().hex[:12]}")
    consumer = bus.consumer(new_group(), [topic])
    with pytest.raises(BusError, match="not started"):
        await consumer.getmany()
    await consumer.start()
    await bus.close()
    await bus.close()  # idempotent
    with pytest.raises(BusError, match="closed"):
        await consumer.getmany()
    with pytest.raises(BusError, match="closed"):
        await bus.send(topic, b"v")
    with pytest.raises(BusError, match="closed"):
        await bus.start()


async def test_a_record_larger_than_max_message_bytes_is_refused(
    kafka_config: KafkaBusConfig, topic: str
) -> None:
    bus = KafkaBus(msgspec.structs.replace(kafka_config, max_message_bytes=64 * 1024))
    await bus.start()
    try:
        await send_all(bus, topic, [b"x" * 60 * 1024])
        # Retrying cannot help, so it is not a (retriable) BusError.
        with pytest.raises(ValueError, match="max_message_bytes"):
            await bus.send(topic, b"x" * 70 * 1024)
    finally:
        await bus.close()


async def test_a_member_cannot_commit_a_partition_it_does_not_own(bus: KafkaBus, topic: str) -> None:
    await bus.create_topic(topic, 2)
    group = new_group()
    first = bus.consumer(group, [topic])
    second = bus.consumer(group, [topic])
    await first.start()
    await second.start()
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while not (len(first.assignment()) == 1 and len(second.assignment()) == 1):
            assert loop.time() < deadline, "two members never split two partitions"
            await first.getmany(timeout_s=0.05)
            await second.getmany(timeout_s=0.05)
        (other,) = second.assignment()
        with pytest.raises(BusError, match="not assigned"):
            await first.commit({other: OffsetAndMetadata(1)})
        assert await first.committed(other) is None
    finally:
        await second.close()
        await first.close()


async def test_a_position_out_of_range_is_reset(bus: KafkaBus, topic: str) -> None:
    await bus.create_topic(topic, 1)
    tp = TopicPartition(topic, 0)
    await send_all(bus, topic, [b"%d" % i for i in range(5)])
    earliest = bus.consumer(new_group(), [topic])
    latest = bus.consumer(new_group(), [topic], auto_offset_reset="latest")
    await earliest.start()
    await latest.start()
    try:
        earliest.seek(tp, 50)
        latest.seek(tp, 50)
        assert [r.offset for r in await collect(earliest, 5)] == list(range(5))
        assert await latest.getmany(timeout_s=1.0) == []
        assert await latest.lag() == 0
        with pytest.raises(ValueError, match="not assigned"):
            earliest.seek(TopicPartition(topic, 1), 0)
    finally:
        await latest.close()
        await earliest.close()


async def test_closing_a_consumer_wakes_its_poll(bus: KafkaBus, topic: str) -> None:
    consumer = bus.consumer(new_group(), [topic])
    await consumer.start()
    polling = asyncio.create_task(consumer.getmany(timeout_s=60))
    await asyncio.sleep(0.1)
    await consumer.close()
    assert await asyncio.wait_for(polling, 10) == []
    with pytest.raises(BusError, match="closed"):
        await consumer.getmany()


# -- the spill journal ------------------------------------------------------------------------------


def journal_metric(name: str) -> float:
    return REGISTRY.get_sample_value(f"alphaengine_bus_journal_{name}") or 0.0


async def eventually(condition: Callable[[], bool], what: str, timeout_s: float = 90.0) -> None:
    """Poll until ``condition`` holds; the deadline fails the test."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        assert loop.time() < deadline, f"not within {timeout_s:.0f} s: {what}"
        await asyncio.sleep(0.05)


async def read_topic(bus: KafkaBus, topic: str, partitions: int) -> dict[int, list[Record]]:
    """Everything in a topic, by partition, read by a new group (the topic's end offsets say how much)."""
    ends = await bus.end_offsets([TopicPartition(topic, p) for p in range(partitions)])
    consumer = bus.consumer(new_group(), [topic])
    await consumer.start()
    try:
        records = await collect(consumer, sum(ends.values()))
    finally:
        await consumer.close()
    return {p: [r for r in records if r.partition == p] for p in range(partitions)}


async def test_sends_go_on_into_the_journal_while_the_broker_is_down_and_reach_kafka_in_order(
    kafka_config: KafkaBusConfig,
    topic: str,
    services_env: dict[str, str],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = msgspec.structs.replace(
        kafka_config, journal_path=str(tmp_path / "journal"), journal_after_s=1.0
    )
    bus = KafkaBus(config)
    await bus.start()
    spilled_before = journal_metric("spilled_records_total")
    replayed_before = journal_metric("replayed_records_total")
    sent = 0
    stop = asyncio.Event()

    async def produce() -> None:
        # Like a source: a window of sends, then wait for their acknowledgements, then more.
        nonlocal sent
        window = []
        while not stop.is_set():
            window.append(await bus.send(topic, b"%d" % sent, key=key_for(sent % 2, 2)))
            sent += 1
            if len(window) == 20:
                await asyncio.gather(*window)
                window.clear()
                await asyncio.sleep(0.01)
        await asyncio.gather(*window)

    try:
        await bus.create_topic(topic, 2)
        producing = asyncio.create_task(produce())
        await eventually(lambda: sent > 200, "records sent before the broker stops")
        await kafka_sh(services_env, "stop")
        try:
            at_stop = sent
            # Acknowledged from the journal while the broker is down: the sender does not wait for it.
            await eventually(lambda: sent > at_stop + 1000, "1000 records acknowledged with the broker down")
            assert bus.spilling
            assert bus.journal is not None
            assert bus.journal.records > 0
            assert journal_metric("records") == bus.journal.records
        finally:
            await kafka_sh(services_env, "start")
        await eventually(lambda: not bus.spilling, "the journal replayed")
        stop.set()
        await producing
        await bus.flush()
        assert bus.journal.records == 0
        assert bus.journal.disk_bytes() == 0
        assert journal_metric("spilled_records_total") - spilled_before > 1000
        assert journal_metric("replayed_records_total") - replayed_before > 1000
        assert journal_metric("full") == 0
        assert "spilling to the journal" in caplog.text
        # aiokafka retries without pause while the broker is down, logging each attempt: the bus lets
        # one of each message through per 10 s instead of thousands a second.
        refused = [r for r in caplog.records if r.name == "aiokafka" and "Unable connect" in r.getMessage()]
        assert len(refused) < 20

        by_partition = await read_topic(bus, topic, 2)
    finally:
        await bus.close()
    # Every record once (nothing lost, nothing twice: the producer's own copies of the records it held
    # when the bus began to spill were not replayed again), each key's records in the order sent.
    for partition, records in by_partition.items():
        values = [int(r.value) for r in records]
        assert values == list(range(partition, sent, 2))


async def test_a_journal_left_by_a_previous_process_is_replayed_before_anything_new(
    kafka_config: KafkaBusConfig, topic: str, tmp_path: Path
) -> None:
    # What a process killed while spilling leaves (test_journal.py shows a SIGKILL leaves it readable).
    path = tmp_path / "journal"
    left = Journal(path, max_bytes=1 << 20)
    await left.open()
    appended = [
        await left.append(topic, b"key", b"old %d" % i, (("h", b"v"),), 1_700_000_000_000) for i in range(50)
    ]
    await asyncio.gather(*(a.durable for a in appended))
    await left.close()

    bus = KafkaBus(msgspec.structs.replace(kafka_config, journal_path=str(path)))
    await bus.start()
    try:
        assert bus.spilling  # until the journal is replayed, new records queue behind it
        await bus.create_topic(topic, 1)
        await send_all(bus, topic, [b"new %d" % i for i in range(10)], key=b"key")
        await eventually(lambda: not bus.spilling, "the journal replayed")
        (records,) = (await read_topic(bus, topic, 1)).values()
    finally:
        await bus.close()
    assert [r.value for r in records] == [b"old %d" % i for i in range(50)] + [
        b"new %d" % i for i in range(10)
    ]
    assert list(records[0].headers) == [("h", b"v")]
    assert records[0].timestamp_ms == 1_700_000_000_000  # the time it was first sent, not replayed


# -- dead letters -----------------------------------------------------------------------------------


async def test_a_sink_dead_letters_garbage_into_its_provisioned_dlq_topic(
    kafka_config: KafkaBusConfig, topic: str, tmp_path: Path
) -> None:
    dlq = f"{topic}.dlq"
    week_ms = 7 * 24 * 3600 * 1000
    config = msgspec.structs.replace(
        kafka_config, topics={dlq: KafkaTopicConfig(partitions=1, retention_ms=week_ms)}
    )
    bus = KafkaBus(config)
    store = MemoryStore()
    await bus.start()
    await store.start()
    ctx = Context(bus, store, MemoryObjectStore(), LiveClock(), tmp_path)
    sink = TickSink("tick_sink", SinkSettings(topic=topic, group=new_group()), ctx)
    try:
        await sink.start()
        # Provisioned as the sink started, before any dead letter: one partition, a week's retention.
        assert await bus.partitions(dlq) == 1
        assert await topic_config(kafka_config, dlq, "retention.ms") == str(week_ms)

        await (await bus.send(topic, b"garbage, not arrow", key=b"BTCUSDT"))
        ticks = TickBatch.from_columns(
            venue="TEST",
            symbol="BTCUSDT",
            trade_id=[1, 2, 3],
            ts_ns=[1_700_000_000_000_000_000 + i for i in range(3)],
            recv_ns=[1_700_000_000_000_000_000 + i for i in range(3)],
            price=[1.0, 2.0, 3.0],
            qty=[1.0, 1.0, 1.0],
            side=[1, -1, 1],
        )
        await (
            await bus.send(topic, encode_ticks(ticks), key=b"BTCUSDT", headers=((SCHEMA_HEADER, TICKS_V1),))
        )
        async with asyncio.timeout(60):  # the sink goes on past the dead letter
            while (await store.query("SELECT count() AS n FROM ticks")).column("n")[0].as_py() < 3:
                await asyncio.sleep(0.05)
        (letters,) = (await read_topic(bus, dlq, 1)).values()
    finally:
        await sink.stop()
        await store.close()
        await bus.close()
    (letter,) = letters
    headers = dict(letter.headers)
    assert letter.value == b"garbage, not arrow"
    assert letter.key == b"BTCUSDT"
    assert headers["reason"]
    assert headers["consumer"] == b"tick_sink"
    assert headers["source"].startswith(f"{topic}/".encode())


async def topic_config(config: KafkaBusConfig, topic: str, name: str) -> str:
    """One configuration entry of a topic, as the broker describes it."""
    admin = AIOKafkaAdminClient(bootstrap_servers=config.bootstrap_servers)
    await admin.start()
    try:
        (response,) = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic, {name: None})]
        )
    finally:
        await admin.close()
    ((resource),) = response.to_object()["resources"]
    return str(next(e["config_value"] for e in resource["config_entries"] if e["config_names"] == name))
