"""Distinct-n: unique n-grams / total n-grams (Li et al. 2016), pooled and within / between profile groups.

Tokens: lower-cased words and single punctuation marks (``\\w+|[^\\w\\s]``).

* ``pooled``: distinct-n over all texts together.
* ``within``: distinct-n of each group's texts, then the mean over groups (weighted by nothing: every group counts
  once) -- how varied one group's answers are.
* ``between``: |union of the groups' n-gram sets| / sum of |each group's n-gram set| -- 1 when no two groups share
  an n-gram, 1/G when all G groups use the same n-grams: how different the groups' answers are from each other
  (the mean-collapse diagnostic).
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Iterable, Sequence
from typing import Any, Optional

__all__ = ["distinct_n", "diversity_report", "ngrams", "tokenize"]

_TOKEN = re.compile(r"\w+|[^\w\s]")


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall((text or "").lower())


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Iterable[str], n: int) -> Optional[float]:
    """Unique n-grams / total n-grams over ``texts``; None when there are no n-grams."""
    total, uniq = 0, set()
    for t in texts:
        grams = ngrams(tokenize(t), n)
        total += len(grams)
        uniq.update(grams)
    return len(uniq) / total if total else None


def _between(groups: dict[Hashable, list[str]], n: int) -> Optional[float]:
    sets = [set(g for t in texts for g in ngrams(tokenize(t), n)) for texts in groups.values()]
    sets = [s for s in sets if s]
    if len(sets) < 2:
        return None
    return len(set().union(*sets)) / sum(len(s) for s in sets)


def diversity_report(texts: Sequence[str], groups: Optional[Sequence[Hashable]] = None,
                     ns: Sequence[int] = (1, 2)) -> dict[str, Any]:
    """``{"distinct_1": {"pooled", "within", "between", "per_group"}, "distinct_2": {...}, "texts", "groups"}``."""
    out: dict[str, Any] = {"texts": len(texts)}
    by: dict[Hashable, list[str]] = {}
    if groups is not None:
        if len(groups) != len(texts):
            raise ValueError(f"{len(groups)} group labels for {len(texts)} texts")
        for t, g in zip(texts, groups):
            by.setdefault(g, []).append(t)
        out["groups"] = len(by)
    for n in ns:
        entry: dict[str, Any] = {"pooled": distinct_n(texts, n)}
        if groups is not None:
            per = {str(g): distinct_n(ts, n) for g, ts in sorted(by.items(), key=lambda kv: str(kv[0]))}
            vals = [v for v in per.values() if v is not None]
            entry["within"] = sum(vals) / len(vals) if vals else None
            entry["between"] = _between(by, n)
            entry["per_group"] = per
        out[f"distinct_{n}"] = entry
    return out
