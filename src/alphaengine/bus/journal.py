"""The spill journal: records kept on local disk while the Kafka broker cannot take them.

The Kafka bus appends here the records it cannot deliver (see :mod:`alphaengine.bus.kafka`), and a
drain task reads them back, in order, to replay them once the broker answers. The journal is durable
local state: :meth:`Journal.append` returns a future that resolves once the record is written and
fsync'd, so a record acknowledged from the journal survives a SIGKILL (and, with ``fsync=True``, a
machine crash) and is replayed by the next process that opens the directory.

Records are kept per topic, in the segment files of the local bus (:mod:`alphaengine.bus._segments`:
CRC'd frames, a torn tail is truncated on open): each topic numbers its records from 0, and order is
kept per topic, which is the only order Kafka has across keys. The bound is on the bytes held (records
appended and not yet replayed); an append that would pass ``max_bytes`` waits, first come first
served, and the journal says so loudly (an ERROR every ``full_log_interval_s``, the
``alphaengine_bus_journal_full`` gauge) instead of dropping anything.

Layout of the directory::

    LOCK                                 flock'd while a process has the journal open
    positions.json                       {topic: offset of the first record not yet replayed}
    topics/<topic>/<base offset, 20 digits>.log      segment files

Replayed records are forgotten by writing ``positions.json`` (atomically) and deleting the segments
below it; a topic drained completely rolls to a fresh, empty segment so its files shrink to nothing.
A crash between a replay and the position write replays those records once more: the journal is
at least once, which idempotent keys downstream make harmless.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import fcntl
import io
import logging
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Literal, NamedTuple

import orjson

from alphaengine.bus._segments import (
    SegmentLog,
    check_topic_name,
    frame,
    frame_length,
    fsync_all,
    io_errors,
    parse_segment,
    record_size,
    write_atomic,
)
from alphaengine.bus.base import Headers, Record, TopicPartition
from alphaengine.errors import BusError
from alphaengine.metrics import JOURNAL_BYTES, JOURNAL_FULL, JOURNAL_RECORDS, JOURNAL_SPILLED

log = logging.getLogger(__name__)

_READ_CHUNK_BYTES = 1024 * 1024
_POSITIONS = "positions.json"


class JournalRecord(NamedTuple):
    """A record read back from the journal."""

    topic: str
    offset: int
    """The record's place in its topic's journal (not a Kafka offset)."""
    key: bytes | None
    value: bytes
    headers: Headers
    timestamp_ms: int
    size: int
    """The bytes it takes in the journal."""


class Appended(NamedTuple):
    """Where an appended record went, and when it is durable."""

    offset: int
    """The record's place in its topic's journal."""
    durable: asyncio.Future[None]
    """Resolves once the record is written and fsync'd (fails with :class:`BusError` if it cannot be)."""


class _TopicJournal:
    """One topic's segments, its write queue and its read cursor."""

    def __init__(self, name: str, log: SegmentLog, next_offset: int, replayed: int) -> None:
        self.name = name
        self.tp = TopicPartition(name, 0)
        self.log = log
        self.next_offset = next_offset
        """The offset the next appended record gets."""
        self.replayed = replayed
        """Records below this offset are replayed (and recorded so in ``positions.json``)."""
        self.unwritten: list[tuple[Record, asyncio.Future[None]]] = []
        self.syncing = False
        """Its active segment is being fsync'd (in a worker thread): it must not be rolled meanwhile."""
        # The read cursor: the frame at byte read_pos of segment read_base has offset read_at.
        self.read_base = log.bases[0]
        self.read_pos = 0
        self.read_at = log.bases[0]

    def rewind(self) -> None:
        """Read again from the first record not yet replayed."""
        self.read_base = self.read_at = self.log.bases[0]
        self.read_pos = 0

    def read(self, max_records: int, max_bytes: int, out: list[JournalRecord]) -> int:
        """Append up to ``max_records`` records after the cursor to ``out``; the bytes they take.

        Stops once ``max_bytes`` are reached (passing it by one chunk of reading at most).
        """
        chunk = min(_READ_CHUNK_BYTES, max_bytes)
        taken = 0
        taken_bytes = 0
        while (
            taken < max_records
            and taken_bytes < max_bytes
            and self.read_at < self.next_offset - len(self.unwritten)
        ):
            bases = self.log.bases
            if self.read_base not in bases or self.read_pos >= self._segment_size(self.read_base):
                # The segment is read to its end (or deleted since): the next one starts at read_at.
                i = bisect.bisect_right(bases, self.read_base)
                if i == len(bases) or bases[i] != self.read_at:
                    raise BusError(f"journal {self.log.directory}: no segment starts at {self.read_at}")
                self.read_base, self.read_pos = bases[i], 0
            with open(self.log.path_of(self.read_base), "rb") as f:
                f.seek(self.read_pos)
                data = f.read(chunk)
                need = frame_length(data)
                if need is not None and need > len(data):  # one record larger than the chunk
                    data += f.read(need - len(data))
            records: list[Record] = []
            sizes: list[int] = []
            valid, self.read_at = parse_segment(
                data,
                self.tp,
                self.read_at,
                self.replayed,
                records=records,
                sizes=sizes,
                max_records=max_records - taken,
            )
            if not valid:
                raise BusError(
                    f"journal {self.log.directory}: unreadable record at byte {self.read_pos} "
                    f"of segment {self.read_base}"
                )
            self.read_pos += valid
            taken += len(records)
            taken_bytes += sum(sizes)
            out += (
                JournalRecord(self.name, r.offset, r.key, r.value, r.headers, r.timestamp_ms, size)
                for r, size in zip(records, sizes, strict=True)
            )
        return taken_bytes

    def _segment_size(self, base: int) -> int:
        if base == self.log.bases[-1]:
            return self.log.size
        return self.log.path_of(base).stat().st_size


