"""Shared pieces of the service-tier fault tests: the services, ClickHouse over HTTP, the engine process.

The fault tests run ``alphaengine`` as users do, as a subprocess on a generated configuration, against
the services of ``scripts/services/all.sh``, and stop and start those services with the same scripts (the
same ``STATE_DIR``, read from the services env file, so a service comes back on its data and ports).
Everything a test creates is named after one run id (database, topics, consumer groups, bucket), so tests
sharing one set of services never see each other's data.
"""

from __future__ import annotations

import gzip
import io
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import polars as pl
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import real_file
from tests.services.envfile import require

REPO = Path(__file__).resolve().parents[2]
SERVICES_DIR = REPO / "scripts" / "services"
SERVICE_TIMEOUT_S = 120
"""How long a service script's stop (SIGTERM, SIGKILL after 30 s) or start (readiness check) may take."""


RECORDINGS = (
    "binance-spot-ws/btcusdt_20240808.gz",
    "binance-spot-ws/btcusdt_20240809.gz",
    "binance-spot-ws/ethusdt_20240808.gz",
)
"""The real recordings the engine replays: BTCUSDT over two files (contiguous ids), ETHUSDT over one."""


@dataclass(frozen=True, slots=True)
class RecordedSymbol:
    """One symbol of the recordings: its first trade id and how many trades one replay pass holds."""

    first_id: int
    trades: int


def recorded_symbols() -> dict[str, RecordedSymbol]:
    """Read straight from the recordings (not through the engine's parser): first id and trades per symbol."""
    ids: dict[str, set[int]] = defaultdict(set)
    for name in RECORDINGS:
        with gzip.open(real_file(name), "rb") as lines:
            for line in lines:
                if b'@trade"' not in line:
                    continue
                data = orjson.loads(line.partition(b" ")[2])["data"]
                ids[data["s"]].add(int(data["t"]))
    for symbol, found in ids.items():  # what makes "contiguous" the expectation (the data README says so)
        assert max(found) - min(found) + 1 == len(found), f"{symbol}: the recording's ids have gaps"
    return {symbol: RecordedSymbol(min(found), len(found)) for symbol, found in ids.items()}


def replay_source(speed: str) -> str:
    """The body of a ``[modules.source]`` replaying :data:`RECORDINGS` in a loop at ``speed``."""
    files = ", ".join(f'"{real_file(name)}"' for name in RECORDINGS)
    return f'type = "replay"\nfiles = [{files}]\nspeed = {speed}\nloop = true'


def free_port() -> int:
    """A TCP port nothing listens on now, on the loopback interface."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run_id() -> str:
    """A short unique name part: databases, topics, groups and buckets of one test carry it."""
    return uuid.uuid4().hex[:12]


@dataclass(frozen=True, slots=True)
class Services:
    """Where the services of the env file are, and the state directory their scripts were started with."""

    state_dir: Path
    kafka_bootstrap: str
    clickhouse_host: str
    clickhouse_port: int
    clickhouse_url: str
    s3_endpoint_url: str

    @classmethod
    def from_env(cls, env: dict[str, str]) -> Services:
        """Read from the services env file; a missing entry fails the test."""
        state_dir, kafka, ch_host, ch_port, ch_url, s3 = require(
            env,
            "ALPHAENGINE_SERVICES_STATE_DIR",
            "KAFKA_BOOTSTRAP_SERVERS",
            "CLICKHOUSE_HOST",
            "CLICKHOUSE_PORT",
            "CLICKHOUSE_URL",
            "S3_ENDPOINT_URL",
        )
        return cls(Path(state_dir), kafka, ch_host, int(ch_port), ch_url, s3)

    def script(self, service: str, command: str) -> None:
        """``scripts/services/<service>.sh <command>`` on this state directory; a failure fails the test."""
        done = subprocess.run(
            ["bash", str(SERVICES_DIR / f"{service}.sh"), command],
            env={**os.environ, "STATE_DIR": str(self.state_dir)},
            capture_output=True,
            text=True,
            timeout=SERVICE_TIMEOUT_S,
            check=False,
        )
        if done.returncode != 0:
            pytest.fail(f"{service}.sh {command} failed ({done.returncode}):\n{done.stderr}", pytrace=False)


class ClickHouseHttp:
    """Queries on the ClickHouse server through its HTTP interface: a view behind the engine's store."""

    def __init__(self, url: str, database: str) -> None:
        self.url = url
        self.database = database

    def execute(self, sql: str, *, database: str | None = None) -> str:
        """Run one statement; the server's error text fails the test."""
        params = urllib.parse.urlencode({"database": database or self.database})
        request = urllib.request.Request(f"{self.url}/?{params}", data=sql.encode(), method="POST")
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return str(response.read().decode())
        except urllib.error.HTTPError as exc:
            pytest.fail(f"ClickHouse refused {sql!r}: {exc.read().decode()}", pytrace=False)

    def query(self, sql: str) -> pl.DataFrame:
        """A SELECT as a data frame (CSV with a header, so column names and types come through)."""
        text = self.execute(f"{sql} FORMAT CSVWithNames")
        return pl.read_csv(io.StringIO(text), infer_schema_length=None)

    def scalar(self, sql: str) -> int:
        """The one integer a one-row, one-column SELECT returns."""
        return int(self.execute(f"{sql} FORMAT TabSeparated").strip())

    def wait_no_inserts(self, timeout_s: float = 60.0) -> None:
        """Until no INSERT into this database runs: one a killed client had sent completely still lands."""
        # concat() keeps this query's own text from matching the pattern it looks for.
        sql = (
            "SELECT count() FROM system.processes WHERE position(query, concat('INSERT', ' INTO')) = 1 "
            f"AND position(query, '`{self.database}`') > 0"
        )
        deadline = time.monotonic() + timeout_s
        while self.scalar(sql):
            assert time.monotonic() < deadline, f"inserts into {self.database} still running"
            time.sleep(0.1)

    def drop_database(self) -> None:
        """Remove the test's database."""
        self.execute(f"DROP DATABASE IF EXISTS `{self.database}`", database="default")


