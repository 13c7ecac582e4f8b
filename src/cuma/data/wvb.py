"""Loader for WorldValuesBench (WVB) files: the real benchmark and the synthetic population written in its layout.

Layout (the WVB repository checkout)::

    ROOT/WorldValuesBench/{train,valid,test}/{split}_demographic_qa.tsv   D_INTERVIEW + demographic columns (text)
    ROOT/WorldValuesBench/{train,valid,test}/{split}_value_qa.tsv        D_INTERVIEW + value questions (integers)
    ROOT/dataset_construction/question_metadata.json                     question text, category, scale, type
    ROOT/dataset_construction/codebook.json                              labels per RAW answer code
    ROOT/dataset_construction/answer_adjustment.json                     RAW code -> ADJUSTED value ("" = dropped)

``ROOT`` may also be the ``WorldValuesBench`` data folder itself (the metadata is then looked for in it, in
``ROOT/../dataset_construction``), or the ``dataset_construction`` folder (data in ``ROOT/../WorldValuesBench``).
``full/`` is not read: it is the union of the three participant splits.

Values in ``{split}_value_qa.tsv`` are already on each question's ADJUSTED scale (WVB applied
``answer_adjustment.json`` when it built the files), but ``codebook.json`` labels the RAW codes. The option labels
therefore go through the adjustment: the label of adjusted value ``v`` is the codebook label of the raw code that
maps to ``v`` (codes absent from the adjustment map to themselves; a code mapped to ``""`` is no option; negative
codes are missing-value codes and never options). When two raw codes land on the same ``v`` (Q241-Q249 merge 0 into
1), the code that stays in place keeps its label. Fifteen questions are affected (see ``docs/data.md``).

Missing answers (empty cells, negative codes, labels of missing-value codes) and answers outside the adjusted scale
are dropped and counted per reason, per split and per question in :attr:`WVBData.dropped`; malformed input (a
missing column, a non-integer answer that is not a label, a duplicated participant, a row with fewer or more fields
than the header, a file cut off inside its last row, ...) raises ``ValueError`` naming the file, the column or line
and what was expected.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from ..profiles import WVB_FIELD_MAP, Profile, is_missing
from ..runinfo import not_utf8_error, read_text, sha256_file
from .records import letters_for, make_record

__all__ = [
    "ANSWER_MISSING",
    "DATA_FOLDER",
    "ID_COLUMN",
    "METADATA_FILES",
    "METADATA_FOLDER",
    "Question",
    "WVBData",
    "WVBPaths",
    "WVBSplit",
    "adjusted_options",
    "clean_question_text",
    "find_wvb_paths",
    "load_wvb",
]

PathLike = Union[str, os.PathLike]

ID_COLUMN = "D_INTERVIEW"
DATA_FOLDER = "WorldValuesBench"
METADATA_FOLDER = "dataset_construction"
METADATA_FILES = ("question_metadata.json", "codebook.json", "answer_adjustment.json")
SPLIT_NAMES = ("train", "valid", "test")
ANSWER_MISSING = -(2**31)  # sentinel in WVBSplit.answers where valid is False

# Reasons an answer cell is dropped (keys of WVBData.dropped).
DROP_EMPTY = "empty"  # empty cell / NaN
DROP_NEGATIVE = "negative_code"  # WVS missing-value code (-1 Don't know, -2 No answer, -4 Not asked, -5 Missing)
DROP_MISSING_LABEL = "missing_label"  # the text label of a missing-value code ("Don't know", ...)
DROP_OUT_OF_SCALE = "out_of_scale"  # an integer outside [answer_scale_min, answer_scale_max] / not an option
DROP_REASONS = (DROP_EMPTY, DROP_NEGATIVE, DROP_MISSING_LABEL, DROP_OUT_OF_SCALE)

_SCALE_PREFIX = re.compile(
    r"^\s*On a scale of (?P<lo>-?\d+) to (?P<hi>-?\d+),\s*(?P=lo) meaning '(?P<lo_label>.*?)' and (?P=hi) "
    r"meaning '(?P<hi_label>.*?)',\s*(?P<rest>\S.*)$",
    re.S,
)


# ---------------------------------------------------------------------------------------------------------- paths


@dataclass(frozen=True)
class WVBPaths:
    """Where the files of one WVB checkout are."""

    data_dir: Path  # holds train/ valid/ test/
    question_metadata: Path
    codebook: Path
    answer_adjustment: Path

    def split_file(self, split: str, kind: str) -> Path:
        return self.data_dir / split / f"{split}_{kind}_qa.tsv"

    def input_files(self) -> dict[str, Path]:
        """Every file the loader reads, by a stable relative name (for the manifest's sha256 list)."""
        out = {
            f"{METADATA_FOLDER}/question_metadata.json": self.question_metadata,
            f"{METADATA_FOLDER}/codebook.json": self.codebook,
            f"{METADATA_FOLDER}/answer_adjustment.json": self.answer_adjustment,
        }
        for split in SPLIT_NAMES:
            for kind in ("demographic", "value"):
                out[f"{DATA_FOLDER}/{split}/{split}_{kind}_qa.tsv"] = self.split_file(split, kind)
        return out


def _has_splits(folder: Path) -> bool:
    return any((folder / s / f"{s}_value_qa.tsv").is_file() for s in SPLIT_NAMES)


def find_wvb_paths(root: PathLike) -> WVBPaths:
    """Locate the data folder and the three metadata files under ``root`` (see the module docstring).

    Raises ``FileNotFoundError`` listing every place that was looked at when something is missing.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"WorldValuesBench path {str(root)!r} does not exist")
    data_candidates = [root / DATA_FOLDER, root, root.parent / DATA_FOLDER]
    data_dir = next((c for c in data_candidates if c.is_dir() and _has_splits(c)), None)
    looked = []
    if data_dir is None:
        looked.append(
            "the participant split files {train,valid,test}/{split}_{demographic,value}_qa.tsv in any of: "
            + ", ".join(str(c) for c in data_candidates)
        )
    # dataset_construction/ first: WVB's build script also copies question_metadata.json into WorldValuesBench/
    meta_candidates = [root / METADATA_FOLDER]
    if data_dir is not None:
        meta_candidates.append(data_dir.parent / METADATA_FOLDER)
    meta_candidates += [root.parent / METADATA_FOLDER, root]
    if data_dir is not None:
        meta_candidates.append(data_dir)
    meta_candidates = list(dict.fromkeys(meta_candidates))
    found: dict[str, Path] = {}
    for name in METADATA_FILES:
        hit = next((c / name for c in meta_candidates if (c / name).is_file()), None)
        if hit is None:
            looked.append(f"{name} in any of: " + ", ".join(str(c) for c in meta_candidates))
        else:
            found[name] = hit
    if data_dir is not None:
        for split in SPLIT_NAMES:
            for kind in ("demographic", "value"):
                f = data_dir / split / f"{split}_{kind}_qa.tsv"
                if not f.is_file():
                    looked.append(f"{f}")
    if looked:
        raise FileNotFoundError(
            f"{root} is not a WorldValuesBench checkout (expected {DATA_FOLDER}/{{train,valid,test}}/ and "
            f"{METADATA_FOLDER}/{{{','.join(METADATA_FILES)}}}). Not found:\n  - " + "\n  - ".join(looked)
        )
    return WVBPaths(
        data_dir=data_dir,
        question_metadata=found["question_metadata.json"],
        codebook=found["codebook.json"],
        answer_adjustment=found["answer_adjustment.json"],
    )


# ---------------------------------------------------------------------------------------------------------- questions


@dataclass(frozen=True)
class Question:
    """One value question with its options on the ADJUSTED scale."""

    id: str
    text: str  # the question without WVB's "On a scale of 1 to 4, 1 meaning ... and 4 meaning ..., " preamble
    raw_text: str  # question_metadata.json's text as is
    category: str
    scale_min: int
    scale_max: int
    ordinal: bool
    option_values: tuple[int, ...]
    options: tuple[str, ...]  # labels, aligned with option_values
    unlabelled: tuple[int, ...] = ()  # option values without a codebook label (their label is the number)

    @property
    def letters(self) -> list[str]:
        return letters_for(len(self.options))

    def label_of(self, value: int) -> str:
        return self.options[self.option_values.index(value)]


def clean_question_text(text: str) -> str:
    """Drop WVB's scale preamble: ``"On a scale of 1 to 4, 1 meaning 'A' and 4 meaning 'B', how ...?"`` ->
    ``"How ...?"``. The options carry the labels, so the preamble is redundant in a lettered prompt. Text without
    the preamble is returned stripped."""
    text = " ".join(str(text).split())
    m = _SCALE_PREFIX.match(text)
    if not m:
        return text
    rest = m.group("rest").strip()
    return rest[:1].upper() + rest[1:]


def _parse_int(value: Any) -> Optional[int]:
    """``3``, ``"3"``, ``"3.0"``, ``3.0`` -> 3; anything else (``""``, ``"abc"``, ``2.5``, NaN) -> None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if math.isfinite(value) and value.is_integer() else None
    if isinstance(value, str):
        s = value.strip()
        if not s:
            return None
        try:
            return int(s)
        except ValueError:
            pass
        try:
            f = float(s)
        except ValueError:
            return None
        return int(f) if math.isfinite(f) and f.is_integer() else None
    return None


def adjusted_options(
    question_id: str,
    choices: Mapping[str, Any],
    adjustment: Mapping[str, Any],
    scale_min: Optional[int],
    scale_max: Optional[int],
    *,
    where: str = "codebook.json",
    adjustment_where: str = "answer_adjustment.json",
) -> tuple[list[int], list[str], list[int]]:
    """Option values and labels of one question on the adjusted scale.

    ``choices``: the codebook's RAW code -> label map; ``adjustment``: RAW code -> adjusted value (``""`` = dropped),
    empty for the questions WVB did not recode. With a scale, the options are ``scale_min..scale_max``; without one
    (non-ordinal questions) they are the adjusted values of the non-negative codes. Returns
    ``(values, labels, unlabelled_values)``; a value without a label gets its number as label.
    """
    adj: dict[int, Optional[int]] = {}
    for key, target in adjustment.items():
        code = _parse_int(key)
        if code is None:
            raise ValueError(
                f"{adjustment_where}: question {question_id}: key {key!r} must be an integer answer code"
            )
        if target is None or (isinstance(target, str) and not target.strip()):
            adj[code] = None
            continue
        new = _parse_int(target)
        if new is None:
            raise ValueError(
                f"{adjustment_where}: question {question_id}: code {key!r} maps to {target!r}; expected an integer "
                "adjusted value or \"\" (dropped)"
            )
        adj[code] = new
    # adjusted value -> [(raw code, label)]
    by_value: dict[int, list[tuple[int, str]]] = {}
    for key, label in choices.items():
        code = _parse_int(key)
        if code is None:
            continue  # non-numeric codebook keys (alpha country codes) are never answer codes
        if code < 0:
            continue  # missing-value codes
        if code in adj:
            target = adj[code]
            if target is None:
                continue  # dropped by the adjustment
        else:
            target = code
        by_value.setdefault(target, []).append((code, " ".join(str(label).split())))
    if scale_min is not None and scale_max is not None:
        if scale_min > scale_max:
            raise ValueError(f"question {question_id}: answer_scale_min {scale_min} > answer_scale_max {scale_max}")
        values = list(range(scale_min, scale_max + 1))
        outside = sorted(v for v in adj.values() if v is not None and not scale_min <= v <= scale_max)
        if outside:
            raise ValueError(
                f"{adjustment_where}: question {question_id}: adjusted values {outside} lie outside the question's "
                f"scale [{scale_min}, {scale_max}] in question_metadata.json"
            )
    else:
        values = sorted(by_value)
        if not values:
            raise ValueError(
                f"{where}: question {question_id} has no scale in question_metadata.json and no non-negative "
                "answer codes in the codebook, so it has no options"
            )
    labels: list[str] = []
    unlabelled: list[int] = []
    for v in values:
        cands = by_value.get(v, [])
        if not cands:
            labels.append(str(v))
            unlabelled.append(v)
            continue
        if len(cands) == 1:
            labels.append(cands[0][1])
            continue
        # several raw codes merged into v: the code that stays in place (v -> v) keeps its label
        stay = [label for code, label in cands if code == v]
        if len(stay) != 1:
            raise ValueError(
                f"{adjustment_where}: question {question_id}: raw codes {[c for c, _ in cands]} all map to the "
                f"adjusted value {v} and none of them is {v} itself, so the option label is ambiguous"
            )
        labels.append(stay[0])
    if len(values) > 26:
        raise ValueError(f"question {question_id} has {len(values)} options; at most 26 can get letters")
    return values, labels, unlabelled


def _load_json(path: Path, what: str) -> Any:
    text = read_text(path)  # not UTF-8: a ValueError naming the file
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}); expected {what}") from None


