"""Evaluation outputs: ``predictions.tsv`` and ``summary.json``, written atomically (temp file + ``os.replace``).

``predictions.tsv`` has one row per scored pair: ``id``, ``question_id``, ``participant_id``, one column per
profile field (``PROFILE_FIELDS`` order, only the fields that occur), ``held_out``, ``gold_letter``,
``gold_value``, ``pred_letter``, ``pred_value``, ``correct``, ``entropy`` (normalised entropy of the
distribution) and ``distribution`` (JSON object ``{"A": p_A, "B": p_B, ...}``). Plain TSV without quoting (a tab
or line break inside a value is written as a space), so any TSV reader splits it on tabs.

``summary.json`` holds ``metrics`` (:func:`cuma.evaluate.choice.compute_metrics`), ``counts`` (pairs, questions,
participants, profiles, dropped records with reasons) and ``run`` (resolved config, seed, package versions, sha256
of the data files, model / adapter paths), see :func:`build_summary`.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from typing import Any, Iterable, Mapping, Optional, Sequence

from .. import runinfo
from ..runinfo import atomic_write_text, sha256_file
from .choice import normalized_entropy

__all__ = [
    "PREDICTION_COLUMNS",
    "atomic_write_json",
    "atomic_write_text",
    "build_summary",
    "package_versions",
    "predictions_tsv",
    "read_predictions_tsv",
    "sha256_file",
    "write_predictions_tsv",
]

PREDICTION_COLUMNS = (
    "id",
    "question_id",
    "participant_id",
    "<profile fields>",
    "held_out",
    "gold_letter",
    "gold_value",
    "pred_letter",
    "pred_value",
    "correct",
    "entropy",
    "distribution",
)
_PACKAGES = ("cuma", "torch", "transformers", "peft", "trl", "tokenizers", "safetensors", "numpy", "accelerate")


def _finite(obj: Any) -> Any:
    """NaN / inf -> None (strict JSON has no NaN)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def atomic_write_json(path: str | os.PathLike, obj: Any) -> str:
    """:func:`cuma.runinfo.atomic_write_json` of ``obj`` (indented; NaN written as null, numpy scalars as numbers)."""
    return runinfo.atomic_write_json(path, _finite(obj))


# ----------------------------------------------------------------------------------------------- predictions


def _profile_fields(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    from ..profiles import PROFILE_FIELDS

    present = {k for r in rows for k, v in (r.get("profile") or {}).items() if v is not None}
    fields = [f for f in PROFILE_FIELDS if f in present]
    extras = sorted(k for k in present if k not in PROFILE_FIELDS)
    return fields + extras


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, ensure_ascii=False)
    return str(value)


def _clean(text: str) -> str:
    # plain TSV without quoting: a tab or line break inside a value becomes a space
    return text.replace("\t", " ").replace("\r", " ").replace("\n", " ")


def predictions_tsv(rows: Sequence[Mapping[str, Any]], digits: int = 8) -> str:
    """The text of ``predictions.tsv`` for prediction dicts (:func:`cuma.evaluate.scoring.score_records`)."""
    fields = _profile_fields(rows)
    header = ["id", "question_id", "participant_id", *fields, "held_out", "gold_letter", "gold_value",
              "pred_letter", "pred_value", "correct", "entropy", "distribution"]
    lines = ["\t".join(header)]
    for r in rows:
        prof = r.get("profile") or {}
        dist = {letter: round(float(p), digits) for letter, p in zip(r["letters"], r["probs"])}
        lines.append(
            "\t".join(
                _clean(c)
                for c in [
                    _cell(r.get("id")),
                    _cell(r.get("question_id")),
                    _cell(r.get("participant_id")),
                    *(_cell(prof.get(f)) for f in fields),
                    _cell(bool(r.get("held_out", False))),
                    _cell(r.get("gold_letter")),
                    _cell(r.get("gold_value")),
                    _cell(r.get("pred_letter")),
                    _cell(r.get("pred_value")),
                    _cell(r.get("pred_letter") == r.get("gold_letter")),
                    f"{normalized_entropy(r['probs']):.6f}",
                    json.dumps(dist, ensure_ascii=False),
                ]
            )
        )
    return "\n".join(lines) + "\n"


def write_predictions_tsv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> str:
    """Write ``predictions.tsv`` atomically; returns the path."""
    return atomic_write_text(path, predictions_tsv(rows))


def read_predictions_tsv(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read ``predictions.tsv`` back: strings per column, ``distribution`` parsed to ``{letter: p}``."""
    with open(path, encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    for r in rows:
        r["distribution"] = json.loads(r["distribution"])
    return rows


# ----------------------------------------------------------------------------------------------- summary


def package_versions(packages: Iterable[str] = _PACKAGES) -> dict[str, Optional[str]]:
    """Installed versions of the packages that decide a result (None when not installed), plus Python's."""
    return runinfo.package_versions(packages, python=True)


def build_summary(
    metrics: Mapping[str, Any],
    *,
    counts: Mapping[str, Any],
    config: Mapping[str, Any],
    data_files: Iterable[str | os.PathLike] = (),
    seed: Optional[int] = None,
    model: Optional[Mapping[str, Any]] = None,
    method: Optional[Mapping[str, Any]] = None,
    timing: Optional[Mapping[str, Any]] = None,
    notes: Sequence[str] = (),
) -> dict[str, Any]:
    """The ``summary.json`` object.

    ``counts``: pairs / questions / participants / profiles scored and ``dropped`` ({reason: count});
    ``config``: the resolved evaluation config; ``data_files``: files read (their sha256 is recorded);
    ``model``: where the base model and adapter came from; ``method``: the method's record.
    """
    files = {}
    for f in data_files:
        f = os.fspath(f)
        if os.path.isfile(f):
            files[os.path.abspath(f)] = sha256_file(f)
    return {
        "task": "wvb",
        "metrics": dict(metrics),
        "counts": dict(counts),
        "run": {
            "config": dict(config),
            "seed": seed,
            "model": dict(model or {}),
            "method": dict(method or {}),
            "data_sha256": files,
            "packages": package_versions(),
            "argv": list(sys.argv),
            "timing": dict(timing or {}),
            "notes": list(notes),
        },
    }
