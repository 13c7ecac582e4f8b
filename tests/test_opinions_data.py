"""cuma data opinions: the readers on hand-written fixtures, the synthetic export round trip against known truth,
the three splits, every bad input, the prepared folder and the CLI end to end."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from cuma.data.opinion_readers import (
    parse_selections,
    prepare_opinions,
    question_id_for,
    read_globalopinionqa,
    read_opinionqa,
    read_opinions_json,
    read_source,
    strip_embedded_options,
)
from cuma.data.opinions import (
    OpinionCell,
    OpinionsError,
    cell_to_record,
    load_opinions,
    render_cell_messages,
)
from cuma.data.records import validate_record

FIX = Path(__file__).parent / "fixtures" / "opinions"
GOQA = FIX / "globalopinionqa.csv"
JSON = FIX / "opinions.json"
OQA = FIX / "opinionqa"


def _by(cells, group_id, question_id=None):
    hits = [c for c in cells if c.group_id == group_id and (question_id is None or c.question_id == question_id)]
    return hits


# ------------------------------------------------------------------------------------------ GlobalOpinionQA


def test_goqa_fixture_cells_and_skips():
    r = read_globalopinionqa(GOQA)
    assert len(r.cells) == 14
    assert dict(r.skipped) == {"length_mismatch": 1, "empty_selections": 1, "sum_off": 1, "duplicate_cell": 1}
    groups = {c.group_id for c in r.cells}
    # suffixed samples and spelling variants stay separate groups; the trailing period goes as profiles drop it
    assert {"country=Mexico", "country=Mexico (Non-national sample)", "country=Britain", "country=Great Britain",
            "country=S. Korea", "country=South Korea", "country=Czech Rep"} <= groups
    assert len(groups) == 10
    crit = question_id_for("goqa", "Do you think people should be free to criticize the government?", ["Yes", "No"])
    # the repeated question (row 7) is the same question: Chile joins it, Argentina's equal repeat is skipped
    assert {c.group_id for c in r.cells if c.question_id == crit} == {
        "country=Argentina", "country=Brazil", "country=Czech Rep", "country=Mexico",
        "country=Mexico (Non-national sample)", "country=Chile"}
    (ar,) = _by(r.cells, "country=Argentina", crit)
    assert ar.target == pytest.approx([0.7, 0.3]) and ar.profile_text == "Country: Argentina."
    assert ar.source == "globalopinionqa" and ar.source_ids["survey"] == "GAS" and ar.weight == 1.0
    # options with commas are kept whole; "Don't know" kept as published
    lot = [c for c in r.cells if c.options == ["Yes, a lot", "No, not at all"]]
    assert len(lot) == 3
    trust = [c for c in r.cells if "Don't know" in c.options]
    assert trust and trust[0].options == ["Most people can be trusted", "Need to be very careful", "Don't know"]
    # within the tolerance: renormalised
    (cz,) = [c for c in trust if c.group_id == "country=Czech Rep"]
    assert cz.target == pytest.approx(np.array([0.5004, 0.4, 0.1]) / 1.0004)
    assert sum(cz.target) == pytest.approx(1.0, abs=1e-12)
    assert r.skip_examples["sum_off"] and "Brazil" in r.skip_examples["sum_off"][0]


def test_goqa_merge_groups(tmp_path):
    mapping = tmp_path / "merge.tsv"
    mapping.write_text("# variant\tcanonical\nBritain\tGreat Britain\nCzech Rep.\tCzechia\n", encoding="utf-8")
    r = read_globalopinionqa(GOQA, merge_groups=str(mapping))
    groups = {c.group_id for c in r.cells}
    assert "country=Britain" not in groups and "country=Great Britain" in groups
    assert "country=Czechia" in groups and "country=Czech Rep" not in groups
    assert r.details["merged_names"]["Britain -> Great Britain"] == 1
    # the built-in variants merge S. Korea into South Korea, which also answers that question with other values
    with pytest.raises(OpinionsError, match="duplicate cell.*South Korea"):
        read_globalopinionqa(GOQA, merge_groups="builtin")


def test_selections_are_never_evaluated():
    assert parse_selections("defaultdict(<class 'list'>, {'A': [0.5, 0.5]})", "x") == {"A": [0.5, 0.5]}
    assert parse_selections("{'A': [1.0]}", "x") == {"A": [1.0]}
    with pytest.raises(OpinionsError, match="selections"):
        parse_selections("defaultdict(<class 'list'>, {'A': __import__('os').getcwd()})", "f.csv:3")
    with pytest.raises(OpinionsError, match="f.csv:3.*selections"):
        parse_selections("[0.5, 0.5]", "f.csv:3")


# ------------------------------------------------------------------------------------------ distributional JSON


def test_strip_embedded_options():
    assert strip_embedded_options("Question: Is it good?\nOptions: A. Yes B. No\nAnswer:") == "Is it good?"
    assert strip_embedded_options("Question: Is it good?\nOptions:\nA. Yes\nB. No\nAnswer:") == "Is it good?"
    assert strip_embedded_options("Is it good?\nA. Yes\nB. No\nAnswer:") == "Is it good?"
    assert strip_embedded_options("Is it good?") == "Is it good?"


def test_json_fixture():
    r = read_opinions_json(JSON)
    assert len(r.cells) == 4
    assert dict(r.skipped) == {"length_mismatch": 1, "sum_off": 1}
    q1 = [c for c in r.cells if c.question == "How much do you trust the national government?"]
    assert {c.group_id for c in q1} == {"country=Argentina", "country=Mexico (Non-national sample)", "country=Brazil"}
    assert len({c.question_id for c in q1}) == 1  # three spellings of one question are one question
    (ar2,) = [c for c in r.cells if c.question == "Is religion important in your life?"]
    assert ar2.options == ["Yes, very", "No", "Don't know"] and ar2.source_ids["id"] == "q2-ar"


# ------------------------------------------------------------------------------------------ OpinionQA


def test_opinionqa_fixture_weighted_distributions():
    r = read_opinionqa(OQA)
    assert dict(r.skipped) == {"respondent_missing_weight": 1, "answer_not_an_option": 1}
    cells = {(c.question_id, c.group_id): c for c in r.cells}
    assert len(cells) == 9
    male = cells[("SATIS_W7", "gender=Male")]
    assert male.target == pytest.approx([2.5 / 3.5, 1 / 3.5])
    assert male.weight == pytest.approx(3.5) and male.source_ids["respondents"] == 4
    assert male.options == ["Satisfied", "Dissatisfied"] and male.option_values == [1.0, 2.0] and male.ordinal
    assert cells[("SATIS_W7", "gender=Female")].target == pytest.approx([0.6, 0.4])
    rep = cells[("SATIS_W7", "extra.political_party=Republican")]
    assert rep.target == pytest.approx([1.0, 0.0]) and rep.profile_text == "Political party: Republican."
    assert cells[("SATIS_W7", "extra.political_party=Democrat")].source_ids["respondents"] == 1
    gov = cells[("GOVSIZE_W7", "gender=Male")]
    assert gov.options == ["Smaller government, fewer services", "Bigger government, more services"]
    assert gov.target == pytest.approx([1.0, 0.0])
    # an Independent answered GOVSIZE only with Refused: no cell; "Refused" party is no group
    assert ("GOVSIZE_W7", "extra.political_party=Independent") not in cells
    assert not any("Refused" in c.group_id for c in r.cells)
    rates = r.details["refusal_rate"]["by_question"]
    assert rates["W7:SATIS_W7"] == pytest.approx(1.5 / 10) and rates["W7:GOVSIZE_W7"] == pytest.approx(1 / 6, abs=1e-6)
    # --min-group-size counts the cells it drops
    r2 = read_opinionqa(OQA, min_group_size=3)
    assert r2.skipped["group_too_small"] == sum(1 for c in r.cells if c.source_ids["respondents"] < 3)
    # --group-fields picks attributes
    r3 = read_opinionqa(OQA, group_fields=["SEX"])
    assert {c.group_id for c in r3.cells} == {"gender=Male", "gender=Female"}
    with pytest.raises(OpinionsError, match="not OpinionQA attributes"):
        read_opinionqa(OQA, group_fields=["sex"])


# ------------------------------------------------------------------------------------------ synthetic truth


@pytest.fixture(scope="module")
def synth_export(tmp_path_factory):
    from cuma.data.opinions_export import export_synthetic_opinions
    from cuma.data.synthetic import SynthConfig, write_synthetic

    root = tmp_path_factory.mktemp("opsynth")
    write_synthetic(root / "pop", SynthConfig(participants=1200, questions=8, countries=4, seed=3))
    manifest = export_synthetic_opinions(root / "pop", root / "export", seed=5)
    truth = json.loads((root / "export" / "truth_groups.json").read_text())
    return root, manifest, truth


def test_export_round_trip_exact_layouts(synth_export):
    root, manifest, truth = synth_export
    for source, path in (("globalopinionqa", "globalopinionqa.csv"), ("opinions-json", "opinions.json")):
        r = read_source(source, root / "export" / path)
        assert not r.skipped
        assert len(r.cells) == manifest["counts"]["questions"] * manifest["counts"]["countries"]
        for c in r.cells:
            assert c.target == pytest.approx(truth[source][c.question_id][c.group_id], abs=1e-12)


def test_export_round_trip_opinionqa(synth_export):
    import pandas as pd

    root, manifest, truth = synth_export
    wave = root / "export" / "opinionqa" / "American_Trends_Panel_W1"
    r = read_source("opinionqa", wave.parent)
    resp = pd.read_csv(wave / "responses.csv", dtype=str, keep_default_na=False)
    info = pd.read_csv(wave / "info.csv", dtype=str, keep_default_na=False)
    refs = {k: eval_list(v) for k, v in zip(info["key"], info["references"])}
    # the reader's distribution equals the weighted shares counted here row by row
    checked = 0
    for c in r.cells[:: max(1, len(r.cells) // 40)]:
        attr, value = c.source_ids["attribute"], c.source_ids["value"]
        rows = resp[(resp[attr] == value) & (resp[c.question_id] != "") & (resp[c.question_id] != "Refused")]
        w = rows["WEIGHT_W1"].astype(float)
        expected = [w[rows[c.question_id] == o].sum() / w.sum() for o in refs[c.question_id][:-1]]
        assert c.target == pytest.approx(expected, abs=1e-12)
        checked += 1
    assert checked >= 20
    # and approaches the group's true distribution (sampled answers; groups of 100+ respondents)
    tv = [0.5 * np.abs(np.array(c.target) - truth["opinionqa"][c.question_id][c.group_id]).sum()
          for c in r.cells if c.source_ids["respondents"] >= 100]
    assert len(tv) > 50 and np.mean(tv) < 0.08
    assert 0.0 < r.details["refusal_rate"]["mean"] < 0.1  # about the 3% written as Refused


def eval_list(text):
    import ast

    return ast.literal_eval(text)


def test_wvb_grouped_matches_truth(synth_export):
    root, _, truth = synth_export
    r = read_source("wvb", root / "pop", group_fields=["country"])
    assert {c.source for c in r.cells} == {"wvb"}
    by_q = Counter(c.question_id for c in r.cells)
    assert len(by_q) == 8 and set(by_q.values()) == {4}
    tv = []
    for c in r.cells:
        t = truth["globalopinionqa"][question_id_for("goqa", c.question, c.options)][c.group_id]
        tv.append(0.5 * np.abs(np.array(c.target) - t).sum())
        assert c.weight == c.source_ids["respondents"] >= 200
    assert np.mean(tv) < 0.06
    # joint groups and the minimum size
    r2 = read_source("wvb", root / "pop", group_fields=["country", "gender"], min_group_size=150)
    assert all(set(c.group) == {"country", "gender"} for c in r2.cells)
    r3 = read_source("wvb", root / "pop", group_fields=["country", "religion"], min_group_size=60)
    assert r3.skipped["group_too_small"] > 0
    assert all(c.source_ids["respondents"] >= 60 for c in r3.cells)
    with pytest.raises(OpinionsError, match="not profile fields"):
        read_source("wvb", root / "pop", group_fields=["B_COUNTRY"])


# ------------------------------------------------------------------------------------------ splits and the folder


def _prep(tmp_path, name="out", source="globalopinionqa", path=GOQA, **kw):
    kw.setdefault("encoder", None)
    return prepare_opinions(source, path, tmp_path / name, **kw), tmp_path / name


def test_split_question(tmp_path, synth_export):
    root, _, _ = synth_export
    m, out = _prep(tmp_path, source="globalopinionqa", path=root / "export" / "globalopinionqa.csv",
                   split="question", test_fraction=0.25, valid_fraction=0.125, seed=1)
    d = load_opinions(out)
    qs = {s: {c.question_id for c in d.cells(s)} for s in ("train", "valid", "test")}
    assert len(qs["test"]) == 2 and len(qs["valid"]) == 1 and len(qs["train"]) == 5
    assert not (qs["train"] & qs["test"]) and not (qs["train"] & qs["valid"])
    assert m["counts"]["cells"] == {s: len(d.cells(s)) for s in ("train", "valid", "test")}
    m2, _ = _prep(tmp_path, "again", source="globalopinionqa", path=root / "export" / "globalopinionqa.csv",
                  split="question", test_fraction=0.25, valid_fraction=0.125, seed=1)
    assert m2["split"] == m["split"] and m2["outputs"]["cells_test.jsonl"] == m["outputs"]["cells_test.jsonl"]


def test_split_group_by_names(tmp_path):
    m, out = _prep(tmp_path, split="group", holdout_groups="argentina, Czech Rep.", valid_fraction=0.0)
    d = load_opinions(out)
    test = d.cells("test")
    assert {c.group_id for c in test} == {"country=Argentina", "country=Czech Rep"}
    assert all(c.heldout_group for c in test) and not any(c.heldout_group for c in d.cells("train"))
    train_q = {c.question_id for c in d.cells("train")}
    assert {c.question_id for c in test} <= train_q
    assert not {c.group_id for c in d.cells("train")} & {"country=Argentina", "country=Czech Rep"}
    assert m["heldout_groups"] == ["country=Argentina", "country=Czech Rep"]
    assert m["split"]["holdout_groups"]["names"] == ["argentina", "Czech Rep."]


def test_split_group_names_file_with_comma(tmp_path):
    data = tmp_path / "goqa.csv"
    data.write_text(
        "question,selections,options,source\n"
        "\"Q one?\",\"defaultdict(<class 'list'>, {'Korea, South': [0.2, 0.8], 'Peru': [0.5, 0.5], "
        "'Chile': [0.4, 0.6]})\",\"['Yes', 'No']\",GAS\n"
        "\"Q two?\",\"defaultdict(<class 'list'>, {'Korea, South': [0.3, 0.7], 'Peru': [0.6, 0.4], "
        "'Chile': [0.1, 0.9]})\",\"['Yes', 'No']\",GAS\n", encoding="utf-8")
    names = tmp_path / "holdout.txt"
    names.write_text("# one name per line\nKorea, South\n", encoding="utf-8")
    _, out = _prep(tmp_path, path=data, split="group", holdout_groups=str(names), valid_fraction=0.0)
    assert {c.group_id for c in load_opinions(out).cells("test")} == {"country=Korea, South"}
    with pytest.raises(OpinionsError, match=r"\['Korea'\].*not groups of the data"):
        _prep(tmp_path, "bad", path=data, split="group", holdout_groups="Korea, Peru", valid_fraction=0.0)
    assert not (tmp_path / "bad").exists()


def test_split_group_fraction_and_unseen_question_skip(tmp_path):
    # only Argentina, S. Korea and South Korea answer the "Yes, a lot" question: held out together, no training group
    # answers it, so their cells on it are skipped (counted); Argentina's cells on the three other questions are the test
    m, out = _prep(tmp_path, split="group", holdout_groups="Argentina,South Korea,S. Korea", valid_fraction=0.0)
    d = load_opinions(out)
    assert m["skipped"]["heldout_group_on_unseen_question"] == 3
    assert sorted(c.group_id for c in d.cells("test")) == ["country=Argentina"] * 3
    assert m["split"]["holdout_groups"]["without_cells"] == ["country=S. Korea", "country=South Korea"]
    assert m["counts"]["cells"]["test"] + m["counts"]["cells"]["train"] + 3 == 14
    m2, out2 = _prep(tmp_path, "frac", split="group", test_fraction=0.3, valid_fraction=0.2, seed=4)
    d2 = load_opinions(out2)
    assert m2["counts"]["heldout_groups"] == len({c.group_id for c in d2.cells("test") + d2.cells("valid")})
    assert all(c.heldout_group for c in d2.cells("valid"))


def test_split_cell_keeps_groups_and_questions_seen(tmp_path, synth_export):
    root, _, _ = synth_export
    m, out = _prep(tmp_path, source="opinions-json", path=root / "export" / "opinions.json", split="cell",
                   test_fraction=0.3, valid_fraction=0.1, seed=2)
    d = load_opinions(out)
    train = d.cells("train")
    tq, tg = {c.question_id for c in train}, {c.group_id for c in train}
    for s in ("valid", "test"):
        assert d.cells(s)
        for c in d.cells(s):
            assert c.question_id in tq and c.group_id in tg and not c.heldout_group
    ids = [c.cell_id for s in ("train", "valid", "test") for c in d.cells(s)]
    assert len(ids) == len(set(ids)) == 32
    assert m["counts"]["cells"]["test"] == round(0.3 * 32)
    m3, _ = _prep(tmp_path, "seed3", source="opinions-json", path=root / "export" / "opinions.json", split="cell",
                  test_fraction=0.3, valid_fraction=0.1, seed=3)
    assert m3["outputs"]["cells_test.jsonl"] != m["outputs"]["cells_test.jsonl"]


def test_prepared_folder_manifest_and_records(tmp_path):
    import torch

    class Enc:
        dim = 4
        source = "hash-encoder"

        def encode(self, texts):
            return torch.tensor([[float(len(t)), float(sum(map(ord, t)) % 97), 1.0, 0.0] for t in texts])

    m, out = _prep(tmp_path, split="cell", test_fraction=0.3, valid_fraction=0.0, encoder=Enc())
    assert m["kind"] == "opinions" and m["source"] == "globalopinionqa" and m["seed"] == 0
    assert m["skipped"] == {"duplicate_cell": 1, "empty_selections": 1, "length_mismatch": 1, "sum_off": 1}
    assert m["inputs"]["globalopinionqa.csv"]["sha256"] and m["versions"]["cuma"]
    assert m["counts"]["groups"] == len(m["groups"]) == 10
    d = load_opinions(out)
    assert d.profile_embeds.shape == (10, 4)
    for g in d.groups:  # rows aligned with groups.jsonl
        assert d.profile_embeds[d.group_index[g["group_id"]], 0].item() == len(g["profile_text"])
    for rec in d.records("test"):
        validate_record(rec)
        assert rec["profile_index"] == d.group_index[rec["group_id"]]
        assert rec["letters"][int(np.argmax(rec["target"]))] == rec["gold_letter"]
    cell = d.cells("train")[0]
    msgs = render_cell_messages(cell)
    assert cell.profile_text in msgs[0]["content"]
    assert msgs[1]["content"].startswith(cell.question) and "A. " + cell.options[0] in msgs[1]["content"]
    assert cell.profile_text not in render_cell_messages(cell, profile_in_prompt=False)[0]["content"]
    assert OpinionCell.from_dict(cell.to_dict()) == cell


# ------------------------------------------------------------------------------------------ bad input


def test_bad_inputs(tmp_path):
    # a file in none of the layouts
    with pytest.raises(OpinionsError, match="missing columns.*selections"):
        read_source("globalopinionqa", JSON)
    with pytest.raises(OpinionsError, match="not valid JSON"):
        read_source("opinions-json", GOQA)
    with pytest.raises(OpinionsError, match="no American_Trends_Panel_W"):
        read_source("opinionqa", FIX)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_source("globalopinionqa", tmp_path / "nope.csv")
    bad = tmp_path / "items.json"
    bad.write_text(json.dumps([{"question": "Q?", "options": ["a", "b"], "attribute": "X"}]), encoding="utf-8")
    with pytest.raises(OpinionsError, match=r"items.json\[0\]: missing keys \['gold_distribution', 'id'\]"):
        read_source("opinions-json", bad)
    # options must be a literal list, never split on commas
    opts = tmp_path / "opts.csv"
    opts.write_text("question,selections,options,source\nQ?,\"{'A': [0.5, 0.5]}\",\"Yes, No\",GAS\n", encoding="utf-8")
    with pytest.raises(OpinionsError, match=r"opts.csv:2: field 'options'"):
        read_source("globalopinionqa", opts)
    with pytest.raises(OpinionsError, match="no respondent counts"):
        read_source("globalopinionqa", GOQA, min_group_size=5)
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + GOQA.read_bytes())
    assert len(read_source("globalopinionqa", bom).cells) == 14
    # a duplicate cell with different values
    dup = tmp_path / "dup.json"
    item = {"question": "Q?", "options": ["a", "b"], "attribute": "X", "gold_distribution": [0.5, 0.5], "id": 1}
    dup.write_text(json.dumps([item, {**item, "gold_distribution": [0.4, 0.6], "id": 2}]), encoding="utf-8")
    with pytest.raises(OpinionsError, match=r"dup.json\[1\]: duplicate cell .* from .*dup.json\[0\]"):
        read_source("opinions-json", dup)
    # an OpinionQA option_ordinal that does not match the references
    wave = tmp_path / "American_Trends_Panel_W2"
    wave.mkdir()
    (wave / "info.csv").write_text("key,question,references,option_ordinal\nK_W2,Q?,\"['a', 'b']\",\"[1.0]\"\n",
                                   encoding="utf-8")
    (wave / "responses.csv").write_text("K_W2,SEX,WEIGHT_W2\na,Male,1\n", encoding="utf-8")
    with pytest.raises(OpinionsError, match=r"info.csv:2: field 'option_ordinal' must list 2 numbers"):
        read_source("opinionqa", wave)
    (wave / "info.csv").write_text("key,question,references,option_ordinal\nK_W2,Q?,\"['a', 'b']\",\"[1, 2]\"\n",
                                   encoding="utf-8")
    (wave / "responses.csv").write_text("K_W2,SEX,WEIGHT_W1\na,Male,1\n", encoding="utf-8")
    with pytest.raises(OpinionsError, match="no survey-weight column 'WEIGHT_W2'"):
        read_source("opinionqa", wave)


def test_bad_options_and_empty_splits(tmp_path):
    with pytest.raises(OpinionsError, match="needs --split group"):
        _prep(tmp_path, split="cell", holdout_groups="Argentina")
    with pytest.raises(OpinionsError, match=r"\['Atlantis'\] are not groups"):
        _prep(tmp_path, split="group", holdout_groups="Argentina,Atlantis")
    one = tmp_path / "one.json"
    one.write_text(json.dumps([{"question": "Q?", "options": ["a", "b"], "attribute": "X",
                                "gold_distribution": [0.5, 0.5], "id": 1}]), encoding="utf-8")
    with pytest.raises(OpinionsError, match="test split is empty"):
        _prep(tmp_path, "e1", source="opinions-json", path=one, split="cell", valid_fraction=0.0)
    with pytest.raises(OpinionsError, match="valid split is empty"):
        _prep(tmp_path, "e2", split="question", test_fraction=0.25, valid_fraction=0.05)
    with pytest.raises(OpinionsError, match="no training group"):
        _prep(tmp_path, "e3", split="group", valid_fraction=0.0, holdout_groups="Argentina,Brazil,Czech Rep,Mexico,"
              "Mexico (Non-national sample),Britain,Great Britain,S. Korea,South Korea,Chile")
    allbad = tmp_path / "allbad.json"
    allbad.write_text(json.dumps([{"question": "Q?", "options": ["a", "b"], "attribute": "X",
                                   "gold_distribution": [0.5, 0.6], "id": 1}]), encoding="utf-8")
    with pytest.raises(OpinionsError, match="no usable cell.*sum_off"):
        _prep(tmp_path, "e4", source="opinions-json", path=allbad, split="cell")
    for name in ("e1", "e2", "e3", "e4"):  # nothing half-written
        assert not (tmp_path / name).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    # an existing output is kept unless --overwrite
    _prep(tmp_path, "done", split="cell")
    with pytest.raises(ValueError, match="not empty"):
        _prep(tmp_path, "done", split="cell")


def test_load_opinions_refuses_other_folders(tmp_path, tiny_prepared):
    with pytest.raises(FileNotFoundError, match="not a prepared opinions folder.*load_prepared"):
        load_opinions(tiny_prepared)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_opinions(tmp_path / "none")
    _, out = _prep(tmp_path, split="cell")
    lines = (out / "cells_test.jsonl").read_text().splitlines()
    row = json.loads(lines[0])
    row["target"] = [0.9] * len(row["options"])
    (out / "cells_test.jsonl").write_text("\n".join([json.dumps(row)] + lines[1:]) + "\n")
    with pytest.raises(OpinionsError, match=r"cells_test.jsonl:1: cell .* field 'target'"):
        load_opinions(out)


# ------------------------------------------------------------------------------------------ CLI


def test_cli_end_to_end(tmp_path, capsys):
    from cuma.cli import main

    out = tmp_path / "prepared"
    rc = main(["data", "opinions", "--source", "opinionqa", "--input", str(OQA), "--out", str(out), "--split",
               "group", "--holdout-groups", "Female", "--valid-fraction", "0", "--no-embeddings", "--seed", "3"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and "respondent_missing_weight" in printed
    m = json.loads((out / "manifest.json").read_text())
    assert m["kind"] == "opinions" and m["split"]["mode"] == "group" and m["seed"] == 3
    assert m["counts"]["cells"]["test"] == 2 and m["heldout_groups"] == ["gender=Female"]
    assert m["details"]["refusal_rate"]["by_question"]["W7:SATIS_W7"] == pytest.approx(0.15)
    assert set(m["inputs"]) == {f"American_Trends_Panel_W7/{n}" for n in ("info.csv", "metadata.csv",
                                                                          "responses.csv")}
    assert not (out / "profile_embeds.safetensors").exists()


def test_cli_synth_export_then_prepare(tmp_path):
    from cuma.cli import main

    pop, exp = tmp_path / "pop", tmp_path / "exp"
    assert main(["data", "synth", "--out", str(pop), "--participants", "400", "--questions", "6", "--countries", "3",
                 "--export-opinions", str(exp)]) == 0
    assert (exp / "globalopinionqa.csv").is_file() and (exp / "truth_groups.json").is_file()
    out = tmp_path / "p"
    assert main(["data", "opinions", "--source", "globalopinionqa", "--input", str(exp / "globalopinionqa.csv"),
                 "--out", str(out), "--split", "cell", "--test-fraction", "0.3", "--no-embeddings"]) == 0
    d = load_opinions(out)
    truth = json.loads((exp / "truth_groups.json").read_text())["globalopinionqa"]
    for c in d.cells("test"):
        assert c.target == pytest.approx(truth[c.question_id][c.group_id], abs=1e-12)
