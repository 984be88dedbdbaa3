"""Typed configs from YAML and ``dotted.key=value`` command-line overrides.

A run's config is a tree of frozen dataclasses (each component's own, next to its code). This module turns
plain data (a YAML mapping) into that tree, checking every key and type on the way, so a typo fails at
start with the field's full name, the problem and the valid choices. Each dataclass's own
``__post_init__`` then checks values; its ``ConfigError`` gets the section prefix added.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Iterable, Mapping, Union

import yaml

from alp_megatron.errors import ConfigError


def _type_name(kind: Any) -> str:
    return getattr(kind, "__name__", None) or str(kind).replace("typing.", "")


def _convert(value: Any, kind: Any, field: str) -> Any:
    """``value`` as type ``kind`` (a dataclass, a scalar, Optional/Union, tuple/list/dict), or ConfigError."""
    origin = typing.get_origin(kind)
    if kind is Any:
        return value
    if origin in (Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, field)
            except ConfigError as error:
                errors.append(error)
        raise errors[0] if len(errors) == 1 else ConfigError(
            field, f"{value!r} is none of {', '.join(_type_name(o) for o in options)}", "fix the value's type")
    if dataclasses.is_dataclass(kind):
        if isinstance(value, kind):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(field, f"expected a mapping (section), got {value!r}", "write it as `key: value` lines")
        return build(kind, value, prefix=field)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(field, f"expected a list, got {value!r}", "write it as [a, b, ...]")
        args = typing.get_args(kind)
        item = args[0] if args else Any
        items = [_convert(v, item, f"{field}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or kind is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(field, f"expected a mapping, got {value!r}", "write it as {key: value}")
        return dict(value)
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(field, f"expected true or false, got {value!r}", "write true or false")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(field, f"expected an integer, got {value!r}", "write a whole number")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 1e-6 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(field, f"expected a number, got {value!r}", "write a number such as 1e-6")
    if kind is str:
        if isinstance(value, str):
            return value
        raise ConfigError(field, f"expected a string, got {value!r}", "quote the value")
    return value


def build(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    """Instantiate dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(known))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"{where}{unknown[0]}", "is not a known setting",
                          f"use one of: {', '.join(sorted(known))}")
    values = {}
    for name, value in data.items():
        field = f"{prefix}.{name}" if prefix else name
        values[name] = _convert(value, hints[name], field)
    try:
        return cls(**values)
    except ConfigError as error:
        if prefix and not error.field.startswith(prefix):
            # a component validates its own fields ("actor.x"); name them from the root of this config
            tail = error.field.split(".", 1)[-1]
            raise ConfigError(f"{prefix}.{tail}", error.problem, error.fix) from None
        raise


def parse_overrides(overrides: Iterable[str]) -> dict:
    """``["a.b=1", "c=[1, 2]"]`` -> ``{"a": {"b": 1}, "c": [1, 2]}``; values are read as YAML scalars."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "is not an override", "write overrides as section.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(key, "has an empty name part", "write overrides as section.key=value")
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(key, "overrides a value and a section below it", "give one of the two")
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    return tree


def merge(base: dict, updates: Mapping) -> dict:
    """``updates`` laid over ``base`` (recursively for mappings); neither input changes."""
    merged = dict(base)
    for key, value in updates.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


BASE_KEY = "base"


def load_yaml(path: str, _seen: tuple[str, ...] = ()) -> dict:
    """The mapping in YAML file ``path`` (empty file: ``{}``); a syntax error or a key given twice names the
    file and line. A top-level ``base: OTHER.yaml`` (relative to ``path``) lays this file over that one
    (recursively), so a preset says only what it changes."""
    import os

    try:
        with open(path) as handle:
            data = yaml.load(handle, Loader=_UniqueKeyLoader)
    except FileNotFoundError:
        raise ConfigError("--config", f"file {path} does not exist", "pass the path of a YAML run config") from None
    except yaml.YAMLError as error:
        raise ConfigError("--config", f"{path} is not valid YAML: {error}", "fix the syntax at that line") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("--config", f"{path} must hold a mapping of sections, got {type(data).__name__}",
                          "start the file with section names such as `model:`")
    if BASE_KEY not in data:
        return data
    base = data.pop(BASE_KEY)
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: {BASE_KEY}", f"must be the path of another YAML config, got {base!r}",
                          "write e.g. `base: ../qwen3_8b_colocated.yaml` (relative to this file)")
    base_path = os.path.normpath(os.path.join(os.path.dirname(path), os.path.expanduser(base)))
    chain = (*_seen, os.path.realpath(path))
    if os.path.realpath(base_path) in chain:
        raise ConfigError(f"{path}: {BASE_KEY}", f"{base_path} is already in the chain {' -> '.join(chain)}",
                          "break the cycle of base files")
    return merge(load_yaml(base_path, chain), data)


def to_dict(config: Any) -> Any:
    """A dataclass tree as plain data (for saving the resolved config beside a run)."""
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (list, tuple)):
        return [to_dict(v) for v in config]
    return config
