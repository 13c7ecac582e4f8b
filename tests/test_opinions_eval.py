"""cuma eval opinions and cuma bench opinions: the metrics against hand values (scipy's jensenshannon semantics),
the references, the summary's keys, the CLI end to end on a tiny model, and the bench's quick path."""

import csv
import json
import math

import pytest
from test_opinions_train import make_opinions

from cuma.cli import main
from cuma.evaluate.opinions import (cell_metrics, js_distance, nearest_groups, population_average,
                                    reference_predictions, summarise, total_variation, uniform, w1_ordinal)
from cuma.evaluate.opinions_cli import paired_difference, read_cells_tsv

KEYS = {"cells", "js_distance", "similarity", "total_variation", "w1_ordinal", "argmax_agreement"}


def _js_by_hand(p, q):
    m = [(a + b) / 2 for a, b in zip(p, q)]
    kl = lambda x: sum(a * math.log2(a / c) for a, c in zip(x, m) if a > 0)  # noqa: E731
    return math.sqrt((kl(p) + kl(q)) / 2)


def test_metrics_against_hand_values():
    assert js_distance([1, 0], [0, 1]) == pytest.approx(1.0)  # disjoint supports: the base-2 maximum
    assert js_distance([0.3, 0.7], [0.3, 0.7]) == pytest.approx(0.0, abs=1e-12)
    # scipy.spatial.distance.jensenshannon([.5, .5], [1, 0], base=2) = 0.5579230...
    assert js_distance([0.5, 0.5], [1.0, 0.0]) == pytest.approx(0.557923, abs=1e-6)
    p, q = [0.1, 0.2, 0.7], [0.4, 0.4, 0.2]
    assert js_distance(p, q) == pytest.approx(_js_by_hand(p, q), rel=1e-12)
    assert js_distance([1, 2, 7], [2, 2, 1]) == pytest.approx(_js_by_hand(p, q), rel=1e-12)  # inputs normalised
    assert js_distance(p, q, base=math.e) == pytest.approx(_js_by_hand(p, q) * math.sqrt(math.log(2)), rel=1e-12)
    assert total_variation(p, q) == pytest.approx(0.5 * (0.3 + 0.2 + 0.5))
    # cumulative sums (0.1, 0.3) vs (0.4, 0.8): |gaps| 0.3 + 0.5 over K - 1 = 2
    assert w1_ordinal(p, q) == pytest.approx(0.4)
    assert w1_ordinal([1, 0, 0, 0], [0, 0, 0, 1]) == pytest.approx(1.0)
    m = cell_metrics(p, q, ordinal=False)
    assert m["w1_ordinal"] is None and m["argmax_agreement"] is False
    assert m["similarity"] == pytest.approx(1 - m["js_distance"])
    assert cell_metrics([0.2, 0.5, 0.3], [0.1, 0.6, 0.3], ordinal=True)["argmax_agreement"] is True
    with pytest.raises(ValueError, match="same options"):
        js_distance([0.5, 0.5], [0.2, 0.3, 0.5])


def _cell(g, q, t, held=False):
    return {"cell_id": f"{q}::{g}", "group_id": g, "question_id": q, "target": t, "held_out": held, "source": "s",
            "ordinal": True}


