"""The Kafka bus: the Bus port on Apache Kafka through aiokafka.

Records are partitioned by this package's rule (:func:`~alphaengine.bus.base.partition_for`, CRC-32 of the
key), not by Kafka's murmur2 default, so a key lands in the same partition on every bus; keyless records
go round robin per topic. The producer is idempotent with ``acks=all``: a record is acknowledged once every
in-sync replica has it, and the retries after a lost connection write it once.

Topics are created by the engine (through the admin client) with the configured partition count,
replication factor and ``max.message.bytes``, before the first record is sent to them or a consumer
subscribes to them, so they never depend on the broker's auto-creation defaults.

Consumers are members of classic consumer groups (aiokafka's round-robin assignor, eager rebalancing)
that commit only when told to. A rebalance revokes every partition of every member; a partition newly
assigned to a member resumes at the group's committed offset, while a partition the member keeps resumes
where it was (as on the embedded bus), not at the committed offset as a plain eager consumer would: that
would deliver again, to the same member, everything it read since its last commit.

**The spill journal** (``journal_path``). Without it, a producer waits for the broker as long as the
producer's buffer lasts and then fails. With it, the bus never makes a sender wait for a broker that does
not answer: a record the broker has not acknowledged within ``journal_after_s`` (or that the producer
could not take, or failed with a retriable error) sends the bus into *spill mode*:

1. every record still in the producer's buffer is copied, in send order, into the journal
   (:mod:`alphaengine.bus.journal`), and its send's future resolves once that copy is durable (fsync'd);
2. while the journal holds anything, every new record goes to the journal too, behind them, so a key's
   records reach Kafka in the order they were sent. A journaled send's future resolves with partition and
   offset -1 (the record is safe on local disk, not yet in Kafka). When the journal is full
   (``journal_max_bytes``) a send waits: back-pressure, never a drop;
3. a drain task waits until the producer has settled the copies of step 1 (it retries them until the
   broker is back, so this is also how the drain learns the broker answers), then replays the journal in
   order, skipping the records the producer did deliver, and forgets each batch once Kafka acknowledged
   it. When the journal is empty, sends go straight to the producer again.

A process killed in spill mode leaves the journal on disk; the next start replays it before anything new.
Delivery from the journal is at least once (a crash between a replay and its record in the journal
replays a batch again; so does a replay batch the producer fails): downstream, records are idempotent
by key (ticks by venue, symbol and trade id; bars by symbol, interval and start), so a duplicate changes
nothing that is stored.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import ssl
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka import TopicPartition as KafkaTopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.codec import has_lz4, has_snappy, has_zstd
from aiokafka.errors import (
    ConsumerStoppedError,
    IllegalStateError,
    InvalidPartitionsError,
    InvalidReplicationFactorError,
    InvalidTopicError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordTooLargeError,
    TopicAlreadyExistsError,
    for_code,
)
from aiokafka.errors import OffsetOutOfRangeError as KafkaOffsetOutOfRangeError
from aiokafka.structs import OffsetAndMetadata as KafkaOffsetAndMetadata

from alphaengine.backoff import Backoff
from alphaengine.bus._segments import record_size
from alphaengine.bus.base import (
    Headers,
    OffsetAndMetadata,
    OffsetReset,
    Record,
    RecordMetadata,
    TopicPartition,
    partition_for,
)
from alphaengine.bus.journal import Journal, JournalRecord
from alphaengine.config import KafkaBusConfig
from alphaengine.errors import BusError, ConfigError, OffsetOutOfRangeError
from alphaengine.metrics import BUS_SENT, JOURNAL_REPLAYED

log = logging.getLogger(__name__)


_COMPRESSION_AVAILABLE = {"snappy": has_snappy, "lz4": has_lz4, "zstd": has_zstd}
_TOPIC_WAIT_POLL_S = 0.05
_REPLAY_BATCH_RECORDS = 2000
_REPLAY_BATCH_BYTES = 8 * 1024 * 1024
_JOURNAL_SEGMENT_BYTES = (1024 * 1024, 64 * 1024 * 1024)
"""Bounds of the journal's segment size (a sixteenth of ``journal_max_bytes`` in between)."""


def _translated(exc: BaseException, what: str) -> Exception:
    """What alphaengine raises for an aiokafka failure.

    A retriable :class:`BusError`, unless retrying cannot help: a record larger than
    ``max_message_bytes`` is a :class:`ValueError`.
    """
    if isinstance(exc, KafkaOffsetOutOfRangeError):
        return OffsetOutOfRangeError(f"cannot {what}: {exc}")
    if isinstance(exc, MessageSizeTooLargeError | RecordTooLargeError):
        return ValueError(f"cannot {what}: {exc} (raise bus.max_message_bytes?)")
    return BusError(f"cannot {what}: {exc!r}")


@contextlib.contextmanager
def _kafka_errors(what: str) -> Iterator[None]:
    """Translate an aiokafka failure (see :func:`_translated`), naming what was being done."""
    try:
        yield
    except KafkaError as exc:
        raise _translated(exc, what) from exc


