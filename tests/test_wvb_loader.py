"""WorldValuesBench loader on the hand-written, invented fixture tests/fixtures/wvb_tiny (no real WVS rows).

The fixture mirrors WVB's structure: a codebook in RAW answer codes, answer_adjustment.json moving the codes of the
15 recoded questions, and value TSVs already on the ADJUSTED scales. Each recoded question is checked on its own."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cuma.data import load_prepared, prepare_wvb, read_jsonl, validate_record
from cuma.data.records import sha256_file
from cuma.data.wvb import adjusted_options, clean_question_text, find_wvb_paths, load_wvb

FIXTURE = Path(__file__).parent / "fixtures" / "wvb_tiny"
TEN = ["Not essential", "2", "3", "4", "5", "6", "7", "8", "9", "Essential"]

# question -> (option values, option labels on the adjusted scale, (participant, adjusted answer, its label))
RECODED = {
    # swap 2 <-> 3: raw 2 "Worse off" becomes 3, raw 3 "About the same" becomes 2
    "Q56": ([1, 2, 3], ["Better off", "About the same", "Worse off"], ("90070002", 3, "Worse off")),
    # raw 3 "Other answer" dropped
    "Q111": ([1, 2], ["Parks come first", "Roads come first"], ("90070002", 2, "Roads come first")),
    # raw 0 "Hard to say" -> 3 (middle), 3 -> 4, 4 -> 5
    "Q119": (
        [1, 2, 3, 4, 5],
        ["Strongly agree", "Agree", "Hard to say", "Disagree", "Strongly disagree"],
        ("90070001", 3, "Hard to say"),
    ),
    # raw 4 "Not allowed to vote" dropped
    "Q221": ([1, 2, 3], ["Always", "Usually", "Never"], ("90070002", 3, "Never")),
    "Q222": ([1, 2, 3], ["Always votes", "Usually votes", "Never votes"], ("90070001", 2, "Usually votes")),
    # raw 0 "Against a fair guild" merged into 1; 1 keeps its own label
    "Q241": (list(range(1, 11)), TEN, ("90070002", 10, "Essential")),
    "Q242": (list(range(1, 11)), TEN, ("90070002", 9, "9")),
    "Q243": (list(range(1, 11)), TEN, ("90070003", 1, "Not essential")),
    "Q244": (list(range(1, 11)), TEN, ("90070005", 10, "Essential")),
    "Q245": (list(range(1, 11)), TEN, ("90070001", 5, "5")),
    "Q246": (list(range(1, 11)), TEN, ("90070006", 1, "Not essential")),
    "Q247": (list(range(1, 11)), TEN, ("90070006", 3, "3")),
    "Q248": (list(range(1, 11)), TEN, ("90070006", 5, "5")),
    "Q249": (list(range(1, 11)), TEN, ("90070001", 9, "9")),
    # raw 5 "Not from this town" dropped
    "Q254": ([1, 2, 3, 4], ["Very proud", "Quite proud", "Not very proud", "Not at all proud"], ("90070002", 4, "Not at all proud")),
}


@pytest.fixture(scope="module")
def data():
    return load_wvb(FIXTURE)


def _locate(data, pid):
    for name, part in data.splits.items():
        if pid in part.participant_ids:
            return name, part.participant_ids.index(pid)
    raise KeyError(pid)


def test_fixture_has_exactly_the_fifteen_recoded_questions():
    adjustment = json.loads((FIXTURE / "dataset_construction" / "answer_adjustment.json").read_text())
    assert sorted(adjustment) == sorted(RECODED)
    assert len(RECODED) == 15


@pytest.mark.parametrize("qid", sorted(RECODED, key=lambda q: int(q[1:])))
def test_recoded_question_options_follow_the_adjustment(data, qid):
    values, labels, (pid, answer, label) = RECODED[qid]
    q = data.question(qid)
    assert list(q.option_values) == values
    assert list(q.options) == labels
    assert q.unlabelled == ()
    assert (q.scale_min, q.scale_max) == (values[0], values[-1])
    # the participant's stored (adjusted) answer becomes a record whose gold letter points at the moved label
    split, row = _locate(data, pid)
    col = data.question_ids.index(qid)
    rec = data.record(split, row, col, profile_index=0)
    validate_record(rec)
    assert rec["gold_value"] == answer
    assert rec["options"][rec["letters"].index(rec["gold_letter"])] == label
    assert rec["option_values"] == values and rec["options"] == labels
    assert rec["scale_min"] == values[0] and rec["scale_max"] == values[-1] and rec["ordinal"] is True


@pytest.mark.parametrize(
    "qid,value,raw_label",
    [("Q56", 2, "Worse off"), ("Q56", 3, "About the same"), ("Q119", 3, "Disagree"), ("Q119", 4, "Strongly disagree")],
)
def test_raw_codebook_labels_would_be_wrong(data, qid, value, raw_label):
    """The authors' bug: labelling adjusted values with the raw codebook. Our labels differ exactly there."""
    codebook = json.loads((FIXTURE / "dataset_construction" / "codebook.json").read_text())
    assert codebook[qid]["choices"][str(value)] == raw_label
    assert data.question(qid).label_of(value) != raw_label


