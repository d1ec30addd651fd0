"""Loading a TOML configuration: environment interpolation, then strict typed decoding.

Every problem is collected before anything is built, each naming its key path, so a bad file fails as a
whole with a complete list instead of one error at a time (and nothing starts half-way).

A string with ``${VAR}`` references is converted, once substituted, to the type of its key (``port =
"${PORT:-9000}"`` gives an int), because the environment only holds strings; a string written as such
(``port = "9000"``) is not, so a quoted number in the file stays the mistake it is.
"""

from __future__ import annotations

import os
import re
import tomllib
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

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
    problems = _Problems()
    interpolated = _interpolate(raw, "", problems, os.environ)
    data = _typed(interpolated, AppConfig, "", problems)
    problems.extend(check(data, AppConfig, ""))
    modules: list[ModuleConfig] = []
    # The module sections as interpolated: their keys' types are known only once the module type is.
    raw_modules = interpolated.get("modules")
    if isinstance(raw_modules, dict):
        modules = _load_modules(raw_modules, resolver or _default_resolver, problems)
    if problems:
        raise ConfigError(list(problems), source)
    app = msgspec.convert(data, AppConfig)
    return LoadedConfig(source=source, app=app, modules=tuple(modules))


class _Problems(list[str]):
    """Problems as ``key.path: what is wrong``; a key whose interpolation failed gets no second one."""

    def __init__(self) -> None:
        super().__init__()
        self.interpolation_failed: set[str] = set()

    def interpolation(self, path: str, problem: str) -> None:
        """A problem with an environment reference of the key at ``path``."""
        self.interpolation_failed.add(path)
        self.append(f"{path}: {problem}")

    def extend(self, found: Iterable[str]) -> None:
        """Add problems found by :func:`check`, leaving out those of keys already reported."""
        super().extend(p for p in found if p.partition(": ")[0] not in self.interpolation_failed)


def _default_resolver(type_name: str) -> type[Strict]:
    from alphaengine.kernel.registry import resolve_module  # noqa: PLC0415  (the registry imports config)

    return resolve_module(type_name).Config


def _load_modules(
    raw_modules: Mapping[str, Any], resolver: ModuleConfigResolver, problems: _Problems
) -> list[ModuleConfig]:
    modules: list[ModuleConfig] = []
    for name, section in raw_modules.items():
        path = f"modules.{name}"
        if not isinstance(section, dict):
            continue  # reported by the AppConfig check
        type_name = _typed(section.get("type"), str, f"{path}.type", problems)
        enabled = _typed(section.get("enabled", True), bool, f"{path}.enabled", problems)
        if not isinstance(type_name, str) or not type_name:
            problems.append(
                f"{path}.type: missing required value (a module type name or 'package.module:Class')"
            )
            continue
        if not isinstance(enabled, bool):
            if f"{path}.enabled" not in problems.interpolation_failed:  # else already reported
                problems.append(f"{path}.enabled: expected a boolean, got {type(enabled).__name__}")
            continue
        try:
            config_type = resolver(type_name)
        except Exception as exc:
            problems.append(f"{path}.type: cannot load module type {type_name!r}: {exc}")
            continue
        settings = _typed(
            {k: v for k, v in section.items() if k not in ("type", "enabled")}, config_type, path, problems
        )
        found = check(settings, config_type, path)
        if found:
            problems.extend(found)
            continue
        modules.append(ModuleConfig(name, type_name, enabled, msgspec.convert(settings, config_type)))
    return modules


@dataclass(frozen=True, slots=True)
class _Interpolated:
    """A string value after ``${VAR}`` substitution, until it is converted to its key's type."""

    text: str
    origins: tuple[str, ...]
    """Where the substituted parts came from (``environment variable X``, ``the default of ${X:-d}``)."""


