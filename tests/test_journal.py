"""The spill journal of the Kafka bus on its own: order, durability across a SIGKILL, torn tails, the
bound and its back-pressure, and giving back the disk once replayed."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from alphaengine.bus.journal import Journal, JournalRecord
from alphaengine.errors import BusError

HEADERS = (("schema", b"ticks.v1"), ("empty", b""))


def gauge(name: str) -> float | None:
    return REGISTRY.get_sample_value(name)


async def open_journal(path: Path, **kwargs: int) -> Journal:
    journal = Journal(path, max_bytes=kwargs.pop("max_bytes", 1 << 20), **kwargs)  # type: ignore[arg-type]
    await journal.open()
    return journal


@pytest.fixture
async def journal(tmp_path: Path) -> AsyncIterator[Journal]:
    journal = await open_journal(tmp_path / "journal")
    yield journal
    await journal.close()


async def append_all(journal: Journal, topic: str, values: list[bytes], key: bytes | None = b"k") -> None:
    appended = [
        await journal.append(topic, key, v, HEADERS, 1_700_000_000_000 + i) for i, v in enumerate(values)
    ]
    await asyncio.gather(*(a.durable for a in appended))


def read_all(journal: Journal) -> list[JournalRecord]:
    out: list[JournalRecord] = []
    while batch := journal.read(max_records=7):
        out += batch
    return out


async def test_records_come_back_in_order_per_topic_with_everything_they_carried(journal: Journal) -> None:
    await append_all(journal, "ticks", [b"t%d" % i for i in range(20)])
    await append_all(journal, "bars", [b"b%d" % i for i in range(5)], key=None)
    await append_all(journal, "ticks", [b"t%d" % i for i in range(20, 25)])
    assert journal.records == 30

    records = read_all(journal)
    ticks = [r for r in records if r.topic == "ticks"]
    bars = [r for r in records if r.topic == "bars"]
    assert [r.value for r in ticks] == [b"t%d" % i for i in range(25)]
    assert [r.offset for r in ticks] == list(range(25))
    assert [r.value for r in bars] == [b"b%d" % i for i in range(5)]
    assert all(r.key is None for r in bars)
    assert all(r.key == b"k" for r in ticks)
    assert all(r.headers == HEADERS for r in records)
    assert [r.timestamp_ms for r in bars] == [1_700_000_000_000 + i for i in range(5)]
    assert journal.read() == []  # read once; nothing is replayed yet
    assert journal.records == 30


async def test_a_replayed_prefix_is_forgotten_and_the_rest_survives_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    journal = await open_journal(path)
    await append_all(journal, "ticks", [b"%d" % i for i in range(10)])
    first = journal.read(max_records=4)
    journal.replayed(first)
    assert journal.records == 6
    with pytest.raises(ValueError, match="expected 4"):
        journal.replayed(first)  # out of order: refused
    await journal.close()

    reopened = await open_journal(path)
    try:
        assert reopened.records == 6
        assert [r.value for r in read_all(reopened)] == [b"%d" % i for i in range(4, 10)]
        # New records continue the numbering after what the journal held.
        await append_all(reopened, "ticks", [b"10"])
        assert [r.offset for r in reopened.read()] == [10]
    finally:
        await reopened.close()


async def test_a_lost_replay_position_replays_what_the_segments_still_hold(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    journal = await open_journal(path, segment_bytes=2048)
    await append_all(journal, "ticks", [b"x" * 500] * 20)
    records = read_all(journal)
    journal.replayed(records[:11])  # deletes the segments wholly replayed (three records each)
    await journal.close()
    (path / "positions.json").write_bytes(b"")  # as a machine crash may leave it (it is not fsync'd)

    reopened = await open_journal(path)
    try:
        again = read_all(reopened)
        # At least once: the rest, and the replayed records still in the first remaining segment.
        assert 9 < len(again) < 20
        assert [r.offset for r in again] == list(range(20 - len(again), 20))
        reopened.replayed(again)
        assert reopened.records == 0
    finally:
        await reopened.close()


async def test_rewind_reads_the_unreplayed_records_again(journal: Journal) -> None:
    await append_all(journal, "ticks", [b"%d" % i for i in range(6)])
    journal.replayed(journal.read(max_records=2))
    assert [r.value for r in journal.read()] == [b"2", b"3", b"4", b"5"]
    journal.rewind()
    assert [r.value for r in journal.read()] == [b"2", b"3", b"4", b"5"]


async def test_segments_roll_and_a_replayed_journal_gives_back_its_disk(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    journal = await open_journal(path, segment_bytes=4096)
    value = b"x" * 1000
    await append_all(journal, "ticks", [value] * 40)
    segments = sorted((path / "topics" / "ticks").glob("*.log"))
    assert len(segments) >= 10
    records = read_all(journal)
    assert len(records) == 40
    assert all(r.value == value for r in records)

    journal.replayed(records[:20])
    assert len(sorted((path / "topics" / "ticks").glob("*.log"))) < len(segments)
    journal.replayed(records[20:])
    assert journal.records == 0
    assert journal.held_bytes == 0
    assert journal.disk_bytes() == 0
    assert gauge("alphaengine_bus_journal_records") == 0
    await journal.close()

    reopened = await open_journal(path)
    try:
        assert reopened.records == 0
        await append_all(reopened, "ticks", [b"after"])
        assert [(r.offset, r.value) for r in reopened.read()] == [(40, b"after")]
    finally:
        await reopened.close()


async def test_a_record_larger_than_a_read_chunk_is_read_whole(journal: Journal) -> None:
    big = bytes(range(256)) * 40
    await append_all(journal, "ticks", [b"small", big, b"small again"])
    records = []
    while batch := journal.read(max_records=10, max_bytes=1024):
        records += batch
    assert [r.value for r in records] == [b"small", big, b"small again"]


CHILD = """
import asyncio, sys
from pathlib import Path
from alphaengine.bus.journal import Journal

