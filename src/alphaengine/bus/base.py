"""The Bus port: topics of keyed records in partitions, consumer groups and committed offsets.

The semantics are Kafka's, so the in-memory and local-log buses in this package and the Kafka bus behave
alike (the contract suite in ``tests/contracts/bus.py`` holds every implementation to them):

* a topic has a fixed number of partitions; a record with a key always lands in the same partition
  (:func:`partition_for`), so per-key order is preserved;
* offsets count from 0 per partition; a *committed* offset is the next offset the group will read;
* the members of a consumer group split the partitions between them; a partition newly assigned to a
  member resumes at the group's committed offset (or at the beginning, ``auto_offset_reset="earliest"``);
* :meth:`Bus.send` returns once the record is accepted into the producer's bounded buffer and gives a
  future that resolves when the record is durable (acknowledged).
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Mapping, Sequence
from typing import Literal, NamedTuple, Protocol, runtime_checkable

Headers = Sequence[tuple[str, bytes]]

OffsetReset = Literal["earliest", "latest"]
"""Where a group member starts in a partition the group has no committed offset for."""


class TopicPartition(NamedTuple):
    """One partition of a topic."""

    topic: str
    partition: int


class Record(NamedTuple):
    """A record read from the bus."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: Headers
    timestamp_ms: int

    @property
    def tp(self) -> TopicPartition:
        """The partition this record was read from."""
        return TopicPartition(self.topic, self.partition)


class RecordMetadata(NamedTuple):
    """Where an acknowledged record was written."""

    topic: str
    partition: int
    offset: int


class OffsetAndMetadata(NamedTuple):
    """A committed position: ``offset`` is the next record to read; ``metadata`` is free text."""

    offset: int
    metadata: str = ""


def partition_for(key: bytes | None, partitions: int, fallback: int = 0) -> int:
    """The partition of a key: CRC-32 of the key modulo the partition count (keyless: ``fallback``)."""
    if key is None:
        return fallback % partitions
    return zlib.crc32(key) % partitions


@runtime_checkable
class Consumer(Protocol):
    """A member of a consumer group subscribed to some topics."""

    async def start(self) -> None:
        """Join the group; returns once partitions can be read."""
        ...

    async def close(self) -> None:
        """Leave the group (idempotent). Uncommitted progress is not committed."""
        ...

    async def getmany(self, max_records: int = 1000, timeout_s: float = 0.1) -> list[Record]:
        """Up to ``max_records`` records from the assigned partitions, waiting at most ``timeout_s``."""
        ...

    async def commit(self, offsets: Mapping[TopicPartition, OffsetAndMetadata]) -> None:
        """Commit positions for the group; they are durable when this returns."""
        ...

    async def committed(self, tp: TopicPartition) -> OffsetAndMetadata | None:
        """The group's committed position on a partition, if any."""
        ...

    def assignment(self) -> frozenset[TopicPartition]:
        """The partitions this member currently reads."""
        ...

    def seek(self, tp: TopicPartition, offset: int) -> None:
        """Read ``tp`` from ``offset`` next."""
        ...

    async def lag(self) -> int:
        """Records in the assigned partitions not yet read by this member."""
        ...


@runtime_checkable
class Bus(Protocol):
    """A durable log of topics (Kafka, or an embedded stand-in)."""

    async def start(self) -> None:
        """Connect; returns when records can be sent."""
        ...

    async def close(self) -> None:
        """Flush what was sent and release every resource (idempotent)."""
        ...

    async def create_topic(self, name: str, partitions: int | None = None) -> None:
        """Create a topic if it does not exist (an existing topic keeps its partition count).

        ``partitions=None`` uses the bus's configured default. Sending to a topic that does not exist
        creates it with the default, as Kafka's auto-creation does.
        """
        ...

    async def partitions(self, topic: str) -> int:
        """The number of partitions of a topic."""
        ...

    async def send(
        self, topic: str, value: bytes, *, key: bytes | None = None, headers: Headers = ()
    ) -> asyncio.Future[RecordMetadata]:
        """Queue a record; await the returned future for its acknowledgement."""
        ...

    async def flush(self) -> None:
        """Wait until every record sent so far is acknowledged."""
        ...

    def consumer(self, group: str, topics: Sequence[str], *, auto_offset_reset: str = "earliest") -> Consumer:
        """A new member of ``group`` subscribed to ``topics`` (call :meth:`Consumer.start`)."""
        ...

    async def end_offsets(self, tps: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        """The next offset to be written in each partition."""
        ...

    async def beginning_offsets(self, tps: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        """The first offset still readable in each partition."""
        ...