def _scale_bound(entry: Mapping[str, Any], key: str, qid: str, path: Path) -> Optional[int]:
    raw = entry.get(key, "")
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return None
    value = _parse_int(raw)
    if value is None:
        raise ValueError(f"{path}: question {qid}: field {key!r} must be an integer or \"\", got {raw!r}")
    return value


def load_questions(
    paths: WVBPaths, question_ids: Optional[Sequence[str]] = None
) -> tuple[list[Question], dict[str, Any], dict[str, Any]]:
    """Value questions (in metadata order) with adjusted options; also returns the codebook and adjustment maps."""
    meta = _load_json(paths.question_metadata, "an object: question id -> metadata")
    codebook = _load_json(paths.codebook, "an object: question id -> {question, choices, ...}")
    adjustment = _load_json(paths.answer_adjustment, "an object: question id -> {raw code: adjusted value}")
    loaded = ((paths.question_metadata, meta), (paths.codebook, codebook), (paths.answer_adjustment, adjustment))
    for path, value in loaded:
        if not isinstance(value, dict):
            raise ValueError(f"{path}: expected a JSON object keyed by question id, got {type(value).__name__}")
    for qid, entry in adjustment.items():
        if not isinstance(entry, dict):
            raise ValueError(
                f"{paths.answer_adjustment}: question {qid}: expected an object raw code -> adjusted value, got "
                f"{type(entry).__name__}"
            )
    wanted = None if question_ids is None else list(dict.fromkeys(str(q) for q in question_ids))
    questions: list[Question] = []
    for qid, entry in meta.items():
        if not isinstance(entry, dict):
            raise ValueError(f"{paths.question_metadata}: question {qid}: expected an object, got {entry!r}")
        if entry.get("use_case") != "value":
            continue
        if wanted is not None and qid not in wanted:
            continue
        for key in ("question", "answer_data_type"):
            if key not in entry:
                raise ValueError(f"{paths.question_metadata}: question {qid}: missing field {key!r}")
        dtype = entry["answer_data_type"]
        if dtype not in ("ordinal", "non_ordinal"):
            raise ValueError(
                f"{paths.question_metadata}: question {qid}: answer_data_type must be 'ordinal' or 'non_ordinal', "
                f"got {dtype!r}"
            )
        lo = _scale_bound(entry, "answer_scale_min", qid, paths.question_metadata)
        hi = _scale_bound(entry, "answer_scale_max", qid, paths.question_metadata)
        if (lo is None) != (hi is None):
            raise ValueError(
                f"{paths.question_metadata}: question {qid}: set both answer_scale_min and answer_scale_max or neither"
            )
        if dtype == "ordinal" and lo is None:
            raise ValueError(f"{paths.question_metadata}: ordinal question {qid} needs answer_scale_min/max")
        cb = codebook.get(qid)
        if not isinstance(cb, dict) or not isinstance(cb.get("choices"), dict):
            raise ValueError(
                f"{paths.codebook}: no entry with a 'choices' object for value question {qid} (needed for its "
                "option labels)"
            )
        values, labels, unlabelled = adjusted_options(
            qid,
            cb["choices"],
            adjustment.get(qid, {}),
            lo,
            hi,
            where=str(paths.codebook),
            adjustment_where=str(paths.answer_adjustment),
        )
        questions.append(
            Question(
                id=qid,
                text=clean_question_text(entry["question"]),
                raw_text=str(entry["question"]),
                category=str(entry.get("category", "") or ""),
                scale_min=lo if lo is not None else min(values),
                scale_max=hi if hi is not None else max(values),
                ordinal=dtype == "ordinal",
                option_values=tuple(values),
                options=tuple(labels),
                unlabelled=tuple(unlabelled),
            )
        )
    if wanted is not None:
        known = {q.id for q in questions}
        unknown = [q for q in wanted if q not in known]
        if unknown:
            raise ValueError(
                f"{paths.question_metadata}: requested questions {unknown} are not value questions there"
            )
    if not questions:
        raise ValueError(f"{paths.question_metadata}: no questions with use_case 'value'")
    return questions, codebook, adjustment