def test_dropped_codes_are_never_options(data):
    assert "Other answer" not in data.question("Q111").options
    assert "Not allowed to vote" not in data.question("Q221").options
    assert "Not a harbour resident" not in data.question("Q222").options
    assert "Not from this town" not in data.question("Q254").options
    for qid in [f"Q{n}" for n in range(241, 250)]:
        assert "Against a fair guild" not in data.question(qid).options
    for q in data.questions:  # negative (missing-value) codes never become options
        assert not {"Don't know", "No answer", "Not asked", "Missing; Not available"} & set(q.options)


def test_unrecoded_questions_use_the_codebook_as_is(data):
    q1 = data.question("Q1")
    assert list(q1.option_values) == [1, 2, 3, 4]
    assert list(q1.options) == ["Very important", "Rather important", "Not very important", "Not at all important"]
    q122 = data.question("Q122")
    assert list(q122.option_values) == [0, 1, 2] and list(q122.options) == ["Disagree", "Hard to say", "Agree"]
    assert q1.text == "How important are gardens in your life?"
    assert q1.category == "Invented Values"


def test_missing_answers_are_dropped_and_counted(data):
    assert data.dropped == {"empty": 3, "negative_code": 2, "missing_label": 1, "out_of_scale": 2}
    assert data.dropped_by_question == {
        "Q1": {"empty": 1, "missing_label": 1},
        "Q56": {"negative_code": 1},
        "Q111": {"empty": 1, "out_of_scale": 1},
        "Q221": {"empty": 1},
        "Q222": {"negative_code": 1},
        "Q254": {"out_of_scale": 1},
    }
    assert data.dropped_by_split["test"] == {"empty": 1, "negative_code": 0, "missing_label": 1, "out_of_scale": 1}
    total_cells = sum(p.num_participants for p in data.splits.values()) * len(data.questions)
    assert sum(p.num_pairs for p in data.splits.values()) == total_cells - sum(data.dropped.values())
    for pid, qid in [("90070003", "Q1"), ("90070004", "Q56"), ("90070003", "Q111"), ("90070011", "Q254"),
                     ("90070010", "Q1"), ("90070004", "Q222")]:  # fmt: skip
        split, row = _locate(data, pid)
        assert not data.splits[split].valid[row, data.question_ids.index(qid)]
        with pytest.raises(ValueError, match="no valid answer"):
            data.record(split, row, data.question_ids.index(qid), 0)


def test_float_formatted_and_label_cells_are_read(data):
    split, row = _locate(data, "90070004")
    assert data.splits[split].answers[row, data.question_ids.index("Q111")] == 2  # "2.0"
    split, row = _locate(data, "90070009")
    assert data.splits[split].answers[row, data.question_ids.index("Q122")] == 2  # "Agree"


def test_value_rows_are_aligned_to_profiles_by_participant_id(data):
    test = data.splits["test"]
    assert test.participant_ids == ["90070010", "90070009", "90070011"]  # value file order
    assert [p.country for p in test.profiles] == ["Ardenia", "Belmora", "Corvath"]
    assert test.profiles[0] == data.splits["train"].profiles[0]  # same demographic answers -> same profile


def test_profiles_use_the_field_map_and_drop_missing_codes(data):
    train = {pid: p for pid, p in zip(data.splits["train"].participant_ids, data.splits["train"].profiles)}
    p1 = train["90070001"]
    assert p1.to_dict() == {
        "country": "Ardenia", "age_group": "25-34", "gender": "Female", "education": "Upper secondary education",
        "religion": "Roman Catholic", "ethnicity": "Ardenian", "employment": "Full time", "marital_status": "Married",
    }  # fmt: skip
    assert train["90070003"].gender == "Female"  # numeric code 2 mapped through the codebook
    assert train["90070004"].religion is None  # "Don't know"
    assert train["90070004"].ethnicity is None  # "Not asked in this country": a negative code's label in the codebook
    assert "Not asked" not in train["90070004"].to_text()
    test = {pid: p for pid, p in zip(data.splits["test"].participant_ids, data.splits["test"].profiles)}
    assert test["90070011"].gender is None  # "No answer"
    assert data.demographic_missing == {"Q260": 1, "Q289": 1, "Q290": 1}
    assert data.demographic_codes_mapped == {"Q260": 1}


