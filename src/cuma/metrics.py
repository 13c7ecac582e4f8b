"""Metrics shared by the data layer and the evaluator (numpy only, imports nothing of cuma).

The synthetic population's oracle (:mod:`cuma.data.synthetic`) and the evaluator (:mod:`cuma.evaluate.choice`,
which re-exports these) measure EMD with the same function, so the oracle's EMD and a model's EMD are comparable.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

__all__ = ["normalize_values", "wasserstein_1d"]


def normalize_values(values: Sequence[float] | np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``(x - lo) / (hi - lo)``: answer values on a ``[lo, hi]`` scale mapped to ``[0, 1]``."""
    if hi == lo:
        raise ValueError(f"cannot normalise on a scale with min == max == {lo}")
    return (np.asarray(values, dtype=np.float64) - lo) / float(hi - lo)


def wasserstein_1d(
    u_values: Sequence[float] | np.ndarray,
    v_values: Sequence[float] | np.ndarray,
    u_weights: Optional[Sequence[float] | np.ndarray] = None,
    v_weights: Optional[Sequence[float] | np.ndarray] = None,
) -> float:
    """1-D Wasserstein-1 distance (earth mover's distance) between two (weighted) samples.

    ``W1(u, v) = integral_{-inf}^{inf} |F_u(x) - F_v(x)| dx`` with ``F`` the (weighted) empirical CDFs; computed
    exactly as a sum over the merged sorted support ``x_(1) <= ... <= x_(m)``:
    ``W1 = sum_j |F_u(x_(j)) - F_v(x_(j))| * (x_(j+1) - x_(j))``. Same result as ``scipy.stats.wasserstein_distance``.
    Weights default to uniform and are normalised to sum to 1.
    """
    u = np.asarray(u_values, dtype=np.float64).ravel()
    v = np.asarray(v_values, dtype=np.float64).ravel()
    if u.size == 0 or v.size == 0:
        raise ValueError("wasserstein_1d needs at least one value on each side")
    uw = np.ones_like(u) if u_weights is None else np.asarray(u_weights, dtype=np.float64).ravel()
    vw = np.ones_like(v) if v_weights is None else np.asarray(v_weights, dtype=np.float64).ravel()
    if uw.shape != u.shape or vw.shape != v.shape:
        raise ValueError("weights must match the values in length")
    if (uw < 0).any() or (vw < 0).any() or uw.sum() <= 0 or vw.sum() <= 0:
        raise ValueError("weights must be non-negative with a positive sum")
    u_order = np.argsort(u, kind="mergesort")
    v_order = np.argsort(v, kind="mergesort")
    u_sorted, v_sorted = u[u_order], v[v_order]
    u_cw = np.concatenate([[0.0], np.cumsum(uw[u_order])])
    v_cw = np.concatenate([[0.0], np.cumsum(vw[v_order])])
    support = np.sort(np.concatenate([u, v]), kind="mergesort")
    deltas = np.diff(support)
    # CDF at each support point (right-continuous): weight of the values <= x
    u_cdf = u_cw[np.searchsorted(u_sorted, support[:-1], side="right")] / u_cw[-1]
    v_cdf = v_cw[np.searchsorted(v_sorted, support[:-1], side="right")] / v_cw[-1]
    return float(np.sum(np.abs(u_cdf - v_cdf) * deltas))
