"""WVB-format records and the prepared-data directory: building, validating, reading and writing them atomically.

One *record* is one (participant, question) pair, a plain dict with the keys of :data:`RECORD_FIELDS` (the shared
schema in ``docs/data-schema.md``). A *prepared-data directory* holds ``train.jsonl``, ``valid.jsonl``,
``test.jsonl``, ``profiles.jsonl``, optionally ``profile_embeds.safetensors`` and ``truth.json``, and
``manifest.json``; :func:`load_prepared` reads it back.

Every writer here is atomic (the writers of :mod:`cuma.runinfo`): a file is written to a temporary sibling and moved
into place with ``os.replace``; a directory is built in a temporary sibling (:func:`atomic_directory`) and renamed
into place only when complete, so a crash never leaves a half-written output that looks finished.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

# the file writers live in cuma.runinfo; re-exported here, where the data modules and tests import them from
from ..runinfo import (  # noqa: F401
    atomic_directory,
    atomic_open,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    dumps,
    not_utf8_error,
    read_json,
    sha256_file,
)

__all__ = [
    "LETTERS",
    "RECORD_FIELDS",
    "SPLITS",
    "PreparedData",
    "atomic_directory",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "letters_for",
    "load_prepared",
    "make_record",
    "read_jsonl",
    "read_jsonl_numbered",
    "read_profile_embeds",
    "sha256_file",
    "validate_record",
    "write_jsonl",
]

PathLike = Union[str, os.PathLike]

LETTERS: tuple[str, ...] = tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
SPLITS: tuple[str, ...] = ("train", "valid", "test")

# Keys of one record, in the order they are written (docs/data-schema.md).
RECORD_FIELDS: tuple[str, ...] = (
    "id",
    "participant_id",
    "question_id",
    "split",
    "profile",
    "profile_text",
    "profile_index",
    "question",
    "category",
    "letters",
    "options",
    "option_values",
    "gold_letter",
    "gold_value",
    "scale_min",
    "scale_max",
    "ordinal",
    "held_out",
)

PREPARED_FILES = ("train.jsonl", "valid.jsonl", "test.jsonl", "profiles.jsonl", "manifest.json")
EMBEDS_FILE = "profile_embeds.safetensors"
EMBEDS_KEY = "profile_embeds"


def letters_for(n: int) -> list[str]:
    """The first ``n`` option letters (``A``, ``B``, ...). At most 26 options."""
    if not isinstance(n, int) or n < 1 or n > len(LETTERS):
        raise ValueError(f"a question needs 1 to {len(LETTERS)} options to get letters, got {n!r}")
    return list(LETTERS[:n])


# ---------------------------------------------------------------------------------------------------------- records


def make_record(
    *,
    participant_id: str,
    question_id: str,
    split: str,
    profile: Mapping[str, Any],
    profile_text: str,
    profile_index: int,
    question: str,
    category: str,
    options: Sequence[str],
    option_values: Sequence[int],
    gold_value: int,
    scale_min: int,
    scale_max: int,
    ordinal: bool,
    held_out: bool = False,
) -> dict[str, Any]:
    """One record in schema order. ``gold_value`` must be one of ``option_values``; the letters follow from them."""
    options = [str(o) for o in options]
    option_values = [int(v) for v in option_values]
    if len(options) != len(option_values):
        raise ValueError(
            f"question {question_id}: {len(options)} option labels but {len(option_values)} option values"
        )
    letters = letters_for(len(options))
    gold_value = int(gold_value)
    try:
        gold_letter = letters[option_values.index(gold_value)]
    except ValueError:
        raise ValueError(
            f"question {question_id}, participant {participant_id}: answer {gold_value} is not one of the option "
            f"values {option_values}"
        ) from None
    record = {
        "id": f"{participant_id}:{question_id}",
        "participant_id": str(participant_id),
        "question_id": str(question_id),
        "split": split,
        "profile": dict(profile),
        "profile_text": profile_text,
        "profile_index": int(profile_index),
        "question": question,
        "category": category,
        "letters": letters,
        "options": options,
        "option_values": option_values,
        "gold_letter": gold_letter,
        "gold_value": gold_value,
        "scale_min": int(scale_min),
        "scale_max": int(scale_max),
        "ordinal": bool(ordinal),
        "held_out": bool(held_out),
    }
    validate_record(record)
    return record


def _where(where: Optional[str]) -> str:
    return f"{where}: " if where else ""


def validate_record(record: Any, where: Optional[str] = None) -> None:
    """Raise ``ValueError`` naming the field when ``record`` does not follow the schema (``where``: e.g. file:line)."""
    at = _where(where)
    if not isinstance(record, Mapping):
        raise ValueError(f"{at}a record must be a JSON object, got {type(record).__name__}")
    missing = [k for k in RECORD_FIELDS if k not in record]
    if missing:
        raise ValueError(f"{at}record {record.get('id', '?')!r} lacks the fields {missing}")
    rid = record["id"]

    def bad(name: str, expected: str) -> ValueError:
        return ValueError(f"{at}record {rid!r}: field {name!r} must be {expected}, got {record[name]!r}")

    for name in ("id", "participant_id", "question_id", "profile_text", "question", "category", "gold_letter"):
        if not isinstance(record[name], str):
            raise bad(name, "a string")
    if record["split"] not in SPLITS:
        raise bad("split", f"one of {list(SPLITS)}")
    if not isinstance(record["profile"], Mapping):
        raise bad("profile", "an object of profile fields")
    for name in ("profile_index", "gold_value", "scale_min", "scale_max"):
        if not isinstance(record[name], int) or isinstance(record[name], bool):
            raise bad(name, "an integer")
    if record["profile_index"] < 0:
        raise bad("profile_index", "a non-negative integer")
    for name in ("ordinal", "held_out"):
        if not isinstance(record[name], bool):
            raise bad(name, "true or false")
    letters, options, values = record["letters"], record["options"], record["option_values"]
    if not isinstance(options, list) or not options or not all(isinstance(o, str) for o in options):
        raise bad("options", "a non-empty list of strings")
    if not isinstance(letters, list) or letters != letters_for(len(options)):
        raise bad("letters", f"{letters_for(len(options))} (one letter per option, in order)")
    if (
        not isinstance(values, list)
        or len(values) != len(options)
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in values)
        or len(set(values)) != len(values)
    ):
        raise bad("option_values", f"{len(options)} distinct integers (one per option)")
    if record["gold_value"] not in values:
        raise bad("gold_value", f"one of the option values {values}")
    if record["gold_letter"] != letters[values.index(record["gold_value"])]:
        raise bad("gold_letter", f"{letters[values.index(record['gold_value'])]!r} (the letter of gold_value)")
    if record["scale_min"] > record["scale_max"]:
        raise bad("scale_min", f"<= scale_max ({record['scale_max']})")
    if not all(record["scale_min"] <= v <= record["scale_max"] for v in values):
        raise bad("option_values", f"values within [scale_min, scale_max] = [{record['scale_min']}, "
                  f"{record['scale_max']}]")
    if record["id"] != f"{record['participant_id']}:{record['question_id']}":
        raise bad("id", f"'{record['participant_id']}:{record['question_id']}' (participant_id:question_id)")


# ---------------------------------------------------------------------------------------------------------- files


def write_jsonl(path: PathLike, records: Iterable[Mapping[str, Any]]) -> int:
    """Write one JSON object per line, atomically. Returns the number of lines."""
    n = 0
    with atomic_open(path, "w") as f:
        for record in records:
            f.write(dumps(record))
            f.write("\n")
            n += 1
    return n


def read_jsonl_numbered(path: PathLike, validate: bool = False) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` of each non-blank line of a JSONL file. A missing file is a FileNotFoundError; a
    file that is not UTF-8 or a bad line a ``ValueError`` naming ``file:line``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"JSONL file {str(path)!r} does not exist")
    out: list[tuple[int, dict[str, Any]]] = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise not_utf8_error(path) from None
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(value, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(value).__name__}")
            if validate:
                validate_record(value, where=f"{path}:{lineno}")
            out.append((lineno, value))
    return out


def read_jsonl(path: PathLike, validate: bool = False) -> list[dict[str, Any]]:
    """Read a JSONL file; a bad line raises ``ValueError`` naming ``file:line``. Blank lines are skipped."""
    return [value for _, value in read_jsonl_numbered(path, validate=validate)]


def read_profile_embeds(path: PathLike, rows: Optional[int] = None) -> Any:
    """The ``profile_embeds`` tensor ``(num_profiles, dim)`` (float32) of a ``profile_embeds.safetensors`` file.

    A file that is not safetensors, has no ``profile_embeds`` tensor, is not 2-D, or (with ``rows``) has another
    number of rows than there are profiles is a ``ValueError`` naming the file and what was expected."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    expected = f"a safetensors file with a tensor {EMBEDS_KEY!r} of shape (num_profiles, dim), as `cuma data` writes it"
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err}); expected {expected}") from None
    if EMBEDS_KEY not in tensors:
        raise ValueError(f"{path}: expected a tensor named {EMBEDS_KEY!r}, found {sorted(tensors)}")
    table = tensors[EMBEDS_KEY]
    if table.ndim != 2:
        raise ValueError(
            f"{path}: tensor {EMBEDS_KEY!r} must be 2-D (num_profiles, dim), got shape {tuple(table.shape)}"
        )
    if rows is not None and table.shape[0] != rows:
        raise ValueError(
            f"{path}: tensor {EMBEDS_KEY!r} must be ({rows}, dim) to match profiles.jsonl, got {tuple(table.shape)}"
        )
    return table.float()


