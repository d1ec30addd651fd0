from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from alphaengine.config import LocalObjectStoreConfig, MemoryObjectStoreConfig
from alphaengine.errors import ObjectStoreError
from alphaengine.objectstore import LocalObjectStore, MemoryObjectStore, ObjectStore, build_objectstore
from tests.contracts.objectstore import ObjectStoreContract


class TestMemoryObjectStore(ObjectStoreContract):
    @pytest.fixture
    async def objects(self) -> AsyncIterator[ObjectStore]:
        store = MemoryObjectStore()
        await store.start()
        yield store
        await store.close()

    async def test_put_keeps_a_copy_of_mutable_data(self, objects: ObjectStore) -> None:
        data = bytearray(b"abc")
        await objects.put("k", data)  # type: ignore[arg-type]  # callers may pass a bytearray
        data[0] = ord("z")

        assert await objects.get("k") == b"abc"


class TestLocalObjectStore(ObjectStoreContract):
    @pytest.fixture
    async def objects(self, tmp_path: Path) -> AsyncIterator[ObjectStore]:
        store = LocalObjectStore(tmp_path / "objects")
        await store.start()
        yield store
        await store.close()

    async def test_objects_are_plain_files_under_the_root(self, tmp_path: Path) -> None:
        store = LocalObjectStore(tmp_path / "a" / "b")
        await store.start()

        await store.put("ticks/date=2026-11-20/part-0.parquet", b"parquet")

        assert (tmp_path / "a/b/ticks/date=2026-11-20/part-0.parquet").read_bytes() == b"parquet"

    async def test_stray_temporary_files_are_not_objects(self, tmp_path: Path) -> None:
        store = LocalObjectStore(tmp_path)
        await store.put("ticks/part-0", b"x")
        # What a process killed in the middle of a write leaves behind.
        (tmp_path / "ticks" / ".tmpab12cd.tmp").write_bytes(b"half")

        assert [i.key for i in await store.list()] == ["ticks/part-0"]

    async def test_a_failed_put_file_leaves_nothing_behind(self, tmp_path: Path) -> None:
        store = LocalObjectStore(tmp_path / "objects")
        await store.start()
        await store.put("a/b", b"old")

        with pytest.raises(ObjectStoreError, match="a/b"):
            await store.put_file("a/b", tmp_path / "missing.bin")

        assert await store.get("a/b") == b"old"
        assert sorted(os.listdir(tmp_path / "objects" / "a")) == ["b"]

    async def test_a_key_cannot_be_an_object_and_a_prefix_of_objects(self, tmp_path: Path) -> None:
        store = LocalObjectStore(tmp_path)
        await store.put("models/gbm", b"object")

        with pytest.raises(ObjectStoreError, match="models/gbm/v1"):
            await store.put("models/gbm/v1", b"under an object")

        assert await store.get("models/gbm") == b"object"

    async def test_a_listing_prefix_never_leads_outside_the_root(self, tmp_path: Path) -> None:
        (tmp_path / "secret").write_bytes(b"outside")
        store = LocalObjectStore(tmp_path / "objects")
        await store.start()

        assert await store.list("../") == []
        assert await store.list("../secret") == []


def test_build_objectstore_builds_memory_and_local(tmp_path: Path) -> None:
    assert isinstance(build_objectstore(MemoryObjectStoreConfig()), MemoryObjectStore)
    local = build_objectstore(LocalObjectStoreConfig(path=str(tmp_path)))
    assert isinstance(local, LocalObjectStore)
    assert local.root == tmp_path