class _RepeatFilter(logging.Filter):
    """Lets through one of each aiokafka message per interval, and says how many were held back.

    While the broker is down, aiokafka's producer retries its metadata without a pause and logs two
    errors per attempt: thousands of identical lines a second, which would bury everything else.
    """

    def __init__(self, interval_s: float = 10.0) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._last: dict[tuple[str, int, object], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        """Whether to log the record (first of its kind in the interval), noting the suppressed ones."""
        key = (record.name, record.levelno, record.msg)
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last[0] < self.interval_s:
            self._last[key] = (last[0], last[1] + 1)
            return False
        if len(self._last) >= 1000:  # messages with varying text: forget the old ones
            self._last = {k: v for k, v in self._last.items() if now - v[0] < self.interval_s}
        self._last[key] = (now, 0)
        if last is not None and last[1]:
            record.msg = f"{record.msg} [{last[1]} more like this in the last {now - last[0]:.0f} s]"
        return True


_AIOKAFKA_LOG = logging.getLogger("aiokafka")
_REPEAT_FILTER = _RepeatFilter()


def _kafka_tp(tp: TopicPartition) -> Any:
    # aiokafka checks isinstance against its own TopicPartition, which is a different class.
    return KafkaTopicPartition(tp.topic, tp.partition)


def _records(batch: list[Any]) -> list[Record]:
    """Records read by aiokafka as this package's (a null value, a tombstone from elsewhere, as b"")."""
    return [
        Record(
            r.topic,
            r.partition,
            r.offset,
            r.key,
            b"" if (v := r.value) is None else v,
            r.headers,
            r.timestamp,
        )
        for r in batch
    ]


@dataclass(eq=False, slots=True)
class _InFlight:
    """A record the producer holds for the bus while a journal is configured (see :meth:`KafkaBus._spill`)."""

    topic: str
    key: bytes | None
    value: bytes
    headers: Headers
    timestamp_ms: int
    sent_at: float
    """Loop time of the send: the watchdog spills when the oldest one waits longer than journal_after_s."""
    acknowledged: asyncio.Future[RecordMetadata]
    """The future the sender awaits."""
    journal_offset: int | None = None
    """Where its copy went in the journal, once spilled."""


class KafkaBus:
    """The :class:`~alphaengine.bus.base.Bus` on an Apache Kafka cluster.

    ``start()`` connects an idempotent producer, an admin client (topic provisioning and metadata) and a
    group-less consumer that answers :meth:`beginning_offsets` and :meth:`end_offsets`. Consumers made by
    :meth:`consumer` each have their own connection and group membership. With ``journal_path``, it also
    opens the spill journal and runs its watchdog and drain tasks (see the module's documentation).
    """

    def __init__(self, config: KafkaBusConfig) -> None:
        problems = []
        if config.compression in _COMPRESSION_AVAILABLE and not _COMPRESSION_AVAILABLE[config.compression]():
            problems.append(
                f"bus.compression: {config.compression!r} needs the cramjam package "
                f"(pip install 'aiokafka[{config.compression}]')"
            )
        if config.partitions < 1:
            problems.append(f"bus.partitions: must be positive, not {config.partitions}")
        if config.replication_factor < 1:
            problems.append(f"bus.replication_factor: must be positive, not {config.replication_factor}")
        for name, topic in config.topics.items():
            if topic.partitions is not None and topic.partitions < 1:
                problems.append(f"bus.topics.{name}.partitions: must be positive, not {topic.partitions}")
        if config.journal_max_bytes < 1:
            problems.append(f"bus.journal_max_bytes: must be positive, not {config.journal_max_bytes}")
        if config.journal_after_s <= 0:
            problems.append(f"bus.journal_after_s: must be positive, not {config.journal_after_s}")
        if problems:
            raise ConfigError(problems)
        self.config = config
        self.journal_path = None if config.journal_path is None else Path(config.journal_path).resolve()
        """The spill journal's directory (made absolute when the bus is built), if any."""
        self._state: Literal["new", "started", "closed"] = "new"
        self._resources = contextlib.AsyncExitStack()
        self._producer: Any = None
        self._admin: Any = None
        self._offsets: Any = None
        self._partition_counts: dict[str, int] = {}
        """Partition counts of the topics sent to, read once: a topic's partitions are fixed (base.py)."""
        self._round_robin: dict[str, int] = {}
        self._unacknowledged = 0
        """Sends whose future is not done yet (:meth:`flush` waits for them)."""
        self._all_acknowledged = asyncio.Event()
        self._all_acknowledged.set()
        self._consumers: set[KafkaConsumer] = set()
        self.journal: Journal | None = None
        """The spill journal, while the bus is started with one."""
        self._spilling = False
        self._in_flight: collections.OrderedDict[int, _InFlight] = collections.OrderedDict()
        """Records in the producer's hands, in send order (only with a journal)."""
        self._next_send = 0
        self._in_flight_settled = asyncio.Event()
        self._in_flight_settled.set()
        self._delivered: set[tuple[str, int]] = set()
        """Journal copies (topic, offset) whose original the producer delivered: not replayed."""
        self._journal_tasks: list[asyncio.Task[None]] = []

    def __repr__(self) -> str:
        spilling = ", spilling to the journal" if self._spilling else ""
        return f"<KafkaBus {self.config.bootstrap_servers} {self._state}{spilling}>"

    @property
    def spilling(self) -> bool:
        """Whether sends go to the journal (the broker was unreachable, or the journal is not drained)."""
        return self._spilling

    @property
    def producer_settings(self) -> dict[str, object]:
        """The producer's settings that decide delivery: idempotence, acks, compression, sizes."""
        return {
            "enable_idempotence": True,
            "acks": "all",
            "compression_type": None if self.config.compression == "none" else self.config.compression,
            "linger_ms": self.config.linger_ms,
            "max_batch_size": self.config.max_batch_bytes,
            "max_request_size": self.config.max_message_bytes,
        }

    def _client_settings(self) -> dict[str, Any]:
        """What every aiokafka client of this bus is built with: where the cluster is and how to log in."""
        config = self.config
        settings: dict[str, Any] = {
            "bootstrap_servers": config.bootstrap_servers,
            "client_id": config.client_id,
            "request_timeout_ms": config.request_timeout_ms,
            "security_protocol": config.security_protocol,
        }
        if config.security_protocol in ("SSL", "SASL_SSL"):
            settings["ssl_context"] = ssl.create_default_context()
        if config.sasl_mechanism is not None:
            settings["sasl_mechanism"] = config.sasl_mechanism
            settings["sasl_plain_username"] = config.sasl_username
            settings["sasl_plain_password"] = config.sasl_password
        return settings

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect to the cluster (and open the journal); returns when records can be sent.

        A start that fails (:class:`BusError`: the cluster cannot be reached, or the journal is in use)
        releases what it opened and may be tried again.
        """
        if self._state == "closed":
            raise BusError("the bus is closed")
        if self._state == "started":
            return
        resources = self._resources
        try:
            if self.journal_path is not None:
                journal = self._new_journal(self.journal_path)
                await journal.open()
                resources.push_async_callback(journal.close)
                self.journal = journal
            with _kafka_errors(f"connect to Kafka at {self.config.bootstrap_servers}"):
                # Each client is registered for closing before it starts: a start that fails half-way
                # leaves open connections (and aiokafka's "unclosed" warnings) otherwise.
                self._admin = AIOKafkaAdminClient(**self._client_settings())
                resources.push_async_callback(self._admin.close)
                await self._admin.start()
                self._producer = AIOKafkaProducer(**self._client_settings(), **self.producer_settings)
                resources.push_async_callback(self._producer.stop)
                await self._producer.start()
                self._offsets = AIOKafkaConsumer(**self._client_settings(), enable_auto_commit=False)
                resources.push_async_callback(self._offsets.stop)
                await self._offsets.start()
        except BaseException:
            self.journal = None
            await resources.aclose()
            raise
        self._state = "started"
        if _REPEAT_FILTER not in _AIOKAFKA_LOG.filters:
            _AIOKAFKA_LOG.addFilter(_REPEAT_FILTER)
        if self.journal is not None:
            # What a previous process left in the journal goes to Kafka before anything new.
            self._spilling = self.journal.records > 0
            loop = asyncio.get_running_loop()
            self._journal_tasks = [
                loop.create_task(self._watch(), name="kafka-journal-watchdog"),
                loop.create_task(self._drain(), name="kafka-journal-drain"),
            ]

    def _new_journal(self, path: Path) -> Journal:
        max_bytes = self.config.journal_max_bytes
        low, high = _JOURNAL_SEGMENT_BYTES
        return Journal(path, max_bytes=max_bytes, segment_bytes=min(high, max(low, max_bytes // 16)))

    async def close(self) -> None:
        """Close every consumer, flush what was sent and disconnect (idempotent).

        With a journal: records the broker has not acknowledged by then are left in the journal (made
        durable first) for the next start to replay, so closing does not wait for an absent broker.
        """
        if self._state == "closed":
            return
        started = self._state == "started"
        self._state = "closed"
        try:
            for consumer in list(self._consumers):
                await consumer.close()
            if started and self.journal is not None:
                await self._close_journal(self.journal)
        finally:
            # The producer's stop flushes the records already sent before it disconnects.
            with _kafka_errors("close the Kafka clients"):
                await self._resources.aclose()

    async def _close_journal(self, journal: Journal) -> None:
        for task in self._journal_tasks:
            task.cancel()
        await asyncio.gather(*self._journal_tasks, return_exceptions=True)
        if self._in_flight and not self._spilling:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.journal_after_s):
                    await self._in_flight_settled.wait()
            if self._in_flight:
                self._spill("closing with records the broker has not acknowledged")
        await journal.flush()
        if self._spilling:
            # Everything the producer still holds (copies of spilled records, records of a replay cut
            # short) is in the journal: fail it, or the producer's stop would wait for the broker.
            self._producer._message_accumulator.fail_all(BusError("the bus closed; kept in the journal"))
            if journal.records:
                log.warning(
                    "closing with %d records (%d bytes) in the journal %s: replayed at the next start",
                    journal.records,
                    journal.held_bytes,
                    journal.path,
                )

    def _check_usable(self) -> None:
        if self._state != "started":
            raise BusError(f"the bus is {'closed' if self._state == 'closed' else 'not started'}")

    # -- topics -----------------------------------------------------------------------------------

    async def create_topic(self, name: str, partitions: int | None = None) -> None:
        """Create a topic if it does not exist; returns once every partition has a leader.

        An existing topic keeps its partition count. New topics get ``max.message.bytes`` from the
        configuration, the configured replication factor, and the partitions and ``retention.ms`` of
        ``bus.topics.<name>`` (else of the bus).
        """
        self._check_usable()
        settings = self.config.topics.get(name)
        count = partitions
        if count is None and settings is not None:
            count = settings.partitions
        if count is None:
            count = self.config.partitions
        if count < 1:
            raise ValueError(f"topic {name!r}: partitions must be positive, not {count}")
        topic_configs = {"max.message.bytes": str(self.config.max_message_bytes)}
        retention_ms = self.config.retention_ms
        if settings is not None and settings.retention_ms is not None:
            retention_ms = settings.retention_ms
        if retention_ms is not None:
            topic_configs["retention.ms"] = str(retention_ms)
        topic = NewTopic(
            name,
            num_partitions=count,
            replication_factor=self.config.replication_factor,
            topic_configs=topic_configs,
        )
        with _kafka_errors(f"create topic {name!r}"):
            response = await self._admin.create_topics([topic])
        for result in response.to_object()["topic_errors"]:
            code = result["error_code"]
            if code == 0:
                continue
            error = for_code(code)
            if error is TopicAlreadyExistsError:
                continue
            reason = f"cannot create topic {name!r}: {result['error_message'] or error.__name__}"
            if error in (InvalidTopicError, InvalidPartitionsError):
                raise ValueError(reason)
            if error is InvalidReplicationFactorError:
                raise ConfigError([f"bus.replication_factor: {reason}"])
            raise BusError(reason)
        await self._wait_for_leaders(name)

    async def _wait_for_leaders(self, name: str) -> None:
        """Wait until every partition of a new topic has a leader that serves it.

        A topic is created in the controller's log first; the broker's metadata shows it, then its
        partitions' leaders, a little later, and a leader serves its partition later still. Records sent
        meanwhile are retried by the producer, with a warning each time.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.request_timeout_ms / 1000
        while True:
            with _kafka_errors(f"describe topic {name!r}"):
                (described,) = await self._admin.describe_topics([name])
            if described["error_code"] == 0 and all(p["leader"] >= 0 for p in described["partitions"]):
                break
            if loop.time() >= deadline:
                raise BusError(f"topic {name!r} has no leader for every partition yet: {described}")
            await asyncio.sleep(_TOPIC_WAIT_POLL_S)
        # Answering a ListOffsets request is what a leader that serves its partition does; aiokafka
        # retries it until then.
        with _kafka_errors(f"wait for the leaders of topic {name!r}"):
            await self._offsets.end_offsets(
                [KafkaTopicPartition(name, p["partition"]) for p in described["partitions"]]
            )

    async def partitions(self, topic: str) -> int:
        """The number of partitions of a topic (:class:`BusError` if it does not exist)."""
        self._check_usable()
        # Metadata of every topic: naming an unknown topic in a metadata request makes a broker with
        # auto-creation on create it.
        with _kafka_errors("read the cluster's topics"):
            described = await self._admin.describe_topics()
        for found in described:
            if found["topic"] == topic and found["error_code"] == 0:
                return len(found["partitions"])
        raise BusError(f"unknown topic {topic!r}")

    # -- producing --------------------------------------------------------------------------------

    async def send(
        self, topic: str, value: bytes, *, key: bytes | None = None, headers: Headers = ()
    ) -> asyncio.Future[RecordMetadata]:
        """Queue a record; the future resolves once every in-sync replica has it.

        Waits while the producer's buffer for the record's partition is full (a :class:`BusError` after
        ``request_timeout_ms``). A topic this bus has not sent to yet is created unless it exists, and its
        partition count is read once: the port's topics keep their partitions.

        With a journal, the future may instead resolve once the record is durable in the journal, with
        partition and offset -1; a send then waits only while the journal is full.
        """
        if self._state != "started":
            self._check_usable()
        BUS_SENT.labels(topic).inc()
        if self.journal is not None:
            return await self._send_or_spill(self.journal, topic, value, key, headers)
        count = self._partition_counts.get(topic)
        if count is None:
            count = await self._partition_count(topic)
        try:
            # aiokafka's record builder (a C extension) takes the headers as a list, nothing else.
            sent = await self._producer.send(
                topic, value, key=key, partition=self._partition(topic, key, count), headers=list(headers)
            )
        except KafkaError as exc:
            raise _translated(exc, f"send to topic {topic!r}") from exc
        acknowledged = self._new_acknowledgement()
        sent.add_done_callback(partial(self._acknowledge, acknowledged))
        return acknowledged

    def _partition(self, topic: str, key: bytes | None, count: int) -> int:
        if key is not None:
            return partition_for(key, count)
        turn = self._round_robin.get(topic, 0)
        self._round_robin[topic] = turn + 1
        return turn % count

    async def _partition_count(self, topic: str) -> int:
        """Create the topic unless it exists, and remember its partition count for the next sends."""
        await self.create_topic(topic)
        with _kafka_errors(f"read the partitions of topic {topic!r}"):
            count = len(await self._producer.partitions_for(topic))
        self._partition_counts[topic] = count
        return count

    def _new_acknowledgement(self) -> asyncio.Future[RecordMetadata]:
        """The future a send returns, counted until it is done (for :meth:`flush`)."""
        acknowledged: asyncio.Future[RecordMetadata] = asyncio.get_running_loop().create_future()
        self._unacknowledged += 1
        self._all_acknowledged.clear()
        acknowledged.add_done_callback(self._settled)
        return acknowledged

    def _settled(self, acknowledged: asyncio.Future[RecordMetadata]) -> None:
        self._unacknowledged -= 1
        if not self._unacknowledged:
            self._all_acknowledged.set()

    def _acknowledge(self, acknowledged: asyncio.Future[RecordMetadata], sent: asyncio.Future[Any]) -> None:
        if acknowledged.done():
            return
        if sent.cancelled():
            acknowledged.set_exception(BusError("the send was cancelled"))
            return
        exc = sent.exception()
        if exc is not None:
            acknowledged.set_exception(_translated(exc, "deliver a record"))
            return
        meta = sent.result()
        acknowledged.set_result(RecordMetadata(meta.topic, meta.partition, meta.offset))

    async def flush(self) -> None:
        """Wait until every record sent so far is acknowledged, journaled or failed."""
        if self._producer is not None and self._state == "started" and self.journal is None:
            with _kafka_errors("flush the producer"):
                await self._producer.flush()
        # The producer's futures are done; the callbacks that resolve ours may still be queued. (With a
        # journal, a record the broker does not take is journaled within journal_after_s.)
        await self._all_acknowledged.wait()

    # -- the spill journal ------------------------------------------------------------------------

    async def _send_or_spill(
        self, journal: Journal, topic: str, value: bytes, key: bytes | None, headers: Headers
    ) -> asyncio.Future[RecordMetadata]:
        """Send through the producer, unless the bus is spilling or the broker does not take the record."""
        timestamp_ms = time.time_ns() // 1_000_000
        if not self._spilling:
            try:
                count = self._partition_counts.get(topic)
                if count is None:
                    count = await self._partition_count(topic)
                partition = self._partition(topic, key, count)
                # The producer waits for room in its buffer, up to request_timeout_ms: a full buffer
                # means the broker is not taking records, so the record goes to the journal sooner.
                async with asyncio.timeout(self.config.journal_after_s):
                    sent = await self._producer.send(
                        topic,
                        value,
                        key=key,
                        partition=partition,
                        headers=list(headers),
                        timestamp_ms=timestamp_ms,
                    )
            except TimeoutError:
                self._spill(f"the producer did not take a record within {self.config.journal_after_s:g} s")
            except KafkaError as exc:
                failure = _translated(exc, f"send to topic {topic!r}")
                if not isinstance(failure, BusError) or not failure.retriable:
                    raise failure from exc
                self._spill(f"the producer failed: {exc!r}")
            except BusError as exc:  # the topic could not be created or described
                self._spill(str(exc))
            else:
                entry = _InFlight(
                    topic,
                    key,
                    value,
                    tuple(headers),
                    timestamp_ms,
                    asyncio.get_running_loop().time(),
                    self._new_acknowledgement(),
                )
                self._track(entry, sent)
                return entry.acknowledged
        # Refused now what a replay could never deliver: it would hold up the journal behind it forever.
        # (The journal refuses an illegal topic name.)
        size = record_size(key, value, headers)
        if size > self.config.max_message_bytes:
            raise ValueError(
                f"cannot send to topic {topic!r}: a record of {size} bytes is larger than "
                f"{self.config.max_message_bytes} (raise bus.max_message_bytes?)"
            )
        appended = await journal.append(topic, key, value, headers, timestamp_ms)
        acknowledged = self._new_acknowledgement()
        appended.durable.add_done_callback(partial(self._journaled, acknowledged, topic))
        return acknowledged

    def _track(self, entry: _InFlight, sent: asyncio.Future[Any]) -> None:
        """Follow a record the producer took, so that it can be spilled if no acknowledgement comes."""
        number = self._next_send
        self._next_send += 1
        self._in_flight[number] = entry
        self._in_flight_settled.clear()
        sent.add_done_callback(partial(self._producer_done, number))
        if self._spilling:
            # The producer took it while the bus began to spill (the send was waiting for room).
            self._copy_to_journal(entry)

    def _producer_done(self, number: int, sent: asyncio.Future[Any]) -> None:
        entry = self._in_flight[number]
        failed = sent.cancelled() or sent.exception() is not None
        if failed and entry.journal_offset is None and self._state == "started" and not self._spilling:
            exc = sent.exception() if not sent.cancelled() else None
            failure = None if exc is None else _translated(exc, "deliver a record")
            if failure is None or (isinstance(failure, BusError) and failure.retriable):
                # Retriable: spilling copies this record, and every later one still in flight, in order.
                self._spill(f"the producer failed a record: {exc!r}")
        del self._in_flight[number]
        if not self._in_flight:
            self._in_flight_settled.set()
        if not failed and entry.journal_offset is not None:
            self._delivered.add((entry.topic, entry.journal_offset))
        if failed and entry.journal_offset is not None:
            return  # its journal copy resolves the sender's future, and is replayed
        self._acknowledge(entry.acknowledged, sent)

    def _journaled(
        self, acknowledged: asyncio.Future[RecordMetadata], topic: str, durable: asyncio.Future[None]
    ) -> None:
        if acknowledged.done():
            return
        exc = BusError("journal write cancelled") if durable.cancelled() else durable.exception()
        if exc is not None:
            acknowledged.set_exception(exc)
        else:
            acknowledged.set_result(RecordMetadata(topic, -1, -1))

    def _spill(self, reason: str) -> None:
        """Enter spill mode: copy what the producer holds into the journal; later sends go there too."""
        journal = self.journal
        if self._spilling or journal is None:
            return
        self._spilling = True
        log.warning(
            "Kafka at %s is not taking records (%s): spilling to the journal %s (%d records in flight)",
            self.config.bootstrap_servers,
            reason,
            journal.path,
            len(self._in_flight),
        )
        for entry in self._in_flight.values():
            self._copy_to_journal(entry)

    def _copy_to_journal(self, entry: _InFlight) -> None:
        """Journal a record the producer holds; the sender's future resolves with whichever is first."""
        assert self.journal is not None
        appended = self.journal.append_nowait(
            entry.topic, entry.key, entry.value, entry.headers, entry.timestamp_ms
        )
        entry.journal_offset = appended.offset
        appended.durable.add_done_callback(partial(self._journaled, entry.acknowledged, entry.topic))

    async def _watch(self) -> None:
        """Spill when the oldest record in the producer's hands has waited longer than journal_after_s."""
        after_s = self.config.journal_after_s
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(after_s / 4)
            if self._spilling or not self._in_flight:
                continue
            oldest = next(iter(self._in_flight.values()))
            if loop.time() - oldest.sent_at > after_s:
                self._spill(f"no acknowledgement within {after_s:g} s")

    async def _drain(self) -> None:
        """Replay the journal to Kafka in order while it holds records; then leave spill mode."""
        journal = self.journal
        assert journal is not None
        backoff = Backoff(0.1, 5.0)
        while True:
            await journal.has_records.wait()
            # The producer retries the records it held at the switch until the broker takes them (or
            # fails them): replaying their copies before would put a key's records out of order.
            await self._in_flight_settled.wait()
            try:
                records = journal.read(_REPLAY_BATCH_RECORDS, _REPLAY_BATCH_BYTES)
                if not records:
                    await journal.flush()  # appended, not yet written: readable once written
                    continue
                replayed = await self._replay(records, backoff)
            except Exception:
                journal.rewind()
                delay = backoff.next_delay()
                log.exception("replaying the journal %s failed; again in %.1f s", journal.path, delay)
                await asyncio.sleep(delay)
                continue
            backoff.reset()
            for record in records:
                self._delivered.discard((record.topic, record.offset))
            journal.replayed(records)
            JOURNAL_REPLAYED.inc(replayed)
            if not journal.records and not journal.full:
                # A send waiting for room in a full journal has chosen the journal already: it goes
                # there, and is replayed, before the bus sends directly again.
                self._spilling = False
                log.info("journal %s replayed to Kafka: sending to the broker directly again", journal.path)

    async def _replay(self, records: list[JournalRecord], backoff: Backoff) -> int:
        """Send a batch of journal records to Kafka and wait for every acknowledgement; the number sent."""
        sent = []
        for record in records:
            if (record.topic, record.offset) in self._delivered:
                continue
            while True:
                try:
                    count = self._partition_counts.get(record.topic)
                    if count is None:
                        count = await self._partition_count(record.topic)
                    with _kafka_errors(f"replay to topic {record.topic!r}"):
                        sent.append(
                            await self._producer.send(
                                record.topic,
                                record.value,
                                key=record.key,
                                partition=self._partition(record.topic, record.key, count),
                                headers=list(record.headers),
                                timestamp_ms=record.timestamp_ms,
                            )
                        )
                    break
                except BusError as exc:
                    # The producer's buffer stayed full (the broker went away again): what it holds is
                    # retried by the producer; this record is sent again after a pause.
                    delay = backoff.next_delay()
                    log.warning("replaying the journal: %s; again in %.1f s", exc, delay)
                    await asyncio.sleep(delay)
        if sent:
            with _kafka_errors("replay the journal"):
                await asyncio.gather(*sent)
        return len(sent)

    # -- consumers --------------------------------------------------------------------------------

    def consumer(
        self, group: str, topics: Sequence[str], *, auto_offset_reset: str = "earliest"
    ) -> KafkaConsumer:
        """A new member of ``group`` subscribed to ``topics`` (call :meth:`KafkaConsumer.start`)."""
        if not group:
            raise ValueError("a consumer group needs a non-empty name")
        if not topics:
            raise ValueError("a consumer needs at least one topic")
        if auto_offset_reset not in ("earliest", "latest"):
            raise ValueError(f"auto_offset_reset must be 'earliest' or 'latest', not {auto_offset_reset!r}")
        reset: OffsetReset = "earliest" if auto_offset_reset == "earliest" else "latest"
        return KafkaConsumer(self, group, tuple(dict.fromkeys(topics)), reset)

    # -- offsets ----------------------------------------------------------------------------------

    async def end_offsets(self, tps: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        """The next offset to be written in each partition.

        A partition that does not exist is a :class:`BusError` after ``request_timeout_ms``.
        """
        self._check_usable()
        if not tps:
            return {}
        with _kafka_errors("read end offsets"):
            found = await self._offsets.end_offsets([_kafka_tp(tp) for tp in tps])
        return {TopicPartition(tp.topic, tp.partition): int(offset) for tp, offset in found.items()}

    async def beginning_offsets(self, tps: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        """The first offset still readable in each partition.

        A partition that does not exist is a :class:`BusError` after ``request_timeout_ms``.
        """
        self._check_usable()
        if not tps:
            return {}
        with _kafka_errors("read beginning offsets"):
            found = await self._offsets.beginning_offsets([_kafka_tp(tp) for tp in tps])
        return {TopicPartition(tp.topic, tp.partition): int(offset) for tp, offset in found.items()}


class _AssignmentListener:
    """Tells a :class:`KafkaConsumer` when its partitions are revoked and assigned."""

    def __init__(self, consumer: KafkaConsumer) -> None:
        self.consumer = consumer

    def on_partitions_revoked(self, revoked: set[Any]) -> None:
        """A rebalance begins: the member reads nothing until the new assignment."""
        self.consumer._revoke()

    async def on_partitions_assigned(self, assigned: set[Any]) -> None:
        """A rebalance ended with this assignment."""
        await self.consumer._assign(assigned)


# aiokafka refuses a listener that is not a ConsumerRebalanceListener; registering the class as a virtual
# subclass satisfies that check without subclassing an untyped class.
ConsumerRebalanceListener.register(_AssignmentListener)


class KafkaConsumer:
    """A member of a Kafka consumer group, made by :meth:`KafkaBus.consumer`.

    Auto-commit is off: positions are committed only by :meth:`commit`. :meth:`getmany` serves the
    assigned partitions in turn, starting one partition further each call, so that none waits for another
    to be drained.
    """

    def __init__(self, bus: KafkaBus, group: str, topics: tuple[str, ...], reset: OffsetReset) -> None:
        self.bus = bus
        self.group = group
        self.topics = topics
        self.reset: OffsetReset = reset
        self._consumer: Any = None
        self._state: Literal["new", "started", "closed"] = "new"
        self._assignment: frozenset[TopicPartition] = frozenset()
        self._partitions: list[Any] = []
        """The assigned partitions as aiokafka's, in order: the rotation of :meth:`getmany`."""
        self._turn = 0
        self._positions: dict[Any, int] = {}
        """Where this member reads next in each partition it read from or sought (aiokafka's keys)."""
        self._kept: dict[Any, int] = {}
        """The positions at the last revocation: restored for the partitions the member gets back."""
        self._readable = asyncio.Event()
        """Set while the member holds an assignment (no rebalance in progress), and once it is closed."""

    def __repr__(self) -> str:
        return f"<KafkaConsumer group={self.group!r} topics={list(self.topics)} {self._state}>"

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Join the group; returns once the group has assigned this member its partitions.

        Creates the subscribed topics that do not exist yet, so the first assignment includes them.
        Fails with :class:`BusError` if no assignment comes within ``join_timeout_s``; a failed start
        leaves the group and may be tried again.
        """
        if self._state == "closed":
            raise BusError("the consumer is closed")
        if self._state == "started":
            return
        bus = self.bus
        bus._check_usable()
        config = bus.config
        for topic in self.topics:
            await bus.create_topic(topic)
        consumer = AIOKafkaConsumer(
            **bus._client_settings(),
            group_id=self.group,
            auto_offset_reset=self.reset,
            enable_auto_commit=False,
            session_timeout_ms=config.session_timeout_ms,
            heartbeat_interval_ms=config.heartbeat_interval_ms,
        )
        self._consumer = consumer
        consumer.subscribe(list(self.topics), listener=_AssignmentListener(self))
        try:
            with _kafka_errors(f"join group {self.group!r}"):
                async with asyncio.timeout(config.join_timeout_s):
                    await consumer.start()
                    # aiokafka's start returns at the assignment, before the listener has been told.
                    await self._readable.wait()
        except BaseException as exc:
            self._consumer = None
            await consumer.stop()
            if isinstance(exc, TimeoutError):
                raise BusError(
                    f"group {self.group!r}: no partitions assigned within {config.join_timeout_s} s"
                ) from exc
            raise
        self._state = "started"
        bus._consumers.add(self)

    async def close(self) -> None:
        """Leave the group without committing (idempotent)."""
        if self._state == "closed":
            return
        self._state = "closed"
        self.bus._consumers.discard(self)
        self._revoke()
        self._readable.set()  # wakes a getmany waiting for the end of a rebalance
        if self._consumer is not None:
            with _kafka_errors(f"leave group {self.group!r}"):
                await self._consumer.stop()

    def _running(self) -> Any:
        """The aiokafka consumer, if this member is started and its bus is usable."""
        if self._state != "started":
            raise BusError(f"the consumer is {'closed' if self._state == 'closed' else 'not started'}")
        self.bus._check_usable()
        return self._consumer

    def _revoke(self) -> None:
        self._kept = self._positions
        self._positions = {}
        self._assignment = frozenset()
        self._partitions = []
        if self._state != "closed":
            self._readable.clear()

    async def _assign(self, assigned: set[Any]) -> None:
        kept = {tp: position for tp, position in self._kept.items() if tp in assigned}
        self._kept = {}
        if kept:
            await self._restore(kept)
        self._assignment = frozenset(TopicPartition(tp.topic, tp.partition) for tp in assigned)
        self._partitions = sorted(assigned)
        if self._state != "closed":
            self._readable.set()

    async def _restore(self, kept: dict[Any, int]) -> None:
        """Resume the partitions this member kept through a rebalance where it was.

        Never behind the group's committed offset: a member dropped from the group (a missed session
        timeout) rejoins through a rebalance too, and another member may have moved on meanwhile.
        """
        consumer = self._consumer
        try:
            async with asyncio.timeout(self.bus.config.request_timeout_ms / 1000):
                committed = await consumer._coordinator.fetch_committed_offsets(list(kept))
        except (KafkaError, TimeoutError) as exc:
            # Then they resume at the committed offsets, as for any eager consumer: at least once.
            log.warning("group %r: kept partitions resume at the committed offsets: %r", self.group, exc)
            return
        for tp, position in kept.items():
            found = committed.get(tp)
            target = position if found is None else max(position, found.offset)
            consumer.seek(tp, target)
            self._positions[tp] = target

    def assignment(self) -> frozenset[TopicPartition]:
        """The partitions this member currently reads (none while a rebalance is in progress)."""
        return self._assignment

    # -- reading ----------------------------------------------------------------------------------

    async def getmany(self, max_records: int = 1000, timeout_s: float = 0.1) -> list[Record]:
        """Up to ``max_records`` records, waiting up to ``timeout_s`` for the first one.

        Records come in offset order per partition; partitions with records share ``max_records``. During
        a rebalance nothing is returned: the records of a partition that is being revoked may belong to
        another member by the time they would be processed.
        """
        consumer = self._running()
        if max_records < 1:
            return []
        if self._readable.is_set():
            records = await self._take(consumer, max_records)
            if records or timeout_s <= 0:
                return records
        elif timeout_s <= 0:
            return []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        try:
            # Cancelling aiokafka's poll loses nothing: it takes records from its buffer only after its
            # last wait, and returns them without waiting again.
            async with asyncio.timeout_at(deadline):
                await self._readable.wait()
                if self._state == "closed":
                    return []
                with _kafka_errors(f"read for group {self.group!r}"):
                    batches = await consumer.getmany(
                        timeout_ms=max(0, round((deadline - loop.time()) * 1000)), max_records=max_records
                    )
        except TimeoutError:
            return []
        except ConsumerStoppedError:
            if self._state == "closed":
                return []
            raise BusError(f"the consumer of group {self.group!r} stopped") from None
        records = []
        for tp, batch in batches.items():
            records += _records(batch)
            self._positions[tp] = batch[-1].offset + 1
        return records

    async def _take(self, consumer: Any, max_records: int) -> list[Record]:
        """Take what is already fetched, partitions in turn, without waiting.

        aiokafka drains its partitions in the order their fetches completed, so one busy partition could
        fill every call; asking each partition for its share, starting one further each time, is fair.
        """
        partitions = self._partitions
        n = len(partitions)
        if not n:
            return []
        self._turn = (self._turn + 1) % n
        candidates = partitions[self._turn :] + partitions[: self._turn]
        out: list[Record] = []
        with _kafka_errors(f"read for group {self.group!r}"):
            while candidates and len(out) < max_records:
                share = -(-(max_records - len(out)) // len(candidates))
                # Partitions that filled their share may hold more: they share what is left.
                full = []
                for tp in candidates:
                    want = min(share, max_records - len(out))
                    if want <= 0:
                        break
                    batch = (await consumer.getmany(tp, timeout_ms=0, max_records=want)).get(tp)
                    if not batch:
                        continue
                    out += _records(batch)
                    self._positions[tp] = batch[-1].offset + 1
                    if len(batch) == want:
                        full.append(tp)
                candidates = full
        return out

    # -- positions --------------------------------------------------------------------------------

    async def commit(self, offsets: Mapping[TopicPartition, OffsetAndMetadata]) -> None:
        """Commit positions of partitions this member owns; durable on the broker when this returns."""
        consumer = self._running()
        request = {}
        for tp, committed in offsets.items():
            if tp not in self._assignment:
                # Kafka would refuse it too (after a rebalance), and a member that lost a partition must
                # not move the new owner's position.
                raise BusError(f"group {self.group!r}: {tp} is not assigned to this member (rebalanced)")
            if committed.offset < 0:
                raise ValueError(f"cannot commit negative offset {committed.offset} for {tp}")
            request[_kafka_tp(tp)] = KafkaOffsetAndMetadata(committed.offset, committed.metadata)
        if not request:
            return
        with _kafka_errors(f"commit for group {self.group!r}"):
            try:
                await consumer.commit(request)
            except IllegalStateError as exc:
                raise BusError(f"group {self.group!r}: {exc} (rebalanced)") from exc

    async def committed(self, tp: TopicPartition) -> OffsetAndMetadata | None:
        """The group's committed position on a partition, with its metadata, if any."""
        consumer = self._running()
        with _kafka_errors(f"read the committed offset of group {self.group!r}"):
            async with asyncio.timeout(self.bus.config.request_timeout_ms / 1000):
                # aiokafka's committed() drops the metadata; its coordinator's OffsetFetch keeps it (and
                # retries while the group is loading or its coordinator moves).
                found = await consumer._coordinator.fetch_committed_offsets([_kafka_tp(tp)])
        committed = found.get(_kafka_tp(tp))
        if committed is None or committed.offset < 0:
            return None
        return OffsetAndMetadata(int(committed.offset), committed.metadata or "")

    def seek(self, tp: TopicPartition, offset: int) -> None:
        """Read ``tp`` from ``offset`` next (an offset out of range is reset by ``auto_offset_reset``)."""
        consumer = self._running()
        if tp not in self._assignment:
            raise ValueError(f"{tp} is not assigned to this member")
        if offset < 0:
            raise ValueError(f"cannot seek to negative offset {offset}")
        consumer.seek(_kafka_tp(tp), offset)
        self._positions[_kafka_tp(tp)] = offset

    async def lag(self) -> int:
        """Records in the assigned partitions not yet read by this member (end offsets minus positions)."""
        consumer = self._running()
        partitions = list(self._partitions)
        if not partitions:
            return 0
        positions: dict[Any, int] = {}
        with _kafka_errors(f"read the positions of group {self.group!r}"):
            for tp in partitions:
                # A position is resolved here (committed offset, else the reset policy), so records sent
                # after lag() returns lie beyond it.
                with contextlib.suppress(IllegalStateError):  # revoked meanwhile: not this member's lag
                    positions[tp] = await consumer.position(tp)
            if not positions:
                return 0
            ends = await consumer.end_offsets(list(positions))
        return sum(max(0, ends[tp] - position) for tp, position in positions.items())
