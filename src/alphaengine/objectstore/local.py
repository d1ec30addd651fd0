"""Objects as files under a local directory: the embedded default for archives and model artifacts.

A key ``a/b/c`` is the file ``<root>/a/b/c``. Every write goes to a temporary file in the target's own
directory, is flushed to disk, and is renamed over the target (``os.replace``), so readers see the old
object or the new one, never a partial one, and a crash leaves at most a stray temporary file, which
listings ignore. All file I/O runs in worker threads, never on the event loop.

Unlike S3, a key here cannot name both an object and a "directory" of other objects (``a`` and
``a/b``): putting the second one raises ObjectStoreError.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, TypeVar

from alphaengine.errors import ObjectNotFoundError, ObjectStoreError
from alphaengine.objectstore.base import ObjectInfo, check_key

T = TypeVar("T")

_COPY_CHUNK_BYTES = 1024 * 1024
_TEMP_PREFIX = "."
"""Temporary files start with '.', which no key segment may (check_key), so they never look like objects."""
_MKSTEMP_ATTEMPTS = 3


class LocalObjectStore:
    """The ObjectStore port on a local directory ``root`` (created by :meth:`start`)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    async def start(self) -> None:
        """Create the root directory if needed."""
        await self._io("create root", "", lambda: self.root.mkdir(parents=True, exist_ok=True))

    async def close(self) -> None:
        """Nothing to release: every operation opens and closes its own files (idempotent)."""

    async def put(self, key: str, data: bytes) -> None:
        """Write ``data`` to ``key`` atomically."""
        target = self._path(key)
        await self._io("put", key, lambda: _write_atomic(target, lambda out: out.write(data)))

    async def put_file(self, key: str, path: Path) -> None:
        """Copy a local file to ``key`` atomically, streaming (never the whole file in memory)."""
        target = self._path(key)

        def copy() -> None:
            with open(path, "rb") as src:
                _write_atomic(target, lambda out: shutil.copyfileobj(src, out, _COPY_CHUNK_BYTES))

        await self._io("put_file", key, copy)

    async def get(self, key: str) -> bytes:
        """The object's bytes; ObjectNotFoundError if there is none."""
        source = self._path(key)

        def read() -> bytes:
            with self._open_object(source, key) as src:
                return src.read()

        return await self._io("get", key, read)

    async def get_file(self, key: str, path: Path) -> None:
        """Copy the object to a local file, streaming; the file appears complete or not at all."""
        source = self._path(key)

        def copy() -> None:
            with self._open_object(source, key) as src:
                _write_atomic(path, lambda out: shutil.copyfileobj(src, out, _COPY_CHUNK_BYTES))

        await self._io("get_file", key, copy)

    async def head(self, key: str) -> ObjectInfo | None:
        """The object's size and modification time, or None."""
        target = self._path(key)

        def info() -> ObjectInfo | None:
            try:
                st = target.stat()
            except (FileNotFoundError, NotADirectoryError):
                return None
            return ObjectInfo(key, st.st_size, st.st_mtime_ns) if stat.S_ISREG(st.st_mode) else None

        return await self._io("head", key, info)

    async def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Every object whose key starts with ``prefix``, sorted by key."""
        return await self._io("list", prefix, lambda: _list_objects(self.root, prefix))

    async def delete(self, key: str) -> None:
        """Remove the object, and the directories it leaves empty; a missing key is not an error."""
        target = self._path(key)

        def remove() -> None:
            with contextlib.suppress(FileNotFoundError, NotADirectoryError, IsADirectoryError):
                target.unlink()
            # An empty directory left behind would make a later put of its own key (a/b, then a) fail.
            parent = target.parent
            while parent != self.root:
                try:
                    parent.rmdir()
                except OSError:
                    break
                parent = parent.parent

        await self._io("delete", key, remove)

    def _path(self, key: str) -> Path:
        check_key(key)
        return self.root.joinpath(*key.split("/"))

    def _open_object(self, source: Path, key: str) -> BinaryIO:
        try:
            return open(source, "rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise ObjectNotFoundError(f"no object {key!r} in {self.root}") from exc

    async def _io(self, operation: str, key: str, fn: Callable[[], T]) -> T:
        """Run blocking file I/O in a worker thread; OS errors become ObjectStoreError naming the key."""
        try:
            return await asyncio.to_thread(fn)
        except OSError as exc:
            raise ObjectStoreError(f"{operation} {key!r} in {self.root}: {exc}") from exc


def _list_objects(root: Path, prefix: str) -> list[ObjectInfo]:
    # Walk only the directory named by the prefix's complete segments, not the whole tree.
    directory = prefix.rpartition("/")[0]
    segments = directory.split("/") if directory else []
    if any(not s or s.startswith(".") or "\\" in s for s in segments):
        return []  # no valid key starts with such a prefix, and it must not lead outside the root
    found = [info for info in _walk(root, root.joinpath(*segments)) if info.key.startswith(prefix)]
    return sorted(found)


def _walk(root: Path, start: Path) -> Iterator[ObjectInfo]:
    for dirpath, dirnames, filenames in os.walk(start):
        dirnames[:] = [d for d in dirnames if not d.startswith(_TEMP_PREFIX)]
        relative = Path(dirpath).relative_to(root).as_posix()
        for name in filenames:
            if name.startswith(_TEMP_PREFIX):
                continue
            try:
                st = os.stat(os.path.join(dirpath, name))
            except FileNotFoundError:
                continue  # deleted while listing
            key = name if relative == "." else f"{relative}/{name}"
            yield ObjectInfo(key, st.st_size, st.st_mtime_ns)


def _write_atomic(target: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write through ``write`` into a temporary file next to ``target``, then rename it over ``target``.

    The data and the rename are both synced to disk: the archiver drops a partition once its Parquet
    file is written, so a written object must survive a machine crash, not only a process crash.
    """
    for attempt in range(_MKSTEMP_ATTEMPTS):
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd, temp_name = tempfile.mkstemp(dir=target.parent, prefix=_TEMP_PREFIX, suffix=".tmp")
            break
        except FileNotFoundError:
            # A concurrent delete removed the directory (empty) between mkdir and mkstemp.
            if attempt == _MKSTEMP_ATTEMPTS - 1:
                raise
    temp = Path(temp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            write(out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_directory(target.parent)


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (a rename is a change to the directory, not the file)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
