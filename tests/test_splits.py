"""Pair sampling within WVB's participant splits and held-out profiles (zero-shot): seeded, uniform, no leaks."""

from pathlib import Path

import numpy as np
import pytest

from cuma.data import HoldoutSpec, load_prepared, prepare_wvb, sample_pairs, select_pairs
from cuma.data.splits import ALL, build_records, heldout_profiles, parse_pair_count
from cuma.data.synthetic import SynthConfig, write_synthetic
from cuma.data.wvb import load_wvb

FIXTURE = Path(__file__).parent / "fixtures" / "wvb_tiny"


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "wvb"
    write_synthetic(root, SynthConfig(participants=300, questions=10, modes=3, seed=5, countries=6, country_set="invented"))
    return load_wvb(root)


@pytest.fixture(scope="module")
def tiny():
    return load_wvb(FIXTURE)


def test_sample_pairs_is_uniform_without_replacement_over_valid_cells():
    rng = np.random.default_rng(0)
    valid = rng.random((50, 8)) < 0.7
    pairs = sample_pairs(valid, 200, seed=1, stream=0)
    assert pairs.shape == (200, 2)
    assert valid[pairs[:, 0], pairs[:, 1]].all()
    assert len({tuple(p) for p in pairs.tolist()}) == 200
    assert np.array_equal(pairs, sample_pairs(valid, 200, seed=1, stream=0))
    assert not np.array_equal(pairs, sample_pairs(valid, 200, seed=2, stream=0))
    everything = sample_pairs(valid, ALL, seed=1, stream=0)
    assert len(everything) == valid.sum() and valid[everything[:, 0], everything[:, 1]].all()
    # uniform: over many seeds every valid cell is drawn about equally often
    counts = np.zeros(valid.shape)
    for s in range(300):
        p = sample_pairs(valid, 20, seed=s, stream=0)
        np.add.at(counts, (p[:, 0], p[:, 1]), 1)
    expected = 300 * 20 / valid.sum()
    assert counts[~valid].sum() == 0
    assert abs(counts[valid].mean() - expected) < 1e-9 and counts[valid].std() < 0.5 * expected
    rows = np.zeros(50, dtype=bool)
    rows[:10] = True
    restricted = sample_pairs(valid, 5, seed=0, stream=0, allowed_rows=rows)
    assert (restricted[:, 0] < 10).all()
    with pytest.raises(ValueError, match="asked for 10000 pairs but only"):
        sample_pairs(valid, 10000, seed=0, stream=0, name="--train-pairs")


def test_parse_pair_count():
    assert parse_pair_count("all") == ALL and parse_pair_count("12") == 12 and parse_pair_count(0) == 0
    for bad in ("-3", "x", 2.5, -2):
        with pytest.raises(ValueError, match="non-negative integer or 'all'"):
            parse_pair_count(bad, "--train-pairs")


def test_pairs_stay_inside_their_participant_split(synth):
    sel = select_pairs(synth, train_pairs=500, test_pairs=200, valid_pairs=100, seed=0)
    records, profiles = build_records(synth, sel)
    for split in ("train", "valid", "test"):
        ids = set(synth.splits[split].participant_ids)
        assert {r["participant_id"] for r in records[split]} <= ids
        assert all(r["split"] == split for r in records[split])
        assert len({r["id"] for r in records[split]}) == len(records[split])
    assert [len(records[s]) for s in ("train", "valid", "test")] == [500, 100, 200]
    texts = [p["profile_text"] for p in profiles]
    for split in records:
        for r in records[split]:
            assert texts[r["profile_index"]] == r["profile_text"]


def test_train_pairs_do_not_depend_on_the_test_count(synth):
    a = select_pairs(synth, train_pairs=300, test_pairs=10, seed=4)
    b = select_pairs(synth, train_pairs=300, test_pairs=150, valid_pairs=20, seed=4)
    assert np.array_equal(a.pairs["train"], b.pairs["train"])
    c = select_pairs(synth, train_pairs=300, test_pairs=10, seed=5)
    assert not np.array_equal(a.pairs["train"], c.pairs["train"])


def _assert_no_leak(records, held):
    train_texts = {r["profile_text"] for s in ("train", "valid") for r in records[s]}
    assert not train_texts & held, "a held-out profile leaked into training"
    assert records["test"], "the zero-shot test set is empty"
    assert all(r["held_out"] for r in records["test"])
    assert {r["profile_text"] for r in records["test"]} <= held
    assert not any(r["held_out"] for s in ("train", "valid") for r in records[s])


