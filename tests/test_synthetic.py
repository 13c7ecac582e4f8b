"""Synthetic population: deterministic, read unchanged by the WVB loader, and with the structure a model must learn
(conflicting cultural modes predicted by the profile). Oracle figures follow the documented formulas."""

import argparse
import json

import numpy as np
import pytest

from cuma.data import load_prepared
from cuma.data.records import sha256_file
from cuma.data.synthetic import (
    SynthConfig,
    generate,
    load_truth,
    oracle_metrics,
    question_pool,
    wasserstein_1d,
    write_synthetic,
)
from cuma.data.wvb import load_wvb

CFG = SynthConfig(participants=600, questions=40, modes=4, seed=0)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "wvb"
    write_synthetic(out, CFG)
    return out


@pytest.fixture(scope="module")
def data(root):
    return load_wvb(root)


@pytest.fixture(scope="module")
def truth(root):
    return load_truth(root)


def _digests(folder):
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_data(root, tmp_path):
    write_synthetic(tmp_path / "again", CFG)
    assert _digests(root) == _digests(tmp_path / "again")
    write_synthetic(tmp_path / "other", SynthConfig(participants=600, questions=40, modes=4, seed=1))
    a = (root / "WorldValuesBench" / "full" / "full_value_qa.tsv").read_bytes()
    b = (tmp_path / "other" / "WorldValuesBench" / "full" / "full_value_qa.tsv").read_bytes()
    assert a != b


def test_layout_is_read_by_the_real_loader(root, data, truth):
    for split in ("full", "train", "valid", "test"):
        for kind in ("demographic", "value"):
            assert (root / "WorldValuesBench" / split / f"{split}_{kind}_qa.tsv").is_file()
    for name in ("question_metadata.json", "codebook.json", "answer_adjustment.json"):
        assert (root / "dataset_construction" / name).is_file()
    sizes = {s: p.num_participants for s, p in data.splits.items()}
    assert sizes == {"train": 420, "valid": 90, "test": 90}  # 70/15/15
    assert len(data.questions) == 40
    # every loaded profile has its truth; answers are on the questions' scales
    texts = {p.to_text() for part in data.splits.values() for p in part.profiles}
    assert texts == set(truth["profiles"])
    for j, q in enumerate(data.questions):
        for part in data.splits.values():
            vals = part.answers[part.valid[:, j], j]
            assert set(vals.tolist()) <= set(q.option_values)
    # missing answers exist and are counted (empty cells and the -1 code), nothing else is dropped
    assert data.dropped["empty"] > 0 and data.dropped["negative_code"] > 0
    assert data.dropped["out_of_scale"] == 0 and data.dropped["missing_label"] == 0
    total = sum(p.num_participants for p in data.splits.values()) * 40
    assert sum(p.num_pairs for p in data.splits.values()) + sum(data.dropped.values()) == total


def test_scale_types_and_recoded_questions(data, truth):
    scales = {(q.scale_min, q.scale_max) for q in data.questions}
    assert {(1, 4), (1, 10), (1, 2), (1, 5), (1, 3), (0, 2)} <= scales
    # the two recoded questions go through answer_adjustment.json like WVB's Q119 and Q56
    assert len(data.recoded) == 2
    labels = {tuple(data.question(q).options) for q in data.recoded}
    assert ("Strongly agree", "Agree", "Hard to say", "Disagree", "Strongly disagree") in labels
    assert ("Better off", "About the same", "Worse off") in labels
    for q in data.questions:
        assert truth["questions"][q.id]["option_values"] == list(q.option_values)
        assert not q.text.startswith("On a scale")


def test_modes_conflict_on_most_questions_and_agree_on_a_few(truth):
    agree = [q for q, v in truth["questions"].items() if v["agree"]]
    assert 1 <= len(agree) <= 0.25 * len(truth["questions"])
    for qid, q in truth["questions"].items():
        dist = np.asarray(q["mode_distributions"])
        assert dist.shape == (truth["modes"], len(q["option_values"]))
        assert np.allclose(dist.sum(axis=1), 1, atol=1e-5)
        peaks = set(dist.argmax(axis=1).tolist())
        assert (len(peaks) == 1) if q["agree"] else (len(peaks) >= 2), qid


