"""Mean-collapse diagnostics (cuma.evaluate.collapse, `cuma analyze collapse`) on hand-made evaluation outputs."""

import json

import numpy as np
import pytest

from cuma.evaluate import collapse
from cuma.evaluate.report import write_predictions_tsv


def _pred(pid, country, qid, gold, probs):
    letters = ["A", "B"]
    k = int(np.argmax(probs))
    return {"id": f"{pid}:{qid}", "participant_id": pid, "question_id": qid, "profile": {"country": country},
            "held_out": False, "letters": letters, "option_values": [1, 2], "gold_letter": gold,
            "gold_value": letters.index(gold) + 1, "probs": list(probs), "pred_letter": letters[k],
            "pred_value": k + 1}  # fmt: skip


def _rows(collapsed: bool):
    """Country X always answers A, country Y always B (two participants each, two questions). The collapsed model
    predicts (0.5, 0.5) for everybody; the aligned one predicts each country's answer with 0.9."""
    rows = []
    for country, gold in (("X", "A"), ("Y", "B")):
        for k in range(2):
            for qid in ("Q1", "Q2"):
                if collapsed:
                    p = [0.5, 0.5]
                else:
                    p = [0.9, 0.1] if gold == "A" else [0.1, 0.9]
                rows.append(_pred(f"{country}{k}", country, qid, gold, p))
    return rows


def _write_run(path, rows, method, generations=None):
    path.mkdir(parents=True)
    write_predictions_tsv(path / "predictions.tsv", rows)
    (path / "summary.json").write_text(json.dumps({"metrics": {"accuracy": 0.5}, "run": {"config": {"method": method}}}))
    if generations is not None:
        with open(path / "generations.jsonl", "w") as fh:
            for g in generations:
                fh.write(json.dumps(g) + "\n")


def test_distinct_n_by_hand():
    assert collapse.distinct_n(["a b a b"], 1) == pytest.approx(2 / 4)
    assert collapse.distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)  # ab, ba, ab
    assert collapse.distinct_n(["a b", "A B c"], 2) == pytest.approx(2 / 3)  # lower-cased: ab, ab, bc
    assert collapse.distinct_n(["a"], 2) is None
    g = collapse.generation_diversity([{"group": "X", "text": "a a"}, {"profile_text": "P", "text": "a b"}])
    assert g["status"] == "ok" and g["distinct_1"] == pytest.approx(2 / 4)
    assert g["per_group"]["X"]["distinct_1"] == pytest.approx(0.5) and g["per_group"]["P"]["distinct_1"] == 1.0
    assert g["distinct_1_group_mean"] == pytest.approx(0.75)
    assert collapse.generation_diversity(None) == {"status": "no generations"}


def test_cross_profile_diversity_collapsed_vs_aligned():
    col = collapse.cross_profile_diversity(_rows(True), "country")
    assert col["gold_mean"] == pytest.approx(1.0)  # the two countries never agree
    assert col["predicted_mean"] == pytest.approx(0.0) and col["ratio_of_means"] == pytest.approx(0.0)
    ali = collapse.cross_profile_diversity(_rows(False), "country")
    from cuma.evaluate.topology import js_divergence

    assert ali["predicted_mean"] == pytest.approx(js_divergence([0.9, 0.1], [0.1, 0.9]))
    assert ali["per_question"]["Q1"]["groups"] == 2 and ali["questions_scored"] == 2
    assert 0 < ali["ratio_of_means"] < 1


def test_entropy_summary():
    s = collapse.entropy_summary(np.array([0.0, 0.5, 1.0, 1.0]))
    assert s["mean"] == pytest.approx(0.625) and s["share_above_0.9"] == pytest.approx(0.5)
    assert sum(s["histogram"]["counts"]) == 4
    assert collapse.entropy_summary(np.array([])) == {"n": 0}


def test_cli_collapse_end_to_end(tmp_path, capsys):
    from cuma import cli

    _write_run(tmp_path / "persona", _rows(True), "persona")
    _write_run(tmp_path / "cuma", _rows(False), "cuma",
               generations=[{"group": "X", "text": "family first always"}, {"group": "Y", "text": "work first"}])
    out = tmp_path / "collapse"
    rc = cli.main(["analyze", "collapse", "--runs", str(tmp_path / "persona"), str(tmp_path / "cuma"), "--out", str(out)])
    assert rc == 0
    assert "entropy mean" in capsys.readouterr().out
    res = json.loads((out / "collapse.json").read_text())
    assert list(res["runs"]) == ["persona", "cuma"]
    per, cu = res["runs"]["persona"], res["runs"]["cuma"]
    assert per["entropy"]["mean"] == pytest.approx(1.0) and per["entropy"]["n"] == 8
    assert cu["entropy"]["mean"] < 0.5
    assert per["diversity"]["ratio_of_means"] == pytest.approx(0.0) and cu["diversity"]["ratio_of_means"] > 0.4
    assert per["distinct"] == {"status": "no generations"}
    assert cu["distinct"]["distinct_1"] == pytest.approx(4 / 5) and cu["distinct"]["groups"] == 2
    md = (out / "collapse.md").read_text()
    assert "no generations" in md and "| cuma | cuma |" in md
    assert res["figures"] == ["entropy.png", "diversity.png", "distinct.png"]
    for f in res["figures"]:
        assert (out / f).stat().st_size > 1000 and (out / f).read_bytes()[:4] == b"\x89PNG"


def test_cli_collapse_missing_run(tmp_path, capsys):
    from cuma import cli

    (tmp_path / "empty").mkdir()
    rc = cli.main(["analyze", "collapse", "--runs", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    assert rc == 2 and "predictions.tsv" in capsys.readouterr().err
