"""The embedded bus: the Bus contract in memory and on disk, plus what only the embedded bus promises
(persistence across restarts and crashes, torn-tail recovery, bounded memory with back-pressure)."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from alphaengine.bus import (
    KafkaBus,
    MemoryBus,
    OffsetAndMetadata,
    TopicPartition,
    build_bus,
)
from alphaengine.config import KafkaBusConfig, LocalBusConfig, MemoryBusConfig
from alphaengine.errors import BusError
from tests.contracts.bus import BusContract, collect, send_all

TP = TopicPartition("t", 0)
KB = b"x" * 1000
RECORD_BYTES = 1030
"""What a 1000-byte keyless record without headers counts for in the backlog (30 bytes of framing)."""


class TestMemoryBusContract(BusContract):
    @pytest.fixture
    async def bus(self) -> AsyncIterator[MemoryBus]:
        bus = MemoryBus()
        await bus.start()
        yield bus
        await bus.close()


class TestLocalBusContract(BusContract):
    @pytest.fixture
    async def bus(self, tmp_path: Path, topic: str) -> AsyncIterator[MemoryBus]:
        bus = MemoryBus(tmp_path / "bus", segment_bytes=256 * 1024)
        await bus.start()
        yield bus
        # Whatever a test did, the log it leaves reopens with the same records.
        tps = [TopicPartition(topic, p) for p in range(await bus.partitions(topic))]
        ends = await bus.end_offsets(tps)
        await bus.close()
        reopened = MemoryBus(tmp_path / "bus")
        await reopened.start()
        assert await reopened.end_offsets(tps) == ends
        await reopened.close()


@pytest.fixture(params=["memory", "local"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def make_bus(mode: str, tmp_path: Path, **kwargs: Any) -> MemoryBus:
    return MemoryBus(tmp_path / "bus" if mode == "local" else None, **kwargs)


def segments(path: Path, topic: str = "t", partition: int = 0) -> list[Path]:
    return sorted((path / "topics" / topic / str(partition)).glob("*.log"))


def backlog_gauge(topic: str) -> float | None:
    return REGISTRY.get_sample_value("alphaengine_bus_backlog_bytes", {"topic": topic})


# -- persistence --------------------------------------------------------------------------------


async def test_reopen_keeps_records_and_committed_offsets(tmp_path: Path) -> None:
    path = tmp_path / "bus"
    bus = MemoryBus(path, segment_bytes=512)
    await bus.start()
    await bus.create_topic("t", 1)
    sent = [(b"k%d" % i, b"value %d" % i, [("n", b"%d" % i)]) for i in range(40)]
    for key, value, headers in sent:
        await bus.send("t", value, key=key, headers=headers)
    consumer = bus.consumer("g", ["t"])
    await consumer.start()
    before = await collect(consumer, 40)
    await consumer.commit({TP: OffsetAndMetadata(25, "after 25")})
    await bus.close()
    await bus.close()  # idempotent

    bus = MemoryBus(path, segment_bytes=512)
    await bus.start()
    try:
        assert await bus.partitions("t") == 1
        assert await bus.end_offsets([TP]) == {TP: 40}
        # Everything below the group's committed offset is gone from memory (whole segments from disk).
        assert (await bus.beginning_offsets([TP]))[TP] == 25
        consumer = bus.consumer("g", ["t"])
        await consumer.start()
        assert await consumer.committed(TP) == OffsetAndMetadata(25, "after 25")
        after = await collect(consumer, 15)
        assert after == before[25:]
        assert [(r.key, r.value, list(r.headers)) for r in after] == sent[25:]
        assert (await (await bus.send("t", b"next"))).offset == 40
    finally:
        await bus.close()


@pytest.mark.filterwarnings("ignore::ResourceWarning")  # the files a crash leaves open, on purpose
async def test_dropping_the_bus_without_close_loses_nothing_acknowledged(tmp_path: Path) -> None:
    path = tmp_path / "bus"
    bus = MemoryBus(path)
    await bus.start()
    consumer = bus.consumer("g", ["t"])
    await consumer.start()
    metas = await send_all(bus, "t", [b"%d" % i for i in range(100)], key=b"k")
    tp = TopicPartition("t", metas[0].partition)
    await consumer.commit({tp: OffsetAndMetadata(60, "m")})
    # No close(): what a crash leaves behind. Collecting the objects releases the directory lock.
    del bus, consumer
    gc.collect()

    reopened = MemoryBus(path)
    await reopened.start()
    try:
        assert await reopened.end_offsets([tp]) == {tp: 100}
        consumer = reopened.consumer("g", ["t"])
        await consumer.start()
        records = await collect(consumer, 40)
        assert [r.value for r in records] == [b"%d" % i for i in range(60, 100)]
    finally:
        await reopened.close()


CHILD = """
import asyncio, sys
from alphaengine.bus import MemoryBus, OffsetAndMetadata, TopicPartition

