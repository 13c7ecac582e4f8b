import json

import pytest

from cuma import cli
from cuma.data.conversations import Conversation, Dropped, Turn, assign_splits, load_table, split_conversations
from cuma.data.prism import load_prism, prepare_prism
from cuma.data.records import read_jsonl
from cuma.profiles import Profile

FIX = "tests/fixtures/prism_tiny"
SURVEY, CONVS = f"{FIX}/survey.jsonl", f"{FIX}/conversations.jsonl"


def _prep(tmp_path, **kw):
    kw.setdefault("test_fraction", 0.2)
    kw.setdefault("valid_fraction", 0.1)
    return prepare_prism(SURVEY, CONVS, tmp_path / "out", **kw), tmp_path / "out"


def test_load_counts_and_drops():
    convs, dropped, counts = load_prism(SURVEY, CONVS)
    d = dropped.to_dict()
    assert counts["survey_users"] == 6 and counts["conversation_rows"] == 13
    assert d["conversations"] == {"empty conversation": 1, "no usable first turn": 1, "user missing from the survey": 1}
    assert d["turns"]["turn without a chosen response"] == 2
    by = {c.conversation_id: c for c in convs}
    assert len(by["c02"].turns) == 3 and len(by["c06"].turns) == 2  # c06 turn 2 has no chosen reply: cut
    assert by["c00"].turns[0].chosen_text.startswith("Try koshari")
    assert by["c00"].profile.religion == "Muslim" and by["c00"].profile.ethnicity == "Middle Eastern"
    assert by["c03"].profile.employment is None  # "Prefer not to say" is a missing code


def test_prepared_folder(tmp_path):
    manifest, out = _prep(tmp_path, supervise="last")
    for kind in ("sft", "pairs"):
        for split in ("train", "valid", "test"):
            assert (out / f"{kind}_{split}.jsonl").is_file()
    assert not (out / "choice_train.jsonl").exists()
    sft = [r for s in ("train", "valid", "test") for r in read_jsonl(out / f"sft_{s}.jsonl")]
    assert len(sft) == 10 and all(r["supervise"] == "last" for r in sft)
    profiles = read_jsonl(out / "profiles.jsonl")
    for r in sft:
        assert profiles[r["profile_index"]]["profile_text"] == r["profile_text"]
        roles = [m["role"] for m in r["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2)
    c00 = next(r for r in sft if r["id"] == "c00")
    assert c00["messages"][1]["content"].startswith("Try koshari")
    pairs = [r for s in ("train", "valid", "test") for r in read_jsonl(out / f"pairs_{s}.jsonl")]
    p = [r for r in pairs if r["conversation_id"] == "c00" and r["turn"] == 1]
    assert len(p) == 1 and p[0]["prompt"][-1] == {"role": "user", "content": "Can you give me the koshari steps?"}
    assert p[0]["prompt"][1]["role"] == "assistant" and p[0]["rejected"] == "Just mix everything in one pot."
    assert len([r for r in pairs if r["conversation_id"] == "c00" and r["turn"] == 0]) == 3
    # Egypt/Muslim users user0 and user4 share one profile
    assert manifest["counts"]["profiles"] == 5
    assert manifest["dropped"]["conversations"]["user missing from the survey"] == 1
    assert set(manifest["outputs"]) >= {"sft_train.jsonl", "pairs_test.jsonl", "profiles.jsonl"}


@pytest.mark.parametrize("by", ["conversation", "user"])
def test_splits_leak_no_conversation(tmp_path, by):
    _, out = _prep(tmp_path, split_by=by, test_fraction=0.3, valid_fraction=0.2, seed=3)
    where = {}
    users = {}
    for split in ("train", "valid", "test"):
        for kind in ("sft", "pairs"):
            for r in read_jsonl(out / f"{kind}_{split}.jsonl"):
                assert where.setdefault(r["conversation_id"], split) == split
                assert r["split"] == split
                if by == "user":
                    assert users.setdefault(r["user_id"], split) == split


def test_split_is_seeded():
    keys = [f"c{i}" for i in range(50)]
    a = assign_splits(keys, 0.1, 0.2, seed=1)
    assert a == assign_splits(list(reversed(keys)), 0.1, 0.2, seed=1)
    assert a != assign_splits(keys, 0.1, 0.2, seed=2)
    assert sum(v == "test" for v in a.values()) == 10 and sum(v == "valid" for v in a.values()) == 5


def test_user_split_drops_shared_conversations():
    p = Profile(country="X")
    t = [Turn("hi", ["a", "b"], 0)]
    convs = [Conversation(f"k{i % 5}", f"u{i}", p, t) for i in range(40)]
    dropped = Dropped()
    parts = split_conversations(convs, by="user", valid_fraction=0.2, test_fraction=0.2, seed=0, dropped=dropped)
    seen = {}
    for split, cs in parts.items():
        for c in cs:
            assert seen.setdefault(c.conversation_id, split) == split
    assert sum(len(v) for v in parts.values()) + dropped.total("conversations") == 40


def test_bad_input(tmp_path):
    bad = tmp_path / "conv.jsonl"
    bad.write_text(json.dumps({"conversation_id": "c1", "user_id": "user0"}) + "\n")
    with pytest.raises(ValueError, match="missing required columns.*conversation_history"):
        load_prism(SURVEY, bad)
    dup = tmp_path / "survey.jsonl"
    dup.write_text('{"user_id": "u"}\n{"user_id": "u"}\n')
    with pytest.raises(ValueError, match="more than once"):
        load_prism(dup, CONVS)
    none_left = tmp_path / "c2.jsonl"
    none_left.write_text(json.dumps({"conversation_id": "c1", "user_id": "nobody", "conversation_history": []}) + "\n")
    with pytest.raises(ValueError, match="no usable conversations"):
        prepare_prism(SURVEY, none_left, tmp_path / "o")


def test_parquet_and_saved_dataset_inputs(tmp_path):
    import datasets

    rows = load_table(CONVS)
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "conv.parquet"))
    datasets.Dataset.from_list(load_table(SURVEY)).save_to_disk(str(tmp_path / "survey_ds"))
    a, da, _ = load_prism(SURVEY, CONVS)
    b, db, _ = load_prism(tmp_path / "survey_ds", tmp_path / "conv.parquet")
    assert [(c.conversation_id, c.profile, [t.responses for t in c.turns]) for c in a] == \
        [(c.conversation_id, c.profile, [t.responses for t in c.turns]) for c in b]
    assert da.to_dict() == db.to_dict()


def test_cli(tmp_path, capsys):
    rc = cli.main(["data", "prism", "--survey", SURVEY, "--conversations", CONVS, "--out", str(tmp_path / "o"),
                   "--no-embeddings", "--seed", "1", "--test-fraction", "0.2"])
    assert rc == 0
    assert "dropped" in capsys.readouterr().out
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["dataset"] == "prism" and m["seed"] == 1 and m["embeddings"] is None


def test_embeddings_with_fake_encoder(tmp_path):
    import torch
    from safetensors.torch import load_file

    class Enc:
        dim = 4

        def encode(self, texts):
            return torch.arange(len(texts) * 4, dtype=torch.float32).reshape(len(texts), 4)

    m, out = _prep(tmp_path, encoder=Enc())
    t = load_file(str(out / "profile_embeds.safetensors"))["profile_embeds"]
    assert tuple(t.shape) == (m["counts"]["profiles"], 4)
