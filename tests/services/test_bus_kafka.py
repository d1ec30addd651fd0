"""The Kafka bus against the real broker of scripts/services: the Bus contract, unchanged, plus what only
Kafka promises here (records and committed offsets survive a broker restart; the producer is idempotent)
and how the Kafka bus refuses misuse."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from alphaengine.bus import KafkaBus, OffsetAndMetadata, TopicPartition, build_bus
from alphaengine.config import KafkaBusConfig
from alphaengine.errors import BusError
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
