"""The embedded bus: Kafka's semantics inside the process, optionally kept in a local log directory.

``MemoryBus()`` keeps everything in memory (unit tests, throwaway runs). ``MemoryBus(path=...)`` is the
*local* bus of the embedded default: a record is appended to a segment file with ``os.write`` before its
send is acknowledged, and committed offsets are JSON files replaced atomically, so a process killed at
any moment (SIGKILL) restarts with every acknowledged record and every committed offset. With
``fsync=True`` records and offsets are also fsync'd, which survives a machine crash too.

Memory stays bounded. Every group that ever subscribed to a topic is *known* to it (and remembered in
the log directory); records below the lowest committed offset of the known groups are dropped from
memory, and segment files holding only such records are deleted. A producer waits (never drops) while a
partition holds more than ``max_backlog_bytes`` that some known group has not committed yet. A topic no
group has subscribed to (a dead-letter topic, say) simply keeps its newest ``max_backlog_bytes`` per
partition.

Layout of ``path``::

    LOCK                               flock'd while a process has the directory open
    groups/<group, %-quoted>.json      {"group", "topics", "offsets": {topic: {partition: [offset, meta]}}}
    topics/<topic>/topic.json          {"partitions": N}
    topics/<topic>/<partition>/<base offset, 20 digits>.log       segment files

The segment format (CRC'd frames, torn tails truncated on open) is :mod:`alphaengine.bus._segments`,
which the spill journal of the Kafka bus shares.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import io
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal
from urllib.parse import quote

import orjson
from prometheus_client import Gauge

from alphaengine.bus._segments import (
    SegmentLog,
    check_topic_name,
    frame,
    fsync_all,
    fsync_dir,
    io_errors,
    record_size,
    write_atomic,
)
from alphaengine.bus.base import (
    Headers,
    OffsetAndMetadata,
    OffsetReset,
    Record,
    RecordMetadata,
    TopicPartition,
    partition_for,
)
from alphaengine.errors import BusError
from alphaengine.metrics import BUS_BACKLOG, BUS_SENT

log = logging.getLogger(__name__)

_WAIT_LOG_INTERVAL_S = 10.0
_MAX_UNWRITTEN_BYTES = 8 * 1024 * 1024
"""The producer buffer of the local bus: a send waits for the disk write beyond this many bytes."""


class _Partition:
    """One partition: its retained records in memory, its offsets and its segment log (if local)."""

    __slots__ = (
        "head",
        "log",
        "next_offset",
        "readers",
        "records",
        "retained_bytes",
        "sizes",
        "space",
        "start",
        "topic",
        "tp",
    )

    def __init__(self, topic: _Topic, index: int) -> None:
        self.topic = topic
        self.tp = TopicPartition(topic.name, index)
        self.records: list[Record] = []
        self.sizes: list[int] = []
        # Trimming advances head instead of deleting from the front of the list (O(n)); the dead prefix
        # is cut once it outgrows the live part, so each record is moved O(1) times.
        self.head = 0
        self.start = 0
        """Offset of ``records[head]``: the first offset still readable."""
        self.next_offset = 0
        """Offset of the next record sent (beyond :attr:`end` while writes are pending)."""
        self.retained_bytes = 0
        """Bytes of the retained records plus those sent and not yet written."""
        self.readers: set[MemoryConsumer] = set()
        self.space = asyncio.Event()
        """Set when trimming made room; waiting producers re-check the backlog."""
        self.log: SegmentLog | None = None

    @property
    def end(self) -> int:
        """The next offset to be written: records below it are acknowledged and readable."""
        return self.start + len(self.records) - self.head

    def load(self, records: list[Record], sizes: list[int], next_offset: int) -> None:
        """Adopt records recovered from the segment log."""
        self.records = records
        self.sizes = sizes
        self.head = 0
        self.start = records[0].offset if records else next_offset
        self.next_offset = next_offset
        self.retained_bytes = sum(sizes)

    def append(self, record: Record, size: int) -> None:
        """Make a record readable."""
        self.records.append(record)
        self.sizes.append(size)

    def read(self, offset: int, max_records: int) -> list[Record]:
        """Up to ``max_records`` records from ``offset`` (which must lie in ``[start, end]``)."""
        i = self.head + offset - self.start
        return self.records[i : i + max_records]

    def trim_to(self, offset: int) -> int:
        """Drop the records below ``offset``; return the bytes freed."""
        n = min(offset, self.end) - self.start
        if n <= 0:
            return 0
        freed = sum(self.sizes[self.head : self.head + n])
        self._drop(n, freed)
        return freed

    def trim_to_bytes(self, limit: int) -> int:
        """Drop the oldest records while more than ``limit`` bytes are retained (keeping the newest)."""
        n = 0
        freed = 0
        live = len(self.records) - self.head
        while self.retained_bytes - freed > limit and n < live - 1:
            freed += self.sizes[self.head + n]
            n += 1
        if n:
            self._drop(n, freed)
        return freed

    def _drop(self, n: int, freed: int) -> None:
        self.head += n
        self.start += n
        self.retained_bytes -= freed
        if self.head * 2 >= len(self.records):
            del self.records[: self.head]
            del self.sizes[: self.head]
            self.head = 0


@dataclass(eq=False)
class _Topic:
    name: str
    partitions: list[_Partition] = field(default_factory=list)
    groups: set[str] = field(default_factory=set)
    """The known groups: every group that ever subscribed (their commits decide what may be trimmed)."""
    retained_bytes: int = 0
    round_robin: int = 0
    gauge: Gauge | None = None

    def update_gauge(self) -> None:
        """Publish the topic's retained bytes."""
        if self.gauge is None:
            self.gauge = BUS_BACKLOG.labels(self.name)
        self.gauge.set(self.retained_bytes)


