"""Opinion distributions: one record per (group, question) *cell*, the prepared opinions folder, its splits.

The field's distributional benchmarks (GlobalOpinionQA, OpinionQA, a grouped per-respondent survey) give one answer
*distribution* per cell. A cell is an :class:`OpinionCell`: the group as a :class:`cuma.Profile` (any subset of its
fields, e.g. only the country), the question with its option labels, the normalised target distribution, an ordinal
flag with option order values where the source has them, and a weight.

A prepared opinions folder (``cuma data opinions``, :func:`cuma.data.opinion_readers.prepare_opinions`)::

    DIR/manifest.json                 kind "opinions", source, split mode, seed, counts.cells per split, skipped by
                                      cause, input hashes, groups, held-out groups, versions
    DIR/cells_{train,valid,test}.jsonl  one OpinionCell per line
    DIR/groups.jsonl                  group_id, group (profile fields), profile_text; row i = embedding row i
    DIR/profile_embeds.safetensors    tensor "profile_embeds" (num_groups, dim), unless written without embeddings

:func:`load_opinions` reads it back. :func:`cell_to_record` turns a cell into the WVB record dict of
:func:`cuma.data.records.make_record` (gold = the target's argmax, option values = positions 1..K) plus the cell's
own keys (``cell_id``, ``group_id``, ``target``, ``weight``, ``source``), so the prompts of
:mod:`cuma.data.prompts` and the letter scoring of ``cuma eval wvb`` apply unchanged; :func:`render_cell_messages`
is :func:`cuma.data.prompts.render_messages` of that record.

Splits (seeded, recorded in the manifest):

- ``question``: a seeded fraction of the questions is held out (valid / test); every group's cells on them go there.
- ``group``: whole groups are held out (``holdout_groups`` by name, else a seeded ``test_fraction`` of the groups;
  ``valid_fraction`` of the remaining groups for valid). Their cells on training questions are the zero-shot
  valid/test cells (``heldout_group: true``); their cells on questions no training group answers are skipped
  (counted). The seen groups' cells are all training cells.
- ``cell``: a seeded fraction of the cells is held out, keeping at least one training cell of each held-out cell's
  question and of its group (a seen group on a seen question, an unseen combination); cells that had to stay in
  train for that are counted.

Distributions: a target whose sum differs from 1 by at most :data:`SUM_TOLERANCE` is renormalised; a larger gap, a
negative or non-finite value, or an all-zero target is a counted skip (cause in the manifest), never guessed.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from ..profiles import PROFILE_FIELDS, Profile, normalize_value
from ..runinfo import atomic_directory, atomic_write_json, package_versions, read_json, sha256_file
from .records import EMBEDS_FILE, EMBEDS_KEY, SPLITS, make_record, read_jsonl_numbered, read_profile_embeds, write_jsonl

__all__ = [
    "GROUPS_FILE",
    "KIND",
    "OPINIONS_FORMAT",
    "SOURCES",
    "SPLIT_MODES",
    "SUM_TOLERANCE",
    "OpinionCell",
    "OpinionData",
    "OpinionsError",
    "ReadResult",
    "assign_splits",
    "cell_to_record",
    "cells_file",
    "check_distribution",
    "group_id_of",
    "load_opinions",
    "match_groups",
    "read_holdout_names",
    "render_cell_messages",
    "write_opinions",
]

PathLike = Union[str, os.PathLike]

KIND = "opinions"
OPINIONS_FORMAT = "cuma-prepared-opinions"
OPINIONS_VERSION = 1
SOURCES: tuple[str, ...] = ("globalopinionqa", "opinions-json", "opinionqa", "wvb")
SPLIT_MODES: tuple[str, ...] = ("question", "group", "cell")
GROUPS_FILE = "groups.jsonl"
# a target distribution within this L1 gap of summing to 1 is renormalised; a larger gap is a counted skip
SUM_TOLERANCE = 1e-3
_STREAM = {"question": 21, "group": 22, "cell": 23, "valid_groups": 24}
_VERSIONED = ("cuma", "numpy", "torch", "safetensors")


class OpinionsError(ValueError):
    """Bad opinions input or options: the message names the file, row, field or option and what was expected."""


def cells_file(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    return f"cells_{split}.jsonl"


# ---------------------------------------------------------------------------------------------------------- cells


@dataclass
class OpinionCell:
    """One (group, question) cell with its target answer distribution (see the module docstring)."""

    cell_id: str  # "<question_id>::<group_id>", stable across runs
    group_id: str  # "field=value|field=value" in Profile field order (see group_id_of)
    group: dict  # Profile.to_dict() of the group: any subset of the profile fields
    profile_text: str  # Profile.to_text() of the group
    question_id: str
    question: str  # question text, without embedded options or "Answer:"
    options: list  # option labels, in the source's order
    ordinal: bool
    option_values: Optional[list]  # order values (floats), one per option, where the source has them
    target: list  # normalised distribution, one probability per option
    weight: float = 1.0  # respondents or summed survey weight where known, else 1.0
    source: str = ""
    source_ids: dict = field(default_factory=dict)  # where the cell came from (file, row, original names, ...)
    split: str = "train"
    heldout_group: bool = False

    def to_dict(self) -> dict[str, Any]:
        # shallow (the values are JSON types already); dataclasses.asdict's deep copy costs more than the rest
        return {name: getattr(self, name) for name in _CELL_FIELDS}

    @classmethod
    def from_dict(cls, value: Any, where: str = "") -> "OpinionCell":
        """Build and check a cell from its JSON object; a bad one is an :class:`OpinionsError` naming ``where``."""
        at = f"{where}: " if where else ""
        if not isinstance(value, Mapping):
            raise OpinionsError(f"{at}an opinion cell must be a JSON object, got {type(value).__name__}")
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in value]
        if missing:
            raise OpinionsError(f"{at}opinion cell {value.get('cell_id', '?')!r} lacks the fields {missing}")
        cell = cls(**{n: value[n] for n in names})
        cell.validate(where)
        return cell

    def validate(self, where: str = "") -> None:
        at = f"{where}: " if where else ""

        def bad(name: str, expected: str) -> OpinionsError:
            return OpinionsError(f"{at}cell {self.cell_id!r}: field {name!r} must be {expected}, got "
                                 f"{getattr(self, name)!r}")

        for name in ("cell_id", "group_id", "profile_text", "question_id", "question", "source"):
            if not isinstance(getattr(self, name), str):
                raise bad(name, "a string")
        if not isinstance(self.group, Mapping):
            raise bad("group", "an object of profile fields")
        if not isinstance(self.options, list) or not self.options or not all(isinstance(o, str) for o in self.options):
            raise bad("options", "a non-empty list of strings")
        if len(self.options) > 26:
            raise bad("options", "at most 26 options (one letter each)")
        k = len(self.options)
        if (not isinstance(self.target, list) or len(self.target) != k
                or not all(isinstance(p, (int, float)) and not isinstance(p, bool) and math.isfinite(p) and p >= 0
                           for p in self.target)
                or abs(sum(self.target) - 1.0) > 1e-6):
            raise bad("target", f"{k} non-negative numbers summing to 1 (one per option)")
        if self.option_values is not None and (
            not isinstance(self.option_values, list) or len(self.option_values) != k
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in self.option_values)
        ):
            raise bad("option_values", f"null or {k} numbers (one per option)")
        if not isinstance(self.ordinal, bool):
            raise bad("ordinal", "true or false")
        if not isinstance(self.heldout_group, bool):
            raise bad("heldout_group", "true or false")
        if (not isinstance(self.weight, (int, float)) or isinstance(self.weight, bool) or not math.isfinite(self.weight)
                or self.weight <= 0):
            raise bad("weight", "a positive number")
        if self.split not in SPLITS:
            raise bad("split", f"one of {list(SPLITS)}")
        if not isinstance(self.source_ids, Mapping):
            raise bad("source_ids", "an object")


_CELL_FIELDS = tuple(f.name for f in fields(OpinionCell))


def group_id_of(profile: Profile) -> str:
    """The stable id of a group: ``field=value`` pairs in Profile field order (extras as ``extra.key``), ``|``-joined.
    ``Profile(country="Argentina")`` -> ``"country=Argentina"``."""
    parts = [f"{n}={getattr(profile, n)}" for n in PROFILE_FIELDS if getattr(profile, n) is not None]
    parts += [f"extra.{k}={v}" for k, v in profile.extra.items()]
    if not parts:
        raise OpinionsError("a group needs at least one profile field with a value")
    return "|".join(parts)


def check_distribution(values: Sequence[Any], n_options: int) -> tuple[Optional[list[float]], Optional[str]]:
    """``(normalised target, None)`` or ``(None, skip cause)`` for a raw distribution of ``n_options`` entries.

    Causes: ``length_mismatch``, ``bad_value`` (not a finite non-negative number), ``zero_mass``, ``sum_off``
    (|sum - 1| > :data:`SUM_TOLERANCE`; within it the target is renormalised)."""
    if len(values) != n_options:
        return None, "length_mismatch"
    out: list[float] = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            return None, "bad_value"
        fv = float(v)
        if not math.isfinite(fv) or fv < 0:
            return None, "bad_value"
        out.append(fv)
    total = math.fsum(out)
    if total <= 0:
        return None, "zero_mass"
    if abs(total - 1.0) > SUM_TOLERANCE:
        return None, "sum_off"
    return [v / total for v in out], None


@dataclass
class ReadResult:
    """What a reader hands to :func:`prepare_opinions`: cells (split unset), skips by cause, inputs, extra stats."""

    source: str
    cells: list  # list[OpinionCell]
    skipped: Counter = field(default_factory=Counter)
    inputs: dict = field(default_factory=dict)  # name -> Path
    details: dict = field(default_factory=dict)  # source-specific figures for the manifest (e.g. refusal rates)
    skip_examples: dict = field(default_factory=dict)  # cause -> first few places (file:row ...) for the manifest

    def skip(self, cause: str, where: str = "", n: int = 1) -> None:
        self.skipped[cause] += n
        if where:
            examples = self.skip_examples.setdefault(cause, [])
            if len(examples) < 5:
                examples.append(where)


# ---------------------------------------------------------------------------------------------------------- records


def cell_to_record(cell: OpinionCell, profile_index: int = 0) -> dict[str, Any]:
    """The WVB record dict (:func:`cuma.data.records.make_record`) of ``cell``, for prompts and letter scoring.

    ``option_values`` are the positions 1..K (the record schema wants distinct integers; the cell's own order values
    stay in ``cell.option_values``), ``gold_value`` the position of the target's argmax (first on ties).
    ``profile_index``: the group's row in ``profile_embeds`` (:attr:`OpinionData.group_index`). Extra keys:
    ``cell_id``, ``group_id``, ``target``, ``weight``, ``source``, ``cell_option_values``."""
    k = len(cell.options)
    positions = list(range(1, k + 1))
    gold = int(np.argmax(np.asarray(cell.target, dtype=float))) + 1
    record = make_record(
        participant_id=cell.group_id,
        question_id=cell.question_id,
        split=cell.split,
        profile=cell.group,
        profile_text=cell.profile_text,
        profile_index=profile_index,
        question=cell.question,
        category=cell.source,
        options=cell.options,
        option_values=positions,
        gold_value=gold,
        scale_min=1,
        scale_max=k,
        ordinal=cell.ordinal,
        held_out=cell.heldout_group,
    )
    record.update(
        cell_id=cell.cell_id,
        group_id=cell.group_id,
        target=list(cell.target),
        weight=float(cell.weight),
        source=cell.source,
        cell_option_values=None if cell.option_values is None else list(cell.option_values),
    )
    return record


def render_cell_messages(cell: OpinionCell, profile_in_prompt: bool = True) -> list[dict[str, str]]:
    """The chat messages of one cell: :func:`cuma.data.prompts.render_messages` of :func:`cell_to_record` (system
    instruction [+ the group's profile sentence], the question with lettered options)."""
    from .prompts import render_messages

    return render_messages(cell_to_record(cell), profile_in_prompt=profile_in_prompt)


# ---------------------------------------------------------------------------------------------------------- groups


def _norm_name(name: Any) -> str:
    value = normalize_value(str(name), "group name")
    return (value or "").lower()


def read_holdout_names(value: Union[None, str, Sequence[str]]) -> list[str]:
    """Group names from ``--holdout-groups``: an existing file (one name per line; blank lines and ``#`` comments
    skipped, so a name with a comma works), else a comma-separated list; a list is taken as is."""
    if value is None:
        return []
    if not isinstance(value, str):
        return [str(v) for v in value if str(v).strip()]
    path = Path(value).expanduser()
    if path.is_file():
        from ..runinfo import read_text

        names = [ln.strip() for ln in read_text(path).splitlines()]
        names = [n for n in names if n and not n.startswith("#")]
        if not names:
            raise OpinionsError(f"--holdout-groups file {str(path)!r} holds no group names (one per line)")
        return names
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        raise OpinionsError(f"--holdout-groups: expected group names (comma list or a file), got {value!r}")
    return names


def match_groups(names: Sequence[str], groups: Mapping[str, Mapping[str, Any]]) -> set[str]:
    """The group ids that ``names`` hold out. A name matches a group (case-insensitively, after the normalisation
    profile values get: whitespace collapsed, trailing period dropped) when it equals its group id, its profile
    sentence, or one of its field values (so "Argentina" holds out every group with that country). Unknown names are
    an :class:`OpinionsError` naming them."""
    keys: dict[str, set[str]] = {}
    for gid, g in groups.items():
        cands = {gid, g["profile_text"]}
        prof = Profile.from_dict(g["group"])
        cands.update(getattr(prof, n) for n in PROFILE_FIELDS if getattr(prof, n) is not None)
        cands.update(prof.extra.values())
        for c in cands:
            keys.setdefault(_norm_name(c), set()).add(gid)
    held: set[str] = set()
    unknown = []
    for name in names:
        hit = keys.get(_norm_name(name))
        if not hit:
            unknown.append(name)
        else:
            held |= hit
    if unknown:
        known = sorted({g["profile_text"] for g in groups.values()})
        shown = known[:20] + (["..."] if len(known) > 20 else [])
        raise OpinionsError(f"--holdout-groups: {unknown} are not groups of the data; known groups: {shown}")
    return held


# ---------------------------------------------------------------------------------------------------------- splits


def _fraction_count(fraction: float, n: int) -> int:
    return int(round(fraction * n)) if fraction > 0 else 0


def assign_splits(
    cells: list[OpinionCell],
    mode: str,
    *,
    seed: int = 0,
    test_fraction: float = 0.2,
    valid_fraction: float = 0.1,
    holdout_groups: Optional[Sequence[str]] = None,
    skipped: Optional[Counter] = None,
) -> dict[str, Any]:
    """Set ``split`` and ``heldout_group`` of every cell in place for ``mode`` (see the module docstring); cells that
    the mode leaves out (held-out groups on questions no training group answers) are removed from ``cells`` and
    counted in ``skipped``. Returns the split's record for the manifest. An empty train or test split, or an empty
    valid split with ``valid_fraction > 0``, is an :class:`OpinionsError`."""
    if mode not in SPLIT_MODES:
        raise OpinionsError(f"--split must be one of {list(SPLIT_MODES)}, got {mode!r}")
    for name, f in (("--test-fraction", test_fraction), ("--valid-fraction", valid_fraction)):
        if not 0.0 <= float(f) < 1.0:
            raise OpinionsError(f"{name} must be in [0, 1), got {f!r}")
    if test_fraction + valid_fraction >= 1.0:
        raise OpinionsError(f"--test-fraction + --valid-fraction must be < 1, got {test_fraction} + {valid_fraction}")
    names = list(holdout_groups or [])
    if names and mode != "group":
        raise OpinionsError(f"--holdout-groups holds whole groups out and needs --split group, not --split {mode}")
    skipped = skipped if skipped is not None else Counter()
    info: dict[str, Any] = {"mode": mode, "seed": seed, "test_fraction": test_fraction,
                            "valid_fraction": valid_fraction}
    for c in cells:
        c.split, c.heldout_group = "train", False

    if mode == "question":
        qids = sorted({c.question_id for c in cells})
        order = [qids[i] for i in np.random.default_rng([seed, _STREAM["question"]]).permutation(len(qids))]
        n_test = _fraction_count(test_fraction, len(qids))
        n_valid = _fraction_count(valid_fraction, len(qids))
        where = {q: "test" for q in order[:n_test]}
        where.update({q: "valid" for q in order[n_test:n_test + n_valid]})
        for c in cells:
            c.split = where.get(c.question_id, "train")
        info["questions"] = {s: sum(1 for q in qids if where.get(q, "train") == s) for s in SPLITS}

    elif mode == "group":
        groups = {c.group_id: {"group": c.group, "profile_text": c.profile_text} for c in cells}
        gids = sorted(groups)
        rng = np.random.default_rng([seed, _STREAM["group"]])
        if names:
            test_groups = match_groups(names, groups)
        else:
            k = _fraction_count(test_fraction, len(gids))
            test_groups = {gids[i] for i in rng.permutation(len(gids))[:k]}
        rest = [g for g in gids if g not in test_groups]
        k_valid = _fraction_count(valid_fraction, len(gids))
        vr = np.random.default_rng([seed, _STREAM["valid_groups"]])
        valid_groups = {rest[i] for i in vr.permutation(len(rest))[:k_valid]}
        if len(test_groups) + len(valid_groups) >= len(gids):
            raise OpinionsError(
                f"the hold-out leaves no training group ({len(test_groups)} test and {len(valid_groups)} valid groups "
                f"of {len(gids)}); hold out fewer groups")
        train_questions = {c.question_id for c in cells if c.group_id not in test_groups | valid_groups}
        kept = []
        for c in cells:
            if c.group_id in test_groups or c.group_id in valid_groups:
                if c.question_id not in train_questions:
                    skipped["heldout_group_on_unseen_question"] += 1
                    continue
                c.split = "test" if c.group_id in test_groups else "valid"
                c.heldout_group = True
            kept.append(c)
        cells[:] = kept
        with_cells = {c.group_id for c in cells if c.heldout_group}
        info["holdout_groups"] = {"names": names, "test": sorted(test_groups), "valid": sorted(valid_groups),
                                  # held-out groups all of whose cells were on questions no training group answers
                                  "without_cells": sorted((test_groups | valid_groups) - with_cells)}

    else:  # cell
        n = len(cells)
        order = np.random.default_rng([seed, _STREAM["cell"]]).permutation(n)
        want = {"test": _fraction_count(test_fraction, n), "valid": _fraction_count(valid_fraction, n)}
        left_q = Counter(c.question_id for c in cells)
        left_g = Counter(c.group_id for c in cells)
        got = {"test": 0, "valid": 0}
        kept_in_train = 0
        for i in order.tolist():
            target = "test" if got["test"] < want["test"] else ("valid" if got["valid"] < want["valid"] else None)
            if target is None:
                break
            c = cells[i]
            # keep the cell's question and group seen in training: the unseen-combination case
            if left_q[c.question_id] <= 1 or left_g[c.group_id] <= 1:
                kept_in_train += 1
                continue
            left_q[c.question_id] -= 1
            left_g[c.group_id] -= 1
            c.split = target
            got[target] += 1
        info["cells_kept_in_train_to_stay_seen"] = kept_in_train

    counts = Counter(c.split for c in cells)
    if counts["train"] == 0:
        raise OpinionsError(f"--split {mode}: the train split is empty; hold out less")
    if counts["test"] == 0:
        raise OpinionsError(
            f"--split {mode}: the test split is empty ({len(cells)} cells); raise --test-fraction or give more data")
    if valid_fraction > 0 and counts["valid"] == 0:
        raise OpinionsError(
            f"--split {mode}: the valid split is empty although --valid-fraction is {valid_fraction}; raise it, give "
            "more data, or pass --valid-fraction 0")
    return info


# ---------------------------------------------------------------------------------------------------------- writing


def _groups_table(cells: Iterable[OpinionCell]) -> list[dict[str, Any]]:
    table: dict[str, dict[str, Any]] = {}
    for c in cells:
        table.setdefault(c.group_id, {"group_id": c.group_id, "group": dict(c.group), "profile_text": c.profile_text})
    return [table[g] for g in sorted(table)]


def write_opinions(
    out: PathLike,
    result: ReadResult,
    split_info: Mapping[str, Any],
    *,
    encoder: Any = "default",
    encoder_device: Optional[str] = "auto",
    overwrite: bool = False,
    options: Optional[Mapping[str, Any]] = None,
    command: Optional[Sequence[str]] = None,
) -> dict[str, Any]:
    """Write the prepared opinions folder for cells whose splits are assigned (atomically); returns the manifest."""
    cells = result.cells
    groups = _groups_table(cells)
    from ..encoder import resolve_encoder

    enc = resolve_encoder(encoder, encoder_device)
    embeds = None
    if enc is not None and groups:
        import torch

        embeds = enc.encode([g["profile_text"] for g in groups]).detach().to("cpu", torch.float32).contiguous()
        if tuple(embeds.shape) != (len(groups), enc.dim):
            raise RuntimeError(f"encoder returned {tuple(embeds.shape)}, expected ({len(groups)}, {enc.dim})")
    by_split = {s: [c for c in cells if c.split == s] for s in SPLITS}
    held = sorted({c.group_id for c in cells if c.heldout_group})
    with atomic_directory(out, overwrite=overwrite) as tmp:
        for s in SPLITS:
            write_jsonl(tmp / cells_file(s), (c.to_dict() for c in by_split[s]))
        write_jsonl(tmp / GROUPS_FILE, groups)
        embeddings_info = None
        if embeds is not None:
            from safetensors.torch import save_file

            save_file({EMBEDS_KEY: embeds}, str(tmp / EMBEDS_FILE),
                      metadata={"encoder": str(getattr(enc, "source", "")), "dim": str(enc.dim),
                                "profiles": GROUPS_FILE})
            embeddings_info = {"file": EMBEDS_FILE, "key": EMBEDS_KEY, "shape": list(embeds.shape), "dtype": "float32"}
        manifest = {
            "format": OPINIONS_FORMAT,
            "format_version": OPINIONS_VERSION,
            "kind": KIND,
            "source": result.source,
            "command": list(command) if command is not None else None,
            "options": dict(options or {}),
            "split": dict(split_info),
            "seed": split_info.get("seed"),
            "sum_tolerance": SUM_TOLERANCE,
            "inputs": {name: {"path": str(Path(p).resolve()), "sha256": sha256_file(p)}
                       for name, p in sorted(result.inputs.items())},
            "counts": {
                "cells": {s: len(by_split[s]) for s in SPLITS},
                "cells_heldout_group": {s: sum(1 for c in by_split[s] if c.heldout_group) for s in SPLITS},
                "questions": {s: len({c.question_id for c in by_split[s]}) for s in SPLITS},
                "groups": len(groups),
                "heldout_groups": len(held),
            },
            "skipped": dict(sorted(result.skipped.items())),
            "skip_examples": result.skip_examples,
            "details": result.details,
            "groups": [g["group_id"] for g in groups],
            "heldout_groups": held,
            "encoder": None if enc is None else (enc.describe() if hasattr(enc, "describe") else {"dim": enc.dim}),
            "embeddings": embeddings_info,
            "versions": package_versions(_VERSIONED, python=True),
        }
        manifest["outputs"] = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        atomic_write_json(tmp / "manifest.json", manifest)
    return manifest


# ---------------------------------------------------------------------------------------------------------- reading


@dataclass
class OpinionData:
    """A prepared opinions folder read back (:func:`load_opinions`)."""

    path: Path
    manifest: dict
    groups: list  # rows of groups.jsonl: {"group_id", "group", "profile_text"}
    group_index: dict  # group_id -> row of groups / profile_embeds
    profile_embeds: Any  # torch.Tensor (num_groups, dim) float32, or None when written without embeddings
    splits: dict = field(repr=False, default_factory=dict)  # split -> list[OpinionCell]

    def cells(self, split: str) -> list[OpinionCell]:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
        return self.splits[split]

    def records(self, split: str) -> list[dict[str, Any]]:
        """:func:`cell_to_record` of every cell of ``split`` with its group's ``profile_index``."""
        return [cell_to_record(c, self.group_index[c.group_id]) for c in self.cells(split)]


def load_opinions(path: PathLike, embeddings: bool = True) -> OpinionData:
    """Read a folder written by ``cuma data opinions``; anything else is an error saying what is missing."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"prepared opinions folder {str(root)!r} does not exist")
    needed = ["manifest.json", GROUPS_FILE] + [cells_file(s) for s in SPLITS]
    absent = [n for n in needed if not (root / n).is_file()]
    if absent:
        hint = " (it looks like a WVB prepared-data folder: use load_prepared)" if (root / "train.jsonl").is_file() else ""
        raise FileNotFoundError(
            f"{root} is not a prepared opinions folder: missing {absent}{hint}; write one with `cuma data opinions`")
    manifest = read_json(root / "manifest.json", dict, what="the opinions manifest")
    if manifest.get("kind") != KIND or manifest.get("format") != OPINIONS_FORMAT:
        raise OpinionsError(f"{root / 'manifest.json'}: expected kind {KIND!r} and format {OPINIONS_FORMAT!r}, got "
                            f"{manifest.get('kind')!r} / {manifest.get('format')!r}")
    groups = []
    index: dict[str, int] = {}
    for lineno, row in read_jsonl_numbered(root / GROUPS_FILE):
        if not isinstance(row.get("group_id"), str) or not isinstance(row.get("profile_text"), str) \
                or not isinstance(row.get("group"), dict):
            raise OpinionsError(f"{root / GROUPS_FILE}:{lineno}: expected group_id, group (object) and profile_text")
        if row["group_id"] in index:
            raise OpinionsError(f"{root / GROUPS_FILE}:{lineno}: group {row['group_id']!r} appears twice")
        index[row["group_id"]] = len(groups)
        groups.append(row)
    splits: dict[str, list[OpinionCell]] = {}
    for s in SPLITS:
        f = root / cells_file(s)
        out = []
        for lineno, row in read_jsonl_numbered(f):
            cell = OpinionCell.from_dict(row, where=f"{f}:{lineno}")
            if cell.split != s:
                raise OpinionsError(f"{f}:{lineno}: cell {cell.cell_id!r} has split {cell.split!r}, expected {s!r}")
            if cell.group_id not in index:
                raise OpinionsError(f"{f}:{lineno}: cell {cell.cell_id!r} names group {cell.group_id!r}, which is "
                                    f"not in {GROUPS_FILE}")
            out.append(cell)
        splits[s] = out
    embeds = None
    if embeddings and (root / EMBEDS_FILE).is_file():
        embeds = read_profile_embeds(root / EMBEDS_FILE, rows=len(groups))
    return OpinionData(path=root, manifest=manifest, groups=groups, group_index=index, profile_embeds=embeds,
                       splits=splits)