def test_root_may_be_the_checkout_or_either_folder():
    a = find_wvb_paths(FIXTURE)
    b = find_wvb_paths(FIXTURE / "WorldValuesBench")
    c = find_wvb_paths(FIXTURE / "dataset_construction")
    assert a == b == c
    assert a.data_dir == FIXTURE / "WorldValuesBench"


def test_missing_layout_error_lists_what_was_looked_for(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        find_wvb_paths(tmp_path)
    msg = str(err.value)
    assert "question_metadata.json" in msg and "answer_adjustment.json" in msg and "train" in msg
    assert str(tmp_path / "dataset_construction") in msg
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_wvb_paths(tmp_path / "nope")


def test_question_text_preamble_is_removed():
    assert (
        clean_question_text("On a scale of 1 to 10, 1 meaning 'Work hard' and 10 meaning 'It doesn't pay - it's luck', where do you stand?")
        == "Where do you stand?"
    )
    assert clean_question_text("  Plain   question? ") == "Plain question?"


def test_adjusted_options_rules():
    # unlabelled scale point gets its number; negative codes ignored; non-numeric keys ignored
    values, labels, unlabelled = adjusted_options("QX", {"1": "Low", "3": "High", "-1": "Don't know", "ABC": "x"}, {}, 1, 3)
    assert values == [1, 2, 3] and labels == ["Low", "2", "High"] and unlabelled == [2]
    # no scale: options are the adjusted non-negative codes
    values, labels, _ = adjusted_options("QY", {"2": "b", "1": "a", "9": "drop"}, {"9": ""}, None, None)
    assert values == [1, 2] and labels == ["a", "b"]
    with pytest.raises(ValueError, match="ambiguous"):
        adjusted_options("QZ", {"0": "a", "2": "b", "1": "c"}, {"0": "3", "2": "3", "1": "1"}, 1, 3)
    with pytest.raises(ValueError, match="outside the question's scale"):
        adjusted_options("QW", {"1": "a"}, {"1": "7"}, 1, 3)
    with pytest.raises(ValueError, match="answer_adjustment.json: question QV: code '1' maps to 'x'"):
        adjusted_options("QV", {"1": "a"}, {"1": "x"}, 1, 3)


# ------------------------------------------------------------------------------------------------ malformed input


@pytest.fixture
def copy(tmp_path):
    dst = tmp_path / "wvb"
    shutil.copytree(FIXTURE, dst)
    return dst


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new, 1))


def test_non_integer_answer_is_a_clear_error(copy):
    f = copy / "WorldValuesBench" / "train" / "train_value_qa.tsv"
    _edit(f, "90070005\t3\t", "90070005\t2.5\t")
    with pytest.raises(ValueError) as err:
        load_wvb(copy)
    msg = str(err.value)
    assert "train_value_qa.tsv" in msg and "column Q1" in msg and "90070005" in msg and "'2.5'" in msg
    assert "integer" in msg


def test_unknown_text_answer_is_a_clear_error(copy):
    f = copy / "WorldValuesBench" / "valid" / "valid_value_qa.tsv"
    _edit(f, "90070007\t2\t3\t", "90070007\t2\tbanana\t")
    with pytest.raises(ValueError, match=r"valid_value_qa.tsv: column Q56, participant 90070007.*'banana'.*option labels"):
        load_wvb(copy)


def test_missing_profile_column_is_a_clear_error(copy):
    for split in ("train", "valid", "test"):
        f = copy / "WorldValuesBench" / split / f"{split}_demographic_qa.tsv"
        f.write_text(f.read_text().replace("\tQ289\t", "\tQ289_renamed\t"))
    with pytest.raises(ValueError, match=r"train_demographic_qa.tsv: missing the profile columns \['Q289'\]"):
        load_wvb(copy)