def _interpolate(value: Any, path: str, problems: _Problems, env: Mapping[str, str]) -> Any:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in every string; an unset variable is a problem.

    A string with references becomes an :class:`_Interpolated`, converted to its key's type by
    :func:`_typed`.
    """
    if isinstance(value, dict):
        return {k: _interpolate(v, _join(path, k), problems, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, f"{path}[{i}]", problems, env) for i, v in enumerate(value)]
    if isinstance(value, str) and "${" in value:
        origins: list[str] = []

        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in env:
                origins.append(f"environment variable {name}")
                return env[name]
            if default is not None:
                origins.append(f"the default of {match.group(0)}")
                return default
            problems.interpolation(path, f"environment variable {name} is not set")
            return ""

        text = _ENV_REF.sub(substitute, value)
        return _Interpolated(text, tuple(origins)) if origins else text
    return value


def _typed(value: Any, tp: Any, path: str, problems: _Problems) -> Any:
    """``value`` with every interpolated string converted to the type of its key (``tp`` at ``path``).

    Walks tables (structs, tagged unions of structs, dicts) and arrays along with the type; where the type
    is unknown (an unknown key, ``Any``) an interpolated value stays a string.
    """
    if isinstance(value, _Interpolated):
        return _convert(value, tp, path, problems)
    tp = _unannotated(tp)
    if isinstance(value, dict):
        return {k: _typed(v, _value_type(value, tp, k), _join(path, k), problems) for k, v in value.items()}
    if isinstance(value, list):
        return [_typed(v, _element_type(tp, i), f"{path}[{i}]", problems) for i, v in enumerate(value)]
    return value


def _value_type(table: dict[str, Any], tp: Any, key: str) -> Any:
    """The type of ``key`` in a table decoded as ``tp`` (``Any`` if unknown)."""
    members = _struct_union_members(tp)
    if members:
        tag_field = members[0].__struct_config__.tag_field
        tag = table.get(tag_field or "kind")
        tag = tag.text if isinstance(tag, _Interpolated) else tag
        tp = next((m for m in members if m.__struct_config__.tag == tag), Any)
    if isinstance(tp, type) and issubclass(tp, Strict):
        return next((f.type for f in msgspec.structs.fields(tp) if f.encode_name == key), Any)
    if get_origin(tp) is dict:
        return get_args(tp)[1]
    return Any


def _element_type(tp: Any, index: int) -> Any:
    """The type of element ``index`` of an array decoded as ``tp`` (``Any`` if unknown)."""
    args = get_args(tp)
    if get_origin(tp) is tuple and args and args[-1] is not Ellipsis:
        return args[index] if index < len(args) else Any
    if get_origin(tp) in (list, tuple, set, frozenset) and args:
        return args[0]
    return Any


def _convert(value: _Interpolated, tp: Any, path: str, problems: _Problems) -> Any:
    """An interpolated string as ``tp``: unchanged where a string is accepted, else parsed.

    Parsing is msgspec's lax mode: ``"9000"`` as an int, ``"0.5"`` as a float, ``true``/``false``/``1``/``0``
    as a bool, surrounding whitespace ignored.
    """
    if path in problems.interpolation_failed or _accepts_str(tp):
        return value.text
    try:
        return msgspec.convert(value.text.strip(), tp, strict=False)
    except msgspec.ValidationError as exc:
        expected = _GOT.sub("", str(exc)).replace("`", "")
        problems.interpolation(
            path,
            f"{expected[0].lower()}{expected[1:]}, got {value.text!r} from {' and '.join(value.origins)}",
        )
        return value.text


_GOT = re.compile(r", got `[^`]*`$")


def _unannotated(tp: Any) -> Any:
    return get_args(tp)[0] if get_origin(tp) is Annotated else tp


def _accepts_str(tp: Any) -> bool:
    """Whether a value of type ``tp`` may be a string (then an interpolated value stays one)."""
    tp = _unannotated(tp)
    if tp is Any or tp is str:
        return True
    origin = get_origin(tp)
    if origin is Literal:
        return any(isinstance(arg, str) for arg in get_args(tp))
    if origin in (Union, types.UnionType):
        return any(_accepts_str(arg) for arg in get_args(tp))
    return False


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
    if not problems:
        # Every key is right on its own; what is left are the struct's checks across keys (__post_init__).
        try:
            msgspec.convert(value, tp)
        except msgspec.ValidationError as exc:
            problems.append(_describe(exc, path or "<root>"))
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
