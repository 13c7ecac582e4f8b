"""Metrics for multiple-choice survey questions (WorldValuesBench and the synthetic population).

Every function is pure numpy over plain arrays / lists; nothing here touches a model. Conventions:

- A *pair* is one (participant, question) answer. ``gold`` / ``pred`` are option indices (0-based, scale order) or
  letters; ``values`` are the numeric answer values on the question's scale (``option_values`` of a record).
- Normalised value of an answer ``x`` on a question with scale ``[lo, hi]``: ``(x - lo) / (hi - lo)`` in ``[0, 1]``.
- Questions whose scale has ``hi == lo`` are skipped by the EMD functions (there is nothing to compare).

:func:`compute_metrics` runs all of them over scored pairs (the dicts :mod:`cuma.evaluate.scoring` returns) and
returns the ``metrics`` block of ``summary.json``. ``docs/evaluation.md`` lists every formula.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Hashable, Iterable, Mapping, Optional, Sequence

import numpy as np

# the 1-D Wasserstein distance lives in the leaf module cuma.metrics (the synthetic population's oracle uses it too);
# re-exported here, where the evaluator's other metrics are
from ..metrics import normalize_values, wasserstein_1d

__all__ = [
    "EMD_THRESHOLDS",
    "MIN_SUBGROUP_SIZE",
    "accuracy",
    "compute_metrics",
    "emd_expected_per_question",
    "emd_per_question",
    "emd_summary",
    "group_accuracy",
    "country_accuracy",
    "macro_f1",
    "macro_f1_per_question",
    "mean_normalized_entropy",
    "normalize_values",
    "normalized_entropy",
    "pooled_macro_f1",
    "sigma_inequity",
    "wasserstein_1d",
    "zero_shot_accuracy",
]

EMD_THRESHOLDS: tuple[float, ...] = (0.1, 0.2, 0.3)
MIN_SUBGROUP_SIZE = 5


# ----------------------------------------------------------------------------------------------------- basics


def accuracy(gold: Sequence[Hashable], pred: Sequence[Hashable]) -> float:
    """Share of pairs whose predicted option equals the gold option.

    ``Acc = (1/n) * sum_i [pred_i == gold_i]``. NaN for zero pairs.
    """
    g = np.asarray(gold, dtype=object)
    p = np.asarray(pred, dtype=object)
    if g.shape != p.shape:
        raise ValueError(f"gold and pred differ in length: {g.shape} vs {p.shape}")
    if g.size == 0:
        return float("nan")
    return float(np.mean(g == p))


def macro_f1(gold: Sequence[Hashable], pred: Sequence[Hashable], labels: Optional[Iterable[Hashable]] = None) -> float:
    """Unweighted mean of the per-label F1 scores.

    For each label ``l`` in ``labels`` (default: every label that occurs in ``gold`` or ``pred``, as scikit-learn
    does): ``F1_l = 2 TP_l / (2 TP_l + FP_l + FN_l)`` (0 when the denominator is 0), and
    ``macro-F1 = (1/|L|) * sum_l F1_l``. NaN for zero pairs.
    """
    g = list(gold)
    p = list(pred)
    if len(g) != len(p):
        raise ValueError(f"gold and pred differ in length: {len(g)} vs {len(p)}")
    if not g:
        return float("nan")
    labs = list(dict.fromkeys(labels)) if labels is not None else sorted(set(g) | set(p), key=_sort_key)
    if not labs:
        return float("nan")
    tp: dict = defaultdict(int)
    fp: dict = defaultdict(int)
    fn: dict = defaultdict(int)
    for a, b in zip(g, p):
        if a == b:
            tp[a] += 1
        else:
            fp[b] += 1
            fn[a] += 1
    scores = []
    for lab in labs:
        denom = 2 * tp[lab] + fp[lab] + fn[lab]
        scores.append(2 * tp[lab] / denom if denom else 0.0)
    return float(np.mean(scores))


def _sort_key(x: Any):
    return (type(x).__name__, x)


def macro_f1_per_question(
    question_ids: Sequence[Hashable], gold: Sequence[Hashable], pred: Sequence[Hashable]
) -> tuple[float, dict[Hashable, float]]:
    """Macro-F1 computed within each question, then averaged over questions (every question weighs the same).

    ``F1_macro = (1/|Q|) * sum_q macro-F1({(gold_i, pred_i) : question_i = q})``; labels of question ``q`` are the
    options that occur among its gold or predicted answers. Returns ``(mean, {question: macro-F1})``.
    """
    groups = _group_indices(question_ids)
    g = list(gold)
    p = list(pred)
    per_q = {q: macro_f1([g[i] for i in idx], [p[i] for i in idx]) for q, idx in groups.items()}
    vals = [v for v in per_q.values() if not math.isnan(v)]
    return (float(np.mean(vals)) if vals else float("nan")), per_q


def pooled_macro_f1(gold: Sequence[Hashable], pred: Sequence[Hashable]) -> float:
    """The authors' variant: one macro-F1 over all pairs of all questions, labels pooled by option letter / index.

    ``F1_pooled = macro-F1(all gold letters, all predicted letters)``: letter "A" of every question is one class,
    and so on (so a question's scale does not define the classes).
    """
    return macro_f1(gold, pred)


def _group_indices(keys: Sequence[Hashable]) -> dict[Hashable, list[int]]:
    out: dict[Hashable, list[int]] = {}
    for i, k in enumerate(keys):
        out.setdefault(k, []).append(i)
    return out


# ------------------------------------------------------------------------------------------------------- EMD


def emd_per_question(
    question_ids: Sequence[Hashable],
    gold_values: Sequence[float],
    pred_values: Sequence[float],
    scale_min: Sequence[float],
    scale_max: Sequence[float],
) -> dict[Hashable, float]:
    """WorldValuesBench EMD of each question, on argmax predictions.

    For question ``q`` with evaluated pairs ``P_q``: ``EMD_q = W1({(g_i - lo_q)/(hi_q - lo_q)}_{i in P_q},
    {(y_i - lo_q)/(hi_q - lo_q)}_{i in P_q})`` where ``g_i`` is the gold answer value, ``y_i`` the value of the
    model's argmax option and ``[lo_q, hi_q]`` the question's scale. Questions with ``hi_q == lo_q`` are left out.
    """
    out: dict[Hashable, float] = {}
    for q, idx in _group_indices(question_ids).items():
        lo, hi = float(scale_min[idx[0]]), float(scale_max[idx[0]])
        if hi == lo:
            continue
        g = normalize_values([gold_values[i] for i in idx], lo, hi)
        p = normalize_values([pred_values[i] for i in idx], lo, hi)
        out[q] = wasserstein_1d(g, p)
    return out


def emd_expected_per_question(
    question_ids: Sequence[Hashable],
    gold_values: Sequence[float],
    option_values: Sequence[Sequence[float]],
    probs: Sequence[Sequence[float]],
    scale_min: Sequence[float],
    scale_max: Sequence[float],
) -> dict[Hashable, float]:
    """EMD of each question between the model's expected answer distribution and the empirical gold distribution.

    For question ``q``: ``m_q = (1/|P_q|) * sum_{i in P_q} p_i`` (the model's full option distributions averaged over
    the evaluated participants, each ``p_i`` placed on the normalised option values of pair ``i``) and
    ``g_q`` = the empirical distribution of the normalised gold values; ``EMDexp_q = W1(m_q, g_q)``.
    """
    out: dict[Hashable, float] = {}
    for q, idx in _group_indices(question_ids).items():
        lo, hi = float(scale_min[idx[0]]), float(scale_max[idx[0]])
        if hi == lo:
            continue
        g = normalize_values([gold_values[i] for i in idx], lo, hi)
        xs = np.concatenate([normalize_values(option_values[i], lo, hi) for i in idx])
        ws = np.concatenate([_as_distribution(probs[i], len(option_values[i])) for i in idx])
        out[q] = wasserstein_1d(xs, g, u_weights=ws)
    return out


def _as_distribution(p: Sequence[float], n: int) -> np.ndarray:
    arr = np.asarray(p, dtype=np.float64).ravel()
    if arr.size != n:
        raise ValueError(f"an option distribution has {arr.size} probabilities for {n} options")
    s = arr.sum()
    if not np.isfinite(s) or s <= 0 or (arr < 0).any():
        raise ValueError(f"not a probability distribution: {arr.tolist()}")
    return arr / s


def emd_summary(emds: Mapping[Hashable, float] | Sequence[float], thresholds: Sequence[float] = EMD_THRESHOLDS) -> dict:
    """Mean and median of per-question EMDs, and the share of questions with ``EMD_q < t`` for each threshold ``t``.

    ``share(t) = |{q : EMD_q < t}| / |Q|``. Values are NaN when there are no questions.
    """
    vals = np.asarray(list(emds.values()) if isinstance(emds, Mapping) else list(emds), dtype=np.float64)
    n = int(vals.size)
    out: dict[str, Any] = {
        "mean": float(vals.mean()) if n else float("nan"),
        "median": float(np.median(vals)) if n else float("nan"),
        "questions": n,
    }
    out["share_below"] = {f"{t:g}": (float(np.mean(vals < t)) if n else float("nan")) for t in thresholds}
    return out


# --------------------------------------------------------------------------------------------------- entropy


def normalized_entropy(p: Sequence[float] | np.ndarray) -> float:
    """Shannon entropy of one option distribution divided by its maximum: ``H(p) / log K``.

    ``H(p) = -sum_j p_j log p_j`` (``0 log 0 = 0``), ``K`` = number of options; 0 = one-hot, 1 = uniform. ``K = 1``
    gives 0.
    """
    arr = _as_distribution(p, len(p))
    k = arr.size
    if k <= 1:
        return 0.0
    nz = arr[arr > 0]
    return float(-(nz * np.log(nz)).sum() / math.log(k))


def mean_normalized_entropy(probs: Iterable[Sequence[float]]) -> float:
    """Mean over pairs of :func:`normalized_entropy` (the mean-collapse diagnostic): ``(1/n) sum_i H(p_i)/log K_i``."""
    vals = [normalized_entropy(p) for p in probs]
    return float(np.mean(vals)) if vals else float("nan")


# ------------------------------------------------------------------------------------------ groups and fairness


def group_accuracy(groups: Sequence[Hashable], correct: Sequence[bool]) -> dict[Hashable, dict[str, float]]:
    """Accuracy per group: ``{group: {"accuracy": mean(correct_i for i in group), "n": |group|}}``.

    Pairs whose group is ``None`` are left out.
    """
    c = np.asarray(correct, dtype=np.float64)
    out: dict[Hashable, dict[str, float]] = {}
    for key, idx in _group_indices(groups).items():
        if key is None:
            continue
        out[key] = {"accuracy": float(c[idx].mean()), "n": len(idx)}
    return dict(sorted(out.items(), key=lambda kv: _sort_key(kv[0])))


def country_accuracy(countries: Sequence[Optional[str]], correct: Sequence[bool]) -> dict[str, Any]:
    """Per-country accuracy and the country macro-accuracy ``(1/|C|) * sum_c Acc_c`` (every country weighs the same).

    Returns ``{"per_country": {country: {"accuracy", "n"}}, "macro_accuracy": float, "countries": |C|}``; pairs
    without a country are left out.
    """
    per = group_accuracy(countries, correct)
    accs = [v["accuracy"] for v in per.values()]
    return {
        "per_country": per,
        "macro_accuracy": float(np.mean(accs)) if accs else float("nan"),
        "countries": len(per),
    }


def sigma_inequity(
    profiles: Sequence[Mapping[str, Any]],
    correct: Sequence[bool],
    fields: Optional[Sequence[str]] = None,
    min_size: int = MIN_SUBGROUP_SIZE,
) -> dict[str, Any]:
    """Spread of accuracy across demographic subgroups, per profile field.

    For field ``f``: subgroups ``S_{f,v}`` = pairs whose profile has value ``v`` for ``f`` (missing values left
    out), kept when ``|S_{f,v}| >= min_size``; ``sigma_f = std_v(Acc(S_{f,v}))`` (population std, ``ddof = 0``),
    defined when at least two subgroups are kept. ``sigma = mean_f sigma_f`` over the fields where it is defined.
    ``fields`` default: every field that occurs in the profiles (sorted).

    Returns ``{"per_field": {f: {"sigma", "subgroups": {v: {"accuracy", "n"}}, "dropped_subgroups": int}},
    "mean": sigma, "fields": number of fields with a defined sigma, "min_subgroup_size": min_size}``
    (``sigma`` is None for fields with fewer than two kept subgroups).
    """
    if len(profiles) != len(correct):
        raise ValueError(f"profiles and correct differ in length: {len(profiles)} vs {len(correct)}")
    if fields is None:
        fields = sorted({k for p in profiles for k, v in (p or {}).items() if k != "extra" and v is not None})
    per_field: dict[str, Any] = {}
    sigmas = []
    for f in fields:
        keys = [(p or {}).get(f) for p in profiles]
        keys = [k if isinstance(k, Hashable) else str(k) for k in keys]
        groups = group_accuracy(keys, correct)
        kept = {k: v for k, v in groups.items() if v["n"] >= min_size}
        sigma = float(np.std([v["accuracy"] for v in kept.values()])) if len(kept) >= 2 else None
        if sigma is not None:
            sigmas.append(sigma)
        per_field[f] = {"sigma": sigma, "subgroups": kept, "dropped_subgroups": len(groups) - len(kept)}
    return {
        "per_field": per_field,
        "mean": float(np.mean(sigmas)) if sigmas else None,
        "fields": len(sigmas),
        "min_subgroup_size": min_size,
    }


def zero_shot_accuracy(correct: Sequence[bool], held_out: Sequence[bool]) -> dict[str, Any]:
    """Sample-weighted accuracy over the pairs of held-out profile groups (the zero-shot protocol).

    ``Acc_zs = sum_{i: held_out_i} [correct_i] / |{i : held_out_i}|`` (pooled over pairs, so larger held-out groups
    weigh more), plus the same over the seen (not held-out) pairs for comparison. ``None`` where there are no pairs.
    """
    c = np.asarray(correct, dtype=bool)
    h = np.asarray(held_out, dtype=bool)
    if c.shape != h.shape:
        raise ValueError(f"correct and held_out differ in length: {c.shape} vs {h.shape}")
    n_h = int(h.sum())
    n_s = int((~h).sum())
    return {
        "accuracy": float(c[h].mean()) if n_h else None,
        "pairs": n_h,
        "seen_accuracy": float(c[~h].mean()) if n_s else None,
        "seen_pairs": n_s,
    }


# ------------------------------------------------------------------------------------------------ everything


def _nan_to_none(x: Any) -> Any:
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    return x


def compute_metrics(
    pairs: Sequence[Mapping[str, Any]],
    thresholds: Sequence[float] = EMD_THRESHOLDS,
    min_subgroup_size: int = MIN_SUBGROUP_SIZE,
    per_question: bool = True,
) -> dict[str, Any]:
    """All metrics over scored pairs (JSON-ready; NaN becomes None).

    Each pair is a mapping with ``question_id``, ``gold_index``, ``pred_index``, ``letters``, ``option_values``,
    ``gold_value``, ``pred_value``, ``probs`` (the option distribution), ``scale_min``, ``scale_max``, ``profile``
    and optionally ``held_out`` and ``ordinal`` -- what :func:`cuma.evaluate.scoring.score_records` returns, or a
    record plus a prediction.
    """
    n = len(pairs)
    qids = [p["question_id"] for p in pairs]
    gold_idx = [int(p["gold_index"]) for p in pairs]
    pred_idx = [int(p["pred_index"]) for p in pairs]
    gold_letters = [p["letters"][g] for p, g in zip(pairs, gold_idx)]
    pred_letters = [p["letters"][k] for p, k in zip(pairs, pred_idx)]
    correct = [g == k for g, k in zip(gold_idx, pred_idx)]
    lo = [p["scale_min"] for p in pairs]
    hi = [p["scale_max"] for p in pairs]
    gold_vals = [p["gold_value"] for p in pairs]
    pred_vals = [p["option_values"][k] for p, k in zip(pairs, pred_idx)]
    opt_vals = [p["option_values"] for p in pairs]
    probs = [p["probs"] for p in pairs]
    profiles = [p.get("profile") or {} for p in pairs]
    held = [bool(p.get("held_out", False)) for p in pairs]

    f1_mean, f1_per_q = macro_f1_per_question(qids, gold_idx, pred_idx)
    emd_arg = emd_per_question(qids, gold_vals, pred_vals, lo, hi)
    emd_exp = emd_expected_per_question(qids, gold_vals, opt_vals, probs, lo, hi)
    ordinal_q = {p["question_id"] for p in pairs if p.get("ordinal", True)}
    acc_per_q = {q: float(np.mean([correct[i] for i in idx])) for q, idx in _group_indices(qids).items()}

    metrics: dict[str, Any] = {
        "pairs": n,
        "questions": len(acc_per_q),
        "accuracy": accuracy(gold_idx, pred_idx),
        "macro_f1": f1_mean,
        "macro_f1_pooled": pooled_macro_f1(gold_letters, pred_letters),
        "emd": emd_summary(emd_arg, thresholds),
        "emd_expected": emd_summary(emd_exp, thresholds),
        "emd_ordinal_only": emd_summary({q: v for q, v in emd_arg.items() if q in ordinal_q}, thresholds),
        "entropy": mean_normalized_entropy(probs),
        "answer_entropy": _answer_entropy(qids, pred_idx, gold_idx, [len(p["letters"]) for p in pairs]),
        "country": country_accuracy([pr.get("country") for pr in profiles], correct),
        "sigma_inequity": sigma_inequity(profiles, correct, min_size=min_subgroup_size),
        "zero_shot": zero_shot_accuracy(correct, held),
    }
    if per_question:
        metrics["per_question"] = {
            q: {
                "pairs": len(idx),
                "accuracy": acc_per_q[q],
                "macro_f1": f1_per_q[q],
                "emd": emd_arg.get(q),
                "emd_expected": emd_exp.get(q),
            }
            for q, idx in sorted(_group_indices(qids).items(), key=lambda kv: _sort_key(kv[0]))
        }
    return _nan_to_none(metrics)


def _answer_entropy(qids, pred_idx, gold_idx, n_options) -> dict[str, float]:
    """Per question, normalised entropy of the histogram of predicted (and of gold) answers, averaged over questions.

    A collapsed model answers every participant alike (predicted-answer entropy near 0) while the gold answers of a
    diverse population are spread out.
    """
    pred_h, gold_h = [], []
    for _, idx in _group_indices(qids).items():
        k = n_options[idx[0]]
        pc = np.bincount([pred_idx[i] for i in idx], minlength=k).astype(np.float64)
        gc = np.bincount([gold_idx[i] for i in idx], minlength=k).astype(np.float64)
        pred_h.append(normalized_entropy(pc / pc.sum()))
        gold_h.append(normalized_entropy(gc / gc.sum()))
    return {
        "predicted": float(np.mean(pred_h)) if pred_h else float("nan"),
        "gold": float(np.mean(gold_h)) if gold_h else float("nan"),
    }