# ---------------------------------------------------------------------------------------------------------- TSVs


def _check_row_lengths(path: Path) -> None:
    """Every row has exactly the header's number of fields, and the file ends with a line end. pandas fills a short
    row with empty cells (they would count as unanswered questions) and reads a row one field too long with its first
    field as an index, so a table cut mid-row (a copy that stopped, a disk that filled) would load without a word.
    Blank lines are skipped, as pandas skips them."""
    import csv
    import io

    text = read_text(path)
    ends_cut = bool(text) and not text.endswith(("\n", "\r"))
    lines = text.count("\n") + (1 if ends_cut else 0)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quotechar='"')
    width = None
    for fields in reader:
        if not fields or fields == [""]:
            continue
        if width is None:
            width = len(fields)
            continue
        if len(fields) != width:
            cut = ends_cut and reader.line_num == lines
            raise ValueError(
                f"{path}: line {reader.line_num}: {len(fields)} tab-separated fields, but the header has {width}"
                + ("; the file ends inside this row without a line end: it looks cut off (copy it again)" if cut
                   else "; expected one field per header column")
            )
    if width is not None and ends_cut:
        raise ValueError(f"{path}: line {lines} (the last) has no line end: the file looks cut off inside its last "
                         "row; copy it again (or, if that row is complete, end the file with a newline)")


