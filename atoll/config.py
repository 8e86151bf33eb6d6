"""Typed configuration: dataclass trees loaded from TOML, checked, overridden from the CLI.

Each component owns its own config dataclass (``InnerConfig`` lives beside the inner trainer,
``OuterConfig`` beside the outer optimizer, ...). This module only knows how to turn a TOML
table into such a tree and back, and how to say clearly what is wrong with an input:

    >>> cfg = load(RunConfig, "demo.toml", overrides=["inner.lr=0.01"])

A config dataclass may define ``check(self) -> None`` that raises ``ValueError`` for a bad
value; the loader prefixes the message with the key's dotted path and the file name.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import tomli_w

from atoll.util.atomic import write_atomic

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that cannot be used, with the key and the reason."""


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and ill-typed values."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a table, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        known = ", ".join(sorted(fields))
        raise ConfigError(f"unknown key '{_join(where, unknown[0])}' (known here: {known})")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, _join(where, name))
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"missing key '{_join(where, missing[0])}'")
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if check is not None:
        try:
            check()
        except ValueError as e:
            raise ConfigError(f"{where or 'config'}: {e}") from None
    return obj


def to_dict(obj: Any) -> Any:
    """The TOML-ready form of a config tree (None values are left out: TOML has no null)."""
    if dataclasses.is_dataclass(obj):
        out = {}
        for f in dataclasses.fields(obj):
            v = to_dict(getattr(obj, f.name))
            if v is not None:
                out[f.name] = v
        return out
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def load(
    cls: type[T], path: str | os.PathLike | None = None, overrides: list[str] | None = None
) -> T:
    """Load ``cls`` from a TOML file (or defaults when ``path`` is None) plus ``key=value``s."""
    data: dict[str, Any] = {}
    where = "defaults"
    if path is not None:
        where = str(path)
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
    for item in overrides or []:
        _apply_override(data, item)
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def save(obj: Any, path: str | os.PathLike) -> None:
    """Write a config tree as TOML, atomically (temporary name, then rename)."""
    write_atomic(Path(path), tomli_w.dumps(to_dict(obj)).encode())


def _apply_override(data: dict[str, Any], item: str) -> None:
    """Set ``a.b.c=value`` in a nested dict; the value is parsed as TOML, else taken as text."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{item}': expected key=value, e.g. inner.lr=0.003")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    parts = key.strip().split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{item}': '{p}' is not a table")
    node[parts[-1]] = value


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _coerce(hint: Any, value: Any, where: str) -> Any:
    """``value`` as type ``hint`` (a TOML value becomes a config field), or a ConfigError
    naming ``where``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(typing.get_args(hint), value, where)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    if origin in (list, tuple):
        return _coerce_sequence(origin, typing.get_args(hint), value, where)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{where}' must be a table, got {value!r}")
        _refuse_non_finite(value, where)
        return dict(value)
    if origin is typing.Literal:
        args = typing.get_args(hint)
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"'{where}' must be one of {choices}, got {value!r}")
        return value
    if hint is Any:
        _refuse_non_finite(value, where)
        return value
    return _coerce_scalar(hint, value, where)


def _coerce_union(args: tuple[Any, ...], value: Any, where: str) -> Any:
    """The first member of the union that accepts ``value`` (None where the union has it)."""
    if value is None and type(None) in args:
        return None
    errors = []
    for a in args:
        if a is type(None):
            continue
        try:
            return _coerce(a, value, where)
        except ConfigError as e:
            errors.append(str(e))
    raise ConfigError(errors[0])


def _coerce_sequence(origin: type, args: tuple[Any, ...], value: Any, where: str) -> Any:
    """A list, a tuple of fixed length or a tuple of any length, item by item."""
    if not isinstance(value, list):
        raise ConfigError(f"'{where}' must be a list, got {value!r}")
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            raise ConfigError(f"'{where}' must have {len(args)} items, got {len(value)}")
        pairs = enumerate(zip(args, value, strict=True))
        return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in pairs)
    item = args[0] if args else Any
    out = [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    return tuple(out) if origin is tuple else out


def _refuse_non_finite(value: Any, where: str) -> None:
    """A ConfigError naming ``where`` if ``value`` is, or holds, nan or inf (TOML has both,
    and either would pass every ``x < limit`` check and poison what it reaches)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"'{where}' must be a finite number, got {value!r}")
    if isinstance(value, dict):
        for k, v in value.items():
            _refuse_non_finite(v, _join(where, str(k)))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _refuse_non_finite(v, f"{where}[{i}]")


def _coerce_scalar(hint: Any, value: Any, where: str) -> Any:
    """A number, integer, bool or string; TOML's bools are not numbers here."""
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"'{where}' must be a number, got {value!r}")
        _refuse_non_finite(value, where)
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"'{where}' must be an integer, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"'{where}' must be true or false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"'{where}' must be a string, got {value!r}")
        return value
    raise ConfigError(f"'{where}': unsupported config type {hint!r}")