@dataclass(eq=False)
class _Group:
    name: str
    topics: set[str] = field(default_factory=set)
    committed: dict[TopicPartition, OffsetAndMetadata] = field(default_factory=dict)
    members: list[MemoryConsumer] = field(default_factory=list)
    """Members in join order: the assignment is a deterministic function of it."""

    def to_json(self) -> bytes:
        """The group's file content."""
        offsets: dict[str, dict[str, list[int | str]]] = {}
        for tp, committed in sorted(self.committed.items()):
            offsets.setdefault(tp.topic, {})[str(tp.partition)] = [committed.offset, committed.metadata]
        return orjson.dumps({"group": self.name, "topics": sorted(self.topics), "offsets": offsets})

    @classmethod
    def from_json(cls, data: bytes) -> _Group:
        """A group read back from its file."""
        doc = orjson.loads(data)
        group = cls(str(doc["group"]), {str(t) for t in doc["topics"]})
        for topic, partitions in doc["offsets"].items():
            for partition, (offset, metadata) in partitions.items():
                group.committed[TopicPartition(topic, int(partition))] = OffsetAndMetadata(
                    int(offset), str(metadata)
                )
        return group


class MemoryBus:
    """The embedded :class:`~alphaengine.bus.base.Bus`: in memory, or kept in a local log at ``path``.

    ``partitions`` is the default partition count of new topics. A partition holding more than
    ``max_backlog_bytes`` not yet committed by every known group makes producers wait; a topic without
    known groups keeps its newest ``max_backlog_bytes`` per partition. With ``path``, segment files roll
    at ``segment_bytes`` and ``fsync=True`` fsyncs every write batch and commit.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        partitions: int = 4,
        max_backlog_bytes: int = 256 * 1024 * 1024,
        segment_bytes: int = 64 * 1024 * 1024,
        fsync: bool = False,
    ) -> None:
        if partitions < 1 or max_backlog_bytes < 1 or segment_bytes < 1:
            raise ValueError("partitions, max_backlog_bytes and segment_bytes must be positive")
        self.path = Path(path) if path is not None else None
        self.default_partitions = partitions
        self.max_backlog_bytes = max_backlog_bytes
        self.segment_bytes = segment_bytes
        self.fsync = fsync
        self._topics: dict[str, _Topic] = {}
        self._groups: dict[str, _Group] = {}
        self._started = False
        self._closed = False
        self._failure: BusError | None = None
        self._lock_file: io.FileIO | None = None
        self._next_member = 0
        self._last_wait_log = float("-inf")
        # Local mode: records sent and not yet written, by partition, written in one batch per loop turn.
        self._unwritten: dict[_Partition, list[tuple[Record, int, asyncio.Future[RecordMetadata]]]] = {}
        self._unwritten_bytes = 0
        self._flush_scheduled = False
        self._syncing = False
        self._last_future: asyncio.Future[RecordMetadata] | None = None

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the log directory (recovering what it holds) and accept records."""
        if self._closed:
            raise BusError("the bus is closed")
        if self._started:
            return
        if self.path is not None:
            try:
                with io_errors(f"open the log directory {self.path}"):
                    self._open_directory(self.path)
            except BaseException:
                self._release_files()
                raise
        self._started = True

    async def close(self) -> None:
        """Write what was sent, leave every group, close the log (idempotent)."""
        if self._closed:
            return
        try:
            if self._started:
                await self.flush()
        finally:
            self._closed = True
            for group in self._groups.values():
                for member in list(group.members):
                    member._detach()
                group.members.clear()
            for topic in self._topics.values():
                for part in topic.partitions:
                    part.space.set()
            self._release_files()

    def _release_files(self) -> None:
        for topic in self._topics.values():
            for part in topic.partitions:
                if part.log is not None:
                    part.log.close()
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def _check_usable(self) -> None:
        if self._failure is not None:
            raise self._failure
        if self._closed:
            raise BusError("the bus is closed")
        if not self._started:
            raise BusError("the bus is not started")

    # -- topics -----------------------------------------------------------------------------------

    async def create_topic(self, name: str, partitions: int | None = None) -> None:
        """Create a topic if it does not exist; an existing topic keeps its partition count."""
        self._check_usable()
        self._topic(name, partitions)

    async def partitions(self, topic: str) -> int:
        """The number of partitions of a topic."""
        self._check_usable()
        return len(self._existing(topic).partitions)

    def _existing(self, name: str) -> _Topic:
        topic = self._topics.get(name)
        if topic is None:
            raise BusError(f"unknown topic {name!r}")
        return topic

    def _partition(self, tp: TopicPartition) -> _Partition:
        parts = self._existing(tp.topic).partitions
        if not 0 <= tp.partition < len(parts):
            raise BusError(f"unknown partition {tp.partition} of topic {tp.topic!r}")
        return parts[tp.partition]

    def _topic(self, name: str, partitions: int | None = None) -> _Topic:
        topic = self._topics.get(name)
        if topic is not None:
            return topic
        check_topic_name(name)
        count = self.default_partitions if partitions is None else partitions
        if count < 1:
            raise ValueError(f"topic {name!r}: partitions must be positive, not {count}")
        topic = _Topic(name, groups=self._known_groups(name))
        topic.partitions = [_Partition(topic, i) for i in range(count)]
        if self.path is not None:
            directory = self.path / "topics" / name
            with io_errors(f"create topic {name!r}"):
                for part in topic.partitions:
                    self._open_log(directory, part, 0)
                # Written last: a topic directory without it is a creation cut short, ignored on open.
                write_atomic(directory / "topic.json", orjson.dumps({"partitions": count}), self.fsync)
                if self.fsync:
                    fsync_dir(directory.parent)
        self._topics[name] = topic
        topic.update_gauge()
        return topic

    def _known_groups(self, topic: str) -> set[str]:
        return {g.name for g in self._groups.values() if topic in g.topics}

    def _open_log(self, directory: Path, part: _Partition, keep_from: int) -> None:
        assert self.path is not None
        part.log, records, sizes, next_offset = SegmentLog.open(
            directory / str(part.tp.partition), part.tp, keep_from, self.segment_bytes, self.fsync
        )
        part.load(records, sizes, next_offset)

    # -- producing --------------------------------------------------------------------------------

    async def send(
        self, topic: str, value: bytes, *, key: bytes | None = None, headers: Headers = ()
    ) -> asyncio.Future[RecordMetadata]:
        """Append a record, waiting while its partition's backlog is full.

        The future resolves once the record is readable: in local mode, after it was written to its
        segment file (and fsync'd with ``fsync=True``).
        """
        self._check_usable()
        t = self._topics.get(topic) or self._topic(topic)
        n = len(t.partitions)
        if key is None:
            index = t.round_robin % n
            t.round_robin += 1
        else:
            index = partition_for(key, n)
        part = t.partitions[index]
        if t.groups and part.retained_bytes > self.max_backlog_bytes:
            await self._wait_for_space(part)
        BUS_SENT.labels(topic).inc()
        headers = tuple(headers)
        record = Record(topic, index, part.next_offset, key, value, headers, time.time_ns() // 1_000_000)
        part.next_offset += 1
        size = record_size(key, value, headers)
        part.retained_bytes += size
        t.retained_bytes += size
        future: asyncio.Future[RecordMetadata] = asyncio.get_running_loop().create_future()
        if part.log is None:
            self._publish(part, record, size, future)
            self._after_publish(part)
            t.update_gauge()
            return future
        self._unwritten.setdefault(part, []).append((record, size, future))
        self._unwritten_bytes += size
        self._last_future = future
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._write_unwritten)
        if self._unwritten_bytes > _MAX_UNWRITTEN_BYTES:
            await asyncio.wait({future})
        return future

    async def _wait_for_space(self, part: _Partition) -> None:
        t = part.topic
        while t.groups and part.retained_bytes > self.max_backlog_bytes:
            now = time.monotonic()
            if now - self._last_wait_log >= _WAIT_LOG_INTERVAL_S:
                self._last_wait_log = now
                log.warning(
                    "producer waiting: %s[%d] holds %d bytes (max_backlog_bytes %d) not yet committed; "
                    "slowest group: %s",
                    part.tp.topic,
                    part.tp.partition,
                    part.retained_bytes,
                    self.max_backlog_bytes,
                    self._slowest_group(part),
                )
            part.space.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_WAIT_LOG_INTERVAL_S):
                    await part.space.wait()
            self._check_usable()

    def _slowest_group(self, part: _Partition) -> str:
        positions = []
        for name in sorted(part.topic.groups):
            committed = self._groups[name].committed.get(part.tp)
            positions.append((committed.offset if committed else -1, name))
        offset, name = min(positions)
        where = "nothing committed" if offset < 0 else f"committed offset {offset}"
        return f"{name!r} ({where}, end offset {part.end})"

    def _publish(
        self, part: _Partition, record: Record, size: int, future: asyncio.Future[RecordMetadata]
    ) -> None:
        part.append(record, size)
        for reader in part.readers:
            reader._wakeup.set()
        if not future.cancelled():
            future.set_result(RecordMetadata(record.topic, record.partition, record.offset))

    def _after_publish(self, part: _Partition) -> None:
        if not part.topic.groups:
            self._trim(part)

    def _write_unwritten(self) -> None:
        """Write every pending record in one batch per partition (run by the loop after sends)."""
        self._flush_scheduled = False
        if self._syncing or not self._unwritten or self._closed:
            return
        batch = self._unwritten
        self._unwritten = {}
        self._unwritten_bytes = 0
        try:
            for part, items in batch.items():
                assert part.log is not None
                part.log.append((record.offset, frame(record)) for record, _, _ in items)
        except OSError as exc:
            self._fail(exc, batch)
            return
        if not self.fsync:
            self._publish_batch(batch)
            return
        fds: list[int] = []
        dirs: list[Path] = []
        for part in batch:
            assert part.log is not None
            fds.append(part.log.file.fileno())
            if part.log.dir_dirty:
                part.log.dir_dirty = False
                dirs.append(part.log.directory)
        self._syncing = True
        synced = asyncio.get_running_loop().run_in_executor(None, fsync_all, fds, dirs)
        synced.add_done_callback(partial(self._synced, batch))

    def _synced(
        self,
        batch: dict[_Partition, list[tuple[Record, int, asyncio.Future[RecordMetadata]]]],
        synced: asyncio.Future[None],
    ) -> None:
        self._syncing = False
        exc = BusError("fsync cancelled") if synced.cancelled() else synced.exception()
        if exc is not None:
            self._fail(exc, batch)
            return
        self._publish_batch(batch)
        if self._unwritten and not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._write_unwritten)

    def _publish_batch(
        self, batch: dict[_Partition, list[tuple[Record, int, asyncio.Future[RecordMetadata]]]]
    ) -> None:
        topics: set[_Topic] = set()
        for part, items in batch.items():
            for record, size, future in items:
                self._publish(part, record, size, future)
            self._after_publish(part)
            topics.add(part.topic)
        for topic in topics:
            topic.update_gauge()

    def _fail(
        self,
        exc: BaseException,
        batch: dict[_Partition, list[tuple[Record, int, asyncio.Future[RecordMetadata]]]],
    ) -> None:
        # What reached the file is unknown after a failed write or fsync: stop acknowledging anything.
        # A restart recovers the log (truncating a torn record); unacknowledged records are re-sent.
        log.error("local bus at %s failed, no further record is accepted: %r", self.path, exc)
        self._failure = BusError(f"local bus at {self.path} failed: {exc!r}")
        for items in (*batch.values(), *self._unwritten.values()):
            for _, _, future in items:
                if not future.done():
                    future.set_exception(self._failure)
        self._unwritten = {}
        self._unwritten_bytes = 0
        for topic in self._topics.values():
            for part in topic.partitions:
                part.space.set()

    async def flush(self) -> None:
        """Wait until every record sent so far is acknowledged (or failed)."""
        if self._last_future is not None and not self._last_future.done():
            await asyncio.wait({self._last_future})

    # -- trimming ---------------------------------------------------------------------------------

    def _floor(self, part: _Partition) -> int:
        """The lowest committed offset of the partition's known groups (capped at the end)."""
        floor = part.end
        for name in part.topic.groups:
            committed = self._groups[name].committed.get(part.tp)
            if committed is None:
                return part.start
            floor = min(floor, committed.offset)
        return floor

    def _trim(self, part: _Partition) -> None:
        topic = part.topic
        if topic.groups:
            freed = part.trim_to(self._floor(part))
        else:
            freed = part.trim_to_bytes(self.max_backlog_bytes)
        if not freed:
            return
        topic.retained_bytes -= freed
        part.space.set()
        if part.log is not None:
            part.log.delete_below(part.start)

    # -- consumer groups --------------------------------------------------------------------------

    def consumer(
        self, group: str, topics: Sequence[str], *, auto_offset_reset: str = "earliest"
    ) -> MemoryConsumer:
        """A new member of ``group`` subscribed to ``topics`` (call :meth:`~MemoryConsumer.start`)."""
        if not group:
            raise ValueError("a consumer group needs a non-empty name")
        if auto_offset_reset not in ("earliest", "latest"):
            raise ValueError(f"auto_offset_reset must be 'earliest' or 'latest', not {auto_offset_reset!r}")
        for topic in topics:
            check_topic_name(topic)
        reset: OffsetReset = "earliest" if auto_offset_reset == "earliest" else "latest"
        return MemoryConsumer(self, group, tuple(dict.fromkeys(topics)), reset)

    def _join(self, member: MemoryConsumer) -> None:
        self._check_usable()
        group = self._groups.get(member.group)
        if group is None:
            group = self._groups[member.group] = _Group(member.group)
        new_topics = [t for t in member.topics if t not in group.topics]
        for name in member.topics:
            self._topic(name).groups.add(group.name)
        if new_topics:
            group.topics.update(new_topics)
            self._save_group(group)
        self._next_member += 1
        member.member_id = self._next_member
        group.members.append(member)
        self._rebalance(group)

    def _leave(self, member: MemoryConsumer) -> None:
        group = self._groups.get(member.group)
        if group is None or member not in group.members:
            return
        group.members.remove(member)
        member._assign(frozenset())
        self._rebalance(group)

    def _rebalance(self, group: _Group) -> None:
        """Kafka's round-robin assignor: partitions in order, each to the next subscribed member."""
        members = group.members
        if not members:
            return
        topics = sorted({t for m in members for t in m.topics})
        new: dict[MemoryConsumer, set[TopicPartition]] = {m: set() for m in members}
        turn = 0
        for name in topics:
            for part in self._topics[name].partitions:
                for _ in range(len(members)):
                    member = members[turn % len(members)]
                    turn += 1
                    if name in member.topics:
                        new[member].add(part.tp)
                        break
        for member in members:
            member._assign(frozenset(new[member]))

    def _commit(self, group_name: str, offsets: Mapping[TopicPartition, OffsetAndMetadata]) -> None:
        group = self._groups[group_name]
        previous = dict(group.committed)
        group.committed.update(offsets)
        try:
            self._save_group(group)
        except BusError:
            # Not durable, so not committed: nothing may be trimmed on its account.
            group.committed = previous
            raise
        topics: set[_Topic] = set()
        for tp in offsets:
            part = self._partition(tp)
            self._trim(part)
            topics.add(part.topic)
        for topic in topics:
            topic.update_gauge()

    def _save_group(self, group: _Group) -> None:
        if self.path is not None:
            with io_errors(f"save the offsets of group {group.name!r}"):
                write_atomic(self._group_file(group.name), group.to_json(), self.fsync)

    def _group_file(self, name: str) -> Path:
        assert self.path is not None
        return self.path / "groups" / (quote(name, safe="") + ".json")

    async def delete_group(self, group: str) -> None:
        """Forget a consumer group that has no members: its commits no longer hold records back.

        A group that stopped consuming for good (a module removed from the configuration) would
        otherwise keep its topics' backlogs from being trimmed, and their producers waiting, forever.
        """
        self._check_usable()
        found = self._groups.get(group)
        if found is None:
            return
        if found.members:
            raise BusError(f"consumer group {group!r} still has {len(found.members)} member(s)")
        del self._groups[group]
        if self.path is not None:
            with io_errors(f"delete group {group!r}"):
                self._group_file(group).unlink(missing_ok=True)
        for name in found.topics:
            topic = self._topics.get(name)
            if topic is None:
                continue
            topic.groups.discard(group)
            for part in topic.partitions:
                self._trim(part)
                # A topic left without groups has no commits to wait for: release its producers.
                part.space.set()
            topic.update_gauge()

    # -- offsets ----------------------------------------------------------------------------------

    async def end_offsets(self, tps: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        """The next offset to be written in each partition."""
        self._check_usable()
        return {tp: self._partition(tp).end for tp in tps}

    async def beginning_offsets(self, tps: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        """The first offset still readable in each partition."""
        self._check_usable()
        return {tp: self._partition(tp).start for tp in tps}

    # -- the log directory ------------------------------------------------------------------------

    def _open_directory(self, path: Path) -> None:
        for sub in ("groups", "topics"):
            (path / sub).mkdir(parents=True, exist_ok=True)
        lock = io.FileIO(path / "LOCK", "a")
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise BusError(f"{path} is in use by another bus (in this or another process)") from None
        self._lock_file = lock
        for file in sorted((path / "groups").iterdir()):
            if file.name.endswith(".tmp"):
                file.unlink()
            elif file.name.endswith(".json"):
                group = _Group.from_json(file.read_bytes())
                self._groups[group.name] = group
        for directory in sorted((path / "topics").iterdir()):
            meta = directory / "topic.json"
            if not meta.exists():
                log.warning("%s: no topic.json (creation cut short), ignored", directory)
                continue
            count = int(orjson.loads(meta.read_bytes())["partitions"])
            topic = _Topic(directory.name, groups=self._known_groups(directory.name))
            topic.partitions = [_Partition(topic, i) for i in range(count)]
            for part in topic.partitions:
                # Only what some known group has yet to commit is read back into memory.
                committed = [self._groups[g].committed.get(part.tp) for g in topic.groups]
                keep_from = min((c.offset if c else 0 for c in committed), default=0)
                self._open_log(directory, part, keep_from)
                topic.retained_bytes += part.retained_bytes
                self._trim(part)
            self._topics[topic.name] = topic
            topic.update_gauge()


class MemoryConsumer:
    """A member of a consumer group of a :class:`MemoryBus`."""

    def __init__(self, bus: MemoryBus, group: str, topics: tuple[str, ...], reset: OffsetReset) -> None:
        self.bus = bus
        self.group = group
        self.topics = topics
        self.reset: OffsetReset = reset
        self.member_id = 0
        self._wakeup = asyncio.Event()
        """Set when a partition of this member got records, its assignment changed, or it closed."""
        self._assignment: frozenset[TopicPartition] = frozenset()
        self._parts: list[_Partition] = []
        self._positions: dict[TopicPartition, int] = {}
        self._turn = 0
        self._state: Literal["new", "joined", "closed"] = "new"

    def __repr__(self) -> str:
        return f"<MemoryConsumer group={self.group!r} member={self.member_id} {self._state}>"

    async def start(self) -> None:
        """Join the group; returns with the member's partitions assigned."""
        if self._state == "closed":
            raise BusError("the consumer is closed")
        if self._state == "new":
            self.bus._join(self)
            self._state = "joined"

    async def close(self) -> None:
        """Leave the group without committing (idempotent)."""
        if self._state == "joined":
            self.bus._leave(self)
        self._state = "closed"
        self._wakeup.set()

    def _detach(self) -> None:
        """The bus closed: drop the assignment and wake a waiting :meth:`getmany`."""
        self._assign(frozenset())
        self._state = "closed"

    def _check_joined(self) -> None:
        if self._state != "joined":
            raise BusError(f"the consumer is {'closed' if self._state == 'closed' else 'not started'}")
        self.bus._check_usable()

    def _assign(self, assignment: frozenset[TopicPartition]) -> None:
        """Take a new assignment.

        Kept partitions keep their position; new ones start at the group's committed offset, else at the
        beginning or the end (``auto_offset_reset``).
        """
        bus = self.bus
        for tp in self._assignment - assignment:
            bus._partition(tp).readers.discard(self)
            del self._positions[tp]
        group = bus._groups[self.group]
        for tp in assignment - self._assignment:
            part = bus._partition(tp)
            part.readers.add(self)
            committed = group.committed.get(tp)
            if committed is not None:
                self._positions[tp] = committed.offset
            else:
                self._positions[tp] = part.start if self.reset == "earliest" else part.end
        self._assignment = assignment
        self._parts = [bus._partition(tp) for tp in sorted(assignment)]
        self._wakeup.set()

    def assignment(self) -> frozenset[TopicPartition]:
        """The partitions this member currently reads."""
        return self._assignment

    async def getmany(self, max_records: int = 1000, timeout_s: float = 0.1) -> list[Record]:
        """Up to ``max_records`` records, waiting up to ``timeout_s`` for the first one.

        Records come in offset order per partition; partitions with records share ``max_records``.
        """
        self._check_joined()
        records = self._collect(max_records)
        if records or timeout_s <= 0:
            return records
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not records and self._state == "joined":
            self._wakeup.clear()
            try:
                async with asyncio.timeout_at(deadline):
                    await self._wakeup.wait()
            except TimeoutError:
                return self._collect(max_records)
            records = self._collect(max_records)
        return records

    def _collect(self, max_records: int) -> list[Record]:
        parts = self._parts
        n = len(parts)
        if not n or max_records < 1:
            return []
        positions = self._positions
        ready: list[tuple[_Partition, int]] = []
        # Start one partition further each call, so that none is always served last.
        self._turn = (self._turn + 1) % n
        for i in range(n):
            part = parts[(self._turn + i) % n]
            position = positions[part.tp]
            if not part.start <= position <= part.end:
                position = self._out_of_range(part, position)
            if position < part.end:
                ready.append((part, position))
        if not ready:
            return []
        if len(ready) == 1:
            part, position = ready[0]
            records = part.read(position, max_records)
            positions[part.tp] = position + len(records)
            return records
        share = -(-max_records // len(ready))
        out: list[Record] = []
        for part, position in ready:
            records = part.read(position, min(share, max_records - len(out)))
            positions[part.tp] = position + len(records)
            out += records
            if len(out) >= max_records:
                break
        return out

    def _out_of_range(self, part: _Partition, position: int) -> int:
        # Kafka's behaviour for a position the log no longer (or not yet) has: reset it by policy.
        new = part.start if self.reset == "earliest" else part.end
        log.warning(
            "group %r: offset %d of %s[%d] is out of range [%d, %d], reset to %d (%s)",
            self.group,
            position,
            part.tp.topic,
            part.tp.partition,
            part.start,
            part.end,
            new,
            self.reset,
        )
        self._positions[part.tp] = new
        return new

    async def commit(self, offsets: Mapping[TopicPartition, OffsetAndMetadata]) -> None:
        """Commit positions of partitions this member owns; durable (written to the log) on return."""
        self._check_joined()
        for tp, committed in offsets.items():
            if tp not in self._assignment:
                # Kafka refuses commits after a rebalance (CommitFailedError); so does this bus, so that
                # a member that lost a partition cannot move the new owner's position.
                raise BusError(f"group {self.group!r}: {tp} is not assigned to this member (rebalanced)")
            if committed.offset < 0:
                raise ValueError(f"cannot commit negative offset {committed.offset} for {tp}")
        self.bus._commit(self.group, {tp: OffsetAndMetadata(*c) for tp, c in offsets.items()})

    async def committed(self, tp: TopicPartition) -> OffsetAndMetadata | None:
        """The group's committed position on a partition, if any."""
        self.bus._check_usable()
        group = self.bus._groups.get(self.group)
        return None if group is None else group.committed.get(tp)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        """Read ``tp`` from ``offset`` next (an offset out of range is reset on the next read)."""
        if tp not in self._assignment:
            raise ValueError(f"{tp} is not assigned to this member")
        if offset < 0:
            raise ValueError(f"cannot seek to negative offset {offset}")
        self._positions[tp] = offset
        self._wakeup.set()

    async def lag(self) -> int:
        """Records in the assigned partitions not yet read by this member."""
        self._check_joined()
        return sum(max(0, part.end - max(self._positions[part.tp], part.start)) for part in self._parts)