def test_references():
    train = [_cell("a", "q1", [1.0, 0.0]), _cell("b", "q1", [0.0, 1.0]), _cell("c", "q1", [0.5, 0.5]),
             _cell("a", "q2", [0.9, 0.1]), _cell("b", "q2", [0.1, 0.9]), _cell("c", "q2", [0.8, 0.2])]
    test = _cell("c", "q1", [0.6, 0.4])
    assert uniform(test) == [0.5, 0.5]
    assert population_average(train)(test) == pytest.approx([0.5, 0.5])
    assert population_average(train)(_cell("c", "q9", [1.0, 0.0])) is None  # no training group answered q9
    # c answers q2 like a (0.8 vs 0.9), unlike b: its nearest training group is a
    assert nearest_groups(train, k=1)({**test, "question_id": "q1"}) == pytest.approx([1.0, 0.0])
    assert nearest_groups(train, k=2)(test) == pytest.approx([0.5, 0.5])
    # a held-out group has no training answers: nearest by profile embedding (d is closest to b)
    import torch

    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7], [0.1, 1.0]])
    index = {"a": 0, "b": 1, "c": 2, "d": 3}
    held = _cell("d", "q1", [0.2, 0.8], held=True)
    assert nearest_groups(train, 1, emb, index)(held) == pytest.approx([0.0, 1.0])
    assert nearest_groups(train, 1)(held) is None  # without embeddings it does not cover the cell
    refs = reference_predictions([test, held], train, k=1, profile_embeds=emb, group_index=index)
    assert set(refs) == {"uniform", "population_average", "nearest_groups"} and len(refs["uniform"]) == 2


def test_summary_blocks_and_keys():
    cells = [_cell("a", "q1", [0.6, 0.4]), _cell("d", "q1", [0.2, 0.8], held=True)]
    rows = [{**c, **cell_metrics([0.5, 0.5], c["target"], True)} for c in cells]
    refs = {"uniform": [cell_metrics([0.5, 0.5], c["target"], True) for c in cells],
            "population_average": [None, cell_metrics([0.3, 0.7], cells[1]["target"], True)],
            "nearest_groups": [None, None]}
    s = summarise(rows, refs)
    for part in ("overall", "seen", "held_out"):
        assert KEYS <= set(s[part]) and set(s[part]["references"]) == set(refs)
        for r in s[part]["references"].values():
            assert KEYS <= set(r)
    assert s["seen"]["cells"] == 1 and s["held_out"]["cells"] == 1
    assert s["seen"]["references"]["population_average"]["cells"] == 0  # covers only the held-out cell
    assert s["held_out"]["js_distance"] == pytest.approx(js_distance([0.5, 0.5], [0.2, 0.8]))
    assert set(s["per_group"]) == {"a", "d"} and s["per_group"]["d"]["held_out"] is True
    assert set(s["per_source"]) == {"s"}


def test_paired_difference_matches_cells():
    a = [{"cell_id": "x", "held_out": False, "js_distance": 0.2}, {"cell_id": "y", "held_out": True, "js_distance": 0.4}]
    b = [{"cell_id": "y", "held_out": True, "js_distance": 0.1}, {"cell_id": "x", "held_out": False, "js_distance": 0.1}]
    d = paired_difference(a, b, n_boot=50)
    assert d["overall"]["difference"] == pytest.approx(0.2) and d["held_out"]["difference"] == pytest.approx(0.3)


@pytest.fixture(scope="module")
def opinions_dir(tmp_path_factory):
    return make_opinions(tmp_path_factory.mktemp("op") / "prepared", groups=8, questions=6)