async def main(path: str) -> None:
    bus = MemoryBus(path, segment_bytes=64 * 1024)
    await bus.start()
    await bus.create_topic("t", 1)
    consumer = bus.consumer("g", ["t"])
    await consumer.start()
    for i in range(2000):
        await bus.send("t", b"acked %d" % i)
    await bus.flush()
    await consumer.commit({TopicPartition("t", 0): OffsetAndMetadata(1234, "before the kill")})
    print("ready", flush=True)
    i = 0
    while True:  # still writing when the kill comes
        await bus.send("t", b"more %d" % i)
        i += 1
        if i % 100 == 0:
            await asyncio.sleep(0)

asyncio.run(main(sys.argv[1]))
"""


async def test_sigkill_loses_no_acknowledged_record_or_commit(tmp_path: Path) -> None:
    path = tmp_path / "bus"
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, str(path), stdout=asyncio.subprocess.PIPE
    )
    assert child.stdout is not None
    line = await asyncio.wait_for(child.stdout.readline(), 60)
    assert line == b"ready\n"
    child.send_signal(signal.SIGKILL)
    assert await child.wait() == -signal.SIGKILL

    bus = MemoryBus(path, segment_bytes=64 * 1024)
    await bus.start()
    try:
        end = (await bus.end_offsets([TP]))[TP]
        assert end >= 2000
        consumer = bus.consumer("g", ["t"])
        await consumer.start()
        assert await consumer.committed(TP) == OffsetAndMetadata(1234, "before the kill")
        records = await collect(consumer, end - 1234)
        assert [r.offset for r in records] == list(range(1234, end))
        assert [r.value for r in records[: 2000 - 1234]] == [b"acked %d" % i for i in range(1234, 2000)]
        assert [r.value for r in records[2000 - 1234 :]] == [b"more %d" % i for i in range(end - 2000)]
    finally:
        await bus.close()


DISK_FULL_CHILD = """
import asyncio, resource, signal, sys
from alphaengine.bus import MemoryBus
from alphaengine.errors import BusError

async def main(path: str) -> None:
    bus = MemoryBus(path)
    await bus.start()
    await bus.create_topic("t", 1)
    # The segment may not grow past 100 kB: the write that crosses it fails like a full disk.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))
    acknowledged = 0
    try:
        while True:
            await (await bus.send("t", b"x" * 1000))
            acknowledged += 1
    except BusError:
        pass
    try:
        await bus.send("t", b"after the failure")
    except BusError as exc:
        print(acknowledged, exc, flush=True)
    await bus.close()