async def main():
    journal = Journal(Path(sys.argv[1]), max_bytes=1 << 30, segment_bytes=64 * 1024)
    await journal.open()
    i = 0
    while True:
        values = [b"%d" % (i + j) + b"." * 500 for j in range(50)]
        appended = [await journal.append("ticks", b"k", value, (), 0) for value in values]
        await appended[-1].durable
        i += 50
        print(i - 1, flush=True)  # every record up to this one is durable

asyncio.run(main())
"""


async def test_a_sigkill_mid_append_leaves_a_readable_journal_with_every_durable_record(
    tmp_path: Path,
) -> None:
    path = tmp_path / "journal"
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, str(path), stdout=asyncio.subprocess.PIPE
    )
    assert child.stdout is not None
    durable = -1
    while durable < 3000:
        line = await asyncio.wait_for(child.stdout.readline(), 30)
        assert line, "the child exited"
        durable = int(line)
    child.send_signal(signal.SIGKILL)
    assert await child.wait() == -signal.SIGKILL

    journal = await open_journal(path)
    try:
        records = read_all(journal)
        numbers = [int(r.value.rstrip(b".")) for r in records]
        assert numbers == list(range(len(numbers)))  # a prefix, in order, without a gap
        assert len(numbers) > durable  # every record acknowledged as durable is there
        assert journal.records == len(numbers)
    finally:
        await journal.close()


async def test_a_torn_last_record_is_truncated_and_appends_continue(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "journal"
    journal = await open_journal(path)
    await append_all(journal, "ticks", [b"a", b"b", b"c"])
    await journal.close()
    (segment,) = (path / "topics" / "ticks").glob("*.log")
    data = segment.read_bytes()
    segment.write_bytes(data[:-3])  # the last record cut short, as by a crash mid-write

    caplog.set_level(logging.WARNING)
    reopened = await open_journal(path)
    try:
        assert "truncating a torn or corrupt record" in caplog.text
        assert [r.value for r in reopened.read()] == [b"a", b"b"]
        await append_all(reopened, "ticks", [b"d"])
        assert [(r.offset, r.value) for r in reopened.read()] == [(2, b"d")]
    finally:
        await reopened.close()


async def test_a_full_journal_makes_appends_wait_in_order_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    value = b"v" * 100
    journal = await open_journal(tmp_path / "journal", max_bytes=1000)
    try:
        for _ in range(7):
            await journal.append("ticks", b"k", value, (), 0)
        assert journal.held_bytes == 7 * 131  # 100 bytes of value, 1 of key, 30 of framing each
        waiting = [
            asyncio.create_task(journal.append("ticks", b"k", b"w%d" % i + b"." * 98, (), 0))
            for i in range(3)
        ]
        await asyncio.sleep(0.05)
        assert not any(t.done() for t in waiting)
        assert journal.full
        assert gauge("alphaengine_bus_journal_full") == 1
        assert "is full" in caplog.text
        assert journal.records == 7  # nothing dropped, nothing added

        journal.replayed(journal.read(max_records=2))  # room for two more
        await asyncio.sleep(0.05)
        assert [t.done() for t in waiting] == [True, True, False]
        journal.replayed(journal.read(max_records=5))
        await asyncio.wait_for(asyncio.gather(*waiting), 5)
        assert not journal.full
        assert gauge("alphaengine_bus_journal_full") == 0
        assert [r.value.rstrip(b".") for r in journal.read()] == [b"w0", b"w1", b"w2"]
    finally:
        await journal.close()


async def test_limits_and_misuse_are_refused(tmp_path: Path) -> None:
    journal = await open_journal(tmp_path / "journal", max_bytes=1000)
    with pytest.raises(BusError, match="in use"):
        await open_journal(tmp_path / "journal")
    with pytest.raises(ValueError, match="cannot fit"):
        await journal.append("ticks", None, b"x" * 2000, (), 0)
    with pytest.raises(ValueError, match="illegal topic name"):
        await journal.append("no spaces", None, b"x", (), 0)
    await journal.close()
    await journal.close()  # idempotent
    with pytest.raises(BusError, match="closed"):
        await journal.append("ticks", None, b"x", (), 0)


async def test_closing_fails_an_append_waiting_for_room_and_keeps_what_was_written(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    journal = await open_journal(path, max_bytes=500)
    await append_all(journal, "ticks", [b"x" * 400])
    waiting = asyncio.create_task(journal.append("ticks", None, b"y" * 400, (), 0))
    await asyncio.sleep(0.05)
    await journal.close()
    with pytest.raises(BusError, match="closed"):
        await waiting
    reopened = await open_journal(path)
    try:
        assert [r.value for r in reopened.read()] == [b"x" * 400]
    finally:
        await reopened.close()
