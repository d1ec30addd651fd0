"""The Store port (tables, idempotent batched inserts, ClickHouse-dialect queries) and its implementations.

``build_store(config)`` turns the ``[store]`` section into a store: ``memory`` (:class:`MemoryStore`),
``chdb`` (:class:`ChdbStore`, the embedded default) or ``clickhouse`` (:class:`ClickHouseStore`, a
ClickHouse server).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from alphaengine.config import ChdbStoreConfig, MemoryStoreConfig, StoreConfig
from alphaengine.store.base import Column, Migration, Store, StoreRequestError, TableSpec
from alphaengine.store.chdb import ChdbStore
from alphaengine.store.memory import MemoryStore
from alphaengine.store.schema import BARS, FEED_GAPS, MIGRATIONS, MIGRATIONS_TABLE, TABLES, TICKS

if TYPE_CHECKING:
    from alphaengine.store.clickhouse import ClickHouseStore

__all__ = [
    "BARS",
    "FEED_GAPS",
    "MIGRATIONS",
    "MIGRATIONS_TABLE",
    "TABLES",
    "TICKS",
    "ChdbStore",
    "ClickHouseStore",
    "Column",
    "MemoryStore",
    "Migration",
    "Store",
    "StoreRequestError",
    "TableSpec",
    "build_store",
]


def __getattr__(name: str) -> object:
    # asynch takes about 0.1 s to import: only a process that uses a ClickHouse server pays for it.
    if name == "ClickHouseStore":
        from alphaengine.store.clickhouse import ClickHouseStore  # noqa: PLC0415  (imports asynch)

        return ClickHouseStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_store(config: StoreConfig) -> Store:
    """The store a ``[store]`` configuration section describes (not yet started)."""
    if isinstance(config, MemoryStoreConfig):
        return MemoryStore()
    if isinstance(config, ChdbStoreConfig):
        return ChdbStore(config.path, config.database)
    from alphaengine.store.clickhouse import ClickHouseStore  # noqa: PLC0415  (imports asynch)

    return ClickHouseStore(config)
