"""The ObjectStore port (named blobs for archives and model artifacts) and its implementations.

``build_objectstore(config)`` turns the ``[objectstore]`` section into a store: ``memory``
(:class:`MemoryObjectStore`) or ``local`` (:class:`LocalObjectStore`, the embedded default).
"""

from alphaengine.config import LocalObjectStoreConfig, MemoryObjectStoreConfig, ObjectStoreConfig
from alphaengine.errors import ConfigError
from alphaengine.objectstore.base import MAX_KEY_BYTES, InvalidKeyError, ObjectInfo, ObjectStore, check_key
from alphaengine.objectstore.local import LocalObjectStore
from alphaengine.objectstore.memory import MemoryObjectStore

__all__ = [
    "MAX_KEY_BYTES",
    "InvalidKeyError",
    "LocalObjectStore",
    "MemoryObjectStore",
    "ObjectInfo",
    "ObjectStore",
    "build_objectstore",
    "check_key",
]


def build_objectstore(config: ObjectStoreConfig) -> ObjectStore:
    """The object store an ``[objectstore]`` configuration section describes (not yet started)."""
    if isinstance(config, MemoryObjectStoreConfig):
        return MemoryObjectStore()
    if isinstance(config, LocalObjectStoreConfig):
        return LocalObjectStore(config.path)
    raise ConfigError(
        [
            "objectstore.kind: 's3' (the S3 object store) is not available yet; it comes in a later "
            "issue. Use kind = 'local' or 'memory'."
        ]
    )