def _read_tsv(path: Path):
    import pandas as pd

    _check_row_lengths(path)
    try:
        frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, na_filter=False, index_col=False)
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path}: the file is empty; expected a header row starting with {ID_COLUMN}") from None
    except pd.errors.ParserError as err:
        raise ValueError(f"{path}: not a tab-separated table ({err})") from None
    except UnicodeDecodeError:
        raise not_utf8_error(path) from None
    frame.columns = [str(c).strip() for c in frame.columns]
    if ID_COLUMN not in frame.columns:
        raise ValueError(f"{path}: no {ID_COLUMN} column; expected a header row with {ID_COLUMN} and the question ids")
    dup_cols = [c for c, n in Counter(frame.columns).items() if n > 1]
    if dup_cols:
        raise ValueError(f"{path}: duplicated columns {dup_cols}")
    return frame


def _participant_ids(frame, path: Path) -> list[str]:
    ids: list[str] = []
    seen: dict[str, int] = {}
    for row, raw in enumerate(frame[ID_COLUMN].tolist()):
        text = str(raw).strip()
        code = _parse_int(text)
        pid = str(code) if code is not None else text
        if not pid:
            raise ValueError(f"{path}: row {row + 2}: column {ID_COLUMN} is empty; expected a participant id")
        if pid in seen:
            raise ValueError(
                f"{path}: column {ID_COLUMN}: participant {pid} appears twice (rows {seen[pid] + 2} and {row + 2}); "
                "expected one row per participant"
            )
        seen[pid] = row
        ids.append(pid)
    return ids


