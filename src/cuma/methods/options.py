"""Typed method options: :class:`Option`, the options of a tuner read from its config dataclass
(:func:`options_from_config`), and the coercion of user values (YAML, CLI strings) to each kind."""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence


@dataclass(frozen=True)
class Option:
    """One option a method accepts. ``kind`` is one of int, float, bool, str, modules (list of module names or a
    regex), int_list; ``default`` is used when the option is not given (``None`` = the library's own default)."""

    kind: str
    default: Any = None
    help: str = ""
    choices: Optional[tuple] = None


_KINDS = ("int", "float", "bool", "str", "modules", "int_list")
_REGEX_CHARS = set("*+?[](){}|^$\\")


def _coerce(method: str, name: str, opt: Option, value: Any) -> Any:
    def bad(expected: str):
        return ValueError(
            f"option {name!r} of method {method!r} must be {expected}, got {type(value).__name__} {value!r}"
        )

    if value is None:
        return None
    kind = opt.kind
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
                value = int(value)
            else:
                raise bad("an integer")
    elif kind == "float":
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise bad("a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        value = float(value)
    elif kind == "bool":
        if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            value = value.strip().lower() in ("1", "true", "yes", "on")
        elif not isinstance(value, bool):
            raise bad("true or false")
    elif kind == "str":
        if not isinstance(value, str):
            raise bad("a string")
    elif kind == "modules":
        value = _as_modules(value)
        if value is None:
            raise bad("a list of module names, a comma-separated string of names, or a regex string")
    elif kind == "int_list":
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        elif isinstance(value, str):
            try:
                value = [int(v) for v in value.split(",") if v.strip()]
            except ValueError:
                raise bad("a list of integers") from None
        elif isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            value = list(value)
        else:
            raise bad("a list of integers")
    if opt.choices is not None and value not in opt.choices:
        raise ValueError(f"option {name!r} of method {method!r} must be one of {list(opt.choices)}, got {value!r}")
    return value


def _as_modules(value: Any):
    """list of names | 'a,b' | 'all-linear' | a regex string -> list[str] or str (regex / 'all-linear')."""
    if isinstance(value, str):
        text = value.strip()
        if text == "all-linear" or any(c in _REGEX_CHARS for c in text):
            return text
        names = [v.strip() for v in text.split(",") if v.strip()]
        return names or None
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) for v in value):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    return None


# fields every PEFT config has that are not method options (PEFT sets them, or they name the run, not the adapter)
_PEFT_BASE_FIELDS = {f.name for f in dataclasses.fields(__import__("peft").config.PeftConfig)}
_MODULE_FIELDS = {"target_modules", "exclude_modules", "modules_to_save", "ffn_modules", "layers_pattern"}


def _kind_of(name: str, hint) -> tuple[str, Optional[tuple]]:
    """Option kind (and choices) of a config field from its type annotation."""
    if name in _MODULE_FIELDS:
        return "modules", None
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    origin = typing.get_origin(hint)
    if origin is typing.Union and len(args) == 1:  # Optional[X]
        return _kind_of(name, args[0])
    if origin is typing.Literal:
        return "str", tuple(typing.get_args(hint))
    if origin is typing.Union and any(typing.get_origin(a) is list and typing.get_args(a) == (int,) for a in args):
        return "int_list", None
    for kind, typ in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if hint is typ:
            return kind, None
    raise TypeError(f"config field {name!r}: no option kind for its type {hint!r}")


def options_from_config(
    config_cls, exclude: Sequence[str] = (), defaults: Optional[Mapping[str, Any]] = None
) -> dict[str, Option]:
    """The options of a method built on ``config_cls`` (a PEFT config dataclass): one per field the class declares
    (PEFT's own fields and fields marked ``metadata={"fitted": True}`` excluded), with the field's type as the kind
    (a ``Literal`` gives the choices), its default and its ``metadata["help"]``. ``exclude``: fields the method fixes;
    ``defaults``: the method's own defaults, where they differ from the config's."""
    hints = typing.get_type_hints(config_cls)
    defaults = dict(defaults or {})
    out: dict[str, Option] = {}
    for f in dataclasses.fields(config_cls):
        if f.name in _PEFT_BASE_FIELDS or f.metadata.get("fitted") or f.name in exclude:
            continue
        kind, choices = _kind_of(f.name, hints[f.name])
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = None
        if f.name in defaults:
            default = defaults.pop(f.name)
        help_text = f.metadata.get("help")
        if not help_text:
            raise ValueError(f"{config_cls.__name__}.{f.name} has no metadata['help']: every option says what it does")
        out[f.name] = Option(kind, default, help_text, choices)
    unknown = set(defaults) | (set(exclude) - {f.name for f in dataclasses.fields(config_cls)})
    if unknown:
        raise ValueError(f"{config_cls.__name__} has no field(s) {sorted(unknown)}")
    return out


# the data option every trainable method records with its run
PROFILE_IN_PROMPT = Option(
    "bool", True, "put the profile sentence in the (system) prompt; a data option recorded with the run"
)