def test_eval_cli_end_to_end(tiny_model_dir, opinions_dir, tmp_path):
    from cuma.train.sft import run_sft
    from test_opinions_train import _cfg

    run_sft(_cfg(tiny_model_dir, opinions_dir, tmp_path / "lora", "lora"))
    out = tmp_path / "eval"
    base = ["eval", "opinions", "--model", str(tiny_model_dir), "--data", str(opinions_dir), "--no-progress"]
    assert main(base + ["--method", "persona", "--out", str(tmp_path / "persona")]) == 0
    assert main(base + ["--adapter", str(tmp_path / "lora"), "--out", str(out),
                        "--compare", str(tmp_path / "persona"), "--bootstrap", "50"]) == 0
    s = json.loads((out / "summary.json").read_text())
    test_cells = sum(1 for line in (opinions_dir / "cells_test.jsonl").read_text().splitlines() if line.strip())
    assert s["overall"]["cells"] == test_cells == s["seen"]["cells"] + s["held_out"]["cells"]
    # the group split: whole groups held out, their cells on training questions are the test cells
    assert s["held_out"]["cells"] == test_cells and s["seen"]["cells"] == 0 and s["seen"]["js_distance"] is None
    for part in ("seen", "held_out"):
        assert KEYS <= set(s[part])
        assert set(s[part]["references"]) == {"uniform", "population_average", "nearest_groups"}
    assert 0 <= s["held_out"]["js_distance"] <= 1
    assert s["held_out"]["references"]["nearest_groups"]["cells"] == test_cells  # by profile embedding
    assert s["config"]["method"] == "lora" and s["config"]["js_base"] == 2
    assert s["comparisons"]["compare_run"]["js_distance"]["overall"]["pairs"] == test_cells
    with open(out / "cells.tsv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert len(rows) == test_cells
    for r in rows:  # the row's metrics are those of its own target and prediction
        t, p = json.loads(r["target"]), json.loads(r["prediction"])
        assert float(r["js_distance"]) == pytest.approx(js_distance(p, t), abs=2e-6)
        assert float(r["uniform_js_distance"]) == pytest.approx(js_distance(uniform({"target": t}), t), abs=2e-6)
    assert len(read_cells_tsv(out)) == test_cells
    report = (out / "report.md").read_text()
    assert "Held-out groups" in report and "per_group_similarity.png" in report
    assert (out / "per_group_similarity.png").stat().st_size > 1000 and (out / "sample_cells.png").is_file()
    # --out is not overwritten without --overwrite; --limit scores the first N cells
    assert main(base + ["--method", "persona", "--out", str(out)]) == 2
    assert main(base + ["--method", "persona", "--out", str(out), "--overwrite", "--limit", "3", "--no-figures"]) == 0
    assert json.loads((out / "summary.json").read_text())["counts"]["beyond_limit"] == test_cells - 3


def test_eval_cli_bad_input(tiny_model_dir, tiny_prepared, opinions_dir, tmp_path, capsys):
    base = ["eval", "opinions", "--model", str(tiny_model_dir), "--no-progress", "--out", str(tmp_path / "o")]
    assert main(base + ["--method", "persona", "--data", str(tiny_prepared)]) == 2
    assert "not a prepared opinions folder" in capsys.readouterr().err
    assert main(base + ["--method", "lora", "--data", str(opinions_dir)]) == 2
    assert "pass --adapter" in capsys.readouterr().err
    assert main(base + ["--method", "fewshot", "--data", str(opinions_dir)]) == 2
    assert main(base + ["--method", "persona", "--data", str(opinions_dir), "--limit", "0"]) == 2


def test_bench_quick(tiny_model_dir, tmp_path):
    data = make_opinions(tmp_path / "cells", groups=6, questions=6, mode="cell")  # seen groups, unseen combinations
    out = tmp_path / "bench"
    argv = ["bench", "opinions", "--data", str(data), "--out", str(out), "--quick", "--steps", "2",
            "--model", str(tiny_model_dir)]
    assert main(argv) == 0
    r = json.loads((out / "results.json").read_text())
    assert set(r["rows"]) == {"persona", "lora", "cuma-semantic", "cuma", "uniform", "population_average",
                              "nearest_groups"}
    for row in r["rows"].values():  # every method and reference in the same keys
        assert set(row) == {"overall", "seen", "held_out"}
        assert all(KEYS <= set(row[p]) for p in row)
    assert r["training"]["cuma"]["global_step"] == 2 and r["config"]["quick"] is True
    assert "cuma - lora" in r["comparisons"] and "cuma - population_average" in r["comparisons"]
    assert r["rows"]["cuma"]["seen"]["cells"] == r["rows"]["population_average"]["seen"]["cells"] > 0
    assert r["rows"]["cuma"]["held_out"]["cells"] == 0
    report = (out / "report.md").read_text()
    assert "## Seen groups" in report and "| CuMA |" in report and "| population average (training groups) |" in report
    assert (out / "js_by_row.png").is_file() and (out / "runs" / "cuma" / "adapter_model.safetensors").is_file()