@dataclass
class WVBSplit:
    """One participant split: ids, profiles and the answer matrix (participants x questions)."""

    name: str
    participant_ids: list[str]
    profiles: list[Profile]
    answers: np.ndarray  # (P, Q) int32 adjusted values; ANSWER_MISSING where not valid
    valid: np.ndarray  # (P, Q) bool

    @property
    def num_participants(self) -> int:
        return len(self.participant_ids)

    @property
    def num_pairs(self) -> int:
        return int(self.valid.sum())


@dataclass
class WVBData:
    """A loaded WorldValuesBench checkout (or synthetic population in its layout)."""

    paths: WVBPaths
    questions: list[Question]
    splits: dict[str, WVBSplit]
    # reason -> count, over all splits and questions
    dropped: dict[str, int] = field(default_factory=dict)
    dropped_by_split: dict[str, dict[str, int]] = field(default_factory=dict)
    dropped_by_question: dict[str, dict[str, int]] = field(default_factory=dict)
    # column -> count of participants whose demographic value was a missing-value code (profile field left out)
    demographic_missing: dict[str, int] = field(default_factory=dict)
    # demographic cells that held a numeric code and were mapped to their codebook label
    demographic_codes_mapped: dict[str, int] = field(default_factory=dict)
    # question id -> {raw code: adjusted value or ""} for the loaded questions that answer_adjustment.json recodes
    recoded: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def question_ids(self) -> list[str]:
        return [q.id for q in self.questions]

    def question(self, question_id: str) -> Question:
        for q in self.questions:
            if q.id == question_id:
                return q
        raise KeyError(f"no value question {question_id!r}; known: {self.question_ids[:10]}...")

    def input_files(self) -> dict[str, Path]:
        return self.paths.input_files()

    def input_sha256(self) -> dict[str, str]:
        return {name: sha256_file(path) for name, path in self.input_files().items()}

    def record(
        self, split: str, row: int, column: int, profile_index: int, held_out: bool = False
    ) -> dict[str, Any]:
        """The schema record of participant ``row`` x question ``column`` of ``split`` (which must be valid)."""
        part = self.splits[split]
        if not part.valid[row, column]:
            raise ValueError(
                f"participant {part.participant_ids[row]} has no valid answer to {self.questions[column].id} in {split}"
            )
        q = self.questions[column]
        profile = part.profiles[row]
        return make_record(
            participant_id=part.participant_ids[row],
            question_id=q.id,
            split=split,
            profile=profile.to_dict(),
            profile_text=profile.to_text(),
            profile_index=profile_index,
            question=q.text,
            category=q.category,
            options=q.options,
            option_values=q.option_values,
            gold_value=int(part.answers[row, column]),
            scale_min=q.scale_min,
            scale_max=q.scale_max,
            ordinal=q.ordinal,
            held_out=held_out,
        )

    def summary(self) -> dict[str, Any]:
        return {
            "questions": len(self.questions),
            "participants": {k: s.num_participants for k, s in self.splits.items()},
            "pairs_available": {k: s.num_pairs for k, s in self.splits.items()},
            "dropped": dict(self.dropped),
        }