class Journal:
    """A bounded, durable, per-topic ordered journal of records in a local directory.

    Not thread-safe: every method runs on the event loop that opened it (file writes are small and go
    to the page cache; fsyncs run in a worker thread).
    """

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int,
        segment_bytes: int = 16 * 1024 * 1024,
        fsync: bool = True,
        full_log_interval_s: float = 10.0,
    ) -> None:
        if max_bytes < 1 or segment_bytes < 1:
            raise ValueError("max_bytes and segment_bytes must be positive")
        self.path = path
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.fsync = fsync
        self.full_log_interval_s = full_log_interval_s
        self._topics: dict[str, _TopicJournal] = {}
        self._bytes = 0
        self._records = 0
        self._lock_file: io.FileIO | None = None
        self._state: Literal["new", "open", "closing", "closed"] = "new"
        self._failure: BusError | None = None
        self._admission = asyncio.Lock()
        """Held by the append that waits for space: later appends queue behind it, in order."""
        self._space = asyncio.Event()
        self._last_full_log = float("-inf")
        self._write_scheduled = False
        self._syncing = False
        self._new_dirs: list[Path] = []
        self._durable = asyncio.Event()
        """Set while every appended record is written and fsync'd."""
        self._durable.set()
        self.has_records = asyncio.Event()
        """Set while the journal holds records not yet replayed (the drain task waits on it)."""

    def __repr__(self) -> str:
        return f"<Journal {self.path} {self._records} records, {self._bytes} bytes>"

    @property
    def records(self) -> int:
        """Records appended and not yet replayed."""
        return self._records

    @property
    def held_bytes(self) -> int:
        """Bytes of the records appended and not yet replayed."""
        return self._bytes

    @property
    def full(self) -> bool:
        """Whether an append is waiting for space."""
        return self._admission.locked()

    # -- lifecycle --------------------------------------------------------------------------------

    async def open(self) -> None:
        """Open (or create) the directory and recover what it holds (reading it in a worker thread)."""
        if self._state != "new":
            raise BusError(f"the journal at {self.path} is {self._state}")
        try:
            with io_errors(f"open the journal {self.path}"):
                await asyncio.to_thread(self._open)
        except BaseException:
            self._release_files()
            raise
        self._state = "open"
        if self._records:
            self.has_records.set()
            log.warning(
                "journal %s holds %d records (%d bytes) from a previous run: they are replayed first",
                self.path,
                self._records,
                self._bytes,
            )
        self._publish_gauges()

    def _open(self) -> None:
        topics_dir = self.path / "topics"
        topics_dir.mkdir(parents=True, exist_ok=True)
        lock = io.FileIO(self.path / "LOCK", "a")
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise BusError(f"the journal {self.path} is in use by another process") from None
        self._lock_file = lock
        positions = self._read_positions()
        for directory in sorted(p for p in topics_dir.iterdir() if p.is_dir()):
            name = directory.name
            replayed = positions.get(name, 0)
            segments, _, sizes, next_offset = SegmentLog.open(
                directory, TopicPartition(name, 0), replayed, self.segment_bytes, self.fsync, load=False
            )
            # Without its position (a lost positions.json) a topic replays what its segments still hold.
            replayed = min(max(replayed, segments.bases[0]), next_offset)
            topic = _TopicJournal(name, segments, next_offset, replayed)
            self._topics[name] = topic
            self._bytes += sum(sizes)
            self._records += len(sizes)

    def _read_positions(self) -> dict[str, int]:
        path = self.path / _POSITIONS
        if not path.exists():
            return {}
        try:
            return {str(t): int(o) for t, o in orjson.loads(path.read_bytes()).items()}
        except (ValueError, AttributeError) as exc:
            # Positions are written without fsync (see replayed): after a machine crash the file may be
            # empty. Replaying everything the segments hold again is then the safe side.
            log.warning("%s is unreadable (%r): replaying every record the journal holds", path, exc)
            return {}

    async def close(self) -> None:
        """Write and fsync what was appended, then close the files (idempotent).

        Appends waiting for space fail with :class:`BusError`; what the journal holds stays for the next
        process to replay.
        """
        if self._state == "closed":
            return
        if self._state == "open":
            self._state = "closing"
            self._space.set()  # waiting appends see the state and give up
            if self._failure is None:
                self._write()
                await self._durable.wait()
        self._state = "closed"
        self._release_files()

    def _release_files(self) -> None:
        for topic in self._topics.values():
            topic.log.close()
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def _check_usable(self) -> None:
        if self._failure is not None:
            raise self._failure
        if self._state != "open":
            raise BusError(
                f"the journal at {self.path} is {'not open' if self._state == 'new' else 'closed'}"
            )

    # -- appending --------------------------------------------------------------------------------

    async def append(
        self, topic: str, key: bytes | None, value: bytes, headers: Headers, timestamp_ms: int
    ) -> Appended:
        """Append a record, waiting while the journal is full (in the order the appends came).

        A record larger than ``max_bytes`` could never fit: :class:`ValueError`.
        """
        self._check_usable()
        size = record_size(key, value, headers)
        if size > self.max_bytes:
            raise ValueError(f"a record of {size} bytes cannot fit in a journal of {self.max_bytes} bytes")
        if self._admission.locked() or self._bytes + size > self.max_bytes:
            async with self._admission:
                await self._wait_for_space(size)
                return self.append_nowait(topic, key, value, headers, timestamp_ms)
        return self.append_nowait(topic, key, value, headers, timestamp_ms)

    async def _wait_for_space(self, size: int) -> None:
        try:
            while self._bytes + size > self.max_bytes:
                JOURNAL_FULL.set(1)
                now = time.monotonic()
                if now - self._last_full_log >= self.full_log_interval_s:
                    self._last_full_log = now
                    log.error(
                        "journal %s is full (%d of %d bytes, %d records): the producers wait until "
                        "the broker takes records again (nothing is dropped)",
                        self.path,
                        self._bytes,
                        self.max_bytes,
                        self._records,
                    )
                self._space.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.full_log_interval_s):
                        await self._space.wait()
                self._check_usable()
        finally:
            JOURNAL_FULL.set(0)

    def append_nowait(
        self, topic: str, key: bytes | None, value: bytes, headers: Headers, timestamp_ms: int
    ) -> Appended:
        """Append a record now, even past ``max_bytes``.

        For records the caller has already accepted (those in the producer's buffer when the broker went
        away): they are few, and refusing them would lose them.
        """
        self._check_usable()
        journal = self._topics.get(topic) or self._create(topic)
        headers = tuple(headers)
        record = Record(topic, 0, journal.next_offset, key, value, headers, timestamp_ms)
        journal.next_offset += 1
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        journal.unwritten.append((record, future))
        self._bytes += record_size(key, value, headers)
        self._records += 1
        self.has_records.set()
        self._durable.clear()
        JOURNAL_SPILLED.inc()
        self._publish_gauges()
        if not self._write_scheduled:
            self._write_scheduled = True
            asyncio.get_running_loop().call_soon(self._write)
        return Appended(record.offset, future)

    def _create(self, name: str) -> _TopicJournal:
        check_topic_name(name)
        directory = self.path / "topics" / name
        with io_errors(f"create the journal of topic {name!r}"):
            segments, _, _, next_offset = SegmentLog.open(
                directory, TopicPartition(name, 0), 0, self.segment_bytes, self.fsync, load=False
            )
        self._new_dirs.append(directory.parent)
        journal = self._topics[name] = _TopicJournal(name, segments, next_offset, 0)
        return journal

    def _write(self) -> None:
        """Write every unwritten record, then fsync in a worker thread (run by the loop after appends)."""
        self._write_scheduled = False
        if self._syncing or self._failure is not None:
            return
        batch = [(t, t.unwritten) for t in self._topics.values() if t.unwritten]
        if not batch:
            return
        fds: list[int] = []
        dirs, self._new_dirs = self._new_dirs, []
        try:
            for topic, items in batch:
                topic.unwritten = []
                topic.syncing = self.fsync
                topic.log.append((record.offset, frame(record)) for record, _ in items)
                fds.append(topic.log.file.fileno())
                if topic.log.dir_dirty:
                    topic.log.dir_dirty = False
                    dirs.append(topic.log.directory)
        except OSError as exc:
            self._fail(exc, batch)
            return
        if not self.fsync:
            self._written(batch)
            return
        self._syncing = True
        synced = asyncio.get_running_loop().run_in_executor(None, fsync_all, fds, dirs)
        synced.add_done_callback(partial(self._synced, batch))

    def _synced(
        self,
        batch: list[tuple[_TopicJournal, list[tuple[Record, asyncio.Future[None]]]]],
        synced: asyncio.Future[None],
    ) -> None:
        self._syncing = False
        for topic, _ in batch:
            topic.syncing = False
        exc = BusError("fsync cancelled") if synced.cancelled() else synced.exception()
        if exc is not None:
            self._fail(exc, batch)
            return
        self._written(batch)
        for topic, _ in batch:
            self._compact(topic)
        if any(t.unwritten for t in self._topics.values()):
            self._write()

    def _written(self, batch: list[tuple[_TopicJournal, list[tuple[Record, asyncio.Future[None]]]]]) -> None:
        for _, items in batch:
            for _, future in items:
                if not future.done():
                    future.set_result(None)
        if not any(t.unwritten for t in self._topics.values()):
            self._durable.set()

    def _fail(
        self,
        exc: BaseException,
        batch: list[tuple[_TopicJournal, list[tuple[Record, asyncio.Future[None]]]]],
    ) -> None:
        # What reached the files is unknown after a failed write or fsync: accept nothing more. A restart
        # recovers the journal (truncating a torn record).
        log.error("journal %s failed, no further record is accepted: %r", self.path, exc)
        self._failure = BusError(f"journal {self.path} failed: {exc!r}")
        for items in (*(items for _, items in batch), *(t.unwritten for t in self._topics.values())):
            for _, future in items:
                if not future.done():
                    future.set_exception(self._failure)
        for topic in self._topics.values():
            topic.unwritten = []
        self._durable.set()
        self._space.set()

    async def flush(self) -> None:
        """Wait until every record appended so far is durable (or the journal failed)."""
        await self._durable.wait()
        if self._failure is not None:
            raise self._failure

    # -- replaying --------------------------------------------------------------------------------

    def read(self, max_records: int = 1000, max_bytes: int = 4 * 1024 * 1024) -> list[JournalRecord]:
        """The next written records after those already read, topic by topic, in order per topic.

        Up to ``max_records``, and about ``max_bytes``. Reading does not remove them: :meth:`replayed`
        does, once they are in Kafka; :meth:`rewind` reads them again.
        """
        self._check_usable()
        out: list[JournalRecord] = []
        taken_bytes = 0
        with io_errors(f"read the journal {self.path}"):
            for topic in self._topics.values():
                if len(out) >= max_records or taken_bytes >= max_bytes:
                    break
                taken_bytes += topic.read(max_records - len(out), max_bytes - taken_bytes, out)
        return out

    def rewind(self) -> None:
        """Make :meth:`read` start again at the first record not yet replayed (after a failed replay)."""
        for topic in self._topics.values():
            topic.rewind()

    def replayed(self, records: Sequence[JournalRecord]) -> None:
        """Forget records that reached Kafka: the first ones :meth:`read` returned, in the same order."""
        self._check_usable()
        if not records:
            return
        touched: dict[str, _TopicJournal] = {}
        for record in records:
            topic = self._topics[record.topic]
            if record.offset != topic.replayed:
                raise ValueError(
                    f"journal of {record.topic!r}: replayed {record.offset}, expected {topic.replayed}"
                )
            topic.replayed += 1
            self._bytes -= record.size
            self._records -= 1
            touched[topic.name] = topic
        with io_errors(f"record the replay position of the journal {self.path}"):
            positions = {name: t.replayed for name, t in self._topics.items()}
            # Not fsync'd: this runs on the event loop, and a position lost in a machine crash only means
            # those records are replayed once more.
            write_atomic(self.path / _POSITIONS, orjson.dumps(positions), fsync=False)
            for topic in touched.values():
                topic.log.delete_below(topic.replayed)
                self._compact(topic)
        if not self._records:
            self.has_records.clear()
        self._space.set()
        self._publish_gauges()

    def _compact(self, topic: _TopicJournal) -> None:
        """Roll a topic replayed to its end onto an empty segment and delete the old ones."""
        if (
            topic.replayed == topic.next_offset
            and topic.log.size
            and not topic.unwritten
            and not topic.syncing
            and self._failure is None
        ):
            with io_errors(f"compact the journal of {topic.name!r}"):
                topic.log.roll(topic.next_offset)
                topic.log.delete_below(topic.next_offset)

    def _publish_gauges(self) -> None:
        JOURNAL_BYTES.set(self._bytes)
        JOURNAL_RECORDS.set(self._records)

    def disk_bytes(self) -> int:
        """Bytes of the segment files on disk (replayed records not yet deleted included)."""
        return sum(p.stat().st_size for p in (self.path / "topics").glob("*/*.log"))
