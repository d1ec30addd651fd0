"""Objects in an S3 bucket, through aiobotocore: AWS or any S3-compatible endpoint (MinIO, SeaweedFS, moto).

A key ``a/b`` is the S3 key ``<prefix>a/b`` in the configured bucket. Requests use path-style addressing
(``<endpoint>/<bucket>/<key>``), which every S3-compatible server understands, and only the checksums
every server accepts: ``Content-MD5`` on each upload, which AWS, MinIO, SeaweedFS and Ceph verify
themselves. As some servers (moto among them) do not, the ETag each upload answers with, the MD5 of what
the server stored, is compared with the MD5 of what was sent as well.

``put_file`` sends a file below ``multipart_threshold_bytes`` in one PUT, and a larger one as a multipart
upload of ``part_size_bytes`` parts, a few of them in flight at once, each read from the file when it is
sent, so memory holds a few parts, never the whole file. A multipart upload that fails or is cancelled
is aborted before the error propagates: no incomplete upload is left to be billed. Readers see the old
object or the new one, never a part of one, as S3 publishes an object only when its upload completes.

Errors: a missing object is :class:`~alphaengine.errors.ObjectNotFoundError`; connection failures,
timeouts, throttling and 5xx answers, once botocore's own retries are spent, are a retriable
:class:`~alphaengine.errors.ObjectStoreError`; what retrying cannot fix (access denied, a missing
bucket, no credentials) is :class:`S3RequestError`, not retriable.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import math
import os
import tempfile
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    NoRegionError,
    ParamValidationError,
    PartialCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from alphaengine.config import S3ObjectStoreConfig
from alphaengine.errors import ConfigError, ObjectNotFoundError, ObjectStoreError
from alphaengine.objectstore.base import MAX_KEY_BYTES, InvalidKeyError, ObjectInfo, check_key

log = logging.getLogger(__name__)

MIN_PART_SIZE_BYTES = 5 * 1024 * 1024
"""S3's smallest part (every part of a multipart upload but the last)."""
_MAX_PARTS = 10_000
"""S3's largest number of parts in one upload: a bigger file gets bigger parts than configured."""
_PARTS_IN_FLIGHT = 4
"""Parts uploaded at once: enough to fill a link that one connection does not; each holds a part in memory."""
_DOWNLOAD_CHUNK_BYTES = 1024 * 1024
_TOTAL_ATTEMPTS = 3
"""botocore's attempts per request ("standard" retry mode: exponential backoff with jitter, a few seconds)."""
_CONNECT_TIMEOUT_S = 5.0
_READ_TIMEOUT_S = 30.0
_ABORT_WAIT_S = 10.0
"""How long close() waits for multipart aborts still running (those whose put_file was cancelled twice)."""

_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NotFound", "404"})
_RETRIABLE_CODES = frozenset(
    {
        "BadDigest",  # the data was damaged on its way: sending it again can succeed
        "InternalError",
        "NoSuchUpload",  # a multipart upload aborted under us (a lifecycle rule): a new upload can succeed
        "OperationAborted",
        "RequestLimitExceeded",
        "RequestTimeout",
        "ServiceUnavailable",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "TooManyRequests",
    }
)
_ENCRYPTIONS_WITHOUT_MD5_ETAG = frozenset({"aws:kms", "aws:kms:dsse"})
_CONFIGURATION_ERRORS = (NoCredentialsError, PartialCredentialsError, ParamValidationError, NoRegionError)
"""botocore's errors that no retry fixes: the configuration is wrong."""
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class S3RequestError(ObjectStoreError):
    """A request S3 refused, or the client could not make, for a reason that retrying does not fix.

    Access denied, a missing bucket, missing or partial credentials, a parameter S3 rejects: the
    configuration or the bucket needs fixing first.
    """

    retriable = False


class _Digest(NamedTuple):
    """The MD5 of a payload as the ``Content-MD5`` header wants it and as an ETag shows it."""

    base64: str
    hex: str


class _SourceFile(NamedTuple):
    """A file being uploaded by put_file: its key, open descriptor and size when the upload began."""

    key: str
    s3_key: str
    path: Path
    fd: int
    size: int


_Parts = list[dict[str, object]]
"""The parts of a multipart upload as CompleteMultipartUpload takes them (``PartNumber``, ``ETag``)."""


