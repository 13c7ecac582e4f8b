"""The paper's claims checked on one run: CuMA against LoRA (and semantic-only CuMA) on the same test pairs.

Accuracy claims carry a paired bootstrap 95% interval over the pairs (:func:`cuma.evaluate.paired.
paired_accuracy_difference`): on a hundred pairs a difference of two accuracies moves by several points from
sampling alone, so the interval says how much of a margin is noise. ``cuma demo`` prints them as its claims table.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional

from .paired import paired_accuracy_difference

__all__ = ["accuracy_claim", "paper_claims"]


def _correct(predictions: Sequence[Mapping[str, Any]], held_out: bool) -> list[bool]:
    return [p["pred_index"] == p["gold_index"] for p in predictions if bool(p["held_out"]) == held_out]


def accuracy_claim(text: str, predictions_a: Sequence[Mapping[str, Any]], predictions_b: Sequence[Mapping[str, Any]],
                   held_out: bool, target: float, seed: int = 0) -> Optional[dict[str, Any]]:
    """"accuracy(a) - accuracy(b) >= target" over the pairs of seen (``held_out`` False) or held-out countries, with
    the paired bootstrap interval; None when there are no such pairs. Both lists are the same pairs in one order."""
    ca, cb = _correct(predictions_a, held_out), _correct(predictions_b, held_out)
    if not ca:
        return None
    d = paired_accuracy_difference(ca, cb, seed=seed)
    return {"claim": text, "measured": d["difference"], "target": target, "met": d["difference"] >= target,
            "kind": "accuracy difference", "interval": [d["ci_low"], d["ci_high"]], "pairs": d["pairs"]}


def paper_claims(results: Mapping[str, Mapping[str, Any]], seed: int = 0) -> list[dict[str, Any]]:
    """The paper's claims from each method's test predictions and metrics table: ``results[method]`` holds
    ``"predictions"`` (the same pairs, in the same order, for every method) and ``"table"`` (``emd`` and ``entropy``
    over the seen-country pairs). Needs ``lora`` and ``cuma`` (else no claims); ``cuma-semantic`` adds one.

    Each claim: ``claim`` (text), ``kind`` ("accuracy difference", "EMD ratio", "entropy difference"),
    ``measured``, ``target``, ``met``; accuracy differences add ``interval`` (95%) and ``pairs``."""
    if not {"lora", "cuma"} <= set(results):
        return []
    ids = [p["id"] for p in results["cuma"]["predictions"]]
    for method, r in results.items():
        if [p["id"] for p in r["predictions"]] != ids:
            raise ValueError(f"claims: {method}'s test predictions are not the same pairs as CuMA's")
    preds = {m: r["predictions"] for m, r in results.items()}
    cuma, lora = results["cuma"]["table"], results["lora"]["table"]
    claims = [
        accuracy_claim("CuMA's accuracy >= LoRA's + 10 points (seen countries)", preds["cuma"], preds["lora"], False,
                       0.10, seed),
        {"claim": "CuMA's EMD <= 0.7x LoRA's (seen countries)", "measured": cuma["emd"] / max(lora["emd"], 1e-12),
         "target": 0.7, "met": cuma["emd"] <= 0.7 * lora["emd"], "kind": "EMD ratio"},
    ]
    if "cuma-semantic" in results:
        claims.append(accuracy_claim("CuMA's accuracy above semantic-only CuMA's (seen countries)", preds["cuma"],
                                     preds["cuma-semantic"], False, 1e-9, seed))
    claims += [
        accuracy_claim("CuMA's zero-shot accuracy >= LoRA's + 10 points (held-out countries)", preds["cuma"],
                       preds["lora"], True, 0.10, seed),
        {"claim": "CuMA's entropy below LoRA's (mean collapse mitigated)",
         "measured": cuma["entropy"] - lora["entropy"], "target": 0.0, "met": cuma["entropy"] < lora["entropy"],
         "kind": "entropy difference"},
    ]
    return [c for c in claims if c is not None]
