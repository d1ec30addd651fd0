"""The kernel: module lifecycle, supervisor, plugin registry, engine runtime and admin socket.

Module authors need :class:`Module`, :class:`ModuleSettings` and :class:`Context` from here; the engine
runtime is :class:`alphaengine.kernel.engine.Engine`.
"""

from alphaengine.kernel.module import Context, Module, ModuleSettings, ModuleState
from alphaengine.kernel.registry import ENTRY_POINT_GROUP, available, resolve_module

__all__ = [
    "ENTRY_POINT_GROUP",
    "Context",
    "Module",
    "ModuleSettings",
    "ModuleState",
    "available",
    "resolve_module",
]
