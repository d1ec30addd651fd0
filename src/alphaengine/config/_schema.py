"""Typed, frozen, strict configuration objects (msgspec structs that reject unknown keys)."""

from __future__ import annotations

from typing import Any, Literal

import msgspec


class Strict(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Base of every configuration section: frozen, keyword-only, unknown keys rejected."""


class SupervisorConfig(Strict, frozen=True):
    """How crashed modules are restarted."""

    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    max_restarts: int = 5
    """A module that fails more than this many times within ``restart_window_s`` becomes FAULTED."""
    restart_window_s: float = 300.0


class EngineConfig(Strict, frozen=True):
    """The engine process as a whole."""

    name: str = "alphaengine"
    data_dir: str = "var/data"
    """Where embedded state lives (relative paths are relative to the working directory)."""
    stop_deadline_s: float = 15.0
    """Graceful stop (drain, flush, commit) must finish within this many seconds."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    report_interval_s: float = 10.0
    """Log a progress line (ticks received and stored, bars, rates) this often; 0 turns it off."""
    supervisor: SupervisorConfig = SupervisorConfig()


# -- bus ------------------------------------------------------------------------------------------


class MemoryBusConfig(Strict, frozen=True, tag="memory", tag_field="kind"):
    """The in-memory bus: Kafka's semantics inside the process, nothing kept across restarts."""

    partitions: int = 4
    max_backlog_bytes: int = 256 * 1024 * 1024
    """Producers wait while a partition holds more than this many bytes not yet committed by all groups."""


class LocalBusConfig(Strict, frozen=True, tag="local", tag_field="kind"):
    """The embedded bus: in-memory semantics, records and offsets kept in a local log directory."""

    path: str
    partitions: int = 4
    max_backlog_bytes: int = 256 * 1024 * 1024
    segment_bytes: int = 64 * 1024 * 1024
    fsync: bool = False
    """fsync each write: survives a machine crash, not only a process crash, at a cost in throughput."""


class KafkaTopicConfig(Strict, frozen=True):
    """How the Kafka bus creates one topic (unset keys: the bus's defaults)."""

    partitions: int | None = None
    retention_ms: int | None = None
    """``retention.ms``; -1 keeps records forever."""


class KafkaBusConfig(Strict, frozen=True, tag="kafka", tag_field="kind"):
    """Apache Kafka through aiokafka."""

    bootstrap_servers: str
    partitions: int = 12
    replication_factor: int = 1
    client_id: str = "alphaengine"
    compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = "zstd"
    linger_ms: int = 5
    max_batch_bytes: int = 256 * 1024
    """The producer's batch per partition: one request carries one batch per partition, so small batches
    cap the rate at a few tens of thousands of 1 KB records a second."""
    max_message_bytes: int = 8 * 1024 * 1024
    """Largest record batch: ``max.message.bytes`` of the topics the engine creates, and the producer's
    largest request (the broker's default, about 1 MiB, is too small for a batch of ticks)."""
    request_timeout_ms: int = 40_000
    """How long a request, or a record waiting in the producer's buffer, may take before it fails."""
    session_timeout_ms: int = 10_000
    """A consumer that stops heartbeating for this long is dropped from its group (the broker's
    ``group.min.session.timeout.ms``, 6000 by default, is the floor)."""
    heartbeat_interval_ms: int = 1_000
    """How often a consumer heartbeats; it also learns of a rebalance at its next heartbeat."""
    join_timeout_s: float = 60.0
    """``Consumer.start`` fails if the group has not assigned partitions to the member by then."""
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: str | None = None
    retention_ms: int | None = None
    """``retention.ms`` of the topics the engine creates; None leaves the broker's default."""
    topics: dict[str, KafkaTopicConfig] = msgspec.field(default_factory=dict)
    """Per-topic overrides of ``partitions`` and ``retention_ms`` for the topics the engine creates (a
    dead-letter topic such as ``ticks.dlq`` needs few partitions and a long retention)."""
    journal_path: str | None = None
    """Where records are spilled while the broker does not take them (None: no journal, producers wait
    for the broker). Relative to the working directory."""
    journal_max_bytes: int = 1024 * 1024 * 1024
    """Bound on the records held in the journal: past it, producers wait (and the engine says so)."""
    journal_after_s: float = 2.0
    """A record the broker has not acknowledged (or the producer not taken) within this many seconds
    sends the bus to the journal."""


BusConfig = MemoryBusConfig | LocalBusConfig | KafkaBusConfig


# -- store ----------------------------------------------------------------------------------------


class MemoryStoreConfig(Strict, frozen=True, tag="memory", tag_field="kind"):
    """The in-memory store (tests)."""


class ChdbStoreConfig(Strict, frozen=True, tag="chdb", tag_field="kind"):
    """chDB, embedded ClickHouse in a local directory (one process per directory)."""

    path: str
    database: str = "alphaengine"


class ClickHouseStoreConfig(Strict, frozen=True, tag="clickhouse", tag_field="kind"):
    """A ClickHouse server over the native protocol."""

    host: str = "127.0.0.1"
    port: int = 9000
    database: str = "alphaengine"
    user: str = "default"
    password: str = ""
    secure: bool = False
    pool_size: int = 4
    """Connections open at most; requests beyond that wait for a free one."""
    connect_timeout_s: float = 5.0
    """Connecting, TLS and the protocol handshake must finish within this many seconds."""
    query_timeout_s: float = 60.0
    """One attempt of a request (an insert, a query, a DDL statement) fails after this many seconds."""
    retry_attempts: int = 3
    """Attempts per request on connection errors and timeouts before a retriable StoreError is raised."""
    backoff_initial_s: float = 0.2
    backoff_max_s: float = 2.0
    """Capped exponential backoff (full jitter) between those attempts."""


StoreConfig = MemoryStoreConfig | ChdbStoreConfig | ClickHouseStoreConfig


# -- object store ---------------------------------------------------------------------------------


class MemoryObjectStoreConfig(Strict, frozen=True, tag="memory", tag_field="kind"):
    """The in-memory object store (tests)."""


class LocalObjectStoreConfig(Strict, frozen=True, tag="local", tag_field="kind"):
    """Objects as files under a local directory."""

    path: str


class S3ObjectStoreConfig(Strict, frozen=True, tag="s3", tag_field="kind"):
    """Any S3-compatible endpoint."""

    bucket: str
    endpoint_url: str | None = None
    region: str = "us-east-1"
    access_key_id: str | None = None
    secret_access_key: str | None = None
    prefix: str = ""
    multipart_threshold_bytes: int = 16 * 1024 * 1024
    part_size_bytes: int = 8 * 1024 * 1024


ObjectStoreConfig = MemoryObjectStoreConfig | LocalObjectStoreConfig | S3ObjectStoreConfig


# -- operations -----------------------------------------------------------------------------------


class MetricsConfig(Strict, frozen=True):
    """The Prometheus endpoint."""

    port: int
    """TCP port of ``/metrics``; 0 picks a free port."""
    host: str = "127.0.0.1"
    enabled: bool = True


class AdminConfig(Strict, frozen=True):
    """The admin socket (a Unix socket speaking JSON lines)."""

    socket: str
    token: str | None = None


class AppConfig(Strict, frozen=True):
    """A whole configuration file. ``modules`` maps a module name to its section (see ModuleConfig)."""

    metrics: MetricsConfig
    admin: AdminConfig
    engine: EngineConfig = EngineConfig()
    bus: BusConfig = MemoryBusConfig()
    store: StoreConfig = MemoryStoreConfig()
    objectstore: ObjectStoreConfig = MemoryObjectStoreConfig()
    modules: dict[str, dict[str, Any]] = msgspec.field(default_factory=dict)
