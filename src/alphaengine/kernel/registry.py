"""The plugin registry: module types by entry-point name or by ``"package.module:Class"`` path.

Built-in and third-party modules register under the entry-point group ``alphaengine.modules``; a
configuration may also name any importable class directly. :func:`reload_module_type` re-imports a
plugin's code for hot reload.
"""

from __future__ import annotations

import importlib
import sys
from importlib.metadata import entry_points
from typing import Any

from alphaengine.errors import PluginError
from alphaengine.kernel.module import Module

ENTRY_POINT_GROUP = "alphaengine.modules"


def available() -> dict[str, str]:
    """Registered plugin names and the ``module:attr`` they point at."""
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def _target(type_name: str) -> str:
    if ":" in type_name:
        return type_name
    registered = available()
    if type_name not in registered:
        known = ", ".join(sorted(registered)) or "none"
        raise PluginError(
            f"no module type {type_name!r} (registered: {known}; or use 'package.module:Class')"
        )
    return registered[type_name]


def resolve_module(type_name: str) -> type[Module[Any]]:
    """The module class for a plugin name or a ``"package.module:Class"`` path."""
    target = _target(type_name)
    module_path, _, attr = target.partition(":")
    try:
        py_module = importlib.import_module(module_path)
    except ImportError as exc:
        raise PluginError(f"cannot import {module_path!r}: {exc}") from exc
    return _class_from(py_module, attr, target)


def reload_module_type(type_name: str) -> type[Module[Any]]:
    """Re-import the Python module that defines a plugin and return the fresh class (hot reload)."""
    target = _target(type_name)
    module_path, _, attr = target.partition(":")
    py_module = sys.modules.get(module_path)
    try:
        py_module = importlib.reload(py_module) if py_module else importlib.import_module(module_path)
    except Exception as exc:  # a syntax error in edited code must not take the engine down
        raise PluginError(f"cannot reload {module_path!r}: {exc!r}") from exc
    return _class_from(py_module, attr, target)


def _class_from(py_module: object, attr: str, target: str) -> type[Module[Any]]:
    obj: Any = py_module
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise PluginError(f"{target!r}: no attribute {part!r}")
    if not (isinstance(obj, type) and issubclass(obj, Module)):
        raise PluginError(f"{target!r} is not an alphaengine Module subclass")
    return obj
