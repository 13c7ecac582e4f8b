"""Export a synthetic population (``cuma data synth``) as opinion distributions with known truth, in the published
layouts the readers of :mod:`cuma.data.opinion_readers` take, so every reader and the whole pipeline can be checked
against known answers (``cuma data synth ... --export-opinions DIR``)::

    DIR/globalopinionqa.csv      GlobalOpinionQA's CSV: one row per question, selections = the true distribution of
                                 every country (defaultdict repr), options = Python-literal list, source "SYN"
    DIR/opinions.json            the distributional JSON layout: one object per (question, country), the question
                                 with embedded "Question:", lettered options and "Answer:"
    DIR/opinionqa/American_Trends_Panel_W1/{info.csv,metadata.csv,responses.csv}
                                 OpinionQA's wave layout: one row per respondent with the population's sampled answers,
                                 a seeded survey weight WEIGHT_W1, a seeded share of answers written "Refused", and the
                                 demographic columns CREGION (the synthetic country), AGE, SEX, EDUCATION, MARITAL,
                                 RELIG, RACE
    DIR/truth_groups.json        per layout, the question id the reader gives -> group id -> true distribution
    DIR/manifest.json            counts, seed, sha256 of every file

A group's true distribution is the mean, over the group's respondents (all splits), of ``truth.json``'s true
distribution of each respondent's profile: the answer distribution of a random member of the group. For layouts a and
b the exported numbers *are* that truth (a reader must recover them to float precision); layout c holds sampled
answers, so its weighted group distributions approach the truth with the group sizes.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any, Union

import numpy as np

from ..runinfo import atomic_directory, atomic_write_json, package_versions, sha256_file
from .opinion_readers import OPINIONQA_ATTRIBUTES, question_id_for
from .opinions import group_id_of

__all__ = ["OPINIONQA_FROM_PROFILE", "export_synthetic_opinions"]

PathLike = Union[str, os.PathLike]

# profile field -> the OpinionQA column it is written to (the synthetic country goes into CREGION)
OPINIONQA_FROM_PROFILE: dict[str, str] = {
    "country": "CREGION",
    "age_group": "AGE",
    "gender": "SEX",
    "education": "EDUCATION",
    "marital_status": "MARITAL",
    "religion": "RELIG",
    "ethnicity": "RACE",
}
WAVE = 1


def _csv_text(header, rows) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def _lettered(question: str, options) -> str:
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    lines = [f"Question: {question}", "Options:"] + [f"{letters[i]}. {o}" for i, o in enumerate(options)]
    return "\n".join(lines) + "\nAnswer:"


def export_synthetic_opinions(synth_dir: PathLike, out: PathLike, *, seed: int = 0, refusal_rate: float = 0.03,
                              overwrite: bool = False) -> dict[str, Any]:
    """Write the layouts of the module docstring for the population in ``synth_dir`` (written by
    :func:`cuma.data.synthetic.write_synthetic`) to ``out``, atomically. Returns the manifest."""
    from ..profiles import Profile
    from .synthetic import load_truth
    from .wvb import load_wvb

    if not 0.0 <= refusal_rate < 1.0:
        raise ValueError(f"refusal_rate must be in [0, 1), got {refusal_rate!r}")
    synth_dir = Path(synth_dir).expanduser()
    truth = load_truth(synth_dir)
    data = load_wvb(synth_dir)
    profiles, answers, valid = [], [], []
    for split in ("train", "valid", "test"):
        part = data.splits[split]
        profiles += part.profiles
        answers.append(part.answers)
        valid.append(part.valid)
    A = np.concatenate(answers)
    V = np.concatenate(valid)
    texts = [p.to_text() for p in profiles]
    rng = np.random.default_rng([seed, 31])

    def group_truth(members: np.ndarray, qid: str) -> list[float]:
        rows = np.asarray([truth["profiles"][texts[i]]["distributions"][qid] for i in members], dtype=float)
        mean = rows.mean(axis=0)
        return (mean / mean.sum()).tolist()

    # ---- countries: layouts a and b
    countries: dict[str, list[int]] = {}
    for i, p in enumerate(profiles):
        if p.country is not None:
            countries.setdefault(p.country, []).append(i)
    country_gid = {c: group_id_of(Profile(country=c)) for c in countries}
    truth_a: dict[str, dict[str, list[float]]] = {}
    truth_b: dict[str, dict[str, list[float]]] = {}
    goqa_rows = []
    json_items = []
    for q in data.questions:
        options = list(q.options)
        dists = {c: group_truth(np.asarray(m), q.id) for c, m in sorted(countries.items())}
        selections = "defaultdict(<class 'list'>, " + repr({c: d for c, d in dists.items()}) + ")"
        goqa_rows.append([q.text, selections, repr(options), "SYN"])
        truth_a[question_id_for("goqa", q.text, options)] = {country_gid[c]: d for c, d in dists.items()}
        truth_b[question_id_for("json", q.text, options)] = {country_gid[c]: d for c, d in dists.items()}
        for c, d in dists.items():
            json_items.append({"question": _lettered(q.text, options), "options": options, "attribute": c,
                               "gold_distribution": d, "id": f"{q.id}-{c}"})

    # ---- OpinionQA wave: sampled answers, weights, refusals; truth per attribute group
    weights = rng.uniform(0.5, 2.0, size=len(profiles))
    refused = rng.random(A.shape) < refusal_rate
    attr_cols = list(OPINIONQA_FROM_PROFILE.values())
    header = ["QKEY"] + [f"{q.id}_W{WAVE}" for q in data.questions] + attr_cols + [f"WEIGHT_W{WAVE}"]
    resp_rows = []
    for i, p in enumerate(profiles):
        row = [str(i + 1)]
        for j, q in enumerate(data.questions):
            if not V[i, j]:
                row.append("")
            elif refused[i, j]:
                row.append("Refused")
            else:
                row.append(q.label_of(int(A[i, j])))
        row += [getattr(p, f) or "" for f in OPINIONQA_FROM_PROFILE]
        row.append(repr(float(weights[i])))
        resp_rows.append(row)
    info_rows, meta_rows = [], []
    truth_c: dict[str, dict[str, list[float]]] = {}
    for q in data.questions:
        key = f"{q.id}_W{WAVE}"
        refs = list(q.options) + ["Refused"]
        ords = [float(v) for v in q.option_values] + [99.0]
        info_rows.append([key, q.text, repr(refs), repr(ords)])
        meta_rows.append([key, repr(refs)])
        per_group = {}
        for field, col in OPINIONQA_FROM_PROFILE.items():
            values: dict[str, list[int]] = {}
            for i, p in enumerate(profiles):
                v = getattr(p, field)
                if v is not None:
                    values.setdefault(v, []).append(i)
            for v, members in values.items():
                prof = Profile.from_mapping({"v": v}, {"v": OPINIONQA_ATTRIBUTES[col]})
                per_group[group_id_of(prof)] = group_truth(np.asarray(members), q.id)
        truth_c[key] = per_group

    with atomic_directory(out, overwrite=overwrite) as tmp:
        (tmp / "globalopinionqa.csv").write_text(
            _csv_text(["question", "selections", "options", "source"], goqa_rows), encoding="utf-8")
        (tmp / "opinions.json").write_text(json.dumps(json_items, indent=1) + "\n", encoding="utf-8")
        wave = tmp / "opinionqa" / f"American_Trends_Panel_W{WAVE}"
        wave.mkdir(parents=True)
        (wave / "info.csv").write_text(_csv_text(["key", "question", "references", "option_ordinal"], info_rows),
                                       encoding="utf-8")
        (wave / "metadata.csv").write_text(_csv_text(["key", "options"], meta_rows), encoding="utf-8")
        (wave / "responses.csv").write_text(_csv_text(header, resp_rows), encoding="utf-8")
        truth_groups = {
            "note": "group true distribution = mean over the group's respondents of truth.json's profile distribution",
            "globalopinionqa": truth_a,
            "opinions-json": truth_b,
            "opinionqa": truth_c,
        }
        (tmp / "truth_groups.json").write_text(json.dumps(truth_groups) + "\n", encoding="utf-8")
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {
            "format": "cuma-synthetic-opinions",
            "synthetic": str(synth_dir.resolve()),
            "synthetic_truth_sha256": sha256_file(synth_dir / "truth.json"),
            "seed": seed,
            "refusal_rate": refusal_rate,
            "counts": {"questions": len(data.questions), "countries": len(countries),
                       "respondents": len(profiles), "json_items": len(json_items),
                       "refused_answers": int((refused & V).sum())},
            "files": {str(p.relative_to(tmp)): sha256_file(p) for p in files},
            "versions": package_versions(("cuma", "numpy")),
        }
        atomic_write_json(tmp / "manifest.json", manifest)
    return manifest
