"""Evaluation: the WVB evaluation API (``wvb``: :func:`evaluate_wvb`, what ``cuma eval wvb``, ``cuma demo`` and the
benchmarks call), choice metrics (``choice``), model scoring of option letters (``scoring``), multi-process scoring
(``distributed``), the paper's claims (``claims``, ``paired``), routing maps (``topology``), report writers
(``report``) and the ``cuma eval`` command (``cli``). See ``docs/evaluation.md`` for the protocol and formulas.

``choice`` and ``report`` are numpy-only; ``scoring`` imports torch when used.
"""

from __future__ import annotations

from .choice import (
    EMD_THRESHOLDS,
    MIN_SUBGROUP_SIZE,
    accuracy,
    compute_metrics,
    country_accuracy,
    emd_expected_per_question,
    emd_per_question,
    emd_summary,
    group_accuracy,
    macro_f1,
    macro_f1_per_question,
    mean_normalized_entropy,
    normalize_values,
    normalized_entropy,
    pooled_macro_f1,
    sigma_inequity,
    wasserstein_1d,
    zero_shot_accuracy,
)


def __getattr__(name):
    if name in ("evaluate_wvb", "WVBEvalConfig", "WVBEvalResult"):
        from . import wvb

        return getattr(wvb, name)
    if name in ("score_records", "score_prompts", "answer_positions", "build_prompts", "load_profile_table"):
        from . import scoring

        return getattr(scoring, name)
    raise AttributeError(f"module 'cuma.evaluate' has no attribute {name!r}")


__all__ = [
    "EMD_THRESHOLDS",
    "MIN_SUBGROUP_SIZE",
    "WVBEvalConfig",
    "WVBEvalResult",
    "accuracy",
    "answer_positions",
    "build_prompts",
    "compute_metrics",
    "country_accuracy",
    "emd_expected_per_question",
    "emd_per_question",
    "emd_summary",
    "evaluate_wvb",
    "group_accuracy",
    "load_profile_table",
    "macro_f1",
    "macro_f1_per_question",
    "mean_normalized_entropy",
    "normalize_values",
    "normalized_entropy",
    "pooled_macro_f1",
    "score_prompts",
    "score_records",
    "sigma_inequity",
    "wasserstein_1d",
    "zero_shot_accuracy",
]
