"""Loading a TOML configuration: environment interpolation, then strict typed decoding.

Every problem is collected before anything is built, each naming its key path, so a bad file fails as a
whole with a complete list instead of one error at a time (and nothing starts half-way).
"""

from __future__ import annotations

import os
import re
import tomllib
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import msgspec

from alphaengine.config._schema import AppConfig, Strict
from alphaengine.errors import ConfigError

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-(.*?))?\}")

ModuleConfigResolver = Callable[[str], type[Strict]]
"""Maps a module ``type`` (plugin name or ``package.module:Class``) to its config struct type."""


@dataclass(frozen=True, slots=True)
class ModuleConfig:
    """One ``[modules.<name>]`` section, decoded: its plugin type, whether it runs, and its settings."""

    name: str
    type: str
    enabled: bool
    settings: Strict


@dataclass(frozen=True, slots=True)
class LoadedConfig:
    """A validated configuration file."""

    source: str
    app: AppConfig
    modules: tuple[ModuleConfig, ...]

    def module(self, name: str) -> ModuleConfig:
        """The module section called ``name``; raises KeyError."""
        for m in self.modules:
            if m.name == name:
                return m
        raise KeyError(name)


def load(path: str | Path, resolver: ModuleConfigResolver | None = None) -> LoadedConfig:
    """Read, interpolate and validate a configuration file; raises ConfigError listing every problem."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"cannot read the file: {exc.strerror}"], source) from exc
    return loads(text, source=source, resolver=resolver)


def loads(
    text: str, *, source: str = "<config>", resolver: ModuleConfigResolver | None = None
) -> LoadedConfig:
    """Validate configuration text (see :func:`load`)."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"not valid TOML: {exc}"], source) from exc
    problems: list[str] = []
    data = _interpolate(raw, "", problems, os.environ)
    problems.extend(check(data, AppConfig, ""))
    modules: list[ModuleConfig] = []
    raw_modules = data.get("modules")
    if isinstance(raw_modules, dict):
        modules = _load_modules(raw_modules, resolver or _default_resolver, problems)
    if problems:
        raise ConfigError(problems, source)
    app = msgspec.convert(data, AppConfig)
    return LoadedConfig(source=source, app=app, modules=tuple(modules))


def _default_resolver(type_name: str) -> type[Strict]:
    from alphaengine.kernel.registry import resolve_module  # noqa: PLC0415  (the registry imports config)

    return resolve_module(type_name).Config


def _load_modules(
    raw_modules: Mapping[str, Any], resolver: ModuleConfigResolver, problems: list[str]
) -> list[ModuleConfig]:
    modules: list[ModuleConfig] = []
    for name, section in raw_modules.items():
        path = f"modules.{name}"
        if not isinstance(section, dict):
            continue  # reported by the AppConfig check
        type_name = section.get("type")
        enabled = section.get("enabled", True)
        if not isinstance(type_name, str) or not type_name:
            problems.append(
                f"{path}.type: missing required value (a module type name or 'package.module:Class')"
            )
            continue
        if not isinstance(enabled, bool):
            problems.append(f"{path}.enabled: expected a boolean, got {type(enabled).__name__}")
            continue
        try:
            config_type = resolver(type_name)
        except Exception as exc:
            problems.append(f"{path}.type: cannot load module type {type_name!r}: {exc}")
            continue
        settings = {k: v for k, v in section.items() if k not in ("type", "enabled")}
        found = check(settings, config_type, path)
        if found:
            problems.extend(found)
            continue
        modules.append(ModuleConfig(name, type_name, enabled, msgspec.convert(settings, config_type)))
    return modules


def _interpolate(value: Any, path: str, problems: list[str], env: Mapping[str, str]) -> Any:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in every string; an unset variable is a problem."""
    if isinstance(value, dict):
        return {k: _interpolate(v, _join(path, k), problems, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, f"{path}[{i}]", problems, env) for i, v in enumerate(value)]
    if isinstance(value, str) and "${" in value:

        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            problems.append(f"{path}: environment variable {name} is not set")
            return ""

        return _ENV_REF.sub(substitute, value)
    return value


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def check(value: Any, tp: Any, path: str) -> list[str]:
    """Every problem decoding ``value`` as ``tp`` would meet, each as ``key.path: what was expected``."""
    if isinstance(tp, type) and issubclass(tp, Strict):
        return _check_struct(value, tp, path)
    members = _struct_union_members(tp)
    if members:
        return _check_tagged(value, members, path)
    try:
        msgspec.convert(value, tp)
    except msgspec.ValidationError as exc:
        return [_describe(exc, path)]
    return []


def _check_struct(value: Any, tp: type[Strict], path: str) -> list[str]:
    if not isinstance(value, dict):
        return [f"{path or '<root>'}: expected a table, got {_kind(value)}"]
    fields = msgspec.structs.fields(tp)
    known = {f.encode_name: f for f in fields}
    tag_field = tp.__struct_config__.tag_field
    problems: list[str] = []
    for key in value:
        if key not in known and key != tag_field:
            problems.append(f"{_join(path, key)}: unknown key (expected one of: {', '.join(sorted(known))})")
    for name, field in known.items():
        if name in value:
            problems.extend(check(value[name], field.type, _join(path, name)))
        elif field.required:
            problems.append(f"{_join(path, name)}: missing required value ({_type_name(field.type)})")
    return problems


def _check_tagged(value: Any, members: list[type[Strict]], path: str) -> list[str]:
    tag_field = members[0].__struct_config__.tag_field or "kind"
    tags = {str(m.__struct_config__.tag): m for m in members}
    if not isinstance(value, dict):
        return [f"{path}: expected a table, got {_kind(value)}"]
    tag = value.get(tag_field)
    if tag not in tags:
        return [f"{_join(path, tag_field)}: expected one of {sorted(tags)}, got {tag!r}"]
    return _check_struct(value, tags[tag], path)


def _struct_union_members(tp: Any) -> list[type[Strict]]:
    if get_origin(tp) not in (Union, types.UnionType):
        return []
    args = get_args(tp)
    if all(isinstance(a, type) and issubclass(a, Strict) and a.__struct_config__.tag_field for a in args):
        return list(args)
    return []


_AT = re.compile(r" - at `\$(.*)`$")


def _describe(exc: msgspec.ValidationError, path: str) -> str:
    message = str(exc)
    match = _AT.search(message)
    if match:
        path += match.group(1)
        message = message[: match.start()]
    message = message.replace("`", "")
    return f"{path}: {message[0].lower()}{message[1:]}" if message else f"{path}: invalid value"


def _kind(value: Any) -> str:
    return {dict: "a table", list: "an array", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def _type_name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")