def test_participant_mismatch_between_files_is_a_clear_error(copy):
    f = copy / "WorldValuesBench" / "test" / "test_value_qa.tsv"
    _edit(f, "90070011\t", "90070099\t")
    with pytest.raises(ValueError, match=r"must list the same participants.*90070099"):
        load_wvb(copy)


def test_duplicated_participant_is_a_clear_error(copy):
    f = copy / "WorldValuesBench" / "train" / "train_value_qa.tsv"
    _edit(f, "90070002\t", "90070001\t")
    with pytest.raises(ValueError, match=r"train_value_qa.tsv: column D_INTERVIEW: participant 90070001 appears twice"):
        load_wvb(copy)


def test_participant_in_two_splits_is_a_clear_error(copy):
    for kind in ("value", "demographic"):
        f = copy / "WorldValuesBench" / "valid" / f"valid_{kind}_qa.tsv"
        _edit(f, "90070008\t", "90070001\t")
    with pytest.raises(ValueError, match="also in the train split"):
        load_wvb(copy)


def test_unknown_value_column_is_a_clear_error(copy):
    f = copy / "WorldValuesBench" / "train" / "train_value_qa.tsv"
    _edit(f, "\tQ254\n", "\tQ999\n")
    with pytest.raises(ValueError, match=r"train_value_qa.tsv: columns \['Q999'\] are not value questions"):
        load_wvb(copy)


def test_bad_adjustment_is_a_clear_error(copy):
    f = copy / "dataset_construction" / "answer_adjustment.json"
    _edit(f, '"Q111": {"3": ""}', '"Q111": {"3": "x"}')
    with pytest.raises(ValueError, match=r"answer_adjustment.json: question Q111: code '3' maps to 'x'"):
        load_wvb(copy)


def test_missing_codebook_entry_is_a_clear_error(copy):
    f = copy / "dataset_construction" / "codebook.json"
    cb = json.loads(f.read_text())
    del cb["Q119"]
    f.write_text(json.dumps(cb))
    with pytest.raises(ValueError, match=r"codebook.json: no entry .* for value question Q119"):
        load_wvb(copy)


# ------------------------------------------------------------------------------------------------ prepared directory


