"""Readers of the published opinion-distribution layouts into :class:`cuma.data.opinions.OpinionCell` lists.

Each reader returns a :class:`cuma.data.opinions.ReadResult` (cells with their split unset, every skip counted by
cause, the input files for the manifest's hashes). A file that is not in the reader's layout is an
:class:`~cuma.data.opinions.OpinionsError` naming the file, the row and the field and saying what was expected;
nothing is guessed. Layouts (DESIGN.md section 7, docs/opinions.md):

- ``globalopinionqa``: GlobalOpinionQA's CSV (columns ``question``, ``selections``, ``options``, ``source``).
  ``selections`` is the repr of a ``defaultdict(<class 'list'>, {country: [p, ...]})``: the wrapper is stripped by a
  pattern and the dict read with :func:`ast.literal_eval` (never ``eval``); ``options`` a Python-literal list (never
  split on commas). Country names are kept as published ("X (Non-national sample)" is its own group) unless
  ``merge_groups`` maps them (a JSON object or ``name<TAB>canonical`` lines, or ``builtin`` for
  :data:`BUILTIN_VARIANTS`).
- ``opinions-json``: a JSON list of ``{"question", "options", "attribute", "gold_distribution", "id"}``; the
  question's embedded "Question:", lettered options and trailing "Answer:" are stripped (cuma renders its own).
- ``opinionqa``: OpinionQA's ``American_Trends_Panel_W<wave>/`` folders (the folder itself or a parent of several):
  ``info.csv`` (key, question, references, option_ordinal), ``responses.csv`` (one row per respondent, survey weight
  ``WEIGHT_W<wave>``, the demographic columns of :data:`OPINIONQA_ATTRIBUTES`), ``metadata.csv`` (hashed when
  present). One group per value of each attribute (the paper's marginal groups); the distribution is the weighted
  share of each option among the respondents of the group who answered, "Refused" kept out and reported as a rate.
- ``wvb``: a WorldValuesBench-layout folder (real, or ``cuma data synth``'s population), respondents grouped by
  ``group_fields`` (profile field names, default ``country``); the distribution is the share of each option.

Question ids: a source id where the layout has one (OpinionQA's key, WVB's question id), else ``<source>-`` plus a
hash of the question text and option list (so a question asked in two rows is one question); the same (question,
group) cell read twice is skipped when the values agree (``duplicate_cell``) and an error when they differ.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import json
import math
import os
import re
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from ..profiles import PROFILE_FIELDS, Profile, normalize_value
from ..runinfo import read_text
from .opinions import (
    SOURCES,
    OpinionCell,
    OpinionsError,
    ReadResult,
    assign_splits,
    check_distribution,
    group_id_of,
    read_holdout_names,
    write_opinions,
)

__all__ = [
    "BUILTIN_VARIANTS",
    "OPINIONQA_ATTRIBUTES",
    "OPINIONQA_REFUSED",
    "parse_selections",
    "prepare_opinions",
    "question_id_for",
    "read_globalopinionqa",
    "read_merge_map",
    "read_opinionqa",
    "read_opinions_json",
    "read_source",
    "read_wvb_groups",
    "strip_embedded_options",
]

PathLike = Union[str, os.PathLike]

# OpinionQA's demographic columns (Santurkar et al. 2023) -> the profile field each becomes
OPINIONQA_ATTRIBUTES: dict[str, str] = {
    "CREGION": "extra.region",
    "AGE": "age_group",
    "SEX": "gender",
    "EDUCATION": "education",
    "CITIZEN": "extra.citizenship",
    "MARITAL": "marital_status",
    "RELIG": "religion",
    "RELIGATTEND": "extra.religious_attendance",
    "POLPARTY": "extra.political_party",
    "INCOME": "income",
    "POLIDEOLOGY": "extra.political_ideology",
    "RACE": "ethnicity",
}
OPINIONQA_REFUSED = "refused"  # option label (normalised, lower case) kept out of the distribution
_WAVE_DIR = re.compile(r"^American_Trends_Panel_W(\d+)$")
INFO_COLUMNS = ("key", "question", "references", "option_ordinal")
GOQA_COLUMNS = ("question", "selections", "options", "source")
JSON_KEYS = ("question", "options", "attribute", "gold_distribution", "id")

# Spelling variants of one country seen in GlobalOpinionQA (used only with merge_groups="builtin")
BUILTIN_VARIANTS: dict[str, str] = {
    "Britain": "Great Britain",
    "United Kingdom": "Great Britain",
    "Czech Rep.": "Czech Republic",
    "Czechia": "Czech Republic",
    "S. Korea": "South Korea",
    "Korea, South": "South Korea",
}

_WRAPPER = re.compile(r"^\s*defaultdict\(\s*<class\s+'[A-Za-z_.]+'>\s*,\s*(\{.*\})\s*\)\s*$", re.S)


def question_id_for(prefix: str, question: str, options: Sequence[str]) -> str:
    """The id of a question without a source id: ``<prefix>-`` + 12 hex digits of a hash of its text and options."""
    h = hashlib.sha1((question + "\x1f" + "\x1e".join(options)).encode("utf-8")).hexdigest()[:12]
    return f"{prefix}-{h}"


class _Cells:
    """Collects cells, keyed by (question, group), with the duplicate rule of the module docstring."""

    def __init__(self, result: ReadResult) -> None:
        self.result = result
        self.at: dict[tuple[str, str], tuple[int, str]] = {}

    def add(self, cell: OpinionCell, where: str) -> None:
        key = (cell.question_id, cell.group_id)
        if key in self.at:
            i, first = self.at[key]
            other = self.result.cells[i]
            if other.options == cell.options and np.allclose(other.target, cell.target, atol=1e-9, rtol=0):
                self.result.skip("duplicate_cell", where)
                return
            raise OpinionsError(
                f"{where}: duplicate cell (question {cell.question_id!r}, group {cell.group_id!r}) with different "
                f"values from {first}: {other.target} vs {cell.target}")
        self.at[key] = (len(self.result.cells), where)
        self.result.cells.append(cell)


def _cell(*, profile: Profile, question_id: str, question: str, options: list, ordinal: bool,
          option_values: Optional[list], target: list, weight: float, source: str, source_ids: dict) -> OpinionCell:
    gid = group_id_of(profile)
    return OpinionCell(cell_id=f"{question_id}::{gid}", group_id=gid, group=profile.to_dict(),
                       profile_text=profile.to_text(), question_id=question_id, question=question, options=options,
                       ordinal=ordinal, option_values=option_values, target=target, weight=float(weight),
                       source=source, source_ids=source_ids)


def _literal(text: str, where: str, field: str, expected: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError) as err:
        short = text if len(text) <= 80 else text[:77] + "..."
        raise OpinionsError(f"{where}: field {field!r} is not {expected} ({type(err).__name__}): {short!r}") from None


def _options(value: Any, where: str, field: str = "options") -> list[str]:
    if isinstance(value, str):
        value = _literal(value.strip(), where, field, "a Python-literal list of option strings like ['Yes', 'No']")
    if not isinstance(value, (list, tuple)) or not value:
        raise OpinionsError(f"{where}: field {field!r} must be a non-empty list of option strings, got {value!r}")
    out = []
    for o in value:
        if isinstance(o, bool) or not isinstance(o, (str, int, float)):
            raise OpinionsError(f"{where}: field {field!r}: option {o!r} is not a string")
        text = " ".join(str(o).split())
        if not text:
            raise OpinionsError(f"{where}: field {field!r}: an option is empty")
        out.append(text)
    if len(out) > 26:
        raise OpinionsError(f"{where}: field {field!r}: {len(out)} options; cuma letters at most 26")
    return out


def read_merge_map(spec: Optional[str]) -> dict[str, str]:
    """``merge_groups``: None (no merging), ``"builtin"`` (:data:`BUILTIN_VARIANTS`), or a file: a JSON object
    ``{name: canonical}`` or lines ``name<TAB>canonical`` (``#`` comments). Keys are matched after profile
    normalisation, case-insensitively."""
    if not spec:
        return {}
    if spec == "builtin":
        raw = dict(BUILTIN_VARIANTS)
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise OpinionsError(f"--merge-groups: {spec!r} is neither 'builtin' nor an existing file")
        text = read_text(path)
        if text.lstrip().startswith("{"):
            try:
                raw = json.loads(text)
            except json.JSONDecodeError as err:
                raise OpinionsError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in raw.items()):
                raise OpinionsError(f"{path}: expected a JSON object of name -> canonical name strings")
        else:
            raw = {}
            for lineno, line in enumerate(text.splitlines(), 1):
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                parts = line.split("\t")
                if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
                    raise OpinionsError(f"{path}:{lineno}: expected 'name<TAB>canonical name', got {line!r}")
                raw[parts[0]] = parts[1]
    return {(normalize_value(k, "group name") or "").lower(): v for k, v in raw.items()}


def _merged(name: str, merge: Mapping[str, str]) -> str:
    return merge.get((normalize_value(name, "group name") or "").lower(), name)


def _attribute_field(group_fields: Optional[Sequence[str]], source: str) -> str:
    """The one profile field a published group name goes into (default country)."""
    if not group_fields:
        return "country"
    if len(group_fields) != 1:
        raise OpinionsError(f"--group-fields: source {source} has one group name per cell; give one profile field "
                            f"(e.g. country or extra.group), got {list(group_fields)}")
    name = group_fields[0]
    if name not in PROFILE_FIELDS and not (name.startswith("extra.") and len(name) > 6):
        raise OpinionsError(f"--group-fields: {name!r} is not a profile field; use one of {list(PROFILE_FIELDS)} or "
                            "extra.<key>")
    return name


def _profile_of(field: str, value: str) -> Profile:
    return Profile.from_mapping({"v": value}, {"v": field})


# --------------------------------------------------------------------------------------------- GlobalOpinionQA


def parse_selections(text: str, where: str) -> dict[str, Any]:
    """The country -> distribution dict of one ``selections`` string (``defaultdict(<class 'list'>, {...})`` or a
    bare ``{...}``), by pattern and :func:`ast.literal_eval` only."""
    text = str(text).strip()
    m = _WRAPPER.match(text)
    body = m.group(1) if m else text
    if not body.startswith("{"):
        raise OpinionsError(f"{where}: field 'selections' must look like \"defaultdict(<class 'list'>, {{'Country': "
                            f"[0.1, 0.9]}})\", got {text[:80]!r}")
    value = _literal(body, where, "selections", "a dict literal of country -> list of numbers")
    if not isinstance(value, dict):
        raise OpinionsError(f"{where}: field 'selections' must hold a dict, got {type(value).__name__}")
    return value


def read_globalopinionqa(path: PathLike, *, group_fields: Optional[Sequence[str]] = None,
                         merge_groups: Optional[str] = None, min_group_size: int = 1) -> ReadResult:
    path = Path(path).expanduser()
    if not path.is_file():
        raise OpinionsError(f"--source globalopinionqa expects GlobalOpinionQA's CSV file; {str(path)!r} is not a file")
    result = ReadResult(source="globalopinionqa", cells=[], inputs={"globalopinionqa.csv": path})
    merge = read_merge_map(merge_groups)
    if merge_groups and merge_groups != "builtin":
        result.inputs["merge_groups"] = Path(merge_groups).expanduser()
    field = _attribute_field(group_fields, "globalopinionqa")
    cells = _Cells(result)
    text = read_text(path).lstrip("\ufeff")  # a byte-order mark would hide the first column's name
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 28))
    reader = csv.reader(text.splitlines(keepends=True))
    try:
        header = next(reader)
    except StopIteration:
        raise OpinionsError(f"{path}: empty file; expected GlobalOpinionQA's CSV with columns {list(GOQA_COLUMNS)}") \
            from None
    header = [h.strip() for h in header]
    missing = [c for c in GOQA_COLUMNS if c not in header]
    if missing:
        raise OpinionsError(f"{path}: not GlobalOpinionQA's layout: missing columns {missing}; expected "
                            f"{list(GOQA_COLUMNS)}, found {header[:10]}")
    col = {c: header.index(c) for c in GOQA_COLUMNS}
    rows = 0
    merged_names: Counter = Counter()
    for rowno, row in enumerate(reader, 2):
        if not any(x.strip() for x in row):
            continue
        where = f"{path}:{rowno}"
        if len(row) != len(header):
            raise OpinionsError(f"{where}: {len(row)} fields, expected {len(header)} (columns {header})")
        rows += 1
        question = " ".join(row[col["question"]].split())
        if not question:
            raise OpinionsError(f"{where}: field 'question' is empty")
        options = _options(row[col["options"]], where)
        sel_text = row[col["selections"]].strip()
        selections = parse_selections(sel_text, where) if sel_text else {}
        if not selections:
            result.skip("empty_selections", where)
            continue
        qid = question_id_for("goqa", question, options)
        survey = row[col["source"]].strip()
        for name, dist in selections.items():
            if not isinstance(name, str) or not name.strip():
                raise OpinionsError(f"{where}: field 'selections': group name {name!r} is not a non-empty string")
            place = f"{where} ({name})"
            if not isinstance(dist, (list, tuple)):
                raise OpinionsError(f"{place}: field 'selections' must map to a list of numbers, got {dist!r}")
            target, cause = check_distribution(dist, len(options))
            if cause:
                result.skip(cause, place)
                continue
            canonical = _merged(name, merge)
            if canonical != name:
                merged_names[f"{name} -> {canonical}"] += 1
            profile = _profile_of(field, canonical)
            if profile.is_empty():
                result.skip("group_name_is_missing_code", place)
                continue
            cells.add(_cell(profile=profile, question_id=qid, question=question, options=options, ordinal=False,
                            option_values=None, target=target, weight=1.0, source="globalopinionqa",
                            source_ids={"row": rowno, "name": name, "survey": survey}), place)
    if rows == 0:
        raise OpinionsError(f"{path}: no data rows under the header {header}")
    result.details = {"rows": rows, "merged_names": dict(merged_names)}
    return result


# --------------------------------------------------------------------------------------------- distributional JSON

_OPTIONS_HEADER = re.compile(r"(?:^|\s)Options\s*:", re.I)
_ANSWER_TAIL = re.compile(r"\s*Answer\s*:?\s*$", re.I)
_QUESTION_HEAD = re.compile(r"^\s*Question\s*:\s*", re.I)
_LETTER_LINE = re.compile(r"(?m)^\s*\(?A[.)]\s")


def strip_embedded_options(text: str) -> str:
    """A question without its embedded "Question:" prefix, "Options: A. ... B. ..." block and trailing "Answer:"."""
    t = str(text)
    t = _QUESTION_HEAD.sub("", t, count=1)
    m = None
    for m in _OPTIONS_HEADER.finditer(t):
        pass
    if m is not None:
        t = t[: m.start()]
    else:
        lm = _LETTER_LINE.search(t)
        if lm is not None and lm.start() > 0:
            t = t[: lm.start()]
    t = _ANSWER_TAIL.sub("", t)
    return " ".join(t.split())


def read_opinions_json(path: PathLike, *, group_fields: Optional[Sequence[str]] = None,
                       merge_groups: Optional[str] = None, min_group_size: int = 1) -> ReadResult:
    path = Path(path).expanduser()
    if not path.is_file():
        raise OpinionsError(f"--source opinions-json expects a JSON file; {str(path)!r} is not a file")
    result = ReadResult(source="opinions-json", cells=[], inputs={"opinions.json": path})
    merge = read_merge_map(merge_groups)
    field = _attribute_field(group_fields, "opinions-json")
    try:
        items = json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise OpinionsError(f"{path}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno}); expected a "
                            f"list of objects with keys {list(JSON_KEYS)}") from None
    if not isinstance(items, list):
        raise OpinionsError(f"{path}: expected a JSON list of objects with keys {list(JSON_KEYS)}, got "
                            f"{type(items).__name__}")
    if not items:
        raise OpinionsError(f"{path}: the list is empty")
    cells = _Cells(result)
    for i, item in enumerate(items):
        where = f"{path}[{i}]"
        if not isinstance(item, dict):
            raise OpinionsError(f"{where}: expected an object with keys {list(JSON_KEYS)}, got {type(item).__name__}")
        missing = [k for k in JSON_KEYS if k not in item]
        if missing:
            raise OpinionsError(f"{where}: missing keys {missing}; expected {list(JSON_KEYS)}")
        if not isinstance(item["question"], str):
            raise OpinionsError(f"{where}: field 'question' must be a string")
        question = strip_embedded_options(item["question"])
        if not question:
            raise OpinionsError(f"{where}: field 'question' is empty once its options and 'Answer:' are stripped")
        options = _options(item["options"], where)
        attribute = item["attribute"]
        if not isinstance(attribute, str) or not attribute.strip():
            raise OpinionsError(f"{where}: field 'attribute' must be a non-empty group name, got {attribute!r}")
        dist = item["gold_distribution"]
        if not isinstance(dist, list):
            raise OpinionsError(f"{where}: field 'gold_distribution' must be a list of numbers, got {dist!r}")
        target, cause = check_distribution(dist, len(options))
        if cause:
            result.skip(cause, where)
            continue
        profile = _profile_of(field, _merged(attribute, merge))
        if profile.is_empty():
            result.skip("group_name_is_missing_code", where)
            continue
        qid = question_id_for("json", question, options)
        cells.add(_cell(profile=profile, question_id=qid, question=question, options=options, ordinal=False,
                        option_values=None, target=target, weight=1.0, source="opinions-json",
                        source_ids={"index": i, "id": item["id"], "attribute": attribute}), where)
    result.details = {"items": len(items)}
    return result


# --------------------------------------------------------------------------------------------- OpinionQA


def _wave_dirs(path: Path) -> list[tuple[int, Path]]:
    m = _WAVE_DIR.match(path.name)
    if m and path.is_dir():
        return [(int(m.group(1)), path)]
    if not path.is_dir():
        raise OpinionsError(f"--source opinionqa expects an American_Trends_Panel_W<wave>/ folder or a folder of "
                            f"them; {str(path)!r} is not a folder")
    found = sorted((int(m.group(1)), p) for p in path.iterdir() if p.is_dir() and (m := _WAVE_DIR.match(p.name)))
    if not found:
        raise OpinionsError(f"{path}: no American_Trends_Panel_W<wave>/ folder in it (OpinionQA's human_resp layout)")
    return found


def _read_csv(path: Path):
    import pandas as pd

    if not path.is_file():
        raise OpinionsError(f"{path.parent}: missing {path.name} (OpinionQA's wave folder has info.csv, "
                            "metadata.csv and responses.csv)")
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as err:
        raise OpinionsError(f"{path}: not a readable CSV ({err})") from None


def _opinionqa_attributes(columns: Sequence[str], group_fields: Optional[Sequence[str]], where: Path) -> list[str]:
    if group_fields:
        unknown = [g for g in group_fields if g not in OPINIONQA_ATTRIBUTES]
        if unknown:
            raise OpinionsError(f"--group-fields: {unknown} are not OpinionQA attributes; known: "
                                f"{list(OPINIONQA_ATTRIBUTES)}")
        absent = [g for g in group_fields if g not in columns]
        if absent:
            raise OpinionsError(f"{where}: no column {absent} for --group-fields")
        return list(group_fields)
    present = [a for a in OPINIONQA_ATTRIBUTES if a in columns]
    if not present:
        raise OpinionsError(f"{where}: none of OpinionQA's demographic columns {list(OPINIONQA_ATTRIBUTES)}")
    return present


def read_opinionqa(path: PathLike, *, group_fields: Optional[Sequence[str]] = None,
                   merge_groups: Optional[str] = None, min_group_size: int = 1) -> ReadResult:
    if merge_groups:
        raise OpinionsError("--merge-groups applies to the globalopinionqa and opinions-json sources only")
    root = Path(path).expanduser()
    result = ReadResult(source="opinionqa", cells=[], inputs={})
    cells = _Cells(result)
    refusal: dict[str, float] = {}
    waves_info = {}
    for wave, folder in _wave_dirs(root):
        info_path, resp_path, meta_path = folder / "info.csv", folder / "responses.csv", folder / "metadata.csv"
        info = _read_csv(info_path)
        missing = [c for c in INFO_COLUMNS if c not in info.columns]
        if missing:
            raise OpinionsError(f"{info_path}: missing columns {missing}; expected {list(INFO_COLUMNS)}")
        resp = _read_csv(resp_path)
        result.inputs[f"{folder.name}/info.csv"] = info_path
        result.inputs[f"{folder.name}/responses.csv"] = resp_path
        if meta_path.is_file():
            result.inputs[f"{folder.name}/metadata.csv"] = meta_path
        wcol = f"WEIGHT_W{wave}"
        if wcol not in resp.columns:
            raise OpinionsError(f"{resp_path}: no survey-weight column {wcol!r}")
        weights = np.zeros(len(resp))
        ok = np.zeros(len(resp), dtype=bool)
        for i, w in enumerate(resp[wcol].tolist()):
            try:
                fw = float(w)
            except ValueError:
                continue
            if math.isfinite(fw) and fw > 0:
                weights[i], ok[i] = fw, True
        if (~ok).any():
            result.skip("respondent_missing_weight", f"{resp_path} ({int((~ok).sum())} rows)", n=int((~ok).sum()))
        attrs = _opinionqa_attributes(list(resp.columns), group_fields, resp_path)
        # each attribute's groups: normalised value -> row mask
        group_rows: list[tuple[str, str, Profile, np.ndarray]] = []
        for attr in attrs:
            values = resp[attr].tolist()
            labels: dict[str, list[int]] = {}
            for i, v in enumerate(values):
                labels.setdefault(v, []).append(i)
            for raw, idx in sorted(labels.items()):
                profile = _profile_of(OPINIONQA_ATTRIBUTES[attr], raw)
                if profile.is_empty():
                    continue  # a missing-value code ("Refused", empty): in no group of this attribute
                mask = np.zeros(len(resp), dtype=bool)
                mask[idx] = True
                group_rows.append((attr, raw, profile, mask & ok))
        asked = 0
        for r, row in enumerate(info.to_dict("records"), 2):
            where = f"{info_path}:{r}"
            key = str(row["key"]).strip()
            if not key:
                raise OpinionsError(f"{where}: field 'key' is empty")
            if key not in resp.columns:
                result.skip("question_not_in_responses", f"{where} ({key})")
                continue
            refs = _options(row["references"], where, "references")
            ords = _literal(str(row["option_ordinal"]).strip(), where, "option_ordinal",
                            "a Python-literal list of numbers")
            if not isinstance(ords, (list, tuple)) or len(ords) != len(refs) or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in ords):
                raise OpinionsError(f"{where}: field 'option_ordinal' must list {len(refs)} numbers (one per "
                                    f"reference option), got {row['option_ordinal']!r}")
            question = " ".join(str(row["question"]).split())
            if not question:
                raise OpinionsError(f"{where}: field 'question' is empty")
            keep = [j for j, o in enumerate(refs) if o.lower() != OPINIONQA_REFUSED]
            if not keep:
                raise OpinionsError(f"{where}: every option of {key} is a refusal")
            options = [refs[j] for j in keep]
            option_values = [float(ords[j]) for j in keep]
            # answer code per respondent: option position, -1 not asked, -2 refused, -3 not an option
            lookup = {o.lower(): j for j, o in enumerate(refs)}
            by_value = {float(v): j for j, v in enumerate(ords)}
            pos_of = {j: p for p, j in enumerate(keep)}
            codes = np.full(len(resp), -1, dtype=np.int64)
            for i, a in enumerate(resp[key].tolist()):
                a = " ".join(str(a).split())
                if not a or a.lower() in ("nan", "none"):
                    continue
                j = lookup.get(a.lower())
                if j is None:
                    try:
                        j = by_value.get(float(a))
                    except ValueError:
                        j = None
                if j is None:
                    codes[i] = -3
                elif j in pos_of:
                    codes[i] = pos_of[j]
                else:
                    codes[i] = -2
            bad = int(((codes == -3) & ok).sum())
            if bad:
                result.skip("answer_not_an_option", f"{resp_path} column {key} ({bad} answers)", n=bad)
            answered = ok & (codes != -1) & (codes != -3)
            if answered.any():
                asked += 1
                refusal[f"W{wave}:{key}"] = float(weights[answered & (codes == -2)].sum() / weights[answered].sum())
            for attr, raw, profile, mask in group_rows:
                sel = mask & (codes >= 0)
                n = int(sel.sum())
                if n == 0:
                    continue
                if n < min_group_size:
                    result.skip("group_too_small", f"{key} {attr}={raw} ({n} respondents)")
                    continue
                counts = np.bincount(codes[sel], weights=weights[sel], minlength=len(options))
                target, cause = check_distribution((counts / counts.sum()).tolist(), len(options))
                if cause:
                    result.skip(cause, f"{key} {attr}={raw}")
                    continue
                cells.add(_cell(profile=profile, question_id=key, question=question, options=options,
                                ordinal=True, option_values=option_values, target=target,
                                weight=float(weights[sel].sum()), source="opinionqa",
                                source_ids={"wave": wave, "key": key, "attribute": attr, "value": raw,
                                            "respondents": n}), f"{where} {attr}={raw}")
        waves_info[folder.name] = {"questions": int(len(info)), "questions_answered": asked,
                                   "respondents": int(len(resp)), "respondents_with_weight": int(ok.sum()),
                                   "attributes": attrs}
    rates = list(refusal.values())
    result.details = {
        "waves": waves_info,
        "refusal_rate": {"mean": float(np.mean(rates)) if rates else 0.0,
                         "max": float(np.max(rates)) if rates else 0.0,
                         "by_question": {k: round(v, 6) for k, v in sorted(refusal.items())}},
    }
    return result


# --------------------------------------------------------------------------------------------- WVB / synthetic


def read_wvb_groups(path: PathLike, *, group_fields: Optional[Sequence[str]] = None,
                    merge_groups: Optional[str] = None, min_group_size: int = 1) -> ReadResult:
    """Group the respondents of a WVB-layout folder (all three participant splits) by ``group_fields``."""
    from .wvb import load_wvb

    if merge_groups:
        raise OpinionsError("--merge-groups applies to the globalopinionqa and opinions-json sources only")
    fields = list(group_fields or ["country"])
    unknown = [f for f in fields if f not in PROFILE_FIELDS]
    if unknown:
        raise OpinionsError(f"--group-fields: {unknown} are not profile fields; known: {list(PROFILE_FIELDS)}")
    data = load_wvb(path)
    result = ReadResult(source="wvb", cells=[], inputs=dict(data.input_files()))
    cells = _Cells(result)
    # one group index per respondent over the concatenated splits (-1: a grouping field is missing)
    profiles: list[Profile] = []
    index: dict[Profile, int] = {}
    rows = []
    answers = []
    for split in ("train", "valid", "test"):
        part = data.splits.get(split)
        if part is None:
            continue
        for prof in part.profiles:
            values = {f: getattr(prof, f) for f in fields}
            if any(v is None for v in values.values()):
                rows.append(-1)
                continue
            g = Profile(**values)
            rows.append(index.setdefault(g, len(index)))
            if len(index) > len(profiles):
                profiles.append(g)
        answers.append(np.where(part.valid, part.answers, -10**9))
    group_of = np.asarray(rows, dtype=np.int64)
    missing_group = int((group_of < 0).sum())
    if missing_group:
        result.skip("respondent_missing_group_field", f"{missing_group} respondents lack one of {fields}",
                    n=missing_group)
    table = np.concatenate(answers, axis=0) if answers else np.zeros((0, len(data.questions)), dtype=np.int64)
    G = len(profiles)
    for j, q in enumerate(data.questions):
        col = table[:, j]
        pos = {v: k for k, v in enumerate(q.option_values)}
        codes = np.array([pos.get(int(v), -1) for v in col], dtype=np.int64)
        sel = (codes >= 0) & (group_of >= 0)
        K = len(q.options)
        counts = np.bincount(group_of[sel] * K + codes[sel], minlength=G * K).reshape(G, K)
        for g in range(G):
            n = int(counts[g].sum())
            if n == 0:
                continue
            if n < min_group_size:
                result.skip("group_too_small", f"{q.id} {group_id_of(profiles[g])} ({n} respondents)")
                continue
            target, cause = check_distribution((counts[g] / n).tolist(), K)
            if cause:
                result.skip(cause, f"{q.id} {group_id_of(profiles[g])}")
                continue
            cells.add(_cell(profile=profiles[g], question_id=q.id, question=q.text, options=list(q.options),
                            ordinal=bool(q.ordinal), option_values=[float(v) for v in q.option_values],
                            target=target, weight=float(n), source="wvb",
                            source_ids={"question_id": q.id, "respondents": n}), f"{q.id} {group_id_of(profiles[g])}")
    truth = Path(path).expanduser() / "truth.json"
    if truth.is_file():
        result.inputs["truth.json"] = truth
    result.details = {"respondents": int(len(group_of)), "groups": G, "group_fields": fields,
                      "questions": len(data.questions)}
    return result


_READERS = {
    "globalopinionqa": read_globalopinionqa,
    "opinions-json": read_opinions_json,
    "opinionqa": read_opinionqa,
    "wvb": read_wvb_groups,
}


def read_source(source: str, path: PathLike, *, group_fields: Optional[Sequence[str]] = None,
                min_group_size: int = 1, merge_groups: Optional[str] = None) -> ReadResult:
    """Read ``path`` with the reader of ``source`` (one of :data:`cuma.data.opinions.SOURCES`)."""
    if source not in _READERS:
        raise OpinionsError(f"--source must be one of {list(SOURCES)}, got {source!r}")
    if isinstance(min_group_size, bool) or not isinstance(min_group_size, int) or min_group_size < 1:
        raise OpinionsError(f"--min-group-size must be a positive integer, got {min_group_size!r}")
    if min_group_size > 1 and source in ("globalopinionqa", "opinions-json"):
        raise OpinionsError(f"--min-group-size: source {source} has no respondent counts per cell; it applies to wvb "
                            "and opinionqa")
    if not Path(path).expanduser().exists():
        raise FileNotFoundError(f"--input {str(path)!r} does not exist")
    return _READERS[source](path, group_fields=group_fields, merge_groups=merge_groups, min_group_size=min_group_size)


def prepare_opinions(
    source: str,
    input_path: PathLike,
    out: PathLike,
    *,
    split: str = "cell",
    seed: int = 0,
    test_fraction: float = 0.2,
    valid_fraction: float = 0.1,
    holdout_groups: Union[None, str, Sequence[str]] = None,
    group_fields: Optional[Sequence[str]] = None,
    min_group_size: int = 1,
    merge_groups: Optional[str] = None,
    encoder: Any = "default",
    encoder_device: Optional[str] = "auto",
    overwrite: bool = False,
    command: Optional[Sequence[str]] = None,
) -> dict[str, Any]:
    """Read ``input_path`` in the layout of ``source``, split its cells and write the prepared opinions folder ``out``
    (``cuma data opinions``). Returns the manifest."""
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise OpinionsError(f"--seed must be a non-negative integer, got {seed!r}")
    names = read_holdout_names(holdout_groups)
    result = read_source(source, input_path, group_fields=group_fields, min_group_size=min_group_size,
                         merge_groups=merge_groups)
    if not result.cells:
        raise OpinionsError(f"{input_path}: no usable cell was read (skipped: {dict(result.skipped)})")
    info = assign_splits(result.cells, split, seed=seed, test_fraction=test_fraction, valid_fraction=valid_fraction,
                         holdout_groups=names, skipped=result.skipped)
    options = {"source": source, "input": str(Path(input_path).resolve()), "split": split, "seed": seed,
               "test_fraction": test_fraction, "valid_fraction": valid_fraction, "holdout_groups": names,
               "group_fields": list(group_fields) if group_fields else None, "min_group_size": min_group_size,
               "merge_groups": merge_groups,
               "encoder": None if encoder is None else (encoder if isinstance(encoder, str) else "object")}
    return write_opinions(out, result, info, encoder=encoder, encoder_device=encoder_device, overwrite=overwrite,
                          options=options, command=command)
