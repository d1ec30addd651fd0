"""The plugin registry: module types by entry-point name or by ``"package.module:Class"`` path.

Built-in and third-party modules register under the entry-point group ``alphaengine.modules``; a
configuration may also name any importable class directly. :func:`reload_module_type` re-imports a
plugin's code for hot reload.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
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
    """Import the Python module that defines a plugin afresh from its source and return the new class.

    The module is executed into a new module object, which replaces the old one in ``sys.modules`` only
    once it has run without error: unlike ``importlib.reload``, which executes into the old module's
    namespace, the running instances keep seeing their own code's globals until they are swapped out,
    and an edit that fails to import changes nothing. Only this one module is re-imported, not what it
    imports.
    """
    target = _target(type_name)
    module_path, _, attr = target.partition(":")
    parent_name, _, child = module_path.rpartition(".")
    importlib.invalidate_caches()
    try:
        search = importlib.import_module(parent_name).__path__ if parent_name else None
        spec = importlib.machinery.PathFinder.find_spec(module_path, search)
        if spec is None or spec.loader is None:
            raise ImportError(f"no module named {module_path!r}")
        fresh = importlib.util.module_from_spec(spec)
    except Exception as exc:
        raise PluginError(f"cannot reload {module_path!r}: {exc!r}") from exc
    previous = sys.modules.get(module_path)
    # Present while it runs, as an import would have it (annotations and pickling look it up there).
    sys.modules[module_path] = fresh
    try:
        spec.loader.exec_module(fresh)
        cls = _class_from(fresh, attr, target)
    except Exception as exc:  # a syntax error in edited code must not take the engine down
        if previous is not None:
            sys.modules[module_path] = previous
        else:
            del sys.modules[module_path]
        if isinstance(exc, PluginError):
            raise
        raise PluginError(f"cannot reload {module_path!r}: {exc!r}") from exc
    if parent_name:
        setattr(sys.modules[parent_name], child, fresh)
    return cls


def _class_from(py_module: object, attr: str, target: str) -> type[Module[Any]]:
    obj: Any = py_module
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise PluginError(f"{target!r}: no attribute {part!r}")
    if not (isinstance(obj, type) and issubclass(obj, Module)):
        raise PluginError(f"{target!r} is not an alphaengine Module subclass")
    return obj