def _digest(data: bytes) -> _Digest:
    md5 = hashlib.md5(data, usedforsecurity=False)
    return _Digest(base64.b64encode(md5.digest()).decode("ascii"), md5.hexdigest())


class S3ObjectStore:
    """The ObjectStore port on an S3 bucket (see the module docstring for the guarantees).

    ``config.endpoint_url`` None means AWS itself; ``access_key_id``/``secret_access_key`` None (or
    empty, as ``${AWS_ACCESS_KEY_ID:-}`` gives) means botocore's default credential chain (environment,
    shared files, instance or container roles).
    """

    def __init__(self, config: S3ObjectStoreConfig) -> None:
        problems = _config_problems(config)
        if problems:
            raise ConfigError(problems)
        self.config = config
        self.bucket = config.bucket
        self.prefix = config.prefix.strip("/") + "/" if config.prefix.strip("/") else ""
        """Prepended to every key: ``""``, or segments ending in ``/``."""
        self._where = f"s3://{self.bucket}/{self.prefix} at {config.endpoint_url or 'AWS'}"
        self._client_context: contextlib.AsyncExitStack | None = None
        self._client: Any = None  # aiobotocore's S3 client (untyped); None unless started
        self._aborts: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Create the client and the bucket if it is missing (idempotent); fails if S3 cannot be reached."""
        if self._client is not None:
            return
        stack = contextlib.AsyncExitStack()
        try:
            self._client = await stack.enter_async_context(
                get_session().create_client(
                    "s3",
                    endpoint_url=self.config.endpoint_url,
                    region_name=self.config.region,
                    aws_access_key_id=self.config.access_key_id or None,
                    aws_secret_access_key=self.config.secret_access_key or None,
                    config=AioConfig(
                        s3={"addressing_style": "path"},
                        # Newer botocore adds CRC checksums that many S3-compatible servers refuse;
                        # Content-MD5, sent explicitly, is the check every server accepts.
                        request_checksum_calculation="when_required",
                        response_checksum_validation="when_required",
                        retries={"mode": "standard", "total_max_attempts": _TOTAL_ATTEMPTS},
                        connect_timeout=_CONNECT_TIMEOUT_S,
                        read_timeout=_READ_TIMEOUT_S,
                    ),
                )
            )
            self._client_context = stack
            await self._ensure_bucket()
        except BaseException:
            self._client = None
            self._client_context = None
            await stack.aclose()
            raise

    async def close(self) -> None:
        """Wait briefly for multipart aborts still running, then close the client (idempotent)."""
        stack, self._client_context = self._client_context, None
        self._client = None
        if stack is None:
            return
        try:
            if self._aborts:
                await asyncio.wait(self._aborts, timeout=_ABORT_WAIT_S)
        finally:
            await stack.aclose()

    async def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key`` in one PUT, verified by its MD5."""
        s3_key = self._s3_key(key)
        payload = bytes(data)  # no copy for bytes; a bytearray the caller changes later is not sent
        digest = await asyncio.to_thread(_digest, payload)
        await self._put_single("put", key, s3_key, payload, digest)

    async def put_file(self, key: str, path: Path) -> None:
        """Upload a local file: one PUT below the multipart threshold, else a multipart upload."""
        s3_key = self._s3_key(key)
        client = self._require_client()
        with self._errors("put_file", key):
            fd = await asyncio.to_thread(os.open, path, os.O_RDONLY)
        try:
            with self._errors("put_file", key):
                size = (await asyncio.to_thread(os.fstat, fd)).st_size
            source = _SourceFile(key, s3_key, path, fd, size)
            if size < self.config.multipart_threshold_bytes:
                data, digest = await self._read(source, 0, size)
                await self._check_size(source)
                await self._put_single("put_file", key, s3_key, data, digest)
            else:
                await self._put_multipart(client, source)
        finally:
            os.close(fd)

    async def get(self, key: str) -> bytes:
        """The object's bytes; ObjectNotFoundError if there is none."""
        s3_key = self._s3_key(key)
        client = self._require_client()
        with self._errors("get", key):
            response = await client.get_object(Bucket=self.bucket, Key=s3_key)
            async with response["Body"] as body:
                return bytes(await body.read())  # botocore checks the length against Content-Length

    async def get_file(self, key: str, path: Path) -> None:
        """Download the object into ``path`` in chunks, through a temporary file renamed over it."""
        s3_key = self._s3_key(key)
        client = self._require_client()
        with self._errors("get_file", key):
            response = await client.get_object(Bucket=self.bucket, Key=s3_key)
            async with response["Body"] as body:
                await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
                # The temporary file sits next to the target so that os.replace is a rename, atomic.
                fd, temp_name = await asyncio.to_thread(
                    tempfile.mkstemp, dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
                )
                temp = Path(temp_name)
                try:
                    with os.fdopen(fd, "wb") as out:
                        await _copy_body(body, out)
                    await asyncio.to_thread(_replace_durably, temp, path)
                except BaseException:
                    await asyncio.to_thread(temp.unlink, missing_ok=True)
                    raise

    async def head(self, key: str) -> ObjectInfo | None:
        """The object's size and modification time, or None."""
        s3_key = self._s3_key(key)
        client = self._require_client()
        try:
            with self._errors("head", key):
                response = await client.head_object(Bucket=self.bucket, Key=s3_key)
        except ObjectNotFoundError:
            return None
        return ObjectInfo(key, int(response["ContentLength"]), _ns(response["LastModified"]))

    async def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Every object whose key starts with ``prefix``, sorted by key (all pages of the listing)."""
        client = self._require_client()
        found: list[ObjectInfo] = []
        with self._errors("list", prefix):
            pages = client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix + prefix
            )
            async for page in pages:
                for entry in page.get("Contents", ()):
                    key = str(entry["Key"]).removeprefix(self.prefix)
                    if _is_valid_key(key):
                        found.append(ObjectInfo(key, int(entry["Size"]), _ns(entry["LastModified"])))
        # S3 lists in UTF-8 byte order, which is code point order too; sorting keeps servers honest.
        return sorted(found)

    async def delete(self, key: str) -> None:
        """Remove the object; a missing key is not an error (S3 answers a delete of one with success)."""
        s3_key = self._s3_key(key)
        client = self._require_client()
        with self._errors("delete", key):
            await client.delete_object(Bucket=self.bucket, Key=s3_key)

    # -- internals ------------------------------------------------------------------------------------

    def _s3_key(self, key: str) -> str:
        check_key(key)
        s3_key = self.prefix + key
        if len(s3_key.encode()) > MAX_KEY_BYTES:
            raise InvalidKeyError(
                f"invalid object key {key!r}: with the prefix {self.prefix!r} it is longer than "
                f"{MAX_KEY_BYTES} bytes"
            )
        return s3_key

    def _require_client(self) -> Any:
        if self._client is None:
            raise ObjectStoreError(f"the S3 object store {self._where} is not started (or already closed)")
        return self._client

    async def _ensure_bucket(self) -> None:
        # HEAD first: with a bucket that exists, the credentials need no permission to create buckets.
        try:
            with self._errors("start", ""):
                await self._client.head_bucket(Bucket=self.bucket)
            return
        except ObjectNotFoundError:
            pass
        configuration: dict[str, object] = {}
        if self.config.region != "us-east-1":  # us-east-1 is the default and refuses to be named
            configuration["CreateBucketConfiguration"] = {"LocationConstraint": self.config.region}
        try:
            await self._client.create_bucket(Bucket=self.bucket, **configuration)
        except ClientError as exc:
            if _error_code(exc) != "BucketAlreadyOwnedByYou":  # created meanwhile by another process
                raise self._translate(exc, "create bucket", "") from exc
        except BotoCoreError as exc:
            raise self._translate(exc, "create bucket", "") from exc
        log.info("created the bucket %s", self._where)

    async def _put_single(self, operation: str, key: str, s3_key: str, data: bytes, digest: _Digest) -> None:
        client = self._require_client()
        with self._errors(operation, key):
            response = await client.put_object(
                Bucket=self.bucket, Key=s3_key, Body=data, ContentMD5=digest.base64
            )
        if not _etag_matches(response, digest):
            # The server stored other bytes than were sent, and it is now the object: remove it, so
            # that nobody reads damaged data (a concurrent writer's newer object would go too).
            with self._errors(operation, key):
                await client.delete_object(Bucket=self.bucket, Key=s3_key)
            raise ObjectStoreError(
                f"S3 {operation} {key!r} in {self._where}: integrity check failed, the server stored "
                f"data with ETag {response.get('ETag')} but the MD5 of the data sent is {digest.hex}; "
                "the damaged object was deleted"
            )

    async def _put_multipart(self, client: Any, source: _SourceFile) -> None:
        with self._errors("put_file", source.key):
            created = await client.create_multipart_upload(Bucket=self.bucket, Key=source.s3_key)
        upload_id = str(created["UploadId"])
        try:
            parts = await self._upload_parts(client, source, upload_id)
            await self._check_size(source)
            with self._errors("put_file", source.key):
                await client.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=source.s3_key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                )
        except BaseException:
            # Shielded, and tracked for close(): a second cancellation must not stop the abort halfway.
            abort = asyncio.ensure_future(self._abort(client, source, upload_id))
            self._aborts.add(abort)
            abort.add_done_callback(self._aborts.discard)
            await asyncio.shield(abort)
            raise

    async def _upload_parts(self, client: Any, source: _SourceFile, upload_id: str) -> _Parts:
        part_size = max(self.config.part_size_bytes, math.ceil(source.size / _MAX_PARTS))
        numbers = iter(range(1, math.ceil(source.size / part_size) + 1))
        etags: dict[int, str] = {}

        async def upload_next_parts() -> None:
            # The workers share one iterator: each part number goes to exactly one of them.
            for number in numbers:
                offset = (number - 1) * part_size
                data, digest = await self._read(source, offset, min(part_size, source.size - offset))
                with self._errors("put_file", source.key):
                    response = await client.upload_part(
                        Bucket=self.bucket,
                        Key=source.s3_key,
                        UploadId=upload_id,
                        PartNumber=number,
                        Body=data,
                        ContentMD5=digest.base64,
                    )
                if not _etag_matches(response, digest):
                    raise ObjectStoreError(
                        f"S3 put_file {source.key!r} in {self._where}: integrity check failed on part "
                        f"{number}, the server stored ETag {response.get('ETag')} for data of MD5 "
                        f"{digest.hex}"
                    )
                etags[number] = str(response["ETag"])

        try:
            async with asyncio.TaskGroup() as workers:
                for _ in range(_PARTS_IN_FLIGHT):
                    workers.create_task(upload_next_parts())
        except BaseExceptionGroup as failed:
            raise failed.exceptions[0] from None  # the first failure says what went wrong
        return [{"PartNumber": number, "ETag": etags[number]} for number in sorted(etags)]

    async def _abort(self, client: Any, source: _SourceFile, upload_id: str) -> None:
        try:
            await client.abort_multipart_upload(Bucket=self.bucket, Key=source.s3_key, UploadId=upload_id)
        except (ClientError, BotoCoreError) as exc:
            if isinstance(exc, ClientError) and _error_code(exc) == "NoSuchUpload":
                return
            # Not raised: the upload's own failure is the error that matters. A bucket lifecycle rule
            # (AbortIncompleteMultipartUpload) is the backstop for uploads left behind like this.
            log.warning(
                "could not abort the multipart upload %s of %r in %s: %s",
                upload_id,
                source.key,
                self._where,
                exc,
            )

    async def _read(self, source: _SourceFile, offset: int, length: int) -> tuple[bytes, _Digest]:
        """``length`` bytes of the file at ``offset`` and their MD5, read in a worker thread."""

        def read() -> tuple[bytes, _Digest]:
            data = os.pread(source.fd, length, offset)
            if len(data) != length:
                raise ObjectStoreError(
                    f"S3 put_file {source.key!r}: {source.path} shrank while it was uploaded"
                )
            return data, _digest(data)

        with self._errors("put_file", source.key):
            return await asyncio.to_thread(read)

    async def _check_size(self, source: _SourceFile) -> None:
        """Refuse to publish an upload of a file that changed size (written to while it was sent)."""
        with self._errors("put_file", source.key):
            now = (await asyncio.to_thread(os.fstat, source.fd)).st_size
        if now != source.size:
            raise ObjectStoreError(
                f"S3 put_file {source.key!r}: {source.path} changed size from {source.size} to {now} "
                "bytes while it was uploaded"
            )

    @contextlib.contextmanager
    def _errors(self, operation: str, key: str) -> Iterator[None]:
        """Turn botocore's, the network's and the file system's errors into ObjectStoreErrors."""
        try:
            yield
        except (ClientError, BotoCoreError, OSError) as exc:
            raise self._translate(exc, operation, key) from exc

    def _translate(self, exc: Exception, operation: str, key: str) -> ObjectStoreError:
        what = f"S3 {operation} {key!r} in {self._where}" if key else f"S3 {operation} {self._where}"
        if isinstance(exc, ClientError):
            code = _error_code(exc)
            status = _http_status(exc)
            detail = f"{code} (HTTP {status}): {exc}"
            if code == "NoSuchBucket":
                return S3RequestError(f"{what}: the bucket {self.bucket!r} does not exist: {detail}")
            if code in _NOT_FOUND_CODES:
                return ObjectNotFoundError(f"no object {key!r} in {self._where}")
            if code in _RETRIABLE_CODES or status >= 500 or status in (408, 429):
                return ObjectStoreError(f"{what}: S3 failed, retrying may succeed: {detail}")
            return S3RequestError(f"{what}: S3 refused the request: {detail}")
        if isinstance(exc, _CONFIGURATION_ERRORS):
            return S3RequestError(f"{what}: {exc}")
        if isinstance(exc, BotoConnectionError):
            return ObjectStoreError(f"{what}: cannot reach S3 ({_TOTAL_ATTEMPTS} attempts): {exc}")
        if isinstance(exc, BotoCoreError):
            return ObjectStoreError(f"{what}: the connection to S3 failed, retrying may succeed: {exc}")
        return ObjectStoreError(f"{what}: {exc}")