# ---------------------------------------------------------------------------------------------------------- reading


@dataclass
class PreparedData:
    """A prepared-data directory read back: records per split, profiles, embeddings (or ``None``), manifest."""

    path: Path
    train: list[dict[str, Any]]
    valid: list[dict[str, Any]]
    test: list[dict[str, Any]]
    profiles: list[dict[str, Any]]
    manifest: dict[str, Any]
    profile_embeds: Any = None  # torch.Tensor (num_profiles, dim) float32, or None when written with --no-embeddings
    truth: Optional[dict[str, Any]] = field(default=None, repr=False)

    def split(self, name: str) -> list[dict[str, Any]]:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {list(SPLITS)}")
        return getattr(self, name)


def load_prepared(path: PathLike, validate: bool = True, embeddings: bool = True, truth: bool = True) -> PreparedData:
    """Read a directory written by ``cuma data wvb`` (or ``cuma data synth --prepare``).

    Checks that every file of the layout exists, that records follow the schema (``validate``), and that each
    record's ``profile_index`` points at a profile with the same text and, when present, an embedding row.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"prepared-data directory {str(root)!r} does not exist")
    absent = [name for name in PREPARED_FILES if not (root / name).is_file()]
    if absent:
        raise FileNotFoundError(
            f"{root} is not a prepared-data directory: missing {absent} (write one with `cuma data wvb`)"
        )
    manifest = read_json(root / "manifest.json", dict, what="the prepared-data manifest")
    splits = {name: read_jsonl(root / f"{name}.jsonl", validate=validate) for name in SPLITS}
    profiles = read_jsonl(root / "profiles.jsonl")
    for i, row in enumerate(profiles):
        if row.get("profile_index") != i or not isinstance(row.get("profile_text"), str):
            raise ValueError(
                f"{root / 'profiles.jsonl'}:{i + 1}: expected profile_index {i} and a profile_text string, got "
                f"{row.get('profile_index')!r}, {row.get('profile_text')!r}"
            )
    embeds = None
    embeds_path = root / EMBEDS_FILE
    if embeddings and embeds_path.is_file():
        embeds = read_profile_embeds(embeds_path, rows=len(profiles))
    for name, records in splits.items():
        for record in records:
            idx = record["profile_index"]
            if idx >= len(profiles) or profiles[idx]["profile_text"] != record["profile_text"]:
                raise ValueError(
                    f"{root / (name + '.jsonl')}: record {record['id']!r} has profile_index {idx}, which does not "
                    f"point at its profile text in profiles.jsonl ({len(profiles)} profiles)"
                )
    truth_value = None
    if truth and (root / "truth.json").is_file():
        truth_value = read_json(root / "truth.json", dict)
    return PreparedData(
        path=root,
        train=splits["train"],
        valid=splits["valid"],
        test=splits["test"],
        profiles=profiles,
        manifest=manifest,
        profile_embeds=embeds,
        truth=truth_value,
    )
