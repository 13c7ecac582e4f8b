"""Choice metrics against hand-computed values (docs/evaluation.md has the formulas)."""

import math

import numpy as np
import pytest

from cuma.evaluate import choice


# ------------------------------------------------------------------------------------------- Wasserstein / EMD


def test_wasserstein_hand_computed():
    # gold 1,1,4,4 and predictions 1,2,2,4 on a 1..4 scale -> normalised 0,0,1,1 vs 0,1/3,1/3,1
    u = choice.normalize_values([1, 1, 4, 4], 1, 4)
    v = choice.normalize_values([1, 2, 2, 4], 1, 4)
    # CDF difference: 0.25 on [0, 1/3) and 0.25 on [1/3, 1) -> 0.25 * 1/3 + 0.25 * 2/3 = 0.25
    assert choice.wasserstein_1d(u, v) == pytest.approx(0.25)
    assert choice.wasserstein_1d(v, u) == pytest.approx(0.25)
    assert choice.wasserstein_1d([0.0], [1.0]) == pytest.approx(1.0)
    assert choice.wasserstein_1d([0.3, 0.7], [0.7, 0.3]) == pytest.approx(0.0)
    # unequal sizes: {0} vs {0, 1}: CDF difference 0.5 on [0, 1)
    assert choice.wasserstein_1d([0.0], [0.0, 1.0]) == pytest.approx(0.5)


def test_wasserstein_weights_and_sorted_matching():
    # weighted: mass 0.25/0.5/0.25 at 0, .5, 1 vs 0.5/0/0.5 -> |0.25-0.5|*0.5 + |0.75-0.5|*0.5 = 0.25
    assert choice.wasserstein_1d([0, 0.5, 1], [0, 0.5, 1], [0.25, 0.5, 0.25], [0.5, 0, 0.5]) == pytest.approx(0.25)
    # weights are normalised; integer weights = repeated samples
    assert choice.wasserstein_1d([0, 1], [0.5], [3, 1]) == pytest.approx(choice.wasserstein_1d([0, 0, 0, 1], [0.5]))
    # equal-size unweighted samples: W1 = mean |sorted(u) - sorted(v)|
    rng = np.random.default_rng(0)
    for _ in range(20):
        u, v = rng.random(9), rng.random(9)
        assert choice.wasserstein_1d(u, v) == pytest.approx(np.mean(np.abs(np.sort(u) - np.sort(v))))
    with pytest.raises(ValueError):
        choice.wasserstein_1d([], [1.0])


def test_emd_per_question_and_expected():
    q = ["q1"] * 4 + ["q2"] * 2 + ["q3"] * 2
    gold = [1, 1, 4, 4, 1, 3, 5, 5]
    pred = [1, 2, 2, 4, 2, 2, 5, 5]
    lo = [1, 1, 1, 1, 1, 1, 5, 5]
    hi = [4, 4, 4, 4, 3, 3, 5, 5]  # q3 has a one-point scale: left out
    emd = choice.emd_per_question(q, gold, pred, lo, hi)
    assert set(emd) == {"q1", "q2"}
    assert emd["q1"] == pytest.approx(0.25)
    # q2: gold {0, 1} vs predictions {0.5, 0.5} -> 0.5
    assert emd["q2"] == pytest.approx(0.5)

    # expected variant on q2: model distributions [.5,.5,0] and [0,.5,.5] average to [.25,.5,.25] on 0, .5, 1;
    # gold 1 and 3 -> [.5, 0, .5]; W1 = 0.25
    opt_vals = [[1, 2, 3, 4]] * 4 + [[1, 2, 3]] * 2 + [[5]] * 2
    probs = [[1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1], [0.5, 0.5, 0], [0, 0.5, 0.5], [1], [1]]
    exp = choice.emd_expected_per_question(q, gold, opt_vals, probs, lo, hi)
    assert exp["q2"] == pytest.approx(0.25)
    # one-hot distributions give back the argmax EMD
    assert exp["q1"] == pytest.approx(emd["q1"])


def test_emd_summary_thresholds():
    s = choice.emd_summary({"a": 0.05, "b": 0.15, "c": 0.25, "d": 0.5})
    assert s["mean"] == pytest.approx(0.2375)
    assert s["median"] == pytest.approx(0.2)
    assert s["questions"] == 4
    assert s["share_below"] == {"0.1": 0.25, "0.2": 0.5, "0.3": 0.75}
    empty = choice.emd_summary({})
    assert empty["questions"] == 0 and math.isnan(empty["mean"])


# ------------------------------------------------------------------------------------------------ entropy


