"""The ObjectStore port (named blobs for archives and model artifacts) and its implementations.

``build_objectstore(config)`` turns the ``[objectstore]`` section into a store: ``memory``
(:class:`MemoryObjectStore`), ``local`` (:class:`LocalObjectStore`, the embedded default) or ``s3``
(:class:`S3ObjectStore`, any S3-compatible endpoint).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from alphaengine.config import LocalObjectStoreConfig, MemoryObjectStoreConfig, ObjectStoreConfig
from alphaengine.objectstore.base import MAX_KEY_BYTES, InvalidKeyError, ObjectInfo, ObjectStore, check_key
from alphaengine.objectstore.local import LocalObjectStore
from alphaengine.objectstore.memory import MemoryObjectStore

if TYPE_CHECKING:
    from alphaengine.objectstore.s3 import S3ObjectStore, S3RequestError

__all__ = [
    "MAX_KEY_BYTES",
    "InvalidKeyError",
    "LocalObjectStore",
    "MemoryObjectStore",
    "ObjectInfo",
    "ObjectStore",
    "S3ObjectStore",
    "S3RequestError",
    "build_objectstore",
    "check_key",
]

_S3_NAMES = frozenset({"S3ObjectStore", "S3RequestError"})


def __getattr__(name: str) -> object:
    # aiobotocore takes about 0.3 s to import: only a process that uses S3 pays for it.
    if name in _S3_NAMES:
        from alphaengine.objectstore import s3  # noqa: PLC0415  (imports aiobotocore)

        return getattr(s3, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_objectstore(config: ObjectStoreConfig) -> ObjectStore:
    """The object store an ``[objectstore]`` configuration section describes (not yet started)."""
    if isinstance(config, MemoryObjectStoreConfig):
        return MemoryObjectStore()
    if isinstance(config, LocalObjectStoreConfig):
        return LocalObjectStore(config.path)
    from alphaengine.objectstore.s3 import S3ObjectStore  # noqa: PLC0415  (imports aiobotocore)

    return S3ObjectStore(config)
