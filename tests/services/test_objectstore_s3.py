"""S3ObjectStore against moto's S3 server: the ObjectStore contract, multipart uploads, faults.

The faults are real: a TCP proxy between the store and moto damages request bodies, holds a request
back, or goes down, and a port with nothing listening stands for a server that is down.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import ClientError
from msgspec.structs import replace

from alphaengine.config import S3ObjectStoreConfig
from alphaengine.errors import ConfigError, ObjectStoreError
from alphaengine.objectstore import ObjectStore, S3ObjectStore, S3RequestError, build_objectstore
from tests.contracts.objectstore import MIB, ObjectStoreContract
from tests.services.envfile import require

TIMEOUT_S = 30
PART = 5 * MIB


@pytest.fixture
def s3_config(services_env: dict[str, str]) -> S3ObjectStoreConfig:
    """A configuration for moto, with a fresh bucket and multipart from 5 MiB (5 MiB parts)."""
    endpoint, key_id, secret, region = require(
        services_env, "S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"
    )
    return S3ObjectStoreConfig(
        bucket=f"test-{uuid.uuid4().hex[:16]}",
        endpoint_url=endpoint,
        region=region,
        access_key_id=key_id,
        secret_access_key=secret,
        multipart_threshold_bytes=PART,
        part_size_bytes=PART,
    )


@pytest.fixture
async def admin(s3_config: S3ObjectStoreConfig) -> AsyncIterator[Any]:
    """A plain aiobotocore client on moto, to look behind the store; drops the test's bucket after."""
    config = AioConfig(
        s3={"addressing_style": "path"},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    async with get_session().create_client(
        "s3",
        endpoint_url=s3_config.endpoint_url,
        region_name=s3_config.region,
        aws_access_key_id=s3_config.access_key_id,
        aws_secret_access_key=s3_config.secret_access_key,
        config=config,
    ) as client:
        yield client
        await _drop_bucket(client, s3_config.bucket)


async def _drop_bucket(client: Any, bucket: str) -> None:
    try:
        uploads = await client.list_multipart_uploads(Bucket=bucket)
    except ClientError:
        return  # never created, or already gone
    for upload in uploads.get("Uploads", []):
        await client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
    async for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        if page.get("Contents"):
            objects = [{"Key": entry["Key"]} for entry in page["Contents"]]
            await client.delete_objects(Bucket=bucket, Delete={"Objects": objects})
    await client.delete_bucket(Bucket=bucket)


async def _incomplete_uploads(admin: Any, bucket: str) -> list[str]:
    response = await admin.list_multipart_uploads(Bucket=bucket)
    return [upload["Key"] for upload in response.get("Uploads", [])]


async def _exists(admin: Any, bucket: str, key: str) -> bool:
    try:
        await admin.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if exc.response["Error"]["Code"] == "404":
            return False
        raise
    return True


@pytest.fixture
async def store(s3_config: S3ObjectStoreConfig, admin: Any) -> AsyncIterator[S3ObjectStore]:
    """A started store on the test's fresh bucket (the ``admin`` fixture drops the bucket after)."""
    started = S3ObjectStore(s3_config)
    await started.start()
    yield started
    await started.close()


class TestS3ObjectStore(ObjectStoreContract):
    @pytest.fixture
    async def objects(self, store: S3ObjectStore) -> ObjectStore:
        return store


class TestS3ObjectStoreUnderAPrefix(ObjectStoreContract):
    """The contract again with keys under a prefix, next to objects outside it that must stay unseen."""

    @pytest.fixture
    async def objects(self, s3_config: S3ObjectStoreConfig, admin: Any) -> AsyncIterator[ObjectStore]:
        config = replace(s3_config, prefix="runs/r1")
        prefixed = S3ObjectStore(config)
        await prefixed.start()
        for neighbour in ["runs/r10/ticks/a", "runs/r1", "ticks/a", "runs/r0/x"]:
            await admin.put_object(Bucket=config.bucket, Key=neighbour, Body=b"not yours")
        yield prefixed
        await prefixed.close()


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


# --- uploads --------------------------------------------------------------------------------------


async def test_a_12_mib_put_file_is_a_multipart_upload(
    store: S3ObjectStore, admin: Any, tmp_path: Path
) -> None:
    source = tmp_path / "source.bin"
    payload = os.urandom(12 * MIB)
    source.write_bytes(payload)
    copy = tmp_path / "copy.bin"

    await store.put_file("archive/big.bin", source)

    # A multipart object's ETag is the MD5 of its parts' MD5s, then "-<number of parts>".
    head = await admin.head_object(Bucket=store.bucket, Key="archive/big.bin")
    parts = [payload[i : i + PART] for i in range(0, len(payload), PART)]
    joined = b"".join(bytes.fromhex(_md5(part)) for part in parts)
    assert head["ETag"].strip('"') == f"{_md5(joined)}-3"
    assert await _incomplete_uploads(admin, store.bucket) == []
    info = await store.head("archive/big.bin")
    assert info is not None
    assert info.size == 12 * MIB
    await store.get_file("archive/big.bin", copy)
    assert copy.read_bytes() == payload


async def test_a_file_below_the_threshold_is_one_put(
    store: S3ObjectStore, admin: Any, tmp_path: Path
) -> None:
    source = tmp_path / "small.bin"
    payload = os.urandom(PART - 1)
    source.write_bytes(payload)

    await store.put_file("models/small.bin", source)

    head = await admin.head_object(Bucket=store.bucket, Key="models/small.bin")
    assert head["ETag"].strip('"') == _md5(payload)  # a single PUT's ETag is the MD5 of its data
    assert await store.get("models/small.bin") == payload


async def test_a_missing_file_uploads_nothing(store: S3ObjectStore, admin: Any, tmp_path: Path) -> None:
    with pytest.raises(ObjectStoreError, match=r"put_file 'a/b'.*missing\.bin"):
        await store.put_file("a/b", tmp_path / "missing.bin")

    assert await store.list() == []
    assert await _incomplete_uploads(admin, store.bucket) == []


async def test_get_file_creates_the_directory_and_leaves_no_temporary_file(
    store: S3ObjectStore, tmp_path: Path
) -> None:
    await store.put("k", b"content")

    await store.get_file("k", tmp_path / "new" / "dir" / "out.bin")

    assert (tmp_path / "new" / "dir" / "out.bin").read_bytes() == b"content"
    assert os.listdir(tmp_path / "new" / "dir") == ["out.bin"]


async def test_a_listing_of_more_than_one_page(store: S3ObjectStore) -> None:
    keys = [f"ticks/date=2026-11-20/part-{i:04d}" for i in range(1100)]  # S3 pages hold 1000 keys
    limit = asyncio.Semaphore(32)

    async def put(key: str) -> None:
        async with limit:
            await store.put(key, b"x")

    await asyncio.gather(*(put(key) for key in keys))

    assert [info.key for info in await store.list("ticks/")] == keys


# --- bucket, prefix, lifecycle, configuration -----------------------------------------------------


async def test_start_creates_the_bucket_and_keys_live_under_the_prefix(
    s3_config: S3ObjectStoreConfig, admin: Any
) -> None:
    config = replace(s3_config, prefix="/alphaengine/prod/")
    store = S3ObjectStore(config)
    await store.start()
    await store.start()  # idempotent
    try:
        await store.put("models/m.txt", b"weights")
        listing = await admin.list_objects_v2(Bucket=config.bucket)
        assert [entry["Key"] for entry in listing["Contents"]] == ["alphaengine/prod/models/m.txt"]
        assert [info.key for info in await store.list()] == ["models/m.txt"]
    finally:
        await store.close()
        await store.close()  # idempotent

    # A second store on the same bucket: the bucket is there already, which is fine.
    again = S3ObjectStore(config)
    await again.start()
    try:
        assert await again.get("models/m.txt") == b"weights"
    finally:
        await again.close()


async def test_keys_too_long_with_the_prefix_are_refused(s3_config: S3ObjectStoreConfig, admin: Any) -> None:
    store = S3ObjectStore(replace(s3_config, prefix="p" * 100))
    await store.start()
    try:
        with pytest.raises(ObjectStoreError, match=r"key .* longer than 1024 bytes") as caught:
            await store.put("k" * 1000, b"x")
        assert not caught.value.retriable
    finally:
        await store.close()


async def test_a_closed_store_refuses_work(s3_config: S3ObjectStoreConfig, admin: Any) -> None:
    store = S3ObjectStore(s3_config)
    with pytest.raises(ObjectStoreError, match="not started"):
        await store.get("k")
    await store.start()
    await store.close()
    with pytest.raises(ObjectStoreError, match="not started"):
        await store.put("k", b"x")


async def test_a_deleted_bucket_is_an_error_retrying_does_not_fix(store: S3ObjectStore, admin: Any) -> None:
    await admin.delete_bucket(Bucket=store.bucket)

    with pytest.raises(S3RequestError, match="does not exist") as caught:
        await store.put("k", b"x")
    assert not caught.value.retriable


def test_bad_configurations_name_their_keys() -> None:
    with pytest.raises(ConfigError) as caught:
        S3ObjectStore(
            S3ObjectStoreConfig(
                bucket="b",
                access_key_id="only-the-id",
                part_size_bytes=MIB,
                multipart_threshold_bytes=0,
                prefix="a/../b",
            )
        )
    message = str(caught.value)
    for key in ["access_key_id", "part_size_bytes", "multipart_threshold_bytes", "prefix"]:
        assert f"objectstore.{key}" in message


def test_build_objectstore_builds_the_s3_store() -> None:
    store = build_objectstore(S3ObjectStoreConfig(bucket="archive", prefix="engine"))
    assert isinstance(store, S3ObjectStore)
    assert (store.bucket, store.prefix) == ("archive", "engine/")


# --- faults ---------------------------------------------------------------------------------------


class FaultyProxy:
    """A TCP proxy in front of the S3 server that can damage or hold back requests, or go down.

    ``corrupt`` turns every 0xFF byte the client sends into 0xFE: HTTP headers are ASCII, so only
    bodies change, and their length stays the same. ``hold`` stops forwarding a connection once a
    request containing that marker passes (and sets ``held``): the request hangs until ``stop``.
    """

    def __init__(self, upstream_url: str) -> None:
        parts = urlsplit(upstream_url)
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.port = 0
        self.corrupt = False
        self.hold: bytes | None = None
        self.held = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._cut = asyncio.Event()
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Listen (on the same port as before, after a stop)."""
        self._cut = asyncio.Event()
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening and cut every connection: the server is gone, as far as the client can tell."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        self._cut.set()
        for writer in self._writers:
            writer.transport.abort()
        await asyncio.gather(*self._handlers)

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        writers = {client_writer}
        self._writers.add(client_writer)
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self._upstream)
            writers.add(upstream_writer)
            self._writers.add(upstream_writer)
            # A cut connection fails one direction or both: that is the fault wanted, not a proxy error.
            await asyncio.gather(
                self._pipe(client_reader, upstream_writer, requests=True),
                self._pipe(upstream_reader, client_writer, requests=False),
                return_exceptions=True,
            )
        except OSError:
            pass  # the server is not there: the client sees its connection closed
        finally:
            for writer in writers:
                writer.transport.abort()
            self._writers -= writers
            self._handlers.discard(handler)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, requests: bool
    ) -> None:
        while data := await reader.read(64 * 1024):
            if requests and self.hold is not None and self.hold in data:
                self.held.set()
                await self._cut.wait()  # never forwarded
                return
            if requests and self.corrupt:
                data = data.replace(b"\xff", b"\xfe")
            writer.write(data)
            await writer.drain()
        writer.write_eof()


@pytest.fixture
async def proxy(s3_config: S3ObjectStoreConfig) -> AsyncIterator[FaultyProxy]:
    assert s3_config.endpoint_url is not None
    faulty = FaultyProxy(s3_config.endpoint_url)
    await faulty.start()
    yield faulty
    await faulty.stop()


@pytest.fixture
async def proxied(
    s3_config: S3ObjectStoreConfig, admin: Any, proxy: FaultyProxy
) -> AsyncIterator[S3ObjectStore]:
    """A started store that reaches moto through ``proxy``."""
    store = S3ObjectStore(replace(s3_config, endpoint_url=proxy.url))
    await store.start()
    yield store
    await store.close()


async def test_data_damaged_on_its_way_is_refused(
    proxied: S3ObjectStore, proxy: FaultyProxy, admin: Any
) -> None:
    proxy.corrupt = True

    with pytest.raises(ObjectStoreError, match="integrity check failed") as caught:
        await proxied.put("models/m.bin", b"\xff" * 1000)

    assert caught.value.retriable  # sending it again can succeed
    # moto stores what it received without checking Content-MD5: the store deleted it again.
    assert not await _exists(admin, proxied.bucket, "models/m.bin")
    proxy.corrupt = False
    await proxied.put("models/m.bin", b"\xff" * 1000)
    assert await proxied.get("models/m.bin") == b"\xff" * 1000


async def test_a_damaged_part_aborts_the_multipart_upload(
    proxied: S3ObjectStore, proxy: FaultyProxy, admin: Any, tmp_path: Path
) -> None:
    source = tmp_path / "source.bin"
    source.write_bytes(b"\xff" * (12 * MIB))
    proxy.corrupt = True

    with pytest.raises(ObjectStoreError, match="integrity check failed on part") as caught:
        await proxied.put_file("archive/big.bin", source)

    assert caught.value.retriable
    assert await _incomplete_uploads(admin, proxied.bucket) == []
    assert not await _exists(admin, proxied.bucket, "archive/big.bin")


async def test_a_cancelled_multipart_upload_is_aborted(
    proxied: S3ObjectStore, proxy: FaultyProxy, admin: Any, tmp_path: Path
) -> None:
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(12 * MIB))
    proxy.hold = b"partNumber=2"
    upload = asyncio.create_task(proxied.put_file("archive/big.bin", source))

    async with asyncio.timeout(TIMEOUT_S):
        await proxy.held.wait()
        # Parts 1 and 3 reach moto while part 2 hangs: cancel an upload that is well under way.
        (in_progress,) = (await admin.list_multipart_uploads(Bucket=proxied.bucket))["Uploads"]
        while len((await admin.list_parts(**_upload_of(in_progress, proxied.bucket))).get("Parts", [])) < 2:
            await asyncio.sleep(0.01)
    upload.cancel()
    with pytest.raises(asyncio.CancelledError):
        await upload

    assert await _incomplete_uploads(admin, proxied.bucket) == []
    assert not await _exists(admin, proxied.bucket, "archive/big.bin")


def _upload_of(upload: dict[str, Any], bucket: str) -> dict[str, str]:
    return {"Bucket": bucket, "Key": upload["Key"], "UploadId": upload["UploadId"]}


async def test_a_server_that_is_down_is_a_retriable_error(s3_config: S3ObjectStoreConfig) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        nothing_listens = f"http://127.0.0.1:{probe.getsockname()[1]}"
    store = S3ObjectStore(replace(s3_config, endpoint_url=nothing_listens))

    started = time.monotonic()
    with pytest.raises(ObjectStoreError, match="cannot reach S3") as caught:
        await store.start()

    assert caught.value.retriable
    assert nothing_listens in str(caught.value)
    assert time.monotonic() - started < 10  # a few retries with backoff, then the error
    with pytest.raises(ObjectStoreError, match="not started"):
        await store.list()


async def test_an_outage_while_running_then_recovery(proxied: S3ObjectStore, proxy: FaultyProxy) -> None:
    await proxied.put("a", b"before")
    await proxy.stop()

    with pytest.raises(ObjectStoreError, match=r"S3 put 'b'.*cannot reach S3") as caught:
        await proxied.put("b", b"during")
    assert caught.value.retriable
    with pytest.raises(ObjectStoreError, match="cannot reach S3"):
        await proxied.list()

    await proxy.start()  # the same port again
    await proxied.put("b", b"after")
    assert [(await proxied.get(key)) for key in ["a", "b"]] == [b"before", b"after"]