def engine_toml(
    path: Path,
    services: Services,
    *,
    run: str,
    metrics_port: int,
    source: str,
    sink: str = "",
    bus: str = "",
    stop_deadline_s: float = 60.0,
) -> Path:
    """Write an engine configuration: Kafka, ClickHouse, a source, sinks and bars, all named by ``run``.

    ``source`` is the ``[modules.source]`` body without the topic; ``sink`` extra settings for both sinks;
    ``bus`` extra settings of the Kafka bus.
    The Kafka session timeout is the broker's smallest, so that a killed engine's group members are
    replaced after 6 s rather than 10.
    """
    data_dir = path.parent / f"var-{run}"
    path.write_text(
        f"""
[engine]
name = "faults-{run}"
data_dir = "{data_dir}"
stop_deadline_s = {stop_deadline_s}
report_interval_s = 2

[engine.supervisor]
backoff_initial_s = 0.2
backoff_max_s = 2.0

[bus]
kind = "kafka"
bootstrap_servers = "{services.kafka_bootstrap}"
partitions = 4
session_timeout_ms = 6000
heartbeat_interval_ms = 500
{bus}

[store]
kind = "clickhouse"
host = "{services.clickhouse_host}"
port = {services.clickhouse_port}
database = "faults_{run}"
connect_timeout_s = 2.0

[objectstore]
kind = "memory"

[metrics]
port = {metrics_port}

[admin]
socket = "{data_dir}/admin.sock"

[modules.source]
topic = "ticks-{run}"
{source}

[modules.tick_sink]
type = "tick_sink"
topic = "ticks-{run}"
group = "tick_sink-{run}"
{sink}

[modules.bar_builder]
type = "bar_builder"
input_topic = "ticks-{run}"
output_topic = "bars-{run}"
group = "bar_builder-{run}"
intervals_s = [1, 60]

[modules.bar_sink]
type = "bar_sink"
topic = "bars-{run}"
group = "bar_sink-{run}"
{sink}
"""
    )
    return path


async def committed_offsets(bootstrap: str, group: str) -> dict[int, int]:
    """A consumer group's committed offsets by partition (the groups here read one topic each)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        found = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return {tp.partition: meta.offset for tp, meta in found.items() if meta.offset >= 0}


async def topic_partitions(bootstrap: str, topic: str) -> list[TopicPartition]:
    """The partitions of a topic, as the broker describes it."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (described,) = await admin.describe_topics([topic])
    finally:
        await admin.close()
    assert described["error_code"] == 0, described
    return [TopicPartition(topic, p["partition"]) for p in described["partitions"]]