def _demographic_label_maps(codebook: Mapping[str, Any], columns: Iterable[str]) -> dict[str, tuple[dict, set]]:
    """column -> (numeric code -> label for non-negative codes, labels of negative (missing) codes)."""
    out: dict[str, tuple[dict, set]] = {}
    for col in columns:
        entry = codebook.get(col)
        choices = entry.get("choices") if isinstance(entry, dict) else None
        codes: dict[int, str] = {}
        missing_labels: set[str] = set()
        if isinstance(choices, dict):
            for key, label in choices.items():
                code = _parse_int(key)
                if code is None:
                    continue
                label = " ".join(str(label).split())
                if code < 0:
                    missing_labels.add(label.lower())
                else:
                    codes[code] = label
        out[col] = (codes, missing_labels)
    return out


def _load_profiles(
    path: Path,
    frame,
    ids: list[str],
    field_map: Mapping[str, str],
    label_maps: Mapping[str, tuple[dict, set]],
    missing_counts: Counter,
    mapped_counts: Counter,
) -> list[Profile]:
    absent = [c for c in field_map if c not in frame.columns]
    if absent:
        raise ValueError(
            f"{path}: missing the profile columns {absent}; expected {ID_COLUMN} and the demographic columns "
            f"{list(field_map)} (text labels)"
        )
    cols = list(field_map)
    columns = [frame[c].tolist() for c in cols]
    cache: dict[tuple, Profile] = {}
    profiles: list[Profile] = []
    for row in range(len(ids)):
        raw = tuple(str(col[row]) for col in columns)
        prof = cache.get(raw)
        if prof is None:
            values: dict[str, Optional[str]] = {}
            for col, cell in zip(cols, raw):
                text = " ".join(cell.split())
                codes, missing_labels = label_maps.get(col, ({}, set()))
                code = _parse_int(text)
                if code is not None and code >= 0 and code in codes:
                    text = codes[code]
                    mapped_counts[col] += 1
                if text.lower() in missing_labels or is_missing(text):
                    text = ""
                values[col] = text or None
            prof = Profile.from_mapping(values, field_map)
            cache[raw] = prof
        profiles.append(prof)
    # count missing demographic values per column (over participants, not distinct rows)
    for col in cols:
        target = field_map[col]
        if target.startswith("extra."):
            key = target[len("extra."):]
            n = sum(1 for p in profiles if key not in p.extra)
        else:
            n = sum(1 for p in profiles if getattr(p, target, None) is None)
        if n:
            missing_counts[col] += n
    return profiles