def test_holdout_countries_never_reach_training(synth):
    spec = HoldoutSpec(countries=("Ardenia", "Corvath"))
    sel = select_pairs(synth, train_pairs=ALL, test_pairs=ALL, valid_pairs=ALL, seed=0, holdout=spec)
    records, _ = build_records(synth, sel)
    held = sel.held_out
    assert held and all(("Country: Ardenia." in t or "Country: Corvath." in t) for t in held)
    _assert_no_leak(records, held)
    assert not any(r["profile"]["country"] in ("Ardenia", "Corvath") for s in ("train", "valid") for r in records[s])
    assert {r["profile"]["country"] for r in records["test"]} == {"Ardenia", "Corvath"}
    removed = sel.participants_removed
    n_held_train = sum(p.country in ("Ardenia", "Corvath") for p in synth.splits["train"].profiles)
    assert removed["train"] == {"held_out_profile": n_held_train} and n_held_train > 0
    assert removed["test"]["profile_not_held_out"] == sum(
        p.country not in ("Ardenia", "Corvath") for p in synth.splits["test"].profiles
    )
    with pytest.raises(ValueError, match=r"\['Atlantis'\] are not countries of the data"):
        heldout_profiles(synth, HoldoutSpec(countries=("Atlantis",)), 0)


def test_holdout_test_keeps_seen_profiles_marked(synth):
    spec = HoldoutSpec(countries=("Ardenia",), test_keeps_seen=True)
    sel = select_pairs(synth, train_pairs=ALL, test_pairs=ALL, seed=0, holdout=spec)
    records, _ = build_records(synth, sel)
    train_texts = {r["profile_text"] for s in ("train", "valid") for r in records[s]}
    assert not train_texts & sel.held_out
    test = records["test"]
    assert {r["held_out"] for r in test} == {True, False}
    assert all(r["held_out"] == (r["profile"]["country"] == "Ardenia") for r in test)
    assert not any(r["profile"]["country"] == "Ardenia" for r in records["train"])


def test_holdout_fraction_is_seeded_and_never_reaches_training(synth):
    all_texts = {p.to_text() for part in synth.splits.values() for p in part.profiles}
    spec = HoldoutSpec(fraction=0.2)
    held = heldout_profiles(synth, spec, seed=7)
    assert len(held) == round(0.2 * len(all_texts)) and held <= all_texts
    assert held == heldout_profiles(synth, spec, seed=7)
    assert held != heldout_profiles(synth, spec, seed=8)
    sel = select_pairs(synth, train_pairs=ALL, test_pairs=ALL, valid_pairs=ALL, seed=7, holdout=spec)
    assert sel.held_out == held
    records, _ = build_records(synth, sel)
    _assert_no_leak(records, held)


def test_holdout_spec_validation():
    with pytest.raises(ValueError, match="not both"):
        HoldoutSpec(countries=("A",), fraction=0.1)
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        HoldoutSpec(fraction=1.0)
    assert not HoldoutSpec().active and HoldoutSpec(countries=(" Ardenia ",)).countries == ("Ardenia",)


def test_prepared_zero_shot_directory_has_no_leak(tmp_path, tiny):
    m = prepare_wvb(tiny, tmp_path / "zs", train_pairs=ALL, test_pairs=ALL, valid_pairs=ALL, seed=0,
                    holdout_countries=["Belmora"], encoder=None)  # fmt: skip
    prepared = load_prepared(tmp_path / "zs")
    held = {r["profile_text"] for r in prepared.test}
    assert held and all("Country: Belmora." in t for t in held)
    _assert_no_leak({"train": prepared.train, "valid": prepared.valid, "test": prepared.test}, held)
    assert m["held_out"] == {
        "countries": ["Belmora"], "fraction": 0.0, "test_keeps_seen": False, "active": True, "num_profiles": 3
    }
    assert m["dropped"]["participants"] == {
        "train": {"held_out_profile": 2}, "valid": {"held_out_profile": 0}, "test": {"profile_not_held_out": 2},
    }  # fmt: skip
    assert m["counts"]["participants_used"] == {"train": 4, "valid": 2, "test": 1}
