"""The in-memory object store: the ObjectStore port's behaviour in a dict, for tests."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from alphaengine.errors import ObjectNotFoundError
from alphaengine.objectstore.base import ObjectInfo, check_key


class MemoryObjectStore:
    """The ObjectStore port in memory: same key rules, errors and ordering as the real stores."""

    def __init__(self) -> None:
        self._objects: dict[str, tuple[bytes, int]] = {}
        """Key to (data, modified_ns)."""

    async def start(self) -> None:
        """Nothing to connect to."""

    async def close(self) -> None:
        """Keep the objects: like a directory or a bucket, the store outlives a connection (idempotent)."""

    async def put(self, key: str, data: bytes) -> None:
        """Store a copy of ``data`` under ``key``."""
        check_key(key)
        self._objects[key] = (bytes(data), time.time_ns())

    async def put_file(self, key: str, path: Path) -> None:
        """Store a local file's content under ``key`` (read in a worker thread)."""
        check_key(key)
        data = await asyncio.to_thread(path.read_bytes)
        self._objects[key] = (data, time.time_ns())

    async def get(self, key: str) -> bytes:
        """The object's bytes; ObjectNotFoundError if there is none."""
        return self._get(key)[0]

    async def get_file(self, key: str, path: Path) -> None:
        """Write the object to a local file (in a worker thread)."""
        data = self._get(key)[0]
        await asyncio.to_thread(path.write_bytes, data)

    async def head(self, key: str) -> ObjectInfo | None:
        """The object's size and modification time, or None."""
        check_key(key)
        entry = self._objects.get(key)
        return None if entry is None else ObjectInfo(key, len(entry[0]), entry[1])

    async def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Every object whose key starts with ``prefix``, sorted by key."""
        return [
            ObjectInfo(key, len(data), modified_ns)
            for key, (data, modified_ns) in sorted(self._objects.items())
            if key.startswith(prefix)
        ]

    async def delete(self, key: str) -> None:
        """Remove the object; a missing key is not an error."""
        check_key(key)
        self._objects.pop(key, None)

    def _get(self, key: str) -> tuple[bytes, int]:
        check_key(key)
        entry = self._objects.get(key)
        if entry is None:
            raise ObjectNotFoundError(f"no object {key!r}")
        return entry
