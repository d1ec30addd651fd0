"""The Bus port (topics of keyed records, consumer groups, committed offsets) and its implementations.

The interface lives in :mod:`alphaengine.bus.base`; :class:`MemoryBus` is the embedded implementation
(in memory, or kept in a local log directory) and :class:`KafkaBus` the one on Apache Kafka.
:func:`build_bus` builds the one a configuration names.
"""

from typing import assert_never

from alphaengine.bus.base import (
    Bus,
    Consumer,
    Headers,
    OffsetAndMetadata,
    Record,
    RecordMetadata,
    TopicPartition,
    partition_for,
)
from alphaengine.bus.kafka import KafkaBus, KafkaConsumer
from alphaengine.bus.memory import MemoryBus, MemoryConsumer
from alphaengine.config import BusConfig, KafkaBusConfig, LocalBusConfig, MemoryBusConfig

__all__ = [
    "Bus",
    "Consumer",
    "Headers",
    "KafkaBus",
    "KafkaConsumer",
    "MemoryBus",
    "MemoryConsumer",
    "OffsetAndMetadata",
    "Record",
    "RecordMetadata",
    "TopicPartition",
    "build_bus",
    "partition_for",
]


def build_bus(config: BusConfig) -> Bus:
    """The bus a ``[bus]`` configuration section describes (not yet started).

    A relative ``path`` of the local bus stays relative: the engine resolves it before calling this.
    """
    if isinstance(config, MemoryBusConfig):
        return MemoryBus(partitions=config.partitions, max_backlog_bytes=config.max_backlog_bytes)
    if isinstance(config, LocalBusConfig):
        return MemoryBus(
            config.path,
            partitions=config.partitions,
            max_backlog_bytes=config.max_backlog_bytes,
            segment_bytes=config.segment_bytes,
            fsync=config.fsync,
        )
    if isinstance(config, KafkaBusConfig):
        return KafkaBus(config)
    assert_never(config)