def test_normalized_entropy():
    assert choice.normalized_entropy([0.5, 0.5, 0, 0]) == pytest.approx(0.5)  # log 2 / log 4
    assert choice.normalized_entropy([0.25] * 4) == pytest.approx(1.0)
    assert choice.normalized_entropy([0, 1, 0]) == pytest.approx(0.0)
    assert choice.normalized_entropy([1.0]) == 0.0
    p = [0.7, 0.2, 0.1]
    assert choice.normalized_entropy(p) == pytest.approx(-sum(x * math.log(x) for x in p) / math.log(3))
    # ragged option counts: mean over pairs
    assert choice.mean_normalized_entropy([[0.5, 0.5, 0, 0], [0.25] * 4, [0, 1]]) == pytest.approx(0.5)


# ----------------------------------------------------------------------------------------------- accuracy / F1


def test_accuracy_and_macro_f1():
    gold = ["A", "A", "B", "C"]
    pred = ["A", "B", "B", "B"]
    assert choice.accuracy(gold, pred) == pytest.approx(0.5)
    # A: 2*1/(2+0+1) = 2/3; B: 2*1/(2+2+0) = 1/2; C: 0 -> (2/3 + 1/2 + 0) / 3 = 7/18
    assert choice.macro_f1(gold, pred) == pytest.approx(7 / 18)
    assert choice.macro_f1(["A", "B"], ["A", "B"]) == pytest.approx(1.0)
    # explicit labels: an absent label counts as F1 0
    assert choice.macro_f1(["A", "B"], ["A", "B"], labels=["A", "B", "C"]) == pytest.approx(2 / 3)


def test_macro_f1_per_question_vs_pooled():
    q = ["q1", "q1", "q2", "q2", "q2"]
    gold = ["A", "B", "A", "A", "A"]
    pred = ["A", "B", "A", "A", "B"]
    mean, per_q = choice.macro_f1_per_question(q, gold, pred)
    # q1: perfect -> 1; q2: A: 2*2/(4+0+1) = 0.8, B: 0 -> 0.4; mean 0.7
    assert per_q == pytest.approx({"q1": 1.0, "q2": 0.4})
    assert mean == pytest.approx(0.7)
    # pooled: A: 2*3/(6+0+1) = 6/7, B: 2*1/(2+1+0) = 2/3 -> 16/21
    assert choice.pooled_macro_f1(gold, pred) == pytest.approx(16 / 21)


# ------------------------------------------------------------------------------------------ groups / fairness


def test_country_accuracy():
    out = choice.country_accuracy(["Egypt", "Egypt", "Egypt", "Sweden", None], [1, 1, 0, 0, 1])
    assert out["per_country"]["Egypt"] == {"accuracy": pytest.approx(2 / 3), "n": 3}
    assert out["per_country"]["Sweden"] == {"accuracy": 0.0, "n": 1}
    assert out["macro_accuracy"] == pytest.approx(1 / 3)
    assert out["countries"] == 2


def test_sigma_inequity_hand_computed():
    correct = [1, 0, 1, 0, 1, 0, 1, 1, 1, 1, 1, 0, 1]
    gender = ["Female"] * 6 + ["Male"] * 5 + ["Other"] * 2
    age = ["young"] * 7 + ["old"] * 6
    profiles = [{"gender": g, "age_group": a, "country": "X"} for g, a in zip(gender, age)]
    out = choice.sigma_inequity(profiles, correct)
    # gender: Female 3/6, Male 5/5, Other (n=2 < 5) dropped -> std(0.5, 1.0) = 0.25
    g = out["per_field"]["gender"]
    assert g["sigma"] == pytest.approx(0.25)
    assert set(g["subgroups"]) == {"Female", "Male"} and g["dropped_subgroups"] == 1
    # age: young 4/7, old 5/6 -> std = (5/6 - 4/7) / 2 = 11/84
    assert out["per_field"]["age_group"]["sigma"] == pytest.approx(11 / 84)
    # country: a single subgroup -> undefined, not counted
    assert out["per_field"]["country"]["sigma"] is None
    assert out["fields"] == 2
    assert out["mean"] == pytest.approx((0.25 + 11 / 84) / 2)
    # min_size is respected
    assert choice.sigma_inequity(profiles, correct, fields=["gender"], min_size=6)["per_field"]["gender"]["sigma"] is None


def test_zero_shot_accuracy():
    out = choice.zero_shot_accuracy([1, 0, 1, 1, 0], [True, True, True, False, False])
    assert out["accuracy"] == pytest.approx(2 / 3) and out["pairs"] == 3
    assert out["seen_accuracy"] == pytest.approx(0.5) and out["seen_pairs"] == 2
    assert choice.zero_shot_accuracy([1], [False])["accuracy"] is None


# ---------------------------------------------------------------------------------------------- everything


def _pair(q, gold, pred, probs, country, held=False, lo=1, hi=4):
    letters = "ABCDEFGHIJ"[: len(probs)]
    values = list(range(lo, lo + len(probs)))
    return {
        "question_id": q,
        "letters": list(letters),
        "option_values": values,
        "gold_index": gold,
        "gold_value": values[gold],
        "pred_index": pred,
        "pred_value": values[pred],
        "probs": probs,
        "scale_min": lo,
        "scale_max": hi,
        "profile": {"country": country},
        "held_out": held,
    }


