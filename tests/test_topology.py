"""Routing topology analysis (cuma.evaluate.topology, `cuma analyze routing`): a hand-set router whose assignment
and distances are known, the human side against the synthetic generator's truth, figures on disk."""

import json
import math

import numpy as np
import pytest
import torch

from conftest import tiny_chat_tokenizer, tiny_llama
from cuma import methods
from cuma.data.records import make_record, write_jsonl
from cuma.evaluate import topology as topo

GROUPS = ("Aland", "Borea", "Cydon")  # profile rows e_A, e_B, e_C (one-hot)
# hand-set routers (top-2 of 4 experts): A -> {0, 1}, B -> {1, 2}, C -> {2, 3}, each kept pair at 0.5 / 0.5
EXPECTED_GATE = np.array([[0.5, 0.5, 0, 0], [0, 0.5, 0.5, 0], [0, 0, 0.5, 0.5]])
# JS (bits) of those: A-B and B-C share half their mass (0.5), A-C are disjoint (1)
EXPECTED_JS = np.array([[0, 0.5, 1.0], [0.5, 0, 0.5], [1.0, 0.5, 0]])
QUESTIONS = [("Q1", "Is family important?"), ("Q2", "Is work important?")]


def _hand_set_cuma(seed=0):
    built = methods.build(
        "cuma", tiny_llama(seed), profile_dim=3, num_experts=4, top_k=2, r=2, router_layers=1, init_weights=False
    )
    routers = [m for name, m in built.model.named_modules() if name.endswith("cuma_router.default")]
    assert routers, "no routers found"
    w_profile = torch.tensor([[10.0, 0, 0], [10.0, 10.0, 0], [0, 10.0, 10.0], [0, 0, 10.0]])  # (N, profile_dim)
    with torch.no_grad():
        for router in routers:
            lin = router.layers[0]
            lin.weight.zero_()
            lin.weight[:, router.in_features :] = w_profile
            lin.bias.zero_()
    return built


def _records():
    """Two participants per group and question; human answers: A always option A, C always option B, B half/half."""
    recs = []
    for gi, country in enumerate(GROUPS):
        for k in range(2):
            for qid, text in QUESTIONS:
                gold = {0: 1, 1: 1 + k, 2: 2}[gi]
                r = make_record(
                    participant_id=f"{country[0]}{k}", question_id=qid, split="test", profile={"country": country},
                    profile_text=f"Country: {country}.", profile_index=gi, question=text, category="Test",
                    options=["Yes", "No"], option_values=[1, 2], gold_value=gold, scale_min=1, scale_max=2,
                    ordinal=True, held_out=country == "Cydon",
                )
                recs.append(r)
    return recs


def _js_half():  # JS([1, 0], [0.5, 0.5]) in bits
    m = np.array([0.75, 0.25])
    return 0.5 * math.log2(1 / 0.75) + 0.5 * (0.5 * math.log2(0.5 / 0.75) + 0.5 * math.log2(0.5 / 0.25))


# ------------------------------------------------------------------------------------------------- units


def test_js_divergence_hand_values():
    assert topo.js_divergence([1, 0], [1, 0]) == 0.0
    assert topo.js_divergence([1, 0], [0, 1]) == pytest.approx(1.0)
    assert topo.js_divergence([0.5, 0.5, 0, 0], [0, 0.5, 0.5, 0]) == pytest.approx(0.5)
    assert topo.js_divergence([1, 0], [0.5, 0.5]) == pytest.approx(_js_half())
    assert topo.js_divergence([2, 0], [1, 1]) == pytest.approx(_js_half())  # normalised first
    np.testing.assert_allclose(topo.pairwise_js(EXPECTED_GATE), EXPECTED_JS, atol=1e-12)


