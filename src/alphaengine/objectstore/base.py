"""The ObjectStore port: named blobs (S3, or a local directory) for archives and model artifacts."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Protocol, runtime_checkable


class ObjectInfo(NamedTuple):
    """An object's key, size in bytes and last-modified time (nanoseconds since the epoch)."""

    key: str
    size: int
    modified_ns: int


@runtime_checkable
class ObjectStore(Protocol):
    """Put, get, list and delete objects by key (``/``-separated, no leading ``/``)."""

    async def start(self) -> None:
        """Connect (and create the bucket or directory if needed)."""
        ...

    async def close(self) -> None:
        """Release every resource (idempotent)."""
        ...

    async def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key``, replacing any object there; atomic for readers."""
        ...

    async def put_file(self, key: str, path: Path) -> None:
        """Upload a local file (multipart where the store has it); atomic for readers."""
        ...

    async def get(self, key: str) -> bytes:
        """The object's bytes; raises ObjectNotFoundError."""
        ...

    async def get_file(self, key: str, path: Path) -> None:
        """Download an object into a local file; raises ObjectNotFoundError."""
        ...

    async def head(self, key: str) -> ObjectInfo | None:
        """The object's info, or None if there is none."""
        ...

    async def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Every object whose key starts with ``prefix``, sorted by key."""
        ...

    async def delete(self, key: str) -> None:
        """Remove an object; deleting a missing key is not an error."""
        ...
