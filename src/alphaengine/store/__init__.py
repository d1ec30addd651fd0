"""The Store port (tables, idempotent batched inserts, ClickHouse-dialect queries) and its implementations.

``build_store(config)`` turns the ``[store]`` section into a store: ``memory`` (:class:`MemoryStore`) or
``chdb`` (:class:`ChdbStore`, the embedded default).
"""

from alphaengine.config import ChdbStoreConfig, MemoryStoreConfig, StoreConfig
from alphaengine.errors import ConfigError
from alphaengine.store.base import Column, Migration, Store, StoreRequestError, TableSpec
from alphaengine.store.chdb import ChdbStore
from alphaengine.store.memory import MemoryStore
from alphaengine.store.schema import BARS, MIGRATIONS, MIGRATIONS_TABLE, TABLES, TICKS

__all__ = [
    "BARS",
    "MIGRATIONS",
    "MIGRATIONS_TABLE",
    "TABLES",
    "TICKS",
    "ChdbStore",
    "Column",
    "MemoryStore",
    "Migration",
    "Store",
    "StoreRequestError",
    "TableSpec",
    "build_store",
]


def build_store(config: StoreConfig) -> Store:
    """The store a ``[store]`` configuration section describes (not yet started)."""
    if isinstance(config, MemoryStoreConfig):
        return MemoryStore()
    if isinstance(config, ChdbStoreConfig):
        return ChdbStore(config.path, config.database)
    raise ConfigError(
        [
            "store.kind: 'clickhouse' (the ClickHouse-server store) is not available yet; it comes in a "
            "later issue. Use kind = 'chdb' (embedded) or 'memory'."
        ]
    )
