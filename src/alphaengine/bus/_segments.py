"""Segment files of records, shared by the local bus (:mod:`.memory`) and the spill journal (:mod:`.journal`).

A segment is named after the offset of its first record (``<base offset, 20 digits>.log``) and holds a
sequence of frames, one per record, little endian::

    u32 body length | u32 CRC-32 of the body |
    body: i64 offset | i64 timestamp_ms | i32 key length (-1: no key) | u16 header count | key |
          (u16 name length | name, UTF-8 | u32 value length | value) per header | value

Frames are appended with ``os.write`` (one call per batch), so a process killed at any moment leaves at
most one torn frame at the end of the active segment; reading back stops at the first frame whose length,
CRC or offset does not check, and :meth:`SegmentLog.open` truncates it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import struct
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from alphaengine.bus.base import Headers, Record, TopicPartition
from alphaengine.errors import BusError

log = logging.getLogger(__name__)

_FRAME_HEAD = struct.Struct("<II")
_BODY_HEAD = struct.Struct("<qqiH")
_HEADER_NAME = struct.Struct("<H")
_HEADER_VALUE = struct.Struct("<I")
_RECORD_OVERHEAD = _FRAME_HEAD.size + _BODY_HEAD.size
_HEADER_OVERHEAD = _HEADER_NAME.size + _HEADER_VALUE.size
FRAME_HEAD_SIZE = _FRAME_HEAD.size
SEGMENT_SUFFIX = ".log"
_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")


def check_topic_name(name: str) -> None:
    """Refuse a topic name Kafka would refuse (:class:`ValueError`).

    Kafka's rule, so that a configuration that works on the embedded bus also works on a broker (and a
    topic name is always a safe directory name).
    """
    if not _TOPIC_NAME.fullmatch(name) or name in {".", ".."}:
        raise ValueError(f"illegal topic name {name!r}: use 1-249 characters of [A-Za-z0-9._-]")


def record_size(key: bytes | None, value: bytes, headers: Headers) -> int:
    """The bytes a record's frame takes in a segment."""
    size = _RECORD_OVERHEAD + len(value)
    if key is not None:
        size += len(key)
    for name, header_value in headers:
        size += _HEADER_OVERHEAD + len(name.encode()) + len(header_value)
    return size


def frame(record: Record) -> list[bytes]:
    """The pieces of a record's frame, to be joined into one write with the rest of its batch.

    The record's topic and partition are not written: a segment belongs to one partition (or, in the
    journal, to one topic).
    """
    key = record.key
    pieces = [
        _BODY_HEAD.pack(
            record.offset, record.timestamp_ms, -1 if key is None else len(key), len(record.headers)
        )
    ]
    if key:
        pieces.append(key)
    for name, header_value in record.headers:
        encoded = name.encode()
        pieces += (
            _HEADER_NAME.pack(len(encoded)),
            encoded,
            _HEADER_VALUE.pack(len(header_value)),
            header_value,
        )
    pieces.append(record.value)
    crc = 0
    length = 0
    for piece in pieces:
        crc = zlib.crc32(piece, crc)
        length += len(piece)
    return [_FRAME_HEAD.pack(length, crc), *pieces]


def frame_length(data: bytes, pos: int = 0) -> int | None:
    """The length of the frame starting at ``pos`` (head included), if its head is in ``data``."""
    if pos + _FRAME_HEAD.size > len(data):
        return None
    length: int = _FRAME_HEAD.unpack_from(data, pos)[0]
    return _FRAME_HEAD.size + length


def parse_segment(
    data: bytes,
    tp: TopicPartition,
    expected: int,
    keep_from: int,
    *,
    records: list[Record] | None,
    sizes: list[int],
    max_records: int | None = None,
) -> tuple[int, int]:
    """Read the frames of ``data`` (which starts at a frame whose offset is ``expected``).

    The records at or above ``keep_from`` are appended to ``records`` (unless it is None: then only
    checked) and their frame sizes to ``sizes``; parsing stops after ``max_records`` of them. Returns the
    length of the valid prefix of ``data`` read (a frame whose length, CRC or offset does not check ends
    it) and the offset after the last frame read.
    """
    view = memoryview(data)
    topic, partition = tp
    pos = 0
    end_of_data = len(data)
    kept = 0
    while pos + _FRAME_HEAD.size <= end_of_data and (max_records is None or kept < max_records):
        length, crc = _FRAME_HEAD.unpack_from(data, pos)
        body = pos + _FRAME_HEAD.size
        end = body + length
        if length < _BODY_HEAD.size or end > end_of_data or zlib.crc32(view[body:end]) != crc:
            break
        offset, timestamp_ms, key_length, header_count = _BODY_HEAD.unpack_from(data, body)
        if offset != expected:
            break
        if offset >= keep_from:
            kept += 1
            sizes.append(end - pos)
            if records is not None:
                p = body + _BODY_HEAD.size
                key = None
                if key_length >= 0:
                    key = data[p : p + key_length]
                    p += key_length
                headers: list[tuple[str, bytes]] = []
                for _ in range(header_count):
                    (name_length,) = _HEADER_NAME.unpack_from(data, p)
                    p += _HEADER_NAME.size
                    name = data[p : p + name_length].decode()
                    p += name_length
                    (value_length,) = _HEADER_VALUE.unpack_from(data, p)
                    p += _HEADER_VALUE.size
                    headers.append((name, data[p : p + value_length]))
                    p += value_length
                records.append(
                    Record(topic, partition, offset, key, data[p:end], tuple(headers), timestamp_ms)
                )
        expected += 1
        pos = end
    return pos, expected


