"""Typed method options: :class:`Option` and the coercion of user values (YAML, CLI strings) to each kind."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional


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


# the data option every trainable method records with its run
PROFILE_IN_PROMPT = Option(
    "bool", True, "put the profile sentence in the (system) prompt; a data option recorded with the run"
)