def test_correlations_and_entropy():
    assert topo.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert topo.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert topo.pearson([1, 2], [1, 2]) is None and topo.pearson([1, 1, 1], [1, 2, 3]) is None
    assert topo.spearman([1, 2, 3, 4], [1, 4, 9, 100]) == pytest.approx(1.0)
    assert topo.spearman([1, 2, 2, 3], [1, 2, 2, 3]) == pytest.approx(1.0)  # ties: average ranks
    assert topo.normalized_entropy([0.25] * 4) == pytest.approx(1.0)
    assert topo.normalized_entropy([1, 0, 0, 0]) == 0.0
    d = np.array([[0, 1, np.nan], [1, 0, 2], [np.nan, 2, 0]])
    c = topo.topology_correlation(d, d)
    assert c["pairs"] == 2 and c["pearson"] is None  # two finite pairs: undefined


def test_classical_mds_recovers_planar_distances():
    pts = np.array([[0, 0], [3, 0], [0, 4], [1, 1], [-2, 3]], dtype=float)
    d = np.sqrt(((pts[:, None] - pts[None]) ** 2).sum(-1))
    xy = topo.classical_mds(d, 2)
    d2 = np.sqrt(((xy[:, None] - xy[None]) ** 2).sum(-1))
    np.testing.assert_allclose(d2, d, atol=1e-9)


def test_average_linkage_matches_upgma_by_hand():
    d = np.array([[0, 1, 4, 5], [1, 0, 4, 6], [4, 4, 0, 2], [5, 6, 2, 0]], dtype=float)
    z = topo.average_linkage(d)
    # {0,1} at 1 -> id 4; {2,3} at 2 -> id 5; then (4+5+4+6)/4 = 4.75
    np.testing.assert_allclose(z, [[0, 1, 1, 2], [2, 3, 2, 2], [4, 5, 4.75, 4]])
    assert topo.dendrogram_order(z, 4) == [0, 1, 2, 3]