def _parse_value_column(
    path: Path,
    qcol: str,
    cells,
    ids: list[str],
    question: Question,
    label_to_value: Mapping[str, int],
    missing_labels: set,
    drops: Counter,
) -> tuple[np.ndarray, np.ndarray]:
    """Adjusted values and validity of one value column (vectorised over distinct cell strings)."""
    import pandas as pd

    codes, uniques = pd.factorize(pd.Series(cells, dtype=object), sort=False)
    allowed = set(question.option_values)
    uniq_value = np.full(len(uniques), ANSWER_MISSING, dtype=np.int32)
    uniq_reason: list[Optional[str]] = []
    for k, cell in enumerate(uniques):
        text = " ".join(str(cell).split())
        reason: Optional[str] = None
        if not text or text.lower() in ("nan", "na", "<na>", "null", "none"):
            reason = DROP_EMPTY
        else:
            number = _parse_int(text)
            if number is None:
                try:
                    f = float(text)
                except ValueError:
                    f = None
                if f is not None:
                    if math.isnan(f):
                        reason = DROP_EMPTY
                    elif f < 0:
                        reason = DROP_NEGATIVE
                    else:
                        row = int(np.flatnonzero(codes == k)[0])
                        raise ValueError(
                            f"{path}: column {qcol}, participant {ids[row]} (row {row + 2}): answer {text!r} is not "
                            f"an integer; expected an integer on the adjusted scale {question.scale_min}.."
                            f"{question.scale_max}, a negative missing code or an empty cell"
                        )
                elif text.lower() in label_to_value:
                    uniq_value[k] = label_to_value[text.lower()]
                elif text.lower() in missing_labels or is_missing(text):
                    reason = DROP_MISSING_LABEL
                else:
                    row = int(np.flatnonzero(codes == k)[0])
                    raise ValueError(
                        f"{path}: column {qcol}, participant {ids[row]} (row {row + 2}): answer {text!r} is neither an "
                        f"integer on the adjusted scale {question.scale_min}..{question.scale_max} nor one of the "
                        f"option labels {list(question.options)}"
                    )
            elif number < 0:
                reason = DROP_NEGATIVE
            elif number not in allowed:
                reason = DROP_OUT_OF_SCALE
            else:
                uniq_value[k] = number
        uniq_reason.append(reason)
    counts = np.bincount(codes, minlength=len(uniques)) if len(codes) else np.zeros(len(uniques), dtype=np.int64)
    for k, reason in enumerate(uniq_reason):
        if reason is not None and counts[k]:
            drops[reason] += int(counts[k])
    values = uniq_value[codes]
    valid = values != ANSWER_MISSING
    return values.astype(np.int32), valid


