"""Smoke tests: every real service started by scripts/services/all.sh answers and does its basic job."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.parse
import urllib.request
import uuid

import pytest

from tests.services.envfile import require

TIMEOUT_S = 60


def _http(url: str, data: bytes | None = None, timeout: float = 10) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError as exc:
        pytest.fail(f"{url} does not answer: {exc!r}", pytrace=False)


# --- Kafka ------------------------------------------------------------------------------------------


async def test_kafka_produce_consume_commit(services_env: dict[str, str]) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    (bootstrap,) = require(services_env, "KAFKA_BOOTSTRAP_SERVERS")
    topic = f"smoke-{uuid.uuid4().hex[:12]}"
    group = f"smoke-group-{uuid.uuid4().hex[:8]}"
    records = {f"key-{i}".encode(): f"value-{i}".encode() for i in range(20)}

    async with asyncio.timeout(TIMEOUT_S):
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(topic, num_partitions=4, replication_factor=1)])
        finally:
            await admin.close()

        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, acks="all")
        await producer.start()
        try:
            sent = [await producer.send_and_wait(topic, value, key=key) for key, value in records.items()]
        finally:
            await producer.stop()
        assert {md.topic for md in sent} == {topic}

        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=bootstrap,
            group_id=group,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await consumer.start()
        received: dict[bytes, bytes] = {}
        try:
            while len(received) < len(records):
                batches = await consumer.getmany(timeout_ms=1000)
                for batch in batches.values():
                    received.update((rec.key, rec.value) for rec in batch if rec.key is not None)
            await consumer.commit()
            partitions = [TopicPartition(topic, p) for p in range(4)]
            end = await consumer.end_offsets(partitions)
            committed = {tp: await consumer.committed(tp) for tp in partitions}
        finally:
            await consumer.stop()
        assert received == records
        assert {tp: committed[tp] or 0 for tp in partitions} == end
        assert sum(end.values()) == len(records)

        # a new member of the same group starts from the committed offsets: nothing left to read
        again = AIOKafkaConsumer(
            topic,
            bootstrap_servers=bootstrap,
            group_id=group,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await again.start()
        try:
            leftover = await again.getmany(timeout_ms=2000)
        finally:
            await again.stop()
        assert sum(len(batch) for batch in leftover.values()) == 0


# --- ClickHouse ---------------------------------------------------------------------------------------


def _ch(url: str, query: str) -> str:
    status, body = _http(f"{url}/", data=query.encode())
    assert status == 200, f"ClickHouse refused {query!r}: {status} {body.decode(errors='replace')}"
    return body.decode()


def test_clickhouse_version_and_replacing_merge_tree(services_env: dict[str, str]) -> None:
    (url,) = require(services_env, "CLICKHOUSE_URL")
    status, body = _http(f"{url}/?query={urllib.parse.quote('SELECT version()')}")
    assert status == 200, body
    assert body.decode().strip().startswith("18.16"), body

    db = f"smoke_{uuid.uuid4().hex[:12]}"
    _ch(url, f"CREATE DATABASE {db}")
    try:
        _ch(
            url,
            f"CREATE TABLE {db}.trades (venue String, symbol String, trade_id UInt64, ts DateTime, "
            "price Float64) ENGINE = ReplacingMergeTree() PARTITION BY toYYYYMMDD(ts) "
            "ORDER BY (venue, symbol, trade_id)",
        )
        rows = ",".join(
            f"('binance','BTCUSDT',{i},toDateTime('2026-11-20 00:00:00'),{100 + i})" for i in range(50)
        )
        _ch(url, f"INSERT INTO {db}.trades VALUES {rows}")
        _ch(url, f"INSERT INTO {db}.trades VALUES {rows}")  # the same rows again: duplicates
        raw = int(_ch(url, f"SELECT count() FROM {db}.trades"))
        assert raw in (50, 100)  # 100 until a background merge folds the duplicates
        assert int(_ch(url, f"SELECT count() FROM {db}.trades FINAL")) == 50
        _ch(url, f"OPTIMIZE TABLE {db}.trades FINAL")
        assert int(_ch(url, f"SELECT count() FROM {db}.trades")) == 50
        assert float(_ch(url, f"SELECT sum(price) FROM {db}.trades")) == sum(100 + i for i in range(50))
    finally:
        _ch(url, f"DROP DATABASE IF EXISTS {db}")


# --- S3 (moto) ----------------------------------------------------------------------------------------


async def test_s3_bucket_put_get(services_env: dict[str, str]) -> None:
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session

    endpoint, key_id, secret, region = require(
        services_env, "S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"
    )
    config = AioConfig(
        s3={"addressing_style": "path"},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    bucket = f"smoke-{uuid.uuid4().hex[:12]}"
    payload = uuid.uuid4().bytes * 4096  # 64 KiB
    async with asyncio.timeout(TIMEOUT_S):
        session = get_session()
        async with session.create_client(
            "s3",
            endpoint_url=endpoint,
            region_name=region,
            aws_access_key_id=key_id,
            aws_secret_access_key=secret,
            config=config,
        ) as s3:
            await s3.create_bucket(Bucket=bucket)
            await s3.put_object(Bucket=bucket, Key="dir/object.bin", Body=payload)
            response = await s3.get_object(Bucket=bucket, Key="dir/object.bin")
            async with response["Body"] as stream:
                got = await stream.read()
            listing = await s3.list_objects_v2(Bucket=bucket, Prefix="dir/")
            await s3.delete_object(Bucket=bucket, Key="dir/object.bin")
            await s3.delete_bucket(Bucket=bucket)
    assert got == payload
    assert [obj["Key"] for obj in listing.get("Contents", [])] == ["dir/object.bin"]


# --- Prometheus ---------------------------------------------------------------------------------------


def test_prometheus_ready(services_env: dict[str, str]) -> None:
    (url,) = require(services_env, "PROMETHEUS_URL")
    status, body = _http(f"{url}/-/ready")
    assert status == 200, body
    status, body = _http(f"{url}/api/v1/status/buildinfo")
    assert status == 200, body
    info = json.loads(body)
    assert info["status"] == "success"
    assert info["data"]["version"].startswith("2.")