asyncio.run(main(sys.argv[1]))
"""


async def test_a_failed_write_stops_the_bus_and_loses_nothing_acknowledged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "bus"
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", DISK_FULL_CHILD, str(path), stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(child.communicate(), 60)
    assert child.returncode == 0
    acknowledged, message = out.decode().split(" ", 1)
    assert "failed" in message
    assert 90 < int(acknowledged) < 100
    with caplog.at_level(logging.WARNING, logger="alphaengine.bus.memory"):
        assert await read_back(path, int(acknowledged)) == [b"x" * 1000] * int(acknowledged)
    assert "truncating a torn or corrupt record" in caplog.text


async def write_and_close(path: Path, n: int, **kwargs: Any) -> None:
    bus = MemoryBus(path, **kwargs)
    await bus.start()
    await bus.create_topic("t", 1)
    await send_all(bus, "t", [b"record %d" % i for i in range(n)])
    await bus.close()


async def read_back(path: Path, n: int, **kwargs: Any) -> list[bytes]:
    bus = MemoryBus(path, **kwargs)
    await bus.start()
    try:
        assert await bus.end_offsets([TP]) == {TP: n}
        consumer = bus.consumer(f"reader-{n}", ["t"])
        await consumer.start()
        return [r.value for r in await collect(consumer, n)]
    finally:
        await bus.close()


@pytest.mark.parametrize("damage", ["torn", "bad crc"])
async def test_a_torn_or_corrupt_last_record_is_truncated(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "bus"
    await write_and_close(path, 10)
    (segment,) = segments(path)
    data = segment.read_bytes()
    if damage == "torn":
        segment.write_bytes(data[:-3])
    else:
        segment.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))

    with caplog.at_level(logging.WARNING, logger="alphaengine.bus.memory"):
        assert await read_back(path, 9) == [b"record %d" % i for i in range(9)]
    assert "truncating a torn or corrupt record" in caplog.text

    bus = MemoryBus(path)
    await bus.start()
    assert (await (await bus.send("t", b"after repair"))).offset == 9
    await bus.close()
    assert (await read_back(path, 10))[-1] == b"after repair"


async def test_a_corrupt_record_in_an_older_segment_sets_the_rest_aside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "bus"
    await write_and_close(path, 30, segment_bytes=100)
    files = segments(path)
    assert len(files) > 3
    damaged = files[1]
    base = int(damaged.stem)
    data = damaged.read_bytes()
    damaged.write_bytes(data[:20] + bytes([data[20] ^ 0xFF]) + data[21:])

    with caplog.at_level(logging.WARNING, logger="alphaengine.bus.memory"):
        assert await read_back(path, base, segment_bytes=100) == [b"record %d" % i for i in range(base)]
    assert "set aside" in caplog.text
    set_aside = sorted(p.name for p in damaged.parent.glob("*.corrupt"))
    assert set_aside == [f.name + ".corrupt" for f in files[2:]]


async def test_the_log_directory_is_held_by_one_bus_at_a_time(tmp_path: Path) -> None:
    first = MemoryBus(tmp_path / "bus")
    await first.start()
    second = MemoryBus(tmp_path / "bus")
    with pytest.raises(BusError, match="in use"):
        await second.start()
    await first.close()
    third = MemoryBus(tmp_path / "bus")
    await third.start()
    await third.close()


async def test_an_unreadable_group_file_fails_the_start_and_releases_the_directory(tmp_path: Path) -> None:
    path = tmp_path / "bus"
    bus = MemoryBus(path)
    await bus.start()
    consumer = bus.consumer("g", ["t"])
    await consumer.start()
    await bus.close()
    group_file = path / "groups" / "g.json"
    good = group_file.read_bytes()
    group_file.write_bytes(b"{not json")
    with pytest.raises(BusError, match="cannot open the log directory"):
        await MemoryBus(path).start()
    group_file.write_bytes(good)
    bus = MemoryBus(path)
    await bus.start()
    await bus.close()


async def test_fsync_mode_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "bus"
    bus = MemoryBus(path, fsync=True, segment_bytes=2048)
    await bus.start()
    await bus.create_topic("t", 1)
    futures = [await bus.send("t", b"record %d" % i) for i in range(50)]
    await bus.flush()
    assert [f.result().offset for f in futures] == list(range(50))
    consumer = bus.consumer("g", ["t"])
    await consumer.start()
    assert len(await collect(consumer, 50)) == 50
    await consumer.commit({TP: OffsetAndMetadata(45)})
    await bus.close()

    bus = MemoryBus(path, fsync=True)
    await bus.start()
    try:
        assert await bus.beginning_offsets([TP]) == {TP: 45}
        consumer = bus.consumer("g", ["t"])
        await consumer.start()
        assert [r.value for r in await collect(consumer, 5)] == [b"record %d" % i for i in range(45, 50)]
    finally:
        await bus.close()


# -- bounded memory -----------------------------------------------------------------------------


async def test_a_full_backlog_makes_the_producer_wait_until_a_commit(
    mode: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bus = make_bus(mode, tmp_path, max_backlog_bytes=10 * RECORD_BYTES - 1)
    await bus.start()
    try:
        await bus.create_topic("t", 1)
        consumer = bus.consumer("slow", ["t"])
        await consumer.start()
        for _ in range(10):
            await (await bus.send("t", KB))
        with caplog.at_level(logging.WARNING, logger="alphaengine.bus.memory"):
            blocked = asyncio.create_task(bus.send("t", KB))
            for _ in range(10):
                await asyncio.sleep(0)
            assert not blocked.done()
        assert "producer waiting" in caplog.text
        assert "slowest group: 'slow' (nothing committed" in caplog.text

        records = await consumer.getmany(max_records=3, timeout_s=1)
        assert len(records) == 3
        for _ in range(10):
            await asyncio.sleep(0)
        assert not blocked.done()  # reading is not enough: the group must commit

        await consumer.commit({TP: OffsetAndMetadata(3)})
        future = await asyncio.wait_for(blocked, 10)
        assert (await future).offset == 10
        assert await bus.beginning_offsets([TP]) == {TP: 3}
        assert backlog_gauge("t") == 8 * RECORD_BYTES
    finally:
        await bus.close()


async def test_the_slowest_of_several_groups_decides_the_trim(mode: str, tmp_path: Path) -> None:
    bus = make_bus(mode, tmp_path)
    await bus.start()
    try:
        await bus.create_topic("t", 1)
        fast = bus.consumer("fast", ["t"])
        slow = bus.consumer("slow", ["t"])
        await fast.start()
        await slow.start()
        await send_all(bus, "t", [KB] * 10)
        await fast.commit({TP: OffsetAndMetadata(10)})
        assert await bus.beginning_offsets([TP]) == {TP: 0}
        await slow.commit({TP: OffsetAndMetadata(4)})
        assert await bus.beginning_offsets([TP]) == {TP: 4}
        assert backlog_gauge("t") == 6 * RECORD_BYTES
    finally:
        await bus.close()


async def test_a_closed_bus_releases_a_waiting_producer_with_an_error(mode: str, tmp_path: Path) -> None:
    bus = make_bus(mode, tmp_path, max_backlog_bytes=RECORD_BYTES)
    await bus.start()
    consumer = bus.consumer("g", ["t"])
    await consumer.start()
    await send_all(bus, "t", [KB], key=b"k")
    blocked = asyncio.create_task(bus.send("t", KB, key=b"k"))
    await asyncio.sleep(0)
    await bus.close()
    with pytest.raises(BusError, match="closed"):
        await asyncio.wait_for(blocked, 10)


async def test_trimming_deletes_fully_consumed_segments(tmp_path: Path) -> None:
    path = tmp_path / "bus"
    bus = MemoryBus(path, segment_bytes=4 * RECORD_BYTES)
    await bus.start()
    try:
        await bus.create_topic("t", 1)
        consumer = bus.consumer("g", ["t"])
        await consumer.start()
        await send_all(bus, "t", [KB] * 30)
        assert len(segments(path)) == 8
        assert len(await collect(consumer, 30)) == 30
        await consumer.commit({TP: OffsetAndMetadata(10)})
        assert [int(p.stem) for p in segments(path)] == [8, 12, 16, 20, 24, 28]
        await consumer.commit({TP: OffsetAndMetadata(30)})
        assert [int(p.stem) for p in segments(path)] == [28]  # the active segment stays
        assert await bus.beginning_offsets([TP]) == {TP: 30}
        assert backlog_gauge("t") == 0
    finally:
        await bus.close()


async def test_a_topic_without_groups_keeps_only_its_newest_backlog(mode: str, tmp_path: Path) -> None:
    bus = make_bus(mode, tmp_path, max_backlog_bytes=10 * RECORD_BYTES, segment_bytes=4 * RECORD_BYTES)
    await bus.start()
    try:
        await bus.create_topic("t", 1)
        await send_all(bus, "t", [b"%04d" % i + KB[4:] for i in range(100)])
        assert await bus.beginning_offsets([TP]) == {TP: 90}
        assert await bus.end_offsets([TP]) == {TP: 100}
        assert backlog_gauge("t") == 10 * RECORD_BYTES
        if mode == "local":
            assert [int(p.stem) for p in segments(tmp_path / "bus")] == [88, 92, 96]
        consumer = bus.consumer("late", ["t"])
        await consumer.start()
        records = await collect(consumer, 10)
        assert [r.value[:4] for r in records] == [b"%04d" % i for i in range(90, 100)]
    finally:
        await bus.close()


async def test_known_groups_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "bus"
    bus = MemoryBus(path)
    await bus.start()
    await bus.create_topic("t", 1)
    consumer = bus.consumer("g", ["t"])
    await consumer.start()
    await consumer.close()
    await send_all(bus, "t", [KB] * 10)
    await bus.close()

    # The group never committed, so a restart with a small backlog keeps every record and makes
    # producers wait instead of dropping the oldest ones as it would for a topic without groups.
    bus = MemoryBus(path, max_backlog_bytes=5 * RECORD_BYTES)
    await bus.start()
    try:
        assert await bus.beginning_offsets([TP]) == {TP: 0}
        blocked = asyncio.create_task(bus.send("t", KB))
        await asyncio.sleep(0)
        assert not blocked.done()
        await bus.delete_group("g")
        assert (await (await asyncio.wait_for(blocked, 10))).offset == 10
        assert await bus.beginning_offsets([TP]) == {TP: 6}
    finally:
        await bus.close()


async def test_a_group_with_members_cannot_be_deleted(mode: str, tmp_path: Path) -> None:
    bus = make_bus(mode, tmp_path)
    await bus.start()
    try:
        consumer = bus.consumer("g", ["t"])
        await consumer.start()
        with pytest.raises(BusError, match="member"):
            await bus.delete_group("g")
        await consumer.close()
        await bus.delete_group("g")
        await bus.delete_group("never existed")
    finally:
        await bus.close()


# -- groups and positions -----------------------------------------------------------------------


async def test_assignment_is_round_robin_in_join_order(mode: str, tmp_path: Path) -> None:
    bus = make_bus(mode, tmp_path)
    await bus.start()
    try:
        await bus.create_topic("a", 3)
        await bus.create_topic("b", 2)
        first = bus.consumer("g", ["a", "b"])
        second = bus.consumer("g", ["a"])
        await first.start()
        await second.start()
        a = [TopicPartition("a", p) for p in range(3)]
        b = [TopicPartition("b", p) for p in range(2)]
        assert first.assignment() == {a[0], a[2], b[0], b[1]}
        assert second.assignment() == {a[1]}
        await first.close()
        assert second.assignment() == set(a)
    finally:
        await bus.close()


async def test_a_member_cannot_commit_a_partition_it_does_not_own(mode: str, tmp_path: Path) -> None:
    bus = make_bus(mode, tmp_path)
    await bus.start()
    try:
        await bus.create_topic("t", 2)
        first = bus.consumer("g", ["t"])
        second = bus.consumer("g", ["t"])
        await first.start()
        await second.start()
        (other,) = second.assignment()
        with pytest.raises(BusError, match="not assigned"):
            await first.commit({other: OffsetAndMetadata(1)})
        assert await first.committed(other) is None
    finally:
        await bus.close()


async def test_a_position_out_of_range_is_reset(
    mode: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bus = make_bus(mode, tmp_path)
    await bus.start()
    try:
        await bus.create_topic("t", 1)
        await send_all(bus, "t", [b"%d" % i for i in range(5)])
        earliest = bus.consumer("e", ["t"])
        latest = bus.consumer("l", ["t"], auto_offset_reset="latest")
        await earliest.start()
        await latest.start()
        earliest.seek(TP, 50)
        latest.seek(TP, 50)
        with caplog.at_level(logging.WARNING, logger="alphaengine.bus.memory"):
            assert [r.offset for r in await earliest.getmany(timeout_s=0)] == list(range(5))
            assert await latest.getmany(timeout_s=0) == []
        assert "out of range" in caplog.text
        with pytest.raises(ValueError, match="not assigned"):
            earliest.seek(TopicPartition("t", 1), 0)
    finally:
        await bus.close()


async def test_closing_a_consumer_wakes_its_poll(mode: str, tmp_path: Path) -> None:
    bus = make_bus(mode, tmp_path)
    await bus.start()
    try:
        consumer = bus.consumer("g", ["t"])
        await consumer.start()
        polling = asyncio.create_task(consumer.getmany(timeout_s=60))
        await asyncio.sleep(0)
        await consumer.close()
        assert await asyncio.wait_for(polling, 10) == []
        with pytest.raises(BusError, match="closed"):
            await consumer.getmany()
    finally:
        await bus.close()


async def test_misuse_is_refused(tmp_path: Path) -> None:
    bus = MemoryBus()
    with pytest.raises(BusError, match="not started"):
        await bus.send("t", b"v")
    await bus.start()
    with pytest.raises(ValueError, match="illegal topic name"):
        await bus.send("no spaces", b"v")
    with pytest.raises(ValueError, match="auto_offset_reset"):
        bus.consumer("g", ["t"], auto_offset_reset="none")
    with pytest.raises(BusError, match="unknown topic"):
        await bus.partitions("missing")
    consumer = bus.consumer("g", ["t"])
    with pytest.raises(BusError, match="not started"):
        await consumer.getmany()
    await bus.close()
    with pytest.raises(BusError, match="closed"):
        await bus.send("t", b"v")
    with pytest.raises(BusError, match="closed"):
        await bus.start()


# -- configuration ------------------------------------------------------------------------------


def test_build_bus_from_configuration(tmp_path: Path) -> None:
    memory = build_bus(MemoryBusConfig(partitions=2, max_backlog_bytes=1000))
    assert isinstance(memory, MemoryBus)
    assert memory.path is None
    assert (memory.default_partitions, memory.max_backlog_bytes) == (2, 1000)

    local = build_bus(LocalBusConfig(path="var/bus", segment_bytes=4096, fsync=True))
    assert isinstance(local, MemoryBus)
    assert local.path == Path("var/bus")  # relative: the engine resolves it
    assert (local.segment_bytes, local.fsync) == (4096, True)

    assert isinstance(build_bus(KafkaBusConfig(bootstrap_servers="127.0.0.1:9092")), KafkaBus)