def load_wvb(
    root: PathLike,
    *,
    question_ids: Optional[Sequence[str]] = None,
    splits: Sequence[str] = SPLIT_NAMES,
    field_map: Mapping[str, str] = WVB_FIELD_MAP,
) -> WVBData:
    """Read a WorldValuesBench checkout (see the module docstring) into answer matrices and profiles.

    ``question_ids`` restricts the value questions (default: every ``use_case == "value"`` question of the
    metadata); ``splits`` the participant splits read; ``field_map`` the demographic columns that form the profile.
    """
    paths = find_wvb_paths(root)
    unknown = [s for s in splits if s not in SPLIT_NAMES]
    if unknown:
        raise ValueError(f"unknown splits {unknown}; expected some of {list(SPLIT_NAMES)}")
    questions, codebook, adjustment = load_questions(paths, question_ids)
    label_maps = _demographic_label_maps(codebook, field_map)
    value_labels: dict[str, dict[str, int]] = {}
    value_missing_labels: dict[str, set] = {}
    for q in questions:
        value_labels[q.id] = {label.lower(): v for v, label in zip(q.option_values, q.options) if v not in q.unlabelled}
        choices = codebook.get(q.id, {}).get("choices", {})
        value_missing_labels[q.id] = {
            " ".join(str(label).split()).lower()
            for key, label in choices.items()
            if (_parse_int(key) is not None and _parse_int(key) < 0)
        }
    meta = _load_json(paths.question_metadata, "an object")
    all_value_ids = {k for k, v in meta.items() if isinstance(v, dict) and v.get("use_case") == "value"}

    data = WVBData(paths=paths, questions=questions, splits={})
    data.recoded = {q.id: dict(adjustment[q.id]) for q in questions if adjustment.get(q.id)}
    total = Counter()
    by_question: dict[str, Counter] = {q.id: Counter() for q in questions}
    missing_counts: Counter = Counter()
    mapped_counts: Counter = Counter()
    owner: dict[str, str] = {}
    for split in splits:
        dpath, vpath = paths.split_file(split, "demographic"), paths.split_file(split, "value")
        demo = _read_tsv(dpath)
        value = _read_tsv(vpath)
        demo_ids = _participant_ids(demo, dpath)
        value_ids = _participant_ids(value, vpath)
        if set(demo_ids) != set(value_ids):
            only_v = [p for p in value_ids if p not in set(demo_ids)]
            only_d = [p for p in demo_ids if p not in set(value_ids)]
            raise ValueError(
                f"{vpath} and {dpath} must list the same participants in column {ID_COLUMN}: "
                f"{len(only_v)} only in the value file (e.g. {only_v[:5]}), {len(only_d)} only in the demographic "
                f"file (e.g. {only_d[:5]})"
            )
        for pid in value_ids:
            if pid in owner:
                raise ValueError(
                    f"{vpath}: participant {pid} is also in the {owner[pid]} split; participant splits must not overlap"
                )
            owner[pid] = split
        extra_cols = [c for c in value.columns if c != ID_COLUMN and c not in all_value_ids]
        if extra_cols:
            raise ValueError(
                f"{vpath}: columns {extra_cols[:10]} are not value questions in {paths.question_metadata}; every "
                "column after D_INTERVIEW must be a question with use_case 'value'"
            )
        profiles_by_id = dict(
            zip(demo_ids, _load_profiles(dpath, demo, demo_ids, field_map, label_maps, missing_counts, mapped_counts))
        )
        profiles = [profiles_by_id[p] for p in value_ids]
        answers = np.full((len(value_ids), len(questions)), ANSWER_MISSING, dtype=np.int32)
        valid = np.zeros((len(value_ids), len(questions)), dtype=bool)
        split_drops = Counter()
        absent = [q.id for q in questions if q.id not in value.columns]
        if absent:
            raise ValueError(
                f"{vpath}: no column for the value questions {absent[:10]}"
                + (f" (and {len(absent) - 10} more)" if len(absent) > 10 else "")
                + f" of {paths.question_metadata}; expected one column per value question (or keep only the "
                "questions that are there with --question-ids)"
            )
        for j, q in enumerate(questions):
            drops = Counter()
            vals, ok = _parse_value_column(
                vpath, q.id, value[q.id].tolist(), value_ids, q, value_labels[q.id], value_missing_labels[q.id], drops
            )
            answers[:, j] = vals
            valid[:, j] = ok
            split_drops.update(drops)
            by_question[q.id].update(drops)
        total.update(split_drops)
        data.dropped_by_split[split] = {r: int(split_drops.get(r, 0)) for r in DROP_REASONS}
        data.splits[split] = WVBSplit(
            name=split, participant_ids=value_ids, profiles=profiles, answers=answers, valid=valid
        )
    data.dropped = {r: int(total.get(r, 0)) for r in DROP_REASONS}
    data.dropped_by_question = {
        qid: {r: int(c[r]) for r in DROP_REASONS if c.get(r)} for qid, c in by_question.items() if sum(c.values())
    }
    data.demographic_missing = {k: int(v) for k, v in sorted(missing_counts.items())}
    data.demographic_codes_mapped = {k: int(v) for k, v in sorted(mapped_counts.items())}
    return data
