"""The ObjectStore port: named blobs (S3, or a local directory) for archives and model artifacts."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Protocol, runtime_checkable

from alphaengine.errors import ObjectStoreError

MAX_KEY_BYTES = 1024
"""S3's limit on a key's length in UTF-8 bytes; every store keeps to it so that keys stay portable."""


class InvalidKeyError(ObjectStoreError):
    """A key that breaks the key rules (:func:`check_key`); retrying with the same key is pointless."""

    retriable = False


def check_key(key: str) -> None:
    """Raise InvalidKeyError (an ObjectStoreError) unless ``key`` is a valid object key.

    A key is ``/``-separated segments, each non-empty and not starting with ``.`` (which rules out ``.``,
    ``..`` and hidden names, where a local store keeps its temporary files), with no backslash or NUL,
    at most :data:`MAX_KEY_BYTES` long. The same rules in every store keep keys portable between a local
    directory and S3 and keep a key from reaching outside a store's root.
    """
    problem = None
    if not key:
        problem = "it is empty"
    elif "\\" in key or "\0" in key:
        problem = "it holds a backslash or NUL character"
    elif len(key.encode()) > MAX_KEY_BYTES:
        problem = f"it is longer than {MAX_KEY_BYTES} bytes"
    elif key.startswith("/"):
        problem = "it starts with '/'"
    elif any(not segment for segment in key.split("/")):
        problem = "it has an empty segment ('//' or a trailing '/')"
    elif any(segment.startswith(".") for segment in key.split("/")):
        problem = "a segment starts with '.' ('.', '..' and hidden names are refused)"
    if problem is not None:
        raise InvalidKeyError(f"invalid object key {key!r}: {problem}")


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