@contextlib.contextmanager
def io_errors(what: str) -> Iterator[None]:
    """Report a failed file operation (or an unreadable metadata file) as a :class:`BusError`."""
    try:
        yield
    except (OSError, ValueError, KeyError) as exc:
        raise BusError(f"cannot {what}: {exc!r}") from exc


def write_atomic(path: Path, data: bytes, fsync: bool) -> None:
    """Replace ``path`` with ``data`` so that a reader (or a restart) sees the old or the new file whole."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if fsync:
        fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make the creation, renaming or deletion of a directory's entries durable (fsync the directory)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_all(fds: Sequence[int], dirs: Sequence[Path]) -> None:
    """Flush files and directories to disk with fsync (run it in a worker thread: it blocks)."""
    for fd in fds:
        os.fsync(fd)
    for directory in dirs:
        fsync_dir(directory)


class SegmentLog:
    """The segment files of one partition: append framed records, roll, delete consumed segments."""

    def __init__(self, directory: Path, bases: list[int], segment_bytes: int, fsync: bool) -> None:
        self.directory = directory
        self.bases = bases
        """Base offsets of the segment files, oldest first; the last one is the active segment."""
        self.segment_bytes = segment_bytes
        self.fsync = fsync
        self.dir_dirty = False
        """A segment was created since the directory was last fsync'd."""
        self.file = self._open_active()
        self.size = os.fstat(self.file.fileno()).st_size

    @classmethod
    def open(
        cls,
        directory: Path,
        tp: TopicPartition,
        keep_from: int,
        segment_bytes: int,
        fsync: bool,
        *,
        load: bool = True,
    ) -> tuple[SegmentLog, list[Record], list[int], int]:
        """Open (or create) a partition's log, recovering the records at or above ``keep_from``.

        Returns the log, the records (only with ``load``: otherwise they are checked, not kept) with their
        sizes, and the next offset. A torn or corrupt tail is truncated with a warning.
        """
        directory.mkdir(parents=True, exist_ok=True)
        bases = sorted(
            int(p.name.removesuffix(SEGMENT_SUFFIX))
            for p in directory.iterdir()
            if p.name.endswith(SEGMENT_SUFFIX) and p.name.removesuffix(SEGMENT_SUFFIX).isdigit()
        )
        # Segments wholly below keep_from were consumed before the last stop.
        while len(bases) > 1 and bases[1] <= keep_from:
            (directory / cls.segment_name(bases.pop(0))).unlink()
        records: list[Record] | None = [] if load else None
        sizes: list[int] = []
        expected = bases[0] if bases else 0
        kept = 0
        for base in bases:
            if base != expected:  # a gap or an overlap between segments
                break
            path = directory / cls.segment_name(base)
            data = path.read_bytes()
            valid, expected = parse_segment(data, tp, expected, keep_from, records=records, sizes=sizes)
            kept += 1
            if valid < len(data):
                log.warning(
                    "%s: truncating a torn or corrupt record at byte %d (%d bytes dropped)",
                    path,
                    valid,
                    len(data) - valid,
                )
                os.truncate(path, valid)
                break
        cls._quarantine(directory, bases[kept:])
        del bases[kept:]
        if not bases:
            bases = [expected]
        loaded = records if records is not None else []
        return cls(directory, bases, segment_bytes, fsync), loaded, sizes, expected

    @classmethod
    def _quarantine(cls, directory: Path, bases: Sequence[int]) -> None:
        # Records after a corrupt one cannot be served without a gap in the offsets; keep the files for
        # forensics under another name instead of deleting them.
        for base in bases:
            path = directory / cls.segment_name(base)
            log.error("%s: follows a corrupt record, set aside as %s.corrupt", path, path.name)
            path.rename(path.with_name(path.name + ".corrupt"))

    @staticmethod
    def segment_name(base: int) -> str:
        """The file name of the segment starting at offset ``base``."""
        return f"{base:020d}{SEGMENT_SUFFIX}"

    def path_of(self, base: int) -> Path:
        """The path of the segment starting at offset ``base``."""
        return self.directory / self.segment_name(base)

    def _open_active(self) -> io.FileIO:
        path = self.path_of(self.bases[-1])
        created = not path.exists()
        f = io.FileIO(path, "a")
        if created:
            self.dir_dirty = True
        return f

    def append(self, frames: Iterable[tuple[int, list[bytes]]]) -> None:
        """Write framed records ``(offset, pieces)`` in order, rolling to a new segment when one is full."""
        chunk: list[bytes] = []
        chunk_size = 0
        for offset, pieces in frames:
            frame_size = sum(len(p) for p in pieces)
            if self.size + chunk_size > 0 and self.size + chunk_size + frame_size > self.segment_bytes:
                self._write(chunk, chunk_size)
                chunk = []
                chunk_size = 0
                self.roll(offset)
            chunk += pieces
            chunk_size += frame_size
        self._write(chunk, chunk_size)

    def _write(self, chunk: list[bytes], size: int) -> None:
        if not size:
            return
        data = memoryview(b"".join(chunk))
        fd = self.file.fileno()
        while data:
            data = data[os.write(fd, data) :]
        self.size += size

    def roll(self, base: int) -> None:
        """Start a new active segment at offset ``base`` (the next offset to be written)."""
        if self.fsync:
            # Only the active segment is fsync'd after a batch; the one being left behind must be first.
            os.fsync(self.file.fileno())
        self.file.close()
        self.bases.append(base)
        self.file = self._open_active()
        self.size = 0

    def delete_below(self, offset: int) -> None:
        """Delete the segments that hold only records below ``offset`` (never the active one)."""
        while len(self.bases) > 1 and self.bases[1] <= offset:
            with contextlib.suppress(FileNotFoundError):
                self.path_of(self.bases.pop(0)).unlink()

    def close(self) -> None:
        """Close the active segment file."""
        self.file.close()
