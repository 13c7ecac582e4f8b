"""Distributional metrics and reference rows for opinion cells (``cuma eval opinions``, ``cuma bench opinions``).

Per cell, a predicted option distribution ``p`` against the target ``t`` (both over the cell's K options):

- ``js_distance``: Jensen-Shannon *distance* with base-2 logarithms, ``sqrt((KL(p||m) + KL(t||m)) / 2)``,
  ``m = (p + t) / 2`` (``scipy.spatial.distance.jensenshannon(p, t, base=2)``; in [0, 1]); ``similarity`` = 1 - it,
  the figure Durmus et al. (2023) report;
- ``total_variation``: ``0.5 * sum |p - t|`` (Meister et al.'s leaderboard);
- ``w1_ordinal``: on ordinal questions only, the 1-D Wasserstein distance on the option order normalised by
  ``K - 1``, ``sum_{k<K} |P_k - T_k| / (K - 1)`` over the cumulative sums (Santurkar et al.'s representativeness is
  1 - its mean);
- ``argmax_agreement``: the two distributions' most likely options agree (first on ties).

Reference rows need no LM and are scored on the same cells:

- ``uniform``: 1/K on every option;
- ``population_average``: the mean of the training groups' targets on the same question (what a mean-collapsed
  model gives);
- ``nearest_groups``: the mean target on the same question of the k training groups nearest to the cell's group --
  by their answers (mean JS distance over the training questions both answered) for a group with training cells, and
  by the cosine of the profile embeddings for a held-out group, which has no training answers to compare (using its
  test answers would leak the targets).

A reference that has no training cell on a cell's question (e.g. under the by-question split) does not cover that
cell; its ``cells`` count says on how many it was scored.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np

__all__ = [
    "METRICS",
    "REFERENCES",
    "argmax_agreement",
    "cell_metrics",
    "js_distance",
    "nearest_groups",
    "population_average",
    "reference_predictions",
    "summarise",
    "total_variation",
    "uniform",
    "w1_ordinal",
]

METRICS = ("js_distance", "similarity", "total_variation", "w1_ordinal", "argmax_agreement")
REFERENCES = ("uniform", "population_average", "nearest_groups")


def _pair(p: Sequence[float], q: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(p, dtype=np.float64)
    b = np.asarray(q, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape or a.size == 0:
        raise ValueError(f"two distributions over the same options are needed, got shapes {a.shape} and {b.shape}")
    if (a < 0).any() or (b < 0).any() or a.sum() <= 0 or b.sum() <= 0:
        raise ValueError("distributions must be non-negative with positive mass")
    return a / a.sum(), b / b.sum()


def js_distance(p: Sequence[float], q: Sequence[float], base: float = 2.0) -> float:
    """Jensen-Shannon distance (scipy's ``jensenshannon(p, q, base)`` semantics: inputs normalised, 0 log 0 = 0)."""
    a, b = _pair(p, q)
    m = (a + b) / 2.0

    def kl(x):
        keep = x > 0
        return float(np.sum(x[keep] * np.log(x[keep] / m[keep])))

    value = (kl(a) + kl(b)) / 2.0 / math.log(base)
    return math.sqrt(max(value, 0.0))


def total_variation(p: Sequence[float], q: Sequence[float]) -> float:
    a, b = _pair(p, q)
    return float(0.5 * np.abs(a - b).sum())


def w1_ordinal(p: Sequence[float], q: Sequence[float]) -> float:
    """W1 on the option positions 0..K-1, divided by K - 1 (in [0, 1])."""
    a, b = _pair(p, q)
    if a.size < 2:
        return 0.0
    return float(np.abs(np.cumsum(a) - np.cumsum(b))[:-1].sum() / (a.size - 1))


def argmax_agreement(p: Sequence[float], q: Sequence[float]) -> bool:
    a, b = _pair(p, q)
    return int(np.argmax(a)) == int(np.argmax(b))


def cell_metrics(pred: Sequence[float], target: Sequence[float], ordinal: bool) -> dict[str, Any]:
    """Every metric of one cell; ``w1_ordinal`` is None on a non-ordinal question."""
    js = js_distance(pred, target)
    return {"js_distance": js, "similarity": 1.0 - js, "total_variation": total_variation(pred, target),
            "w1_ordinal": w1_ordinal(pred, target) if ordinal else None,
            "argmax_agreement": argmax_agreement(pred, target)}


def mean_metrics(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Means over cells (``w1_ordinal`` over the ordinal cells; None when there are none), with the cell counts."""
    out: dict[str, Any] = {"cells": len(rows)}
    for name in METRICS:
        values = [float(r[name]) for r in rows if r.get(name) is not None]
        out[name] = float(np.mean(values)) if values else None
    out["ordinal_cells"] = sum(1 for r in rows if r.get("w1_ordinal") is not None)
    return out


# ------------------------------------------------------------------------------------------------- references


def uniform(cell: Mapping[str, Any]) -> list[float]:
    k = len(cell["target"])
    return [1.0 / k] * k


def _by_question(train: Sequence[Mapping[str, Any]]) -> dict[tuple, dict[str, np.ndarray]]:
    """(question_id, n_options) -> {group_id: target} of the training cells."""
    table: dict[tuple, dict[str, np.ndarray]] = defaultdict(dict)
    for c in train:
        table[(c["question_id"], len(c["target"]))][c["group_id"]] = np.asarray(c["target"], dtype=np.float64)
    return table


def population_average(train: Sequence[Mapping[str, Any]]):
    """``predict(cell)``: the mean of the training groups' targets on the cell's question (None when no training
    group answered it with the same options)."""
    table = _by_question(train)
    means = {key: np.mean(list(groups.values()), axis=0) for key, groups in table.items()}

    def predict(cell: Mapping[str, Any]) -> Optional[list[float]]:
        m = means.get((cell["question_id"], len(cell["target"])))
        return None if m is None else m.tolist()

    return predict


def nearest_groups(train: Sequence[Mapping[str, Any]], k: int = 5, profile_embeds=None,
                   group_index: Optional[Mapping[str, int]] = None):
    """``predict(cell)``: the mean target on the cell's question of the ``k`` training groups nearest to the cell's
    group among those that answered it (see the module docstring for the two distances). A held-out group without
    ``profile_embeds`` gets None (not covered)."""
    if k < 1:
        raise ValueError(f"nearest_groups: k must be >= 1, got {k}")
    table = _by_question(train)
    answers: dict[str, dict[tuple, np.ndarray]] = defaultdict(dict)
    for key, groups in table.items():
        for g, t in groups.items():
            answers[g][key] = t
    emb = None
    if profile_embeds is not None and group_index is not None:
        e = np.asarray(profile_embeds.float().cpu().numpy() if hasattr(profile_embeds, "cpu") else profile_embeds,
                       dtype=np.float64)
        emb = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    cache: dict[str, list[tuple[float, str]]] = {}

    def ranking(group: str) -> list[tuple[float, str]]:
        if group in cache:
            return cache[group]
        mine = answers.get(group)
        order: list[tuple[float, str]] = []
        if mine:  # by answers on the training questions both groups answered
            for other, theirs in answers.items():
                if other == group:
                    continue
                shared = [q for q in mine if q in theirs]
                if shared:
                    order.append((float(np.mean([js_distance(mine[q], theirs[q]) for q in shared])), other))
        elif emb is not None and group in group_index:  # a held-out group: by its profile embedding
            me = emb[group_index[group]]
            for other in answers:
                if other in group_index:
                    order.append((float(1.0 - emb[group_index[other]] @ me), other))
        order.sort()
        cache[group] = order
        return order

    def predict(cell: Mapping[str, Any]) -> Optional[list[float]]:
        groups = table.get((cell["question_id"], len(cell["target"])))
        if not groups:
            return None
        chosen = [g for _, g in ranking(cell["group_id"]) if g in groups][:k]
        if not chosen:
            return None
        return np.mean([groups[g] for g in chosen], axis=0).tolist()

    return predict


def reference_predictions(cells: Sequence[Mapping[str, Any]], train: Sequence[Mapping[str, Any]], *, k: int = 5,
                          profile_embeds=None, group_index=None) -> dict[str, list[Optional[list[float]]]]:
    """Each reference's prediction for every cell (None where it does not cover the cell)."""
    makers = {"uniform": lambda: uniform, "population_average": lambda: population_average(train),
              "nearest_groups": lambda: nearest_groups(train, k, profile_embeds, group_index)}
    return {name: [make(c) for c in cells] for name, make in ((n, m()) for n, m in makers.items())}


# ------------------------------------------------------------------------------------------------- summaries


def summarise(rows: Sequence[Mapping[str, Any]], reference_rows: Mapping[str, Sequence[Optional[Mapping]]]) -> dict:
    """``summary.json``'s body: for ``overall``, ``seen`` and ``held_out`` cells the model's mean metrics with a
    ``references`` object (the same keys, each reference on the cells it covers), then ``per_group`` and
    ``per_source`` (model and references side by side). ``rows[i]`` holds ``group_id``, ``source``, ``held_out`` and
    the model's metrics of cell i; ``reference_rows[name][i]`` that reference's metrics of cell i or None."""

    def block(idx: list[int]) -> dict:
        out = mean_metrics([rows[i] for i in idx])
        out["references"] = {name: mean_metrics([refs[i] for i in idx if refs[i] is not None])
                             for name, refs in reference_rows.items()}
        return out

    every = list(range(len(rows)))
    summary = {
        "overall": block(every),
        "seen": block([i for i in every if not rows[i]["held_out"]]),
        "held_out": block([i for i in every if rows[i]["held_out"]]),
    }
    for key, field in (("per_group", "group_id"), ("per_source", "source")):
        groups: dict[str, list[int]] = defaultdict(list)
        for i in every:
            groups[str(rows[i].get(field) or "")].append(i)
        summary[key] = {name: {**block(idx), "held_out": bool(rows[idx[0]]["held_out"])} if key == "per_group"
                        else block(idx) for name, idx in sorted(groups.items())}
    return summary
