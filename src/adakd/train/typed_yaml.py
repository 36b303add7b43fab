"""YAML 1.2 text into typed dataclasses: every value is checked against its field's type, and every error names the
dotted key (``loss.selection: expected a string, got 3``). Knows nothing of the run schema (:mod:`.config`)."""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from typing import Any

import yaml

from ..errors import ConfigError

__all__ = ["ConfigError", "build", "parse_yaml"]


class _Loader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false. YAML 1.1 also reads yes/no/on/off as booleans, which turns
    ``save_strategy: no`` into False."""


_REPLACED = ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float")
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in _REPLACED]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
# YAML 1.2 floats: "1e-3" is a number (YAML 1.1 wants "1.0e-3").
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    """``text`` parsed as YAML 1.2 (safe: plain data only). Raises ``yaml.YAMLError``."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _key_error(key: str, reason: str) -> ConfigError:
    """A :class:`ConfigError` ``key: reason`` that carries both apart, so that a caller adds the file name without
    reading the text."""
    return ConfigError(f"{key}: {reason}", key=key, reason=reason)


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check (and lightly coerce) a YAML value against a dataclass field type; raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:  # ``X | None``: the one type's own error
            raise errors[0]
        raise _key_error(key, f"expected {' or '.join(map(_type_name, args))}")
    if dataclasses.is_dataclass(tp):
        # A section that declares TRUE_MEANS_DEFAULTS can be switched on with ``true`` (``lora: true``).
        if value is True and getattr(tp, "TRUE_MEANS_DEFAULTS", False):
            value = {}
        if not isinstance(value, dict):
            raise _key_error(key, f"expected a mapping, got {value!r}")
        return build(tp, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise _key_error(key, f"expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _key_error(key, f"expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise _key_error(key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _key_error(key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _key_error(key, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _key_error(key, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"{key}: unsupported field type {tp}")  # a bug in the schema, not in the YAML


def build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """An instance of the dataclass ``cls`` from the mapping ``data``; nested dataclass fields are built from nested
    mappings. Fields declared with ``init=False`` are not read from ``data``.

    Args:
        cls: the dataclass.
        data: its values, as parsed from YAML.
        prefix: the dotted key of ``data`` in the whole file (``""`` at the top), for messages.

    Raises:
        ConfigError: an unknown key (with the closest valid one), a missing required key or a value of the wrong
            type; the message names the dotted key.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    # str(): YAML allows non-string keys (``1: x``), which must be reported, not crash the sort.
    unknown = sorted(str(k) for k in set(data) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        close = difflib.get_close_matches(unknown[0], list(fields), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise _key_error(f"{where}{unknown[0]}", f"unknown key{hint}; valid: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise _key_error(key, "is required")
    return cls(**kwargs)