def test_prepare_writes_the_schema_and_is_reproducible(tmp_path):
    kw = dict(train_pairs=40, test_pairs="all", valid_pairs=10, seed=3, encoder=None)
    m1 = prepare_wvb(FIXTURE, tmp_path / "a", **kw)
    m2 = prepare_wvb(FIXTURE, tmp_path / "b", **kw)
    for name in ("train.jsonl", "valid.jsonl", "test.jsonl", "profiles.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert m1["outputs"] == m2["outputs"]
    prepared = load_prepared(tmp_path / "a")
    assert prepared.profile_embeds is None and not (tmp_path / "a" / "profile_embeds.safetensors").exists()
    assert len(prepared.train) == 40 and len(prepared.valid) == 10 and len(prepared.test) == 48
    assert len({r["id"] for r in prepared.train}) == 40
    assert {r["split"] for r in prepared.test} == {"test"}
    assert all(r["held_out"] is False for r in prepared.test)
    # profiles.jsonl: one row per unique profile of the written records, sorted by text
    texts = [p["profile_text"] for p in prepared.profiles]
    assert texts == sorted(set(r["profile_text"] for s in ("train", "valid", "test") for r in prepared.split(s)))
    m = prepared.manifest
    assert m["dataset"] == "wvb" and m["seed"] == 3
    assert m["dropped"]["answers"] == {"empty": 3, "negative_code": 2, "missing_label": 1, "out_of_scale": 2}
    assert m["counts"]["records"] == {"train": 40, "valid": 10, "test": 48}
    assert m["counts"]["pairs_available"] == {"train": 97, "valid": 34, "test": 48}
    assert m["dropped"]["pairs_not_sampled"] == {"train": 57, "valid": 24, "test": 0}
    assert sorted(m["questions"]["recoded"]) == sorted(RECODED)
    for name, entry in m["source"]["files"].items():
        assert entry["sha256"] == sha256_file(entry["path"]), name
    for name, digest in m["outputs"].items():
        assert sha256_file(tmp_path / "a" / name) == digest
    assert m["versions"]["numpy"] and m["embeddings"] is None and m["encoder"] is None


def test_prepare_refuses_a_non_empty_output_and_leaves_nothing_on_error(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty; pass --overwrite"):
        prepare_wvb(FIXTURE, out, train_pairs=5, test_pairs=5, encoder=None)
    assert (out / "keep.txt").read_text() == "x"
    prepare_wvb(FIXTURE, out, train_pairs=5, test_pairs=5, encoder=None, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "manifest.json").is_file()
    with pytest.raises(ValueError, match=r"--test-pairs \(test split\): asked for 500 pairs but only 48"):
        prepare_wvb(FIXTURE, tmp_path / "new", train_pairs=5, test_pairs=500, encoder=None)
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary siblings left behind


def test_prepare_with_the_embedded_encoder(tmp_path):
    pytest.importorskip("safetensors")
    from cuma.encoder import EncoderLoadError, ProfileEncoder

    try:
        enc = ProfileEncoder.default()
    except EncoderLoadError as err:
        pytest.skip(str(err))
    m = prepare_wvb(FIXTURE, tmp_path / "p", train_pairs=4, test_pairs=2, seed=0, encoder=enc)  # few profiles: fast
    prepared = load_prepared(tmp_path / "p")
    e = prepared.profile_embeds
    assert e is not None and e.dtype.is_floating_point and tuple(e.shape) == (len(prepared.profiles), enc.dim)
    assert m["embeddings"]["shape"] == [len(prepared.profiles), enc.dim]
    assert m["encoder"]["dim"] == enc.dim
    rec = prepared.test[0]
    expected = enc.encode([rec["profile_text"]])[0]
    assert np.allclose(e[rec["profile_index"]].numpy(), expected.numpy(), atol=1e-5)
    assert read_jsonl(tmp_path / "p" / "profiles.jsonl")[rec["profile_index"]]["profile_text"] == rec["profile_text"]


# ------------------------------------------------------------------------------------------------ tables cut mid-row


def _cut(path: Path, keep_chars_of_last_row: int) -> str:
    """Cut ``path`` inside its last row (no line end after it), as a copy that stopped would; returns the cut text."""
    text = path.read_text()
    body, last = text.rstrip("\n").rsplit("\n", 1)
    path.write_text(body + "\n" + last[:keep_chars_of_last_row])
    return last[:keep_chars_of_last_row]


def test_value_table_cut_mid_row_is_an_error_naming_file_and_line(copy):
    f = copy / "WorldValuesBench" / "train" / "train_value_qa.tsv"
    lines = f.read_text().count("\n")
    _cut(f, 30)  # a few fields of the last participant's row
    with pytest.raises(ValueError, match=rf"train_value_qa.tsv: line {lines}: \d+ tab-separated fields, but the "
                                         r"header has \d+; the file ends inside this row.*cut off"):
        load_wvb(copy)


def test_demographic_table_cut_inside_a_value_is_an_error(copy):
    f = copy / "WorldValuesBench" / "test" / "test_demographic_qa.tsv"
    lines = f.read_text().count("\n")
    cut = _cut(f, len(f.read_text().rstrip("\n").rsplit("\n", 1)[1]) - 3)  # inside the last field's value
    assert cut.count("\t") == 9  # every field is there: only the missing line end shows the cut
    with pytest.raises(ValueError, match=rf"test_demographic_qa.tsv: line {lines} \(the last\) has no line end"):
        load_wvb(copy)


@pytest.mark.parametrize("kind", ["value", "demographic"])
def test_rows_with_more_or_fewer_fields_than_the_header_are_errors(copy, kind):
    f = copy / "WorldValuesBench" / "valid" / f"valid_{kind}_qa.tsv"
    text = f.read_text().split("\n")
    text[2] = text[2] + "\textra"  # one field too many (pandas would read the first field as an index)
    f.write_text("\n".join(text))
    with pytest.raises(ValueError, match=rf"valid_{kind}_qa.tsv: line 3: (\d+) tab-separated fields, but the header "
                                         r"has \d+; expected one field per header column"):
        load_wvb(copy)
    text[2] = text[2].rsplit("\t", 2)[0]  # one field too few
    f.write_text("\n".join(text))
    with pytest.raises(ValueError, match=rf"valid_{kind}_qa.tsv: line 3: "):
        load_wvb(copy)


def test_cut_table_through_the_cli_is_one_line_and_writes_nothing(copy, tmp_path, capsys):
    from cuma import cli

    _cut(copy / "WorldValuesBench" / "train" / "train_value_qa.tsv", 30)
    out = tmp_path / "prepared"
    assert cli.main(["data", "wvb", "--wvb", str(copy), "--out", str(out), "--train-pairs", "all", "--test-pairs", "all",
                     "--no-embeddings"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train_value_qa.tsv: line" in err and "cut off" in err
    assert not out.exists()