def test_mode_depends_strongly_on_country_weakly_on_the_rest(data, truth):
    by_country: dict[str, list] = {}
    for part in data.splits.values():
        for p in part.profiles:
            by_country.setdefault(p.country, []).append(truth["profiles"][p.to_text()]["mode_probs"])
    dominant_share = []
    for country, probs in by_country.items():
        mean = np.mean(probs, axis=0)
        assert int(mean.argmax()) == truth["countries"][country]["dominant_mode"]
        dominant_share.append(mean.max())
        # not deterministic: within a country, individual profiles still vary (religion, age)
        assert np.asarray(probs).std(axis=0).max() > 0.01
    assert min(dominant_share) > 0.45 and max(dominant_share) < 0.97
    # learnable but not trivial: the profile-aware oracle clearly beats the mean-collapsed predictor
    o = truth["oracle"]["test"]
    assert o["accuracy"] > o["population_accuracy"] + 0.08
    assert o["accuracy_expected"] < 0.8
    assert o["emd_expected_mean"] < o["population_emd_mean"]


def test_answers_follow_the_true_mixture(data, truth):
    """Empirical answer frequencies over all participants match the average of their true distributions."""
    for j, q in enumerate(data.questions):
        counts = np.zeros(len(q.option_values))
        expected = np.zeros(len(q.option_values))
        n = 0
        for part in data.splits.values():
            for row in np.flatnonzero(part.valid[:, j]):
                counts[q.option_values.index(int(part.answers[row, j]))] += 1
                expected += truth["profiles"][part.profiles[row].to_text()]["distributions"][q.id]
                n += 1
        assert np.abs(counts / n - expected / n).max() < 0.09, q.id


def test_oracle_figures_recompute_from_truth_on_the_test_split(data, truth):
    test = data.splits["test"]
    recs = [
        {"profile_text": test.profiles[i].to_text(), "question_id": q.id, "gold_value": int(test.answers[i, j]),
         "scale_min": q.scale_min, "scale_max": q.scale_max}
        for i in range(test.num_participants) for j, q in enumerate(data.questions) if test.valid[i, j]
    ]  # fmt: skip
    got = oracle_metrics(recs, truth)
    want = truth["oracle"]["test"]
    assert got["n_pairs"] == want["n_pairs"] == test.num_pairs
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-6), k


def test_oracle_formulas_by_hand():
    truth = {
        "questions": {"Q1": {"option_values": [1, 2, 3], "scale_min": 1, "scale_max": 3}},
        "profiles": {"a": {"distributions": {"Q1": [0.6, 0.3, 0.1]}}, "b": {"distributions": {"Q1": [0.1, 0.2, 0.7]}}},
    }
    recs = [
        {"profile_text": "a", "question_id": "Q1", "gold_value": 1, "scale_min": 1, "scale_max": 3},
        {"profile_text": "a", "question_id": "Q1", "gold_value": 2, "scale_min": 1, "scale_max": 3},
        {"profile_text": "b", "question_id": "Q1", "gold_value": 3, "scale_min": 1, "scale_max": 3},
        {"profile_text": "b", "question_id": "Q1", "gold_value": 3, "scale_min": 1, "scale_max": 3},
    ]
    m = oracle_metrics(recs, truth)
    assert m["accuracy"] == 0.75  # predictions 1, 1, 3, 3
    assert m["accuracy_expected"] == pytest.approx((0.6 + 0.6 + 0.7 + 0.7) / 4)
    # gold normalised {0, .5, 1, 1}, predictions {0, 0, 1, 1}: W1 = 0.5 * 1/4
    assert m["emd_mean"] == pytest.approx(0.125) and m["emd_median"] == pytest.approx(0.125)
    # expected variant: predicted mean distribution [.35, .25, .4] on {0, .5, 1}
    # CDFs gold (.25, .5, 1) vs pred (.35, .6, 1): |.1| * .5 + |.1| * .5 = 0.1
    assert m["emd_expected_mean"] == pytest.approx(0.1)
    # population argmax of the mean distribution is 3 -> correct on 2 of 4
    assert m["population_accuracy"] == 0.5


