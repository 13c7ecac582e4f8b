import json

import pytest

from cuma import cli
from cuma.data.community_alignment import load_community_alignment, parse_preferred, prepare_community_alignment
from cuma.data.records import read_jsonl

CSV = "tests/fixtures/ca_tiny/community_alignment.csv"


def test_parse_preferred():
    assert [parse_preferred(x) for x in ("A", "b", "response_c", "Response D", "2", 3, "4.0")] == [0, 1, 2, 3, 1, 2, 3]
    assert parse_preferred("E") is None and parse_preferred("") is None and parse_preferred(None) is None
    assert parse_preferred("Z") is None


def test_load_and_drops():
    convs, dropped, counts = load_community_alignment(CSV)
    d = dropped.to_dict()
    assert counts["rows"] == 15 and len(convs) == 13
    assert d["rows"] == {"first turn: missing preferred-response label": 1,
                         "first turn: unknown preferred-response label": 1}
    assert d["turns"] == {"unknown preferred-response label (thread cut)": 1}
    by = {(c.conversation_id, c.user_id): c for c in convs}
    assert len(by[("k0", "a2")].turns) == 2 and by[("k0", "a2")].turns[1].chosen == 2
    assert len(by[("k2", "a1")].turns) == 1  # second label "E": cut
    assert by[("k0", "a0")].profile.extra == {"political_leaning": "Liberal"}
    assert by[("k0", "a0")].profile.country == "India"


def test_prepared_folder_and_no_leak(tmp_path):
    m = prepare_community_alignment(CSV, tmp_path / "o", test_fraction=0.2, valid_fraction=0.2, seed=0)
    out = tmp_path / "o"
    where = {}
    choice = []
    for split in ("train", "valid", "test"):
        for kind in ("sft", "pairs", "choice"):
            for r in read_jsonl(out / f"{kind}_{split}.jsonl"):
                assert where.setdefault(r["conversation_id"], split) == split
        choice += read_jsonl(out / f"choice_{split}.jsonl")
    assert len(choice) == 13 and m["counts"]["choice"]["test"] >= 1
    c = next(r for r in choice if r["id"] == "k0:a1")
    assert c["letters"] == ["A", "B", "C", "D"] and c["gold_letter"] == "C" and len(c["options"]) == 4
    assert c["prompt"] == [{"role": "user", "content": "How should I ask my manager for a raise?"}]
    sft = [r for s in ("train", "valid", "test") for r in read_jsonl(out / f"sft_{s}.jsonl")]
    s = next(r for r in sft if r["id"] == "k0:a2")
    assert [m["role"] for m in s["messages"]] == ["user", "assistant", "user", "assistant"]
    assert s["messages"][3]["content"] == "Let the manager decide."
    pairs = [r for sp in ("train", "valid", "test") for r in read_jsonl(out / f"pairs_{sp}.jsonl")]
    assert len([p for p in pairs if p["id"].startswith("k0:a2:t1:")]) == 3


def test_missing_columns(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("conversation_id,annotator_id,first_turn_prompt\nk,a,hi\n")
    with pytest.raises(ValueError, match="missing required columns"):
        load_community_alignment(p)


def test_cli_and_parquet(tmp_path):
    import pandas as pd

    pd.read_csv(CSV, dtype=object).to_parquet(tmp_path / "ca.parquet")
    assert cli.main(["data", "ca", "--input", str(tmp_path / "ca.parquet"), "--out", str(tmp_path / "o"),
                     "--no-embeddings", "--split-by", "user"]) == 0
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["dataset"] == "community_alignment" and m["split"]["by"] == "user"
    total = sum(m["counts"]["sft"].values())
    assert total + m["dropped"].get("conversations", {}).get(
        "conversation shared with a user of another split (split by user)", 0) == 13
