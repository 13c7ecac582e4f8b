"""Typed run configurations: YAML files mapped onto nested dataclasses, with command-line overrides.

``load_config(SFTRunConfig, "configs/wvb/cuma_r8.yaml", ["--train.learning_rate", "1e-4", "--method.options.r=64"])``

- Sections are dataclasses; keys are their field names. Unknown keys and values of the wrong type are errors that
  name the key (``train.learing_rate: unknown key; valid keys: ...``).
- Overrides use dotted paths (``--section.field value`` or ``--section.field=value``); a leaf name that is unique
  across sections may be given alone (``--learning_rate 1e-4``). Values are parsed as YAML scalars, then checked
  against the field's type. A ``dict`` field (e.g. ``method.options``) takes sub-keys (``--method.options.r 64``).
- ``base: other.yaml`` at the top of a file includes another file first (paths relative to the including file).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from .runinfo import read_text


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message names the key."""


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key, line: int, first: int):
        super().__init__(f"line {line}: duplicate key {key!r} (first given at line {first}); each key may appear "
                         "only once in a mapping")
        self.line = line


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key repeated in one mapping is an error (PyYAML keeps the last value)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` merges; its keys may be overridden
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.get(key)
        except TypeError:  # an unhashable key: PyYAML reports it itself
            continue
        if first is not None:
            raise _DuplicateKey(key, key_node.start_mark.line + 1, first)
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def load_yaml(text: str) -> Any:
    """YAML text -> Python values, safely, refusing duplicate keys (a ``yaml.YAMLError`` naming the key and line)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def _origin(tp):
    return typing.get_origin(tp)


def _is_optional(tp) -> tuple[bool, Any]:
    if _origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def _check(key: str, tp, value):
    """Coerce ``value`` to the annotated type ``tp`` or raise ConfigError naming ``key``."""
    optional, inner = _is_optional(tp)
    if value is None:
        if optional or tp is Any:
            return None
        raise ConfigError(f"{key}: must not be null (expected {getattr(tp, '__name__', tp)})")
    tp = inner
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {type(value).__name__}")
        return _build(tp, value, key)
    origin = _origin(tp)
    if origin in (list, tuple):
        (item_tp,) = typing.get_args(tp)[:1] or (Any,)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_check(f"{key}[{i}]", item_tp, v) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: must be one of {list(allowed)}, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"{where}{unknown[0]}: unknown key; valid keys: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _check(f"{prefix}.{name}" if prefix else name, hints[name], value)
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"{prefix or cls.__name__}: {err}") from None


def _read_yaml(path: Path, seen: tuple = ()) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'base' includes form a cycle")
    try:
        data = load_yaml(read_text(path)) or {}
    except _DuplicateKey as err:
        raise ConfigError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    except ValueError as err:  # not UTF-8 (the message names the file)
        raise ConfigError(str(err)) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    base = data.pop("base", None)
    if base is None:
        return data
    merged = _read_yaml((path.parent / base), seen + (path.resolve(),))
    return _deep_merge(merged, data)


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _leaf_types(cls, prefix=()) -> dict[tuple[str, ...], Any]:
    """Dotted path of every non-dataclass field -> its type (Optional unwrapped)."""
    out = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = _is_optional(hints[f.name])[1]
        if dataclasses.is_dataclass(tp):
            out.update(_leaf_types(tp, prefix + (f.name,)))
        else:
            out[prefix + (f.name,)] = tp
    return out


def _parse_value(raw: str, tp) -> Any:
    # strings stay verbatim (YAML would turn "no" into False and "1e-4" stays a string only by luck)
    if tp is str or (_origin(tp) in (list, tuple) and typing.get_args(tp)[:1] == (str,)):
        return raw
    return load_yaml(raw) if raw != "" else ""


def parse_overrides(cls, argv: list[str]) -> dict:
    """``["--train.learning_rate", "1e-4", "--seed=3"]`` -> nested dict, keys resolved against ``cls``."""
    types_ = _leaf_types(cls)
    leaves = list(types_)
    by_leaf: dict[str, list[tuple[str, ...]]] = {}
    for p in leaves:
        by_leaf.setdefault(p[-1], []).append(p)
    out: dict = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"override {arg!r}: expected --key value or --key=value")
        key = arg[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(argv):
                raise ConfigError(f"--{key}: missing value")
            raw = argv[i + 1]
            i += 2
        key = key.replace("-", "_")
        parts = tuple(key.split("."))
        path = _resolve_path(parts, leaves, by_leaf, key)
        try:
            value = _parse_value(raw, types_.get(path))
        except yaml.YAMLError as err:
            raise ConfigError(f"--{key}: value {raw!r} is not a valid YAML value ({err})") from None
        node = out
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = value
    return out


def _resolve_path(parts, leaves, by_leaf, key):
    # full path to a leaf, or a path into a dict-typed leaf (method.options.r)
    for n in range(len(parts), 0, -1):
        if parts[:n] in leaves:
            return parts
    if len(parts) == 1:
        matches = by_leaf.get(parts[0], [])
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise ConfigError(f"--{key}: ambiguous; use one of {', '.join('.'.join(m) for m in matches)}")
    valid = ", ".join(".".join(p) for p in leaves)
    raise ConfigError(f"--{key}: unknown key; valid keys: {valid}")


def load_config(cls, path: Optional[Union[str, Path]] = None, overrides: Optional[list[str]] = None):
    """Build ``cls`` from a YAML file (optional) and command-line overrides (optional)."""
    data = _read_yaml(Path(path)) if path else {}
    if overrides:
        data = _deep_merge(data, parse_overrides(cls, overrides))
    return _build(cls, data)


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def dump_yaml(obj) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False)