def test_wasserstein_matches_a_grid_integral():
    """On a grid of step 1/4 the W1 distance is sum_k |F_u(k) - F_v(k)| / 4 over the first four grid points."""
    rng = np.random.default_rng(1)
    for _ in range(50):
        u = rng.integers(0, 5, size=rng.integers(1, 30))
        v = rng.integers(0, 5, size=rng.integers(1, 30))
        w = rng.random(len(v)) + 0.01
        fu = np.array([np.mean(u <= k) for k in range(4)])
        fv = np.array([np.sum(w * (v <= k)) / w.sum() for k in range(4)])
        fv_unweighted = np.array([np.mean(v <= k) for k in range(4)])
        assert wasserstein_1d(u / 4, v / 4) == pytest.approx(np.abs(fu - fv_unweighted).sum() / 4, abs=1e-12)
        assert wasserstein_1d(u / 4, v / 4, v_weights=w) == pytest.approx(np.abs(fu - fv).sum() / 4, abs=1e-12)


def test_wasserstein_matches_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for _ in range(20):
        u = rng.integers(0, 5, size=rng.integers(1, 30)) / 4
        v = rng.integers(0, 5, size=rng.integers(1, 30)) / 4
        w = rng.random(len(v))
        assert wasserstein_1d(u, v) == pytest.approx(scipy_stats.wasserstein_distance(u, v), abs=1e-12)
        assert wasserstein_1d(u, v, v_weights=w) == pytest.approx(
            scipy_stats.wasserstein_distance(u, v, v_weights=w), abs=1e-12
        )
    assert wasserstein_1d([0, 0], [1]) == 1.0 and wasserstein_1d([0.5], [0.5]) == 0.0
    with pytest.raises(ValueError):
        wasserstein_1d([], [1])


def test_generate_in_memory_matches_written_truth(truth):
    pop = generate(CFG)
    assert json.loads(json.dumps(pop.truth)) == truth


def test_bad_config_is_a_clear_error():
    pool = sum(len(f.items) for f in question_pool())
    for kw, msg in [
        (dict(participants=5), "--participants"),
        (dict(questions=pool + 1), f"--questions must be 1..{pool}"),
        (dict(modes=1), "--modes"),
        (dict(countries=99), "--countries"),
        (dict(seed=-1), "--seed"),
    ]:
        with pytest.raises(ValueError, match=msg):
            generate(SynthConfig(**kw))


def test_cli_synth_with_prepare(tmp_path, capsys):
    from cuma.data import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(
        ["synth", "--out", str(tmp_path / "s"), "--participants", "120", "--questions", "9", "--modes", "3",
         "--seed", "2", "--prepare", str(tmp_path / "p"), "--train-pairs", "200", "--test-pairs", "50",
         "--no-embeddings"]
    )  # fmt: skip
    assert cli.run(args) == 0
    out = capsys.readouterr().out
    assert "120 participants" in out and "oracle" in out
    prepared = load_prepared(tmp_path / "p")
    assert len(prepared.train) == 200 and len(prepared.test) == 50
    assert prepared.truth is not None and prepared.manifest["dataset"] == "synthetic"
    o = prepared.manifest["oracle_test"]
    assert o["n_pairs"] == 50 and 0 < o["accuracy"] <= 1
    assert o == pytest.approx(oracle_metrics(prepared.test, prepared.truth))
    # the same generated folder through `cuma data wvb`, with a zero-shot hold-out
    args = parser.parse_args(
        ["wvb", "--wvb", str(tmp_path / "s"), "--out", str(tmp_path / "zs"), "--train-pairs", "all",
         "--test-pairs", "all", "--holdout-fraction", "0.25", "--seed", "1", "--no-embeddings"]
    )  # fmt: skip
    assert cli.run(args) == 0
    zs = load_prepared(tmp_path / "zs")
    held = {r["profile_text"] for r in zs.test}
    assert held and not held & {r["profile_text"] for r in zs.train}
    assert zs.manifest["options"]["holdout"] == {"countries": [], "fraction": 0.25, "test_keeps_seen": False}


# ------------------------------------------------------------------------------------- real countries by cultural zone

ZONE_CFG = SynthConfig(participants=800, questions=6, modes=4, countries=16, seed=0,
                       zones=("Protestant Europe", "Orthodox Europe", "Confucian", "Latin America"),
                       profile_fields=("B_COUNTRY", "X003R", "Q260", "Q289"), country_strength=3.0)


