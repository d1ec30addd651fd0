"""The Bus contract: what every implementation of :class:`alphaengine.bus.Bus` must do.

An implementation's test module subclasses :class:`BusContract` and provides an async fixture ``bus``
that yields a *started* bus. The tests run unchanged against a real Kafka broker, where a rebalance takes
seconds, a topic must be created before it is used and records are acknowledged asynchronously: every
wait polls towards a generous deadline, and nothing is asserted about elapsed time.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections import Counter
from collections.abc import Callable, Sequence

import pytest
from prometheus_client import REGISTRY

from alphaengine.bus import (
    Bus,
    Consumer,
    OffsetAndMetadata,
    Record,
    RecordMetadata,
    TopicPartition,
    partition_for,
)

DEADLINE_S = 60.0
"""How long a test waits for records or a rebalance before failing (a broker's rebalance takes seconds)."""
POLL_S = 0.2


def new_group() -> str:
    """A group name no other test uses (a broker keeps groups between tests)."""
    return f"contract-group-{uuid.uuid4().hex[:12]}"


def key_for(partition: int, partitions: int) -> bytes:
    """A key that lands on ``partition``."""
    i = 0
    while partition_for(f"k{i}".encode(), partitions) != partition:
        i += 1
    return f"k{i}".encode()


def all_partitions(topic: str, partitions: int) -> frozenset[TopicPartition]:
    """Every partition of a topic."""
    return frozenset(TopicPartition(topic, p) for p in range(partitions))


async def send_all(
    bus: Bus, topic: str, values: Sequence[bytes], *, key: bytes | None = None
) -> list[RecordMetadata]:
    """Send records in order and wait for every acknowledgement."""
    futures = [await bus.send(topic, value, key=key) for value in values]
    return [await future for future in futures]


async def collect(consumer: Consumer, n: int, *, max_records: int = 1000) -> list[Record]:
    """Poll until ``n`` records arrived or the deadline passed (never asks for more than ``n``)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_S
    got: list[Record] = []
    while len(got) < n and loop.time() < deadline:
        got += await consumer.getmany(max_records=min(max_records, n - len(got)), timeout_s=POLL_S)
    return got


async def collect_from(consumers: Sequence[Consumer], n: int) -> list[list[Record]]:
    """Poll several members in turn until ``n`` records arrived in all; the records of each member."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_S
    got: list[list[Record]] = [[] for _ in consumers]
    while sum(map(len, got)) < n and loop.time() < deadline:
        for i, consumer in enumerate(consumers):
            got[i] += await consumer.getmany(timeout_s=POLL_S / len(consumers))
    return got


async def until(
    condition: Callable[[], bool], consumers: Sequence[Consumer], what: str
) -> list[list[Record]]:
    """Poll ``consumers`` (which lets a broker's group protocol progress) until ``condition`` holds.

    Returns what each member read meanwhile; fails the test at the deadline.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_S
    got: list[list[Record]] = [[] for _ in consumers]
    while not condition():
        if loop.time() >= deadline:
            pytest.fail(f"not within {DEADLINE_S} s: {what}")
        for i, consumer in enumerate(consumers):
            got[i] += await consumer.getmany(timeout_s=POLL_S / len(consumers))
    return got


def offsets_by_partition(records: Sequence[Record]) -> dict[int, list[int]]:
    """The offsets read from each partition, in the order they were read."""
    out: dict[int, list[int]] = {}
    for record in records:
        out.setdefault(record.partition, []).append(record.offset)
    return out


class BusContract:
    """The tests every Bus implementation passes; subclasses provide the ``bus`` fixture."""

    @pytest.fixture
    def topic(self) -> str:
        """A topic name no other test uses."""
        return f"contract-{uuid.uuid4().hex[:12]}"

    # -- topics and producing ---------------------------------------------------------------------

    async def test_create_topic_is_idempotent_and_keeps_its_partitions(self, bus: Bus, topic: str) -> None:
        await bus.create_topic(topic, 3)
        await bus.create_topic(topic, 5)
        await bus.create_topic(topic)
        assert await bus.partitions(topic) == 3

    async def test_sending_to_an_unknown_topic_creates_it(self, bus: Bus, topic: str) -> None:
        meta = await (await bus.send(topic, b"first"))
        partitions = await bus.partitions(topic)
        assert partitions >= 1
        assert meta.topic == topic
        assert 0 <= meta.partition < partitions
        assert meta.offset == 0
        ends = await bus.end_offsets(sorted(all_partitions(topic, partitions)))
        assert sum(ends.values()) == 1

    async def test_sent_records_are_counted_per_topic(self, bus: Bus, topic: str) -> None:
        await send_all(bus, topic, [b"a", b"b", b"c"])
        assert REGISTRY.get_sample_value("alphaengine_bus_sent_records_total", {"topic": topic}) == 3

    async def test_a_keyed_record_goes_to_the_partition_of_its_key(self, bus: Bus, topic: str) -> None:
        await bus.create_topic(topic, 3)
        keys = [f"symbol-{i}".encode() for i in range(30)]
        futures = [await bus.send(topic, b"v", key=key) for key in keys]
        metas = [await f for f in futures]
        assert [m.partition for m in metas] == [partition_for(k, 3) for k in keys]
        consumer = bus.consumer(new_group(), [topic])
        await consumer.start()
        try:
            records = await collect(consumer, len(keys))
        finally:
            await consumer.close()
        assert len(records) == len(keys)
        assert all(r.partition == partition_for(r.key or b"", 3) for r in records)

    async def test_keyless_records_are_spread_round_robin(self, bus: Bus, topic: str) -> None:
        await bus.create_topic(topic, 3)
        metas = await send_all(bus, topic, [b"v"] * 12)
        assert Counter(m.partition for m in metas) == {0: 4, 1: 4, 2: 4}

    async def test_offsets_count_from_zero_and_each_key_keeps_its_order(self, bus: Bus, topic: str) -> None:
        await bus.create_topic(topic, 3)
        keys = [f"k{i}".encode() for i in range(10)]
        futures = []
        for seq in range(30):
            for key in keys:
                futures.append(await bus.send(topic, b"%s:%d" % (key, seq), key=key))
        metas = [await f for f in futures]
        sent: dict[int, list[int]] = {}
        for meta in metas:
            sent.setdefault(meta.partition, []).append(meta.offset)
        for offsets in sent.values():
            assert offsets == list(range(len(offsets)))

        consumer = bus.consumer(new_group(), [topic])
        await consumer.start()
        try:
            records = await collect(consumer, len(metas))
        finally:
            await consumer.close()
        assert len(records) == len(metas)
        assert offsets_by_partition(records) == sent
        for key in keys:
            seqs = [int(r.value.split(b":")[1]) for r in records if r.key == key]
            assert seqs == list(range(30))

    async def test_flush_waits_for_every_acknowledgement(self, bus: Bus, topic: str) -> None:
        await bus.create_topic(topic, 2)
        futures = [await bus.send(topic, b"%d" % i, key=key_for(i % 2, 2)) for i in range(200)]
        await bus.flush()
        assert all(f.done() for f in futures)
        metas = [f.result() for f in futures]
        assert [m.offset for m in metas if m.partition == 0] == list(range(100))
        assert [m.offset for m in metas if m.partition == 1] == list(range(100))

    async def test_keys_headers_and_large_values_round_trip(self, bus: Bus, topic: str) -> None:
        await bus.create_topic(topic, 1)
        big = os.urandom(1024 * 1024)
        sent: list[tuple[bytes | None, bytes, list[tuple[str, bytes]]]] = [
            (None, b"", []),
            (b"key", big, [("schema", b"ticks.v1"), ("binary", b"\x00\xff\x80"), ("schema", b"dup")]),
            (b"", b"empty key", [("empty", b""), ("prix-€", b"utf-8 name")]),
        ]
        for key, value, headers in sent:
            await (await bus.send(topic, value, key=key, headers=headers))
        consumer = bus.consumer(new_group(), [topic])
        await consumer.start()
        try:
            records = await collect(consumer, len(sent))
        finally:
            await consumer.close()
        assert [(r.key, r.value, list(r.headers)) for r in records] == sent
        assert all(isinstance(r.timestamp_ms, int) and r.timestamp_ms > 0 for r in records)

    async def test_beginning_and_end_offsets(self, bus: Bus, topic: str) -> None:
        await bus.create_topic(topic, 2)
        tps = sorted(all_partitions(topic, 2))
        assert await bus.beginning_offsets(tps) == dict.fromkeys(tps, 0)
        assert await bus.end_offsets(tps) == dict.fromkeys(tps, 0)
        await send_all(bus, topic, [b"a"] * 3, key=key_for(0, 2))
        await send_all(bus, topic, [b"b"] * 5, key=key_for(1, 2))
        assert await bus.end_offsets(tps) == {tps[0]: 3, tps[1]: 5}
        assert await bus.beginning_offsets(tps) == dict.fromkeys(tps, 0)

    # -- consuming --------------------------------------------------------------------------------

    async def test_two_groups_each_see_every_record(self, bus: Bus, topic: str) -> None:
        await bus.create_topic(topic, 3)
        first = bus.consumer(new_group(), [topic])
        second = bus.consumer(new_group(), [topic])
        await first.start()
        await second.start()
        try:
            await send_all(bus, topic, [b"%d" % i for i in range(60)])
            a = await collect(first, 60)
            b = await collect(second, 60)
        finally:
            await first.close()
            await second.close()
        assert sorted(r.value for r in a) == sorted(b"%d" % i for i in range(60))
        assert sorted(r.value for r in b) == sorted(b"%d" % i for i in range(60))

    async def test_members_of_a_group_split_its_partitions(self, bus: Bus, topic: str) -> None:
        await bus.create_topic(topic, 4)
        every = all_partitions(topic, 4)
        group = new_group()
        first = bus.consumer(group, [topic])
        second = bus.consumer(group, [topic])
        await first.start()
        try:
            await until(lambda: first.assignment() == every, [first], "the only member owns every partition")
            await second.start()
            try:
                await until(
                    lambda: (
                        bool(first.assignment())
                        and bool(second.assignment())
                        and not first.assignment() & second.assignment()
                        and first.assignment() | second.assignment() == every
                    ),
                    [first, second],
                    "two members split the partitions",
                )
                owned = first.assignment(), second.assignment()
                keys = [key_for(p, 4) for p in range(4)]
                futures = [await bus.send(topic, b"%d" % i, key=keys[i % 4]) for i in range(80)]
                for future in futures:
                    await future
                a, b = await collect_from([first, second], 80)
            finally:
                await second.close()
        finally:
            await first.close()
        assert len(a) + len(b) == 80
        assert {r.tp for r in a} == owned[0]
        assert {r.tp for r in b} == owned[1]
        assert sorted(r.value for r in a + b) == sorted(b"%d" % i for i in range(80))

    async def test_a_joining_member_starts_at_the_committed_offset(self, bus: Bus, topic: str) -> None:
        await bus.create_topic(topic, 2)
        every = all_partitions(topic, 2)
        for p in range(2):
            await send_all(bus, topic, [b"%d" % i for i in range(10)], key=key_for(p, 2))
        group = new_group()
        first = bus.consumer(group, [topic])
        await first.start()
        second = bus.consumer(group, [topic])
        try:
            await until(lambda: first.assignment() == every, [first], "the only member owns both partitions")
            assert len(await collect(first, 20)) == 20
            await first.commit({tp: OffsetAndMetadata(6, "half") for tp in every})
            await second.start()
            got = await until(
                lambda: len(first.assignment()) == 1 and len(second.assignment()) == 1,
                [first, second],
                "the joining member takes a partition",
            )
            (taken,) = second.assignment()
            records = got[1] + await collect(second, 4 - len(got[1]))
        finally:
            await second.close()
            await first.close()
        assert {r.tp for r in records} == {taken}
        assert sorted({r.offset for r in records}) == [6, 7, 8, 9]

    async def test_a_leaving_member_hands_its_partitions_over(self, bus: Bus, topic: str) -> None:
        await bus.create_topic(topic, 2)
        every = all_partitions(topic, 2)
        group = new_group()
        stays = bus.consumer(group, [topic])
        leaves = bus.consumer(group, [topic])
        await stays.start()
        try:
            await leaves.start()
            try:
                await until(
                    lambda: len(stays.assignment()) == 1 and len(leaves.assignment()) == 1,
                    [stays, leaves],
                    "two members split two partitions",
                )
                (handed_over,) = leaves.assignment()
                (kept,) = stays.assignment()
                for tp in (handed_over, kept):
                    await send_all(bus, topic, [b"%d" % i for i in range(10)], key=key_for(tp.partition, 2))
                read = await collect(leaves, 10)
                assert [r.offset for r in read] == list(range(10))
                await leaves.commit({handed_over: OffsetAndMetadata(6)})
            finally:
                await leaves.close()
            got = await until(lambda: stays.assignment() == every, [stays], "the remaining member owns both")
            records = got[0] + await collect(stays, 14 - len(got[0]))
        finally:
            await stays.close()
        by_partition = offsets_by_partition(records)
        # A broker may deliver a partition again after a rebalance (at least once): compare as sets.
        assert set(by_partition[handed_over.partition]) == {6, 7, 8, 9}
        assert set(by_partition[kept.partition]) == set(range(10))

    async def test_a_new_member_resumes_at_the_committed_offset(self, bus: Bus, topic: str) -> None:
        await bus.create_topic(topic, 1)
        tp = TopicPartition(topic, 0)
        await send_all(bus, topic, [b"%d" % i for i in range(20)])
        group = new_group()
        first = bus.consumer(group, [topic])
        await first.start()
        try:
            assert len(await collect(first, 20)) == 20
            assert await first.committed(tp) is None
            await first.commit({tp: OffsetAndMetadata(7, "checkpoint 7")})
            assert await first.committed(tp) == OffsetAndMetadata(7, "checkpoint 7")
        finally:
            await first.close()
        second = bus.consumer(group, [topic])
        await second.start()
        try:
            assert await second.committed(tp) == OffsetAndMetadata(7, "checkpoint 7")
            records = await collect(second, 13)
        finally:
            await second.close()
        assert [r.offset for r in records] == list(range(7, 20))
        assert [r.value for r in records] == [b"%d" % i for i in range(7, 20)]

    async def test_closing_does_not_commit(self, bus: Bus, topic: str) -> None:
        await bus.create_topic(topic, 1)
        tp = TopicPartition(topic, 0)
        await send_all(bus, topic, [b"%d" % i for i in range(5)])
        group = new_group()
        first = bus.consumer(group, [topic])
        await first.start()
        try:
            assert len(await collect(first, 5)) == 5
        finally:
            await first.close()
        await first.close()  # idempotent
        second = bus.consumer(group, [topic])
        await second.start()
        try:
            assert await second.committed(tp) is None
            records = await collect(second, 5)
        finally:
            await second.close()
        assert [r.offset for r in records] == list(range(5))

    async def test_latest_reads_only_records_sent_after_joining(self, bus: Bus, topic: str) -> None:
        await bus.create_topic(topic, 2)
        await send_all(bus, topic, [b"old"] * 6)
        consumer = bus.consumer(new_group(), [topic], auto_offset_reset="latest")
        await consumer.start()
        try:
            assert consumer.assignment() == all_partitions(topic, 2)
            # lag() resolves the positions, so what is sent next lies beyond them.
            assert await consumer.lag() == 0
            await send_all(bus, topic, [b"new"] * 4)
            records = await collect(consumer, 4)
            assert await consumer.getmany(timeout_s=POLL_S) == []
        finally:
            await consumer.close()
        assert [r.value for r in records] == [b"new"] * 4

    async def test_getmany_waits_for_records_and_returns_empty_on_timeout(self, bus: Bus, topic: str) -> None:
        await bus.create_topic(topic, 1)
        consumer = bus.consumer(new_group(), [topic])
        await consumer.start()
        try:
            assert await consumer.getmany(timeout_s=0.05) == []
            waiting = asyncio.create_task(consumer.getmany(timeout_s=DEADLINE_S))
            for _ in range(3):  # let the poll start waiting: the record must wake it up
                await asyncio.sleep(0)
            await send_all(bus, topic, [b"wake up"])
            records = await asyncio.wait_for(waiting, DEADLINE_S * 2)
            while not records:  # a broker may answer a poll before the record reached it
                records = await consumer.getmany(timeout_s=DEADLINE_S)
        finally:
            await consumer.close()
        assert [r.value for r in records] == [b"wake up"]

    async def test_getmany_honours_max_records_in_offset_order(self, bus: Bus, topic: str) -> None:
        await bus.create_topic(topic, 1)
        await send_all(bus, topic, [b"%d" % i for i in range(50)])
        consumer = bus.consumer(new_group(), [topic])
        await consumer.start()
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + DEADLINE_S
            records: list[Record] = []
            while len(records) < 50 and loop.time() < deadline:
                batch = await consumer.getmany(max_records=7, timeout_s=POLL_S)
                assert len(batch) <= 7
                records += batch
        finally:
            await consumer.close()
        assert [r.offset for r in records] == list(range(50))

    async def test_getmany_is_fair_across_partitions(self, bus: Bus, topic: str) -> None:
        await bus.create_topic(topic, 2)
        for p in range(2):
            await send_all(bus, topic, [b"x" * 100] * 2000, key=key_for(p, 2))
        consumer = bus.consumer(new_group(), [topic])
        await consumer.start()
        try:
            records = await collect(consumer, 4000, max_records=100)
        finally:
            await consumer.close()
        assert len(records) == 4000
        first_half = Counter(r.partition for r in records[:2000])
        # Both partitions have their turn before either one is drained.
        assert first_half[0] > 0
        assert first_half[1] > 0

    async def test_seek_moves_the_position(self, bus: Bus, topic: str) -> None:
        await bus.create_topic(topic, 1)
        tp = TopicPartition(topic, 0)
        await send_all(bus, topic, [b"%d" % i for i in range(10)])
        consumer = bus.consumer(new_group(), [topic])
        await consumer.start()
        try:
            assert len(await collect(consumer, 10)) == 10
            consumer.seek(tp, 3)
            records = await collect(consumer, 7)
        finally:
            await consumer.close()
        assert [r.offset for r in records] == list(range(3, 10))

    async def test_lag_counts_records_not_yet_read(self, bus: Bus, topic: str) -> None:
        await bus.create_topic(topic, 2)
        await send_all(bus, topic, [b"v"] * 10)
        consumer = bus.consumer(new_group(), [topic])
        await consumer.start()
        try:
            assert await consumer.lag() == 10
            assert len(await collect(consumer, 4)) == 4
            assert await consumer.lag() == 6
            assert len(await collect(consumer, 6)) == 6
            assert await consumer.lag() == 0
        finally:
            await consumer.close()