def test_compute_metrics_end_to_end():
    one = lambda k, n=4: [1.0 if i == k else 0.0 for i in range(n)]  # noqa: E731
    pairs = [
        _pair("q1", 0, 0, one(0), "Egypt"),
        _pair("q1", 0, 1, one(1), "Egypt"),
        _pair("q1", 3, 1, one(1), "Sweden", held=True),
        _pair("q1", 3, 3, one(3), "Sweden", held=True),
        _pair("q2", 0, 0, [0.5, 0.5, 0.0], "Egypt", hi=3),
        _pair("q2", 2, 0, [0.5, 0.5, 0.0], "Sweden", held=True, hi=3),
    ]
    m = choice.compute_metrics(pairs)
    assert m["pairs"] == 6 and m["questions"] == 2
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["emd"]["questions"] == 2
    assert m["per_question"]["q1"]["emd"] == pytest.approx(0.25)
    assert m["per_question"]["q2"]["emd"] == pytest.approx(0.5)  # gold {0, 1} vs predictions {0, 0}
    assert m["emd"]["mean"] == pytest.approx(0.375)
    assert m["entropy"] == pytest.approx((0 + 0 + 0 + 0 + 2 * math.log(2) / math.log(3)) / 6)
    assert m["country"]["per_country"]["Egypt"]["accuracy"] == pytest.approx(2 / 3)
    assert m["zero_shot"]["accuracy"] == pytest.approx(1 / 3) and m["zero_shot"]["pairs"] == 3
    # fewer than 5 pairs per country -> sigma undefined (None, JSON-ready)
    assert m["sigma_inequity"]["mean"] is None
    # answer-entropy diagnostic: q1 gold {A, A, D, D} -> 0.5; q2 predictions all A -> 0
    assert m["answer_entropy"]["gold"] == pytest.approx((0.5 + math.log(2) / math.log(3)) / 2)


# ------------------------------------------------------------------------------------ oracle on synthetic data


def test_true_distributions_reproduce_the_generator_oracle(tmp_path):
    """Feeding the synthetic generator's TRUE answer distributions in as the predictions must reproduce the oracle
    figures the generator writes to truth.json (accuracy of the argmax, both EMDs), and the population marginal
    (a mean-collapsed model) its population figures."""
    from cuma.data.synthetic import SynthConfig, load_truth, write_synthetic
    from cuma.data.wvb import load_wvb

    out = tmp_path / "synth"
    write_synthetic(out, SynthConfig(participants=300, questions=10, seed=1))
    data = load_wvb(out)
    truth = load_truth(out)
    oracle = truth["oracle"]["test"]
    split = data.splits["test"]
    records = [
        data.record("test", r, c, profile_index=0)
        for r in range(split.num_participants)
        for c in range(len(data.questions))
        if split.valid[r, c]
    ]
    assert len(records) == oracle["n_pairs"]

    def as_pair(rec, dist):
        k = int(np.argmax(dist))
        return dict(
            rec, probs=list(dist), pred_index=k, pred_value=rec["option_values"][k],
            gold_index=rec["letters"].index(rec["gold_letter"]),
        )

    true = [as_pair(r, truth["profiles"][r["profile_text"]]["distributions"][r["question_id"]]) for r in records]
    m = choice.compute_metrics(true)
    assert m["pairs"] == oracle["n_pairs"] and m["questions"] == oracle["n_questions"]
    assert m["accuracy"] == pytest.approx(oracle["accuracy"], abs=1e-6)
    assert m["emd"]["mean"] == pytest.approx(oracle["emd_mean"], abs=1e-6)
    assert m["emd"]["median"] == pytest.approx(oracle["emd_median"], abs=1e-6)
    assert m["emd_expected"]["mean"] == pytest.approx(oracle["emd_expected_mean"], abs=1e-6)
    assert m["emd_expected"]["median"] == pytest.approx(oracle["emd_expected_median"], abs=1e-6)

    # mean collapse: every participant gets the population's average distribution of the question
    by_q = {}
    for p in true:
        by_q.setdefault(p["question_id"], []).append(p["probs"])
    marginal = {q: np.mean(np.asarray(v), axis=0) for q, v in by_q.items()}
    collapsed = choice.compute_metrics([as_pair(r, marginal[r["question_id"]]) for r in records])
    assert collapsed["accuracy"] == pytest.approx(oracle["population_accuracy"], abs=1e-6)
    assert collapsed["emd"]["mean"] == pytest.approx(oracle["population_emd_mean"], abs=1e-6)
    # the collapsed model is worse and predicts less diverse answers than the oracle
    assert collapsed["accuracy"] < m["accuracy"] and collapsed["emd"]["mean"] > m["emd"]["mean"]
    assert collapsed["answer_entropy"]["predicted"] == 0.0 < m["answer_entropy"]["predicted"]