def test_zone_population_countries_share_their_zones_mode():
    from cuma.data.synthetic import ZONES

    pop = generate(ZONE_CFG)
    countries = pop.truth["countries"]
    assert len(countries) == 16
    by_zone = {}
    for name, info in countries.items():
        assert name in [c[0] for c in ZONES[info["zone"]]]
        by_zone.setdefault(info["zone"], set()).add(info["dominant_mode"])
    assert set(by_zone) == set(ZONE_CFG.zones) and all(len(m) == 1 for m in by_zone.values())
    assert len({next(iter(m)) for m in by_zone.values()}) == 4  # as many modes as zones: one each
    # each country's average mode is its zone's (religion leans the same way with real zones)
    by_country = {}
    for text, info in pop.truth["profiles"].items():
        country = text.split("Country: ", 1)[1].split(".", 1)[0]
        by_country.setdefault(country, []).append(info["mode_probs"])
    for country, probs in by_country.items():
        assert int(np.mean(probs, axis=0).argmax()) == countries[country]["dominant_mode"], country


def test_profile_fields_limit_the_profile_sentence(tmp_path):
    write_synthetic(tmp_path / "z", ZONE_CFG)
    data = load_wvb(tmp_path / "z")
    texts = {p.to_text() for part in data.splits.values() for p in part.profiles}
    assert all(t.startswith("Country: ") and "Education" not in t and "Marital" not in t for t in texts)
    assert any("Religion: " in t for t in texts) and any("Age group: " in t for t in texts)
    assert texts == set(load_truth(tmp_path / "z")["profiles"])


def test_invented_country_set_keeps_the_no_prior_names():
    from cuma.data.synthetic import COUNTRIES

    pop = generate(SynthConfig(participants=200, questions=4, modes=3, countries=5, country_set="invented", seed=0))
    assert sorted(pop.truth["countries"]) == sorted(c[0] for c in COUNTRIES[:5])
    assert all(v["zone"] is None for v in pop.truth["countries"].values())


@pytest.mark.parametrize("bad,match", [
    (dict(country_set="atlantis"), "country-set"),
    (dict(zones=("Narnia",)), "unknown zone"),
    (dict(zones=("Confucian", "Confucian")), "twice"),
    (dict(profile_fields=("X003R",)), "B_COUNTRY"),
    (dict(profile_fields=("B_COUNTRY", "X003R")), "shape the latent mode"),  # religion left out
    (dict(countries=49), "countries must be 2..48"),
])
def test_zone_options_are_checked(bad, match):
    with pytest.raises(ValueError, match=match):
        generate(SynthConfig(participants=100, questions=4, **bad))


def test_stratified_held_out_pairs(tmp_path):
    from cuma.data.splits import prepare_wvb

    write_synthetic(tmp_path / "raw", ZONE_CFG)
    manifest = prepare_wvb(load_wvb(tmp_path / "raw"), tmp_path / "prep", train_pairs=50, test_pairs=30,
                           valid_pairs=20, seed=0, holdout_countries=["Sweden", "China"], holdout_test_keeps_seen=True,
                           held_out_pairs={"test": 25, "valid": 10}, encoder=None)
    data = load_prepared(tmp_path / "prep", embeddings=False)
    for split, seen_n, held_n in (("test", 30, 25), ("valid", 20, 10)):
        recs = data.split(split)
        held = [r for r in recs if r["held_out"]]
        assert len(recs) == seen_n + held_n and len(held) == held_n
        assert all(r["profile"]["country"] in ("Sweden", "China") for r in held)
        assert not any(r["profile"]["country"] in ("Sweden", "China") for r in recs if not r["held_out"])
    assert not any(r["profile"]["country"] in ("Sweden", "China") for r in data.train)
    assert manifest["options"]["holdout"]["held_out_pairs"] == {"test": 25, "valid": 10}
    with pytest.raises(ValueError, match="no profile is held out"):
        prepare_wvb(load_wvb(tmp_path / "raw"), tmp_path / "p2", train_pairs=5, test_pairs=5, seed=0,
                    held_out_pairs={"test": 5}, encoder=None)
