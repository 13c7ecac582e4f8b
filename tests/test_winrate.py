import json

import numpy as np
import pytest

from cuma import cli
from cuma.data.community_alignment import prepare_community_alignment
from cuma.data.records import read_jsonl
from cuma.evaluate.diversity import distinct_n, diversity_report
from cuma.evaluate.winrate import collect_prompts, group_breakdown, winrate_stats


def test_winrate_arithmetic():
    res = ["win"] * 6 + ["tie"] * 2 + ["loss"] * 2 + ["invalid"] * 3
    s = winrate_stats(res, n_boot=500, seed=0)
    assert (s["n"], s["wins"], s["ties"], s["losses"], s["invalid"], s["total"]) == (10, 6, 2, 2, 3, 13)
    assert s["win_rate"] == pytest.approx(0.7)
    assert s["ci_low"] <= 0.7 <= s["ci_high"] and 0.3 < s["ci_low"] and s["ci_high"] <= 1.0
    assert s == winrate_stats(res, n_boot=500, seed=0)  # seeded
    allwin = winrate_stats(["win"] * 5, n_boot=100)
    assert allwin["win_rate"] == allwin["ci_low"] == allwin["ci_high"] == 1.0
    assert winrate_stats(["invalid"])["win_rate"] is None
    with pytest.raises(ValueError):
        winrate_stats(["maybe"])


def test_interval_matches_normal_approximation():
    rng = np.random.default_rng(0)
    res = list(rng.choice(["win", "tie", "loss"], size=400, p=[0.5, 0.2, 0.3]))
    s = winrate_stats(res, n_boot=4000, seed=1)
    scores = np.array([{"win": 1, "tie": 0.5, "loss": 0}[r] for r in res])
    se = scores.std() / np.sqrt(len(scores))
    assert s["ci_low"] == pytest.approx(scores.mean() - 1.96 * se, abs=0.01)
    assert s["ci_high"] == pytest.approx(scores.mean() + 1.96 * se, abs=0.01)


def test_inconsistency_and_groups():
    res = [{"outcome": "win", "consistent": True}, {"outcome": "tie", "consistent": False},
           {"outcome": "tie", "consistent": True}, {"outcome": "invalid", "consistent": None}]
    s = winrate_stats(res, n_boot=50)
    assert s["inconsistent"] == 1 and s["inconsistency_rate"] == pytest.approx(1 / 3)
    g = group_breakdown(res, ["x", "x", "y", "y"], n_boot=50)
    assert g["x"]["win_rate"] == 0.75 and g["y"]["win_rate"] == 0.5 and g["y"]["invalid"] == 1


def test_distinct_n():
    assert distinct_n(["a b a b"], 1) == 0.5 and distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    assert distinct_n([""], 2) is None
    r = diversity_report(["the cat", "the cat", "a dog", "a dog"], ["g1", "g1", "g2", "g2"])
    assert r["distinct_1"]["pooled"] == 0.5 and r["distinct_1"]["within"] == 0.5
    assert r["distinct_1"]["between"] == 1.0  # no word shared between the groups
    same = diversity_report(["x y", "x y"], ["g1", "g2"])
    assert same["distinct_2"]["between"] == 0.5


@pytest.fixture(scope="module")
def ca_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("ca") / "prep"
    prepare_community_alignment("tests/fixtures/ca_tiny/community_alignment.csv", out, test_fraction=0.3,
                                valid_fraction=0.0, seed=0)
    return out


def test_collect_prompts(ca_data):
    pairs = read_jsonl(ca_data / "pairs_test.jsonl")
    items = collect_prompts(pairs)
    assert len(items) == len({p["id"].rsplit(":r", 1)[0] for p in pairs})
    assert collect_prompts(pairs, num_samples=2, seed=5) == collect_prompts(pairs, num_samples=2, seed=5)
    assert all(it["group"] != "unknown" for it in items)


def test_eval_winrate_end_to_end(ca_data, tiny_model_dir, tmp_path):
    out = tmp_path / "wr"
    rc = cli.main(["eval", "winrate", "--model", str(tiny_model_dir), "--candidate-method", "persona",
                   "--data", str(ca_data), "--out", str(out), "--judge", "local", "--judge-model",
                   str(tiny_model_dir), "--max-new-tokens", "4", "--num-samples", "3", "--seed", "0",
                   "--bootstrap", "100"])
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["metrics"]["total"] == 3 and s["metrics"]["n"] + s["metrics"]["invalid"] == 3
    gens = read_jsonl(out / "generations.jsonl")
    assert len(gens) == 6 and {g["model"] for g in gens} == {"candidate", "reference"}
    assert set(gens[0]) >= {"id", "profile_text", "group", "model", "text"}
    assert len(read_jsonl(out / "verdicts.jsonl")) == 3
    assert "distinct_2" in s["metrics"]["diversity"]["candidate"]


@pytest.mark.parametrize("method", ["vanilla", "fewshot"])
def test_eval_choice(ca_data, tiny_model_dir, tmp_path, method):
    args = ["eval", "choice", "--model", str(tiny_model_dir), "--method", method, "--data", str(ca_data),
            "--no-progress"]
    if method == "fewshot":
        args += ["--fewshot-k", "1"]
    assert cli.main(args + ["--out", str(tmp_path / "b1"), "--batch-size", "1"]) == 0
    assert cli.main(args + ["--out", str(tmp_path / "b4"), "--batch-size", "4"]) == 0
    s1 = json.loads((tmp_path / "b1" / "summary.json").read_text())
    p1 = read_jsonl(tmp_path / "b1" / "predictions.jsonl")
    p4 = read_jsonl(tmp_path / "b4" / "predictions.jsonl")
    assert 0.0 <= s1["metrics"]["accuracy"] <= 1.0 and s1["metrics"]["macro_f1"] is not None
    for a, b in zip(p1, p4):  # padding does not change the scores
        assert a["probs"] == pytest.approx(b["probs"], abs=1e-5)


def test_eval_winrate_with_a_cuma_candidate(ca_data, tiny_model_dir, tmp_path):
    """A CuMA adapter generates with its profile rows (the prepared folder's embeddings) against the base model."""
    import shutil

    import torch
    from safetensors.torch import save_file

    from cuma import methods, models

    data = tmp_path / "prep"
    shutil.copytree(ca_data, data)
    n_profiles = len(read_jsonl(data / "profiles.jsonl"))
    save_file({"profile_embeds": torch.randn(n_profiles, 16)}, str(data / "profile_embeds.safetensors"))
    built = methods.build("cuma", models.load_base(str(tiny_model_dir)), r=2, num_experts=3, router_hidden=8,
                          profile_dim=16, init_weights=False)
    methods.save(built, tmp_path / "adapter")
    out = tmp_path / "wr"
    rc = cli.main(["eval", "winrate", "--model", str(tiny_model_dir), "--candidate-adapter", str(tmp_path / "adapter"),
                   "--data", str(data), "--out", str(out), "--judge", "local", "--judge-model",
                   str(tiny_model_dir), "--max-new-tokens", "3", "--num-samples", "2", "--seed", "0",
                   "--bootstrap", "50"])
    assert rc == 0
    gens = read_jsonl(out / "generations.jsonl")
    assert len(gens) == 4 and {g["model"] for g in gens} == {"candidate", "reference"}
