"""Configuration: TOML files decoded into frozen, strict, typed objects.

``load(path)`` interpolates ``${ENV_VAR}`` (and ``${ENV_VAR:-default}``) in strings, validates the whole
file, including every ``[modules.<name>]`` section against its plugin's ``Config`` struct, and raises one
:class:`~alphaengine.errors.ConfigError` listing every problem by key path.
"""

from alphaengine.config._load import LoadedConfig, ModuleConfig, ModuleConfigResolver, check, load, loads
from alphaengine.config._schema import (
    AdminConfig,
    AppConfig,
    BusConfig,
    ChdbStoreConfig,
    ClickHouseStoreConfig,
    EngineConfig,
    KafkaBusConfig,
    LocalBusConfig,
    LocalObjectStoreConfig,
    MemoryBusConfig,
    MemoryObjectStoreConfig,
    MemoryStoreConfig,
    MetricsConfig,
    ObjectStoreConfig,
    S3ObjectStoreConfig,
    StoreConfig,
    Strict,
    SupervisorConfig,
)

__all__ = [
    "AdminConfig",
    "AppConfig",
    "BusConfig",
    "ChdbStoreConfig",
    "ClickHouseStoreConfig",
    "EngineConfig",
    "KafkaBusConfig",
    "LoadedConfig",
    "LocalBusConfig",
    "LocalObjectStoreConfig",
    "MemoryBusConfig",
    "MemoryObjectStoreConfig",
    "MemoryStoreConfig",
    "MetricsConfig",
    "ModuleConfig",
    "ModuleConfigResolver",
    "ObjectStoreConfig",
    "S3ObjectStoreConfig",
    "StoreConfig",
    "Strict",
    "SupervisorConfig",
    "check",
    "load",
    "loads",
]
