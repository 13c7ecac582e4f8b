"""Paired accuracy differences (cuma.evaluate.paired) and the demo's claims table built from them."""

import numpy as np
import pytest

from cuma.demo import claim_row
from cuma.evaluate.claims import paper_claims
from cuma.evaluate.paired import paired_accuracy_difference


def test_paired_difference_hand_values():
    same = paired_accuracy_difference([True, False, True, False], [True, False, True, False])
    assert same["difference"] == 0.0 and same["ci_low"] == 0.0 and same["ci_high"] == 0.0
    assert same["standard_error"] == 0.0
    full = paired_accuracy_difference([True] * 5, [False] * 5)
    assert full["difference"] == 1.0 and full["ci_low"] == 1.0 and full["ci_high"] == 1.0
    rng = np.random.default_rng(3)
    a, b = rng.random(400) < 0.6, rng.random(400) < 0.45
    d = paired_accuracy_difference(a, b, n_boot=4000, seed=1)
    diff = a.astype(float) - b.astype(float)
    assert d["difference"] == pytest.approx(diff.mean())
    assert d["standard_error"] == pytest.approx(diff.std(ddof=1) / 20.0)
    # the percentile interval is about +-1.96 standard errors around the difference
    assert d["ci_low"] < d["difference"] < d["ci_high"]
    assert (d["ci_high"] - d["ci_low"]) / 2 == pytest.approx(1.96 * d["standard_error"], rel=0.15)
    assert paired_accuracy_difference(a, b, n_boot=500, seed=1) == paired_accuracy_difference(a, b, n_boot=500, seed=1)


def test_paired_difference_bad_input():
    with pytest.raises(ValueError, match="equal-length"):
        paired_accuracy_difference([True, False], [True])
    with pytest.raises(ValueError, match="zero pairs"):
        paired_accuracy_difference([], [])
    with pytest.raises(ValueError, match="confidence"):
        paired_accuracy_difference([True], [False], confidence=1.5)


def _results(correct: dict, held: list, tables: dict) -> dict:
    out = {}
    for method, flags in correct.items():
        preds = [{"id": f"p{i}", "held_out": h, "gold_index": 0, "pred_index": 0 if c else 1}
                 for i, (c, h) in enumerate(zip(flags, held))]
        out[method] = {"predictions": preds, "table": tables[method]}
    return out


def test_demo_claims_from_predictions():
    held = [False] * 10 + [True] * 10
    correct = {
        "lora": [True] * 4 + [False] * 6 + [True] * 4 + [False] * 6,  # 40% seen, 40% held out
        "cuma-semantic": [True] * 4 + [False] * 6 + [True] * 5 + [False] * 5,
        "cuma": [True] * 6 + [False] * 4 + [True] * 5 + [False] * 5,  # 60% seen (+20), 50% held out (+10)
    }
    tables = {"lora": {"emd": 0.30, "entropy": 0.90}, "cuma-semantic": {"emd": 0.28, "entropy": 0.88},
              "cuma": {"emd": 0.24, "entropy": 0.95}}
    claims = {c["claim"].split(" (")[0]: c for c in paper_claims(_results(correct, held, tables))}
    acc = claims["CuMA's accuracy >= LoRA's + 10 points"]
    assert acc["measured"] == pytest.approx(0.2) and acc["met"] and acc["pairs"] == 10
    assert acc["interval"][0] <= 0.2 <= acc["interval"][1]
    emd = claims["CuMA's EMD <= 0.7x LoRA's"]
    assert emd["measured"] == pytest.approx(0.8) and not emd["met"]  # 0.24 / 0.30
    assert claims["CuMA's accuracy above semantic-only CuMA's"]["met"]
    zs = claims["CuMA's zero-shot accuracy >= LoRA's + 10 points"]
    assert zs["measured"] == pytest.approx(0.1) and zs["met"] and zs["pairs"] == 10
    ent = claims["CuMA's entropy below LoRA's"]
    assert not ent["met"] and ent["measured"] == pytest.approx(0.05)
    rows = [claim_row(c) for c in claims.values()]
    assert "+20.0 points" in rows[0] and "**met**" in rows[0]
    assert "0.80x" in rows[1] and "**not met**" in rows[1]


def test_demo_claims_refuse_misaligned_predictions():
    held = [False, True]
    results = _results({"lora": [True, False], "cuma": [True, True]}, held,
                       {"lora": {"emd": 0.3, "entropy": 0.9}, "cuma": {"emd": 0.2, "entropy": 0.8}})
    results["lora"]["predictions"].reverse()
    with pytest.raises(ValueError, match="not the same pairs"):
        paper_claims(results)
    assert paper_claims({"cuma": results["cuma"]}) == []
