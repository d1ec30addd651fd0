"""The ObjectStore contract: what every object store (in-memory, local directory, S3) must do.

A test module subclasses :class:`ObjectStoreContract` and provides an async fixture ``objects`` yielding a
started store on a fresh, empty bucket or directory.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from alphaengine.errors import ObjectNotFoundError, ObjectStoreError
from alphaengine.objectstore import ObjectInfo, ObjectStore

MIB = 1024 * 1024

BAD_KEYS = [
    "",
    "/ticks/a",
    "ticks//a",
    "ticks/",
    "ticks/../a",
    "..",
    ".",
    "./ticks",
    "ticks/.hidden",
    "ticks\\a",
    "ticks/a\0b",
    "k" * 1025,
]


def _hash(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(MIB), b""):
            digest.update(chunk)
    return digest.hexdigest()


class ObjectStoreContract:
    """Tests every ObjectStore implementation passes; subclasses provide the ``objects`` fixture."""

    async def test_put_then_get_and_head(self, objects: ObjectStore) -> None:
        before = time.time_ns()
        await objects.put("models/gbm/v1/model.txt", b"weights")
        after = time.time_ns()

        assert await objects.get("models/gbm/v1/model.txt") == b"weights"
        info = await objects.head("models/gbm/v1/model.txt")
        assert info is not None
        assert (info.key, info.size) == ("models/gbm/v1/model.txt", 7)
        # S3 keeps whole seconds: allow that much either side.
        assert before - 2 * 10**9 <= info.modified_ns <= after + 2 * 10**9

    async def test_put_replaces_an_object(self, objects: ObjectStore) -> None:
        await objects.put("a/b", b"first version")
        await objects.put("a/b", b"v2")

        assert await objects.get("a/b") == b"v2"
        assert [(i.key, i.size) for i in await objects.list()] == [("a/b", 2)]

    async def test_an_empty_object(self, objects: ObjectStore) -> None:
        await objects.put("empty", b"")

        assert await objects.get("empty") == b""
        info = await objects.head("empty")
        assert info is not None
        assert info.size == 0

    async def test_keys_with_spaces_unicode_and_punctuation(self, objects: ObjectStore) -> None:
        keys = ["ticks/date=2026-11-20/part 0 ü.parquet", "reports/a+b@c,d;e~f(1).json"]
        for i, key in enumerate(keys):
            await objects.put(key, bytes([i]) * 3)

        for i, key in enumerate(keys):
            assert await objects.get(key) == bytes([i]) * 3
        assert [i.key for i in await objects.list()] == sorted(keys)

    async def test_a_missing_key(self, objects: ObjectStore, tmp_path: Path) -> None:
        target = tmp_path / "out.bin"

        with pytest.raises(ObjectNotFoundError):
            await objects.get("no/such/key")
        with pytest.raises(ObjectNotFoundError):
            await objects.get_file("no/such/key", target)
        assert await objects.head("no/such/key") is None
        await objects.delete("no/such/key")
        assert not target.exists()

    async def test_list_by_prefix_sorted_by_key(self, objects: ObjectStore) -> None:
        keys = [
            "ticks/date=2026-11-21/part-0.parquet",
            "models/gbm/v2/model.txt",
            "ticks/date=2026-11-20/part-1.parquet",
            "ticks/date=2026-11-20/part-0.parquet",
            "ticks.manifest",
            "models/gbm/v10/model.txt",
        ]
        for key in keys:
            await objects.put(key, key.encode())

        everything = await objects.list()
        assert [i.key for i in everything] == sorted(keys)
        assert all(i.size == len(i.key.encode()) for i in everything)
        assert [i.key for i in await objects.list("ticks/")] == sorted(
            k for k in keys if k.startswith("ticks/")
        )
        assert [i.key for i in await objects.list("ticks")] == sorted(
            k for k in keys if k.startswith("ticks")
        )
        assert [i.key for i in await objects.list("ticks/date=2026-11-2")] == [
            "ticks/date=2026-11-20/part-0.parquet",
            "ticks/date=2026-11-20/part-1.parquet",
            "ticks/date=2026-11-21/part-0.parquet",
        ]
        assert [i.key for i in await objects.list("models/gbm/v1")] == ["models/gbm/v10/model.txt"]
        assert await objects.list("nothing/") == []
        assert all(isinstance(i, ObjectInfo) for i in everything)

    async def test_delete(self, objects: ObjectStore) -> None:
        await objects.put("models/gbm/v1/model.txt", b"1")
        await objects.put("models/gbm/v2/model.txt", b"2")

        await objects.delete("models/gbm/v1/model.txt")
        await objects.delete("models/gbm/v1/model.txt")

        assert await objects.head("models/gbm/v1/model.txt") is None
        with pytest.raises(ObjectNotFoundError):
            await objects.get("models/gbm/v1/model.txt")
        assert [i.key for i in await objects.list()] == ["models/gbm/v2/model.txt"]

    async def test_a_key_that_was_a_prefix_can_become_an_object(self, objects: ObjectStore) -> None:
        await objects.put("models/gbm/v1/model.txt", b"1")
        await objects.delete("models/gbm/v1/model.txt")

        await objects.put("models/gbm", b"now an object")

        assert await objects.get("models/gbm") == b"now an object"

    async def test_put_file_and_get_file_of_12_mib(self, objects: ObjectStore, tmp_path: Path) -> None:
        source = tmp_path / "source.bin"
        source.write_bytes(os.urandom(12 * MIB))
        copy = tmp_path / "copy.bin"

        await objects.put_file("archive/big.bin", source)
        await objects.get_file("archive/big.bin", copy)

        assert copy.stat().st_size == 12 * MIB
        assert _hash(copy) == _hash(source)
        info = await objects.head("archive/big.bin")
        assert info is not None
        assert info.size == 12 * MIB

    async def test_get_file_replaces_an_existing_file(self, objects: ObjectStore, tmp_path: Path) -> None:
        target = tmp_path / "out.bin"
        target.write_bytes(b"old and longer content")
        await objects.put("k", b"new")

        await objects.get_file("k", target)

        assert target.read_bytes() == b"new"

    @pytest.mark.parametrize("key", BAD_KEYS, ids=[repr(k)[:20] for k in BAD_KEYS])
    async def test_a_bad_key_is_refused(self, objects: ObjectStore, key: str, tmp_path: Path) -> None:
        source = tmp_path / "source.bin"
        source.write_bytes(b"x")
        calls: list[Callable[[], Awaitable[object]]] = [
            lambda: objects.put(key, b"x"),
            lambda: objects.put_file(key, source),
            lambda: objects.get(key),
            lambda: objects.get_file(key, tmp_path / "out.bin"),
            lambda: objects.head(key),
            lambda: objects.delete(key),
        ]
        for call in calls:
            with pytest.raises(ObjectStoreError, match="key") as caught:
                await call()
            assert not isinstance(caught.value, ObjectNotFoundError)
            assert not caught.value.retriable
        assert await objects.list() == []
