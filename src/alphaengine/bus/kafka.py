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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Iterator, Mapping, Sequence
from functools import partial
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

from alphaengine.bus.base import (
    Headers,
    OffsetAndMetadata,
    OffsetReset,
    Record,
    RecordMetadata,
    TopicPartition,
    partition_for,
)
from alphaengine.config import KafkaBusConfig
from alphaengine.errors import BusError, ConfigError, OffsetOutOfRangeError

log = logging.getLogger(__name__)


_COMPRESSION_AVAILABLE = {"snappy": has_snappy, "lz4": has_lz4, "zstd": has_zstd}
_TOPIC_WAIT_POLL_S = 0.05


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


class KafkaBus:
    """The :class:`~alphaengine.bus.base.Bus` on an Apache Kafka cluster.

    ``start()`` connects an idempotent producer, an admin client (topic provisioning and metadata) and a
    group-less consumer that answers :meth:`beginning_offsets` and :meth:`end_offsets`. Consumers made by
    :meth:`consumer` each have their own connection and group membership.
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
        if problems:
            raise ConfigError(problems)
        self.config = config
        self._state: Literal["new", "started", "closed"] = "new"
        self._resources = contextlib.AsyncExitStack()
        self._producer: Any = None
        self._admin: Any = None
        self._offsets: Any = None
        self._partition_counts: dict[str, int] = {}
        """Partition counts of the topics sent to, read once: a topic's partitions are fixed (base.py)."""
        self._round_robin: dict[str, int] = {}
        self._unacknowledged = 0
        self._all_acknowledged = asyncio.Event()
        self._all_acknowledged.set()
        self._consumers: set[KafkaConsumer] = set()

    def __repr__(self) -> str:
        return f"<KafkaBus {self.config.bootstrap_servers} {self._state}>"

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
        """Connect to the cluster; returns when records can be sent.

        A start that fails (:class:`BusError`: the cluster cannot be reached) releases what it opened and
        may be tried again.
        """
        if self._state == "closed":
            raise BusError("the bus is closed")
        if self._state == "started":
            return
        resources = self._resources
        try:
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
            await resources.aclose()
            raise
        self._state = "started"

    async def close(self) -> None:
        """Close every consumer, flush what was sent and disconnect (idempotent)."""
        if self._state == "closed":
            return
        self._state = "closed"
        try:
            for consumer in list(self._consumers):
                await consumer.close()
        finally:
            # The producer's stop flushes the records already sent before it disconnects.
            with _kafka_errors("close the Kafka clients"):
                await self._resources.aclose()

    def _check_usable(self) -> None:
        if self._state != "started":
            raise BusError(f"the bus is {'closed' if self._state == 'closed' else 'not started'}")

    # -- topics -----------------------------------------------------------------------------------

    async def create_topic(self, name: str, partitions: int | None = None) -> None:
        """Create a topic if it does not exist; returns once every partition has a leader.

        An existing topic keeps its partition count. New topics get ``max.message.bytes`` from the
        configuration, and the configured replication factor.
        """
        self._check_usable()
        count = self.config.partitions if partitions is None else partitions
        if count < 1:
            raise ValueError(f"topic {name!r}: partitions must be positive, not {count}")
        topic = NewTopic(
            name,
            num_partitions=count,
            replication_factor=self.config.replication_factor,
            topic_configs={"max.message.bytes": str(self.config.max_message_bytes)},
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
        """
        if self._state != "started":
            self._check_usable()
        count = self._partition_counts.get(topic)
        if count is None:
            count = await self._partition_count(topic)
        if key is None:
            turn = self._round_robin.get(topic, 0)
            self._round_robin[topic] = turn + 1
            partition = turn % count
        else:
            partition = partition_for(key, count)
        try:
            sent = await self._producer.send(topic, value, key=key, partition=partition, headers=headers)
        except KafkaError as exc:
            raise _translated(exc, f"send to topic {topic!r}") from exc
        acknowledged: asyncio.Future[RecordMetadata] = asyncio.get_running_loop().create_future()
        self._unacknowledged += 1
        self._all_acknowledged.clear()
        sent.add_done_callback(partial(self._acknowledge, acknowledged))
        return acknowledged

    async def _partition_count(self, topic: str) -> int:
        """Create the topic unless it exists, and remember its partition count for the next sends."""
        await self.create_topic(topic)
        with _kafka_errors(f"read the partitions of topic {topic!r}"):
            count = len(await self._producer.partitions_for(topic))
        self._partition_counts[topic] = count
        return count

    def _acknowledge(self, acknowledged: asyncio.Future[RecordMetadata], sent: asyncio.Future[Any]) -> None:
        self._unacknowledged -= 1
        if not self._unacknowledged:
            self._all_acknowledged.set()
        if acknowledged.cancelled():
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
        """Wait until every record sent so far is acknowledged (or failed)."""
        if self._producer is not None and self._state == "started":
            with _kafka_errors("flush the producer"):
                await self._producer.flush()
        # The producer's futures are done; the callbacks that resolve ours may still be queued.
        await self._all_acknowledged.wait()

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