async def _copy_body(body: Any, out: BinaryIO) -> None:
    """Stream a response body into ``out`` (then fsync it): 1 MiB writes, each in a worker thread."""
    buffer = bytearray()
    while chunk := await body.read(_DOWNLOAD_CHUNK_BYTES):
        buffer += chunk
        if len(buffer) >= _DOWNLOAD_CHUNK_BYTES:
            await asyncio.to_thread(out.write, buffer)
            buffer.clear()
    await asyncio.to_thread(_finish, out, buffer)


def _finish(out: BinaryIO, tail: bytes | bytearray) -> None:
    # Synced, like the local store's writes: the archiver may drop data once a copy is on disk.
    out.write(tail)
    out.flush()
    os.fsync(out.fileno())


def _replace_durably(temp: Path, target: Path) -> None:
    os.replace(temp, target)
    # The rename is a change to the directory, synced on its own.
    directory = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _config_problems(config: S3ObjectStoreConfig) -> list[str]:
    problems = []
    if bool(config.access_key_id) != bool(config.secret_access_key):
        problems.append(
            "objectstore.access_key_id and objectstore.secret_access_key: give both, or neither "
            "(then botocore's default credential chain is used)"
        )
    if config.part_size_bytes < MIN_PART_SIZE_BYTES:
        problems.append(
            f"objectstore.part_size_bytes: {config.part_size_bytes} is below S3's smallest part, "
            f"{MIN_PART_SIZE_BYTES} bytes (5 MiB)"
        )
    if config.multipart_threshold_bytes < 1:
        problems.append(
            "objectstore.multipart_threshold_bytes: expected at least 1, got "
            f"{config.multipart_threshold_bytes}"
        )
    prefix = config.prefix.strip("/")
    if prefix:
        try:
            check_key(prefix)
        except InvalidKeyError as exc:
            problems.append(f"objectstore.prefix: {exc}")
    if not config.bucket:
        problems.append("objectstore.bucket: expected a bucket name, got ''")
    return problems


def _is_valid_key(key: str) -> bool:
    # Objects other tools put in the bucket with keys this port refuses (a console's "folder/" marker,
    # say) cannot be read through it, so a listing leaves them out, as the local store does temp files.
    try:
        check_key(key)
    except InvalidKeyError:
        return False
    return True


def _etag_matches(response: Mapping[str, object], digest: _Digest) -> bool:
    """Whether an upload's ETag is the MD5 of what was sent (True where S3 makes the ETag something else)."""
    if response.get("ServerSideEncryption") in _ENCRYPTIONS_WITHOUT_MD5_ETAG or response.get(
        "SSECustomerAlgorithm"
    ):
        return True  # with KMS or a customer key the ETag is not the MD5: only Content-MD5 protects
    etag = response.get("ETag")
    return etag is None or str(etag).strip('"') == digest.hex


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _http_status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _ns(modified: datetime) -> int:
    """An S3 timestamp in nanoseconds since the epoch, exactly (no float on the way)."""
    return (modified - _EPOCH) // timedelta(microseconds=1) * 1000
