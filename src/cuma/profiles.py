"""Demographic profiles and their one canonical sentence.

A :class:`Profile` holds the demographic attributes of one participant (WorldValuesBench respondent, PRISM user,
Community Alignment annotator) as named, optional string fields. :meth:`Profile.to_text` writes it as the single
sentence that is embedded by :class:`cuma.ProfileEncoder` (and optionally put into the system prompt)::

    >>> Profile(country="Egypt", age_group="25-34 years old", gender="Female", religion="Muslim").to_text()
    'Country: Egypt. Age group: 25-34 years old. Gender: Female. Religion: Muslim.'

The rendering is deterministic: fields appear in the order of :data:`PROFILE_FIELDS`, then the ``extra`` entries
sorted by key; missing fields are left out; values are whitespace-normalised. Values that are missing-value codes
(``None``, ``""``, NaN, negative survey codes such as ``"-1"``, ``"Don't know"``, ``"No answer"``, ``"Missing"``,
...) are dropped, both by the constructor and by :meth:`Profile.from_mapping`, so two records that differ only in how
they say "unknown" give equal profiles and the same text.

Raw dataset records become profiles through a per-dataset *field map* (source column -> profile field); the maps for
the three datasets ship here as :data:`WVB_FIELD_MAP`, :data:`PRISM_FIELD_MAP` and
:data:`COMMUNITY_ALIGNMENT_FIELD_MAP` (also :data:`FIELD_MAPS` by dataset name). A source key may be a dotted path
into nested mappings (PRISM's ``religion.simplified``); a target may be ``"extra.<key>"`` for attributes that have no
typed field.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = [
    "COMMUNITY_ALIGNMENT_FIELD_MAP",
    "FIELD_LABELS",
    "FIELD_MAPS",
    "MISSING_VALUES",
    "PRISM_FIELD_MAP",
    "PROFILE_FIELDS",
    "Profile",
    "WVB_FIELD_MAP",
    "is_missing",
    "normalize_value",
]

# Typed fields in rendering order. Append new fields at the end only: the order is part of the canonical text, and
# changing it changes every profile embedding an adapter was trained with.
PROFILE_FIELDS: tuple[str, ...] = (
    "country",
    "age_group",
    "gender",
    "education",
    "religion",
    "ethnicity",
    "employment",
    "marital_status",
    "social_class",
    "income",
    "language",
)

FIELD_LABELS: dict[str, str] = {
    "country": "Country",
    "age_group": "Age group",
    "gender": "Gender",
    "education": "Education",
    "religion": "Religion",
    "ethnicity": "Ethnicity",
    "employment": "Employment",
    "marital_status": "Marital status",
    "social_class": "Social class",
    "income": "Income",
    "language": "Language",
}

# Answers that mean "no information" (compared case-insensitively, after whitespace normalisation and with curly
# apostrophes made straight). "None" is deliberately absent: it is a real answer (e.g. religion: None).
MISSING_VALUES: frozenset[str] = frozenset(
    {
        "",
        "nan",
        "na",
        "n/a",
        "null",
        "<na>",
        "don't know",
        "dont know",
        "do not know",
        "no answer",
        "not asked",
        "not applicable",
        "not available",
        "refused",
        "prefer not to say",
        "prefer not to answer",
        "missing",
        "unknown",
    }
)
# Labels that start like this are missing codes too (the WVS codebook has "Missing; Not available",
# "Missing; Unknown", "Other missing; Multiple answers Mail (EVS)", ...).
_MISSING_PREFIXES: tuple[str, ...] = ("missing;", "missing:", "missing ", "other missing")
# Negative survey codes, alone or followed by their label: "-1", "-2.0", "-1. Don't know", "-5 Missing".
_NEGATIVE_CODE = re.compile(r"^-\d+(\.0+)?($|[\s.:;,)\-])")
_SPACES = re.compile(r"\s+")

# WorldValuesBench demographic columns (text labels in {split}_demographic_qa.tsv).
WVB_FIELD_MAP: dict[str, str] = {
    "B_COUNTRY": "country",
    "X003R": "age_group",
    "Q260": "gender",
    "Q275": "education",
    "Q273": "marital_status",
    "Q289": "religion",
    "Q290": "ethnicity",
    "Q279": "employment",
}

# PRISM survey (one row per user); religion and ethnicity are nested objects in the raw JSONL.
PRISM_FIELD_MAP: dict[str, str] = {
    "reside_country": "country",
    "age": "age_group",
    "gender": "gender",
    "education": "education",
    "religion.simplified": "religion",
    "ethnicity.simplified": "ethnicity",
    "employment_status": "employment",
}

# Community Alignment (one row per annotator x conversation; six annotator_* columns).
COMMUNITY_ALIGNMENT_FIELD_MAP: dict[str, str] = {
    "annotator_country": "country",
    "annotator_age": "age_group",
    "annotator_gender": "gender",
    "annotator_education_level": "education",
    "annotator_ethnicity": "ethnicity",
    "annotator_political": "extra.political_leaning",
}

FIELD_MAPS: dict[str, dict[str, str]] = {
    "wvb": WVB_FIELD_MAP,
    "prism": PRISM_FIELD_MAP,
    "community_alignment": COMMUNITY_ALIGNMENT_FIELD_MAP,
}

_EXTRA_PREFIX = "extra."


def _is_na_object(value: Any) -> bool:
    # pandas.NA / NaT and similar sentinels, without importing pandas
    return type(value).__name__ in ("NAType", "NaTType")


MAX_INTEGER = 10**18  # larger integers in a profile field are an error (no label or code is that long)


def is_missing(value: Any) -> bool:
    """True for ``None``, NaN, empty strings, negative codes and the labels in :data:`MISSING_VALUES`.

    Values of types a profile cannot hold (lists, dicts, ...) are not "missing"; :func:`normalize_value` rejects them.
    """
    if value is None or _is_na_object(value):
        return True
    if isinstance(value, bool):
        return False
    if isinstance(value, numbers.Integral):
        return int(value) < 0  # compared as an integer: float() of a 400-digit number overflows
    if isinstance(value, numbers.Real):
        try:
            fv = float(value)
        except (TypeError, ValueError, OverflowError):
            return False
        return math.isnan(fv) or fv < 0
    if isinstance(value, str):
        text = _SPACES.sub(" ", value).strip()
        low = text.lower().replace("\u2019", "'").replace("\u2018", "'")
        if low in MISSING_VALUES or low.startswith(_MISSING_PREFIXES):
            return True
        return bool(_NEGATIVE_CODE.match(low))
    return False


def normalize_value(value: Any, name: str = "value") -> Optional[str]:
    """Canonical string of one profile value, or ``None`` when it is a missing-value code.

    Strings are whitespace-normalised and lose trailing periods (the sentence adds its own); integral numbers render
    without a decimal part (``25.0`` -> ``"25"``). Anything else (bool, list, dict, ...) raises ``ValueError`` naming
    the field.
    """
    if is_missing(value):
        return None
    if isinstance(value, str):
        text = _SPACES.sub(" ", value).strip().rstrip(".").rstrip()
        return text or None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(
            f"profile field {name!r} must be a string or a number, got {type(value).__name__}: {value!r}"
        )
    if isinstance(value, numbers.Integral):
        if abs(int(value)) >= MAX_INTEGER:
            digits = int(int(value).bit_length() * 0.30103) + 1  # str() of a huge int is itself an error
            raise ValueError(f"profile field {name!r}: a number of about {digits} digits; a profile number must be "
                             f"below 1e18 (send a label as a string)")
        return str(int(value))
    try:
        fv = float(value)
    except OverflowError:
        raise ValueError(f"profile field {name!r} must be finite, got a number too large for a float") from None
    if math.isinf(fv):
        raise ValueError(f"profile field {name!r} must be finite, got {value!r}")
    return str(int(fv)) if fv.is_integer() and abs(fv) < MAX_INTEGER else repr(fv)


def _extra_label(key: str) -> str:
    words = key.replace("_", " ").replace("-", " ").split()
    text = " ".join(words)
    return text[:1].upper() + text[1:]


def _lookup(record: Mapping, key: str) -> Any:
    """``record[key]``; if absent, follow a dotted path through nested mappings. Missing keys give ``None``."""
    if key in record:
        return record[key]
    if "." not in key:
        return None
    node: Any = record
    for part in key.split("."):
        if not isinstance(node, Mapping):
            return None
        if part not in node:
            return None
        node = node[part]
    return node


@dataclass(frozen=True)
class Profile:
    """Demographic attributes of one participant; every field is optional.

    Values are normalised on construction (see :func:`normalize_value`): missing-value codes become ``None``, other
    values become stripped strings. ``extra`` holds attributes without a typed field (e.g. Community Alignment's
    political leaning); its keys are rendered after the typed fields, sorted by key, with underscores as spaces.
    Profiles are immutable, comparable and hashable (usable as dict keys).
    """

    country: Optional[str] = None
    age_group: Optional[str] = None
    gender: Optional[str] = None
    education: Optional[str] = None
    religion: Optional[str] = None
    ethnicity: Optional[str] = None
    employment: Optional[str] = None
    marital_status: Optional[str] = None
    social_class: Optional[str] = None
    income: Optional[str] = None
    language: Optional[str] = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in PROFILE_FIELDS:
            object.__setattr__(self, name, normalize_value(getattr(self, name), name))
        extra = self.extra
        if extra is None:
            extra = {}
        if not isinstance(extra, Mapping):
            raise ValueError(f"profile field 'extra' must be a mapping of str -> value, got {type(extra).__name__}")
        clean: dict[str, str] = {}
        for key, value in extra.items():
            if not isinstance(key, str) or not key.strip():
                raise ValueError(f"profile field 'extra' needs non-empty string keys, got {key!r}")
            k = key.strip()
            if k in PROFILE_FIELDS:
                raise ValueError(f"extra key {k!r} is a typed Profile field; pass it as {k}=... instead")
            v = normalize_value(value, f"extra.{k}")
            if v is not None:
                clean[k] = v
        object.__setattr__(self, "extra", dict(sorted(clean.items())))

    def __hash__(self) -> int:
        return hash(tuple(getattr(self, n) for n in PROFILE_FIELDS) + (tuple(self.extra.items()),))

    def __str__(self) -> str:
        return self.to_text()

    # ------------------------------------------------------------------ rendering

    def items(self) -> list[tuple[str, str]]:
        """(label, value) pairs in rendering order, missing fields left out."""
        out = [(FIELD_LABELS[n], getattr(self, n)) for n in PROFILE_FIELDS if getattr(self, n) is not None]
        out.extend((_extra_label(k), v) for k, v in self.extra.items())
        return out

    def to_text(self) -> str:
        """The canonical sentence, e.g. ``"Country: Egypt. Age group: 25-34 years old. Gender: Female."``.

        Empty profiles give ``""``.
        """
        return " ".join(f"{label}: {value}." for label, value in self.items())

    def to_dict(self) -> dict[str, Any]:
        """Present typed fields by name, plus ``"extra"`` when it is not empty (round-trips through ``from_dict``)."""
        out: dict[str, Any] = {n: getattr(self, n) for n in PROFILE_FIELDS if getattr(self, n) is not None}
        if self.extra:
            out["extra"] = dict(self.extra)
        return out

    def is_empty(self) -> bool:
        return not self.items()

    def replace(self, **changes: Any) -> "Profile":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Profile":
        """Build from ``{field name: value}`` (as written by :meth:`to_dict`); unknown keys raise ``ValueError``."""
        if not isinstance(data, Mapping):
            raise ValueError(f"Profile.from_dict expects a mapping, got {type(data).__name__}")
        unknown = [k for k in data if k not in PROFILE_FIELDS and k != "extra"]
        if unknown:
            raise ValueError(f"unknown profile fields {unknown}; known: {list(PROFILE_FIELDS)} and 'extra'")
        return cls(**dict(data))

    @classmethod
    def from_mapping(cls, record: Mapping[str, Any], field_map: Mapping[str, str]) -> "Profile":
        """Build a profile from one raw record through a per-dataset field map.

        ``field_map`` maps a source key of ``record`` to a target: a :data:`PROFILE_FIELDS` name or
        ``"extra.<key>"``. Source keys may be dotted paths into nested mappings (``"religion.simplified"``); a key
        that is literally present in ``record`` wins over the path. Absent keys and missing-value codes are skipped.
        When two sources map to the same target, the first present one wins.
        """
        if not isinstance(record, Mapping):
            raise ValueError(f"Profile.from_mapping expects a mapping record, got {type(record).__name__}")
        if not isinstance(field_map, Mapping):
            raise ValueError(f"field_map must map source keys to profile fields, got {type(field_map).__name__}")
        typed: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for source, target in field_map.items():
            if not isinstance(target, str):
                raise ValueError(f"field_map[{source!r}] must be a profile field name, got {target!r}")
            if target.startswith(_EXTRA_PREFIX):
                key = target[len(_EXTRA_PREFIX):].strip()
                if not key:
                    raise ValueError(f"field_map[{source!r}] = {target!r} needs a key after 'extra.'")
                bucket, name = extra, key
            elif target in PROFILE_FIELDS:
                bucket, name = typed, target
            else:
                raise ValueError(
                    f"field_map[{source!r}] = {target!r} is not a profile field; use one of {list(PROFILE_FIELDS)} "
                    "or 'extra.<key>'"
                )
            if bucket.get(name) is not None:
                continue
            value = _lookup(record, source)
            if isinstance(value, Mapping):
                raise ValueError(
                    f"profile field {target!r} (from {source!r}) got a nested mapping {value!r}; "
                    "point the field map at one of its keys with a dotted path"
                )
            value = normalize_value(value, target)
            if value is not None:
                bucket[name] = value
        return cls(**typed, extra=extra)

    @classmethod
    def from_record(cls, record: Mapping[str, Any], dataset: str) -> "Profile":
        """:meth:`from_mapping` with the shipped field map of ``dataset`` (``wvb``, ``prism``, ``community_alignment``)."""
        try:
            field_map = FIELD_MAPS[dataset]
        except KeyError:
            raise ValueError(f"no field map for dataset {dataset!r}; known: {sorted(FIELD_MAPS)}") from None
        return cls.from_mapping(record, field_map)
