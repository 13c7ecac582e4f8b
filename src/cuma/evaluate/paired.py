"""Paired comparison of two methods scored on the same pairs: the difference of their accuracies with a percentile
bootstrap interval over the pairs (both methods resampled together, so the pairs' shared difficulty cancels).

Used by the claims of :mod:`cuma.evaluate.claims` (``cuma demo``: "CuMA beats LoRA by at least 10 points"), where a
difference of two accuracies on 100 held-out pairs moves by several points from sampling alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["paired_accuracy_difference"]


def paired_accuracy_difference(
    correct_a: Sequence[bool], correct_b: Sequence[bool], *, n_boot: int = 2000, confidence: float = 0.95, seed: int = 0
) -> dict[str, Any]:
    """``accuracy(a) - accuracy(b)`` over the same pairs (``correct_a[i]`` and ``correct_b[i]`` are one pair), with a
    percentile bootstrap interval (``n_boot`` resamples of the pairs, seeded) and the paired standard error."""
    a = np.asarray(correct_a, dtype=np.float64)
    b = np.asarray(correct_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired comparison needs two equal-length 1-D lists, got {a.shape} and {b.shape}")
    if a.size == 0:
        raise ValueError("paired comparison of zero pairs")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    d = a - b
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, d.size, size=(n_boot, d.size))
    boots = d[idx].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    return {
        "difference": float(d.mean()),
        "ci_low": float(np.quantile(boots, tail)),
        "ci_high": float(np.quantile(boots, 1.0 - tail)),
        "standard_error": float(d.std(ddof=1) / np.sqrt(d.size)) if d.size > 1 else None,
        "pairs": int(d.size),
        "confidence": confidence,
        "bootstrap_samples": n_boot,
    }