async def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    """The offset after the last record of each partition of a topic."""
    partitions = await topic_partitions(bootstrap, topic)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        ends = await consumer.end_offsets(partitions)
    finally:
        await consumer.stop()
    return {tp.partition: offset for tp, offset in ends.items()}


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class EngineProcess:
    """``alphaengine run --config <config>`` as a subprocess, its output in files, watched via /metrics."""

    def __init__(self, config: Path, metrics_port: int, name: str) -> None:
        self.config = config
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        self.stdout_path = config.parent / f"{name}.out"
        self.stderr_path = config.parent / f"{name}.err"
        with self.stdout_path.open("w") as out, self.stderr_path.open("w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "alphaengine", "run", "--config", str(config)],
                stdout=out,
                stderr=err,
                cwd=config.parent,
            )

    def stderr_tail(self, lines: int = 40) -> str:
        """The end of the engine's log, for failure messages."""
        return "\n".join(self.stderr_path.read_text(errors="replace").splitlines()[-lines:])

    def samples(self) -> Samples:
        """Every sample of the metrics endpoint by (name, labels); empty while it does not answer."""
        try:
            with urllib.request.urlopen(self.metrics_url, timeout=5) as response:
                text = response.read().decode()
        except OSError:
            return {}
        return {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def module_states(self, samples: Samples | None = None) -> dict[str, str]:
        """Each module's state as ``alphaengine_module_state`` reports it."""
        found = self.samples() if samples is None else samples
        return {
            dict(labels)["module"]: dict(labels)["state"]
            for (name, labels), value in found.items()
            if name == "alphaengine_module_state" and value == 1.0
        }

    def wait_until(self, what: str, ready: Callable[[Samples], bool], timeout_s: float = 180.0) -> Samples:
        """Poll the metrics until ``ready`` holds; the engine exiting or the timeout fails the test."""
        deadline = time.monotonic() + timeout_s
        while True:
            samples = self.samples()
            if samples and ready(samples):
                return samples
            if self.proc.poll() is not None:
                pytest.fail(
                    f"the engine exited ({self.proc.returncode}) before {what}:\n{self.stderr_tail()}",
                    pytrace=False,
                )
            if time.monotonic() > deadline:
                pytest.fail(
                    f"not within {timeout_s:.0f} s: {what}; module states {self.module_states(samples)}\n"
                    f"{self.stderr_tail()}",
                    pytrace=False,
                )
            time.sleep(0.2)

    def admin_status(self) -> dict[str, dict[str, Any]]:
        """``alphaengine admin status --json``: each module's row (state, detail, gave_up, ...) by name."""
        done = subprocess.run(
            [sys.executable, "-m", "alphaengine", "admin", "--config", str(self.config), "--json", "status"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return {m["module"]: m for m in orjson.loads(done.stdout)["modules"]}

    def wait_running(self, modules: Sequence[str]) -> None:
        """Until every module in ``modules`` is RUNNING; one the supervisor gave up on fails the test.

        A module that fails while it starts (a consumer group that took too long to form on a busy
        machine) is restarted by the supervisor, which is the engine doing its job; only a module left
        FAULTED for good is a failure.
        """

        def running(samples: Samples) -> bool:
            states = self.module_states(samples)
            if "FAULTED" in states.values():
                given_up = {m: row["last_error"] for m, row in self.admin_status().items() if row["gave_up"]}
                assert not given_up, f"modules FAULTED for good at start: {given_up}\n{self.stderr_tail()}"
            return all(states.get(m) == "RUNNING" for m in modules)

        self.wait_until(f"modules {', '.join(modules)} RUNNING", running)

    def kill(self) -> None:
        """SIGKILL: no drain, no flush, no commit."""
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self, timeout_s: float = 120.0) -> str:
        """SIGTERM (a graceful stop: drain, flush, commit); returns the summary line. A failed stop fails."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(
                f"the engine did not stop within {timeout_s:.0f} s:\n{self.stderr_tail()}", pytrace=False
            )
        assert self.proc.returncode == 0, f"unclean stop ({self.proc.returncode}):\n{self.stderr_tail()}"
        return self.stdout_path.read_text().strip().splitlines()[-1]

    def ensure_dead(self) -> None:
        """After a failed test: no engine left running."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of one metric whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def summary_counts(line: str) -> tuple[int, int]:
    """Ticks received and stored from the engine's summary line ``ticks received N, stored M, ...``."""
    assert line.startswith("ticks received "), line
    words = line.replace(",", "").split()
    return int(words[2]), int(words[4])