def test_select_layers():
    names = [f"base_model.model.model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    assert topo.select_layers(names, None) == [0, 2, 3]
    assert topo.select_layers(names, "0,-1") == [0, 3]
    assert topo.select_layers(names, "v_proj") == [1, 3]
    with pytest.raises(ValueError):
        topo.select_layers(names, "9")
    assert topo.short_layer_name(names[3]) == "L1.v_proj"


# ------------------------------------------------------------------------------------------------- hand-set router


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_hand_set_router_assignment_and_distances(padding_side):
    built = _hand_set_cuma()
    tok = tiny_chat_tokenizer(padding_side)
    recs = _records()
    table = torch.eye(3)
    stats = topo.collect_routing(built.model, tok, recs, group_field="country", profile_table=table, batch_size=3)
    assert stats.groups == list(GROUPS)
    assert len(stats.layers) == 4 and stats.num_experts == 4  # 2 blocks x (q_proj, v_proj)
    for li in range(len(stats.layers)):
        np.testing.assert_allclose(stats.mean_gate[li], EXPECTED_GATE, atol=1e-5)
        np.testing.assert_allclose(stats.load_share[li], EXPECTED_GATE, atol=1e-12)
        np.testing.assert_allclose(stats.distances(li), EXPECTED_JS, atol=1e-4)
    np.testing.assert_allclose(stats.distances(None), EXPECTED_JS, atol=1e-4)
    assert {g: sorted(v) for g, v in stats.assignment(None, top=2).items()} == {
        "Aland": [0, 1], "Borea": [1, 2], "Cydon": [2, 3]}  # fmt: skip
    # only the non-pad prompt tokens were counted
    lengths = {g: 0 for g in GROUPS}
    from cuma.data.prompts import render_prompt

    for r in recs:
        lengths[r["profile"]["country"]] += len(tok(render_prompt(r, tok), add_special_tokens=False)["input_ids"])
    np.testing.assert_array_equal(stats.tokens[0], [lengths[g] for g in GROUPS])
    assert stats.prompts == {g: 4 for g in GROUPS} and stats.held_out == {"Aland": False, "Borea": False, "Cydon": True}
    # the human side of the same groups: A-C disjoint (1), A-B and B-C at JS([1,0],[.5,.5])
    dists = topo.human_distributions(recs, "country")
    np.testing.assert_allclose(dists["Borea"]["Q1"], [0.5, 0.5])
    hd, shared = topo.human_distance_matrix(dists, stats.groups)
    h = _js_half()
    np.testing.assert_allclose(hd, [[0, h, 1], [h, 0, h], [1, h, 0]], atol=1e-12)
    assert shared[0, 1] == 2
    corr = topo.topology_correlation(stats.distances(None), hd)
    assert corr["pairs"] == 3 and corr["pearson"] == pytest.approx(1.0, abs=1e-6)
    assert corr["spearman"] == pytest.approx(1.0)


def test_limit_per_group():
    built = _hand_set_cuma()
    stats = topo.collect_routing(built.model, tiny_chat_tokenizer(), _records(), profile_table=torch.eye(3), limit=1,
                                 batch_size=8)  # fmt: skip
    assert stats.prompts == {g: 1 for g in GROUPS}
    np.testing.assert_allclose(stats.mean_gate[0], EXPECTED_GATE, atol=1e-5)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_accumulator_inside_an_evaluation_pass(padding_side):
    """The demo pools its routing map from the gates of its test evaluation (score_records, batched longest-first,
    rows reported through on_rows): the same statistics as a collect_routing pass of its own."""
    from cuma.evaluate.scoring import score_records
    from cuma.routing import record_gates

    built = _hand_set_cuma()
    tok = tiny_chat_tokenizer(padding_side)
    recs = _records()
    seen_rows = []
    acc = topo.RoutingAccumulator(recs)
    with torch.no_grad(), record_gates(built.model) as rec:
        preds = score_records(built.model, tok, recs, batch_size=5, profile_table=torch.eye(3), progress=False,
                              on_rows=lambda idx: (seen_rows.extend(idx), acc.add_forward(rec, [recs[i] for i in idx])))
        assert all(not calls for calls in rec.gates.values())  # emptied after every forward
    assert sorted(seen_rows) == list(range(len(recs))) and len(preds) == len(recs)
    pooled = acc.stats()
    own = topo.collect_routing(built.model, tok, recs, profile_table=torch.eye(3), batch_size=3)
    assert pooled.groups == own.groups and pooled.layers == own.layers and pooled.prompts == own.prompts
    np.testing.assert_allclose(pooled.mean_gate, own.mean_gate, atol=1e-6)
    np.testing.assert_array_equal(pooled.tokens, own.tokens)
    np.testing.assert_allclose(pooled.mean_gate[0], EXPECTED_GATE, atol=1e-5)
    assert pooled.held_out == {"Aland": False, "Borea": False, "Cydon": True}


def test_accumulator_refuses_unknown_groups_and_empty_passes():
    built = _hand_set_cuma()
    recs = _records()
    acc = topo.RoutingAccumulator(recs[:4])  # Aland only
    with pytest.raises(ValueError, match="no gates were pooled"):
        acc.stats()
    from cuma.routing import record_gates

    tok = tiny_chat_tokenizer()
    enc = tok([f"x {i}" for i in range(2)], return_tensors="pt", padding=True)
    with torch.no_grad(), record_gates(built.model) as rec:
        built.model(**enc, profile_embeds=torch.eye(3)[[1, 2]])
    with pytest.raises(ValueError, match="'Borea' was not among"):
        acc.add_forward(rec, [recs[4], recs[8]])


def test_model_without_routers_is_refused():
    built = methods.build("lora", tiny_llama(), r=2)
    with pytest.raises(ValueError, match="no routed layers"):
        topo.collect_routing(built.model, tiny_chat_tokenizer(), _records()[:2])


# ------------------------------------------------------------------------------------------------- CLI end to end


@pytest.fixture(scope="module")
def routing_workspace(tmp_path_factory):
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("topology")
    data = root / "data"
    data.mkdir()
    recs = _records()
    write_jsonl(data / "test.jsonl", recs)
    write_jsonl(data / "train.jsonl", [dict(r, split="train") for r in recs if r["profile"]["country"] != "Cydon"])
    write_jsonl(data / "valid.jsonl", [])
    write_jsonl(data / "profiles.jsonl", [{"profile_index": i, "profile_text": f"Country: {c}.",
                                          "profile": {"country": c}} for i, c in enumerate(GROUPS)])  # fmt: skip
    save_file({"profile_embeds": torch.eye(3)}, str(data / "profile_embeds.safetensors"))
    (data / "manifest.json").write_text(json.dumps({"seed": 0}))
    cuma_dir = root / "cuma"
    methods.save(_hand_set_cuma(), cuma_dir)
    sem = methods.build("cuma-semantic", tiny_llama(), num_experts=4, top_k=2, r=2, router_layers=1, init_weights=False)
    sem_dir = root / "semantic"
    methods.save(sem, sem_dir)
    return {"root": root, "data": data, "cuma": cuma_dir, "semantic": sem_dir}


def test_cli_routing_end_to_end(routing_workspace, tiny_model_dir, tmp_path, capsys):
    from cuma import cli

    ws = routing_workspace
    out = tmp_path / "analysis"
    rc = cli.main(["analyze", "routing", "--model", str(tiny_model_dir), "--adapter", str(ws["cuma"]),
                   str(ws["semantic"]), "--data", str(ws["data"]), "--out", str(out), "--batch-size", "4",
                   "--layers", "0,-1", "--no-progress", "--device", "cpu"])  # fmt: skip
    assert rc == 0
    assert "Pearson" in capsys.readouterr().out
    res = json.loads((out / "analysis.json").read_text())
    assert res["groups"] == list(GROUPS) and res["held_out"]["Cydon"] is True
    assert set(res["runs"]) == {"cuma", "cuma-semantic"}
    run = res["runs"]["cuma"]
    np.testing.assert_allclose(np.array(run["all_layers"]["distance"], dtype=float), EXPECTED_JS, atol=1e-4)
    assert run["all_layers"]["correlation"]["pearson"] == pytest.approx(1.0, abs=1e-5)
    assert len(run["per_layer"]) == 4 and len(run["heatmap_layers"]) == 2
    for layer in run["per_layer"].values():
        assert layer["correlation"]["pearson"] == pytest.approx(1.0, abs=1e-5)
        np.testing.assert_allclose([layer["mean_gate"][g] for g in GROUPS], EXPECTED_GATE, atol=1e-5)
    assert run["utilisation"]["pooled_load_entropy_mean"] == pytest.approx(
        topo.normalized_entropy([1 / 6, 1 / 3, 1 / 3, 1 / 6]), abs=1e-4)  # fmt: skip
    sem = res["runs"]["cuma-semantic"]
    assert sem["uses_profile"] is False and sem["method"] == "cuma-semantic"
    assert [row["label"] for row in res["comparison"]] == ["cuma", "cuma-semantic"]
    h = _js_half()
    np.testing.assert_allclose(np.array(res["human"]["distance"], dtype=float), [[0, h, 1], [h, 0, h], [1, h, 0]],
                               atol=1e-6)
    figures = [out / f for r in res["runs"].values() for f in r["figures"]] + [out / f for f in res["figures"]]
    assert len(figures) == 8
    for f in figures:
        assert f.is_file() and f.stat().st_size > 1000 and f.read_bytes()[:4] == b"\x89PNG", f
    assert "| cuma |" in (out / "analysis.md").read_text()


def test_cli_routing_bad_arguments(routing_workspace, tiny_model_dir, tmp_path, capsys):
    from cuma import cli

    ws = routing_workspace
    rc = cli.main(["analyze", "routing", "--model", str(tiny_model_dir), "--adapter", str(ws["cuma"]), "--data",
                   str(ws["data"]), "--out", str(tmp_path / "o"), "--human-source", "truth", "--no-progress"])  # fmt: skip
    assert rc == 2 and "truth.json" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- synthetic truth


def test_human_distances_follow_the_generators_truth(tmp_path):
    from cuma.data.synthetic import SynthConfig, load_truth, write_synthetic
    from cuma.data.wvb import load_wvb

    write_synthetic(tmp_path / "raw", SynthConfig(participants=1000, questions=8, modes=3, countries=5, seed=0))
    data = load_wvb(tmp_path / "raw")
    truth = load_truth(tmp_path / "raw")
    recs = []
    for split in ("train", "valid", "test"):
        sp = data.splits[split]
        recs += [data.record(split, r, c, 0) for r in range(sp.num_participants) for c in range(len(data.questions))
                 if sp.valid[r, c]]  # fmt: skip
    groups = sorted({r["profile"]["country"] for r in recs})
    assert len(groups) == 5

    # independent computation from truth.json: a country's true answer distribution for a question is the mean of
    # its participants' true distributions
    sums: dict = {}
    for r in recs:
        key = (r["profile"]["country"], r["question_id"])
        v = np.asarray(truth["profiles"][r["profile_text"]]["distributions"][r["question_id"]])
        s = sums.setdefault(key, [np.zeros_like(v), 0])
        s[0] += v
        s[1] += 1
    qids = sorted({q for _, q in sums})
    expected = np.zeros((5, 5))
    for i, a in enumerate(groups):
        for j, b in enumerate(groups):
            if i != j:
                expected[i, j] = np.mean([topo.js_divergence(sums[(a, q)][0] / sums[(a, q)][1],
                                                             sums[(b, q)][0] / sums[(b, q)][1]) for q in qids])  # fmt: skip
    d_truth, shared = topo.human_distance_matrix(topo.human_distributions(recs, "country", "truth", truth), groups)
    np.testing.assert_allclose(d_truth, expected, atol=1e-12)
    assert (shared[np.triu_indices(5, 1)] == len(qids)).all()

    # the empirical (gold) distances estimate the true ones
    d_gold, _ = topo.human_distance_matrix(topo.human_distributions(recs, "country"), groups)
    corr = topo.topology_correlation(d_gold, d_truth)
    assert corr["pairs"] == 10 and corr["pearson"] > 0.9
    iu = np.triu_indices(5, 1)
    assert np.max(np.abs(d_gold[iu] - d_truth[iu])) < 0.1  # finite samples bias JS upwards a little

    # countries whose dominant latent mode is the same are closer than countries whose modes conflict
    dom = {c: truth["countries"][c]["dominant_mode"] for c in groups}
    same = [d_truth[i, j] for i, j in zip(*iu) if dom[groups[i]] == dom[groups[j]]]
    diff = [d_truth[i, j] for i, j in zip(*iu) if dom[groups[i]] != dom[groups[j]]]
    if same and diff:
        assert np.mean(same) < np.mean(diff)


def test_routing_map_from_pooled_gates():
    """The report's routing map: per-projection loads, the projection whose load differs most between groups, and a
    similarity matrix near 1 for groups routed alike and -1 for groups routed apart (centred over groups)."""
    from cuma.evaluate.topology import RoutingStats, per_layer_load, routing_map, routing_similarity

    flat = [0.25, 0.25, 0.25, 0.25]
    # layer 0 routes every group alike; layer 1 sends A and B to expert 0 and C to expert 3
    gates = np.array([[flat, flat, flat],
                      [[0.7, 0.1, 0.1, 0.1], [0.7, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.7]]])
    stats = RoutingStats(layers=["l0.q_proj", "l1.q_proj"], groups=["A", "B", "C"], mean_gate=gates,
                         load_share=gates, tokens=np.ones((2, 3)))
    per_layer = per_layer_load(stats)
    assert per_layer["C"]["l1.q_proj"] == pytest.approx([0.1, 0.1, 0.1, 0.7])
    groups, sim = routing_similarity(per_layer)
    assert groups == ["A", "B", "C"]
    assert sim[0][1] == pytest.approx(1.0) and sim[0][2] == pytest.approx(-1.0, abs=1e-6)
    m = routing_map(stats, held_out=["C"])
    assert m["layer"] == "l1.q_proj" and m["held_out"] == ["C"] and m["countries"] == ["A", "B", "C"]
    assert m["load"]["A"] == pytest.approx([0.7, 0.1, 0.1, 0.1])
    assert m["mean_load"]["C"] == pytest.approx([0.175, 0.175, 0.175, 0.475])
