"""`cuma eval wvb` end to end, in process: a tiny Llama saved to disk, a tiny prepared-data folder (docs/data-schema.md)."""

import argparse
import json
import math
import os

import numpy as np
import pytest
import torch
from conftest import tiny_chat_tokenizer, tiny_llama
from test_scoring import PROFILES, QUESTIONS, make_record

from cuma import methods
from cuma.evaluate import cli as eval_cli
from cuma.evaluate import scoring
from cuma.evaluate.report import read_predictions_tsv

DIM = 8


def _write_jsonl(path, rows):
    with open(path, "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    # base model + tokenizer
    model_dir = root / "model"
    tiny_llama().save_pretrained(model_dir)
    tiny_chat_tokenizer("left").save_pretrained(model_dir)

    # prepared data: 3 profiles (Chile held out), 2 participants each in test, 1 each in train
    data = root / "data"
    data.mkdir()
    test, train = [], []
    for p, prof in enumerate(PROFILES):
        for q, (qid, n, text) in enumerate(QUESTIONS):
            for k in range(2):
                rec = make_record(f"p{p}{k}", qid, n, (p + q + k) % n, prof, p, text)
                rec["held_out"] = prof["country"] == "Chile"
                test.append(rec)
            if prof["country"] != "Chile":
                tr = make_record(f"t{p}", qid, n, (p + 2 * q) % n, prof, p, text)
                tr["split"] = "train"
                train.append(tr)
    bad = dict(test[0], id="bad:Q1", participant_id="bad", gold_letter="Z")
    _write_jsonl(data / "test.jsonl", test + [bad])
    _write_jsonl(data / "train.jsonl", train)
    _write_jsonl(data / "valid.jsonl", [])
    _write_jsonl(
        data / "profiles.jsonl",
        [{"profile_index": i, "profile_text": make_record("x", "Q", 2, 0, pr, i, "?")["profile_text"], "profile": pr}
         for i, pr in enumerate(PROFILES)],
    )
    from safetensors.torch import save_file

    table = torch.randn(len(PROFILES), DIM, generator=torch.Generator().manual_seed(5))
    save_file({"profile_embeds": table}, str(data / "profile_embeds.safetensors"))
    (data / "manifest.json").write_text(json.dumps({"seed": 0, "encoder": {"id": "test", "dim": DIM}}))

    # a CuMA adapter trained on nothing (random B so the profile matters), saved like a training run saves it
    built = methods.build(
        "cuma", tiny_llama(), profile_dim=DIM, init_weights=False, num_experts=4, top_k=2, r=4, router_hidden=16
    )
    adapter = root / "cuma_adapter"
    methods.save(built, adapter)
    return {"root": root, "model": str(model_dir), "data": str(data), "adapter": str(adapter), "test": test,
            "train": train, "table": table}


def _parse(argv):
    parser = argparse.ArgumentParser(prog="cuma eval")
    eval_cli.add_arguments(parser)
    return parser.parse_args(argv)


def _run(ws, out, *extra):
    args = _parse(["wvb", "--model", ws["model"], "--data", ws["data"], "--out", str(out), "--no-progress", *extra])
    assert eval_cli.run(args) == 0
    summary = json.loads((out / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    preds = read_predictions_tsv(out / "predictions.tsv")
    return summary, preds


def test_vanilla_end_to_end(workspace, tmp_path, capsys):
    ws = workspace
    summary, preds = _run(ws, tmp_path / "out", "--method", "vanilla", "--batch-size", "4")
    assert len(preds) == len(ws["test"])
    counts = summary["counts"]
    assert counts["pairs"] == 18 and counts["questions"] == 3 and counts["participants"] == 6
    assert counts["dropped"] == {"gold_letter not among the letters": 1} and counts["records_in_split"] == 19
    assert counts["held_out_pairs"] == 6
    m = summary["metrics"]
    for key in ("accuracy", "macro_f1", "macro_f1_pooled", "entropy"):
        assert 0.0 <= m[key] <= 1.0
    assert set(m["emd"]["share_below"]) == {"0.1", "0.2", "0.3"}
    assert m["emd"]["questions"] == 3 and m["emd_expected"]["mean"] is not None
    assert set(m["country"]["per_country"]) == {"Egypt", "Sweden", "Chile"}
    assert m["zero_shot"]["pairs"] == 6
    assert "gender" in m["sigma_inequity"]["per_field"] or "country" in m["sigma_inequity"]["per_field"]
    # predictions.tsv: one row per pair, profile columns, a distribution that sums to 1 and whose argmax is predicted
    row = preds[0]
    assert {"country", "age_group", "gold_letter", "pred_letter", "distribution", "correct"} <= set(row)
    acc = np.mean([r["correct"] == "true" for r in preds])
    assert acc == pytest.approx(m["accuracy"])
    for r in preds:
        dist = r["distribution"]
        assert sum(dist.values()) == pytest.approx(1.0, abs=1e-6)
        assert r["pred_letter"] == max(dist, key=dist.get)
    # run record
    run = summary["run"]
    assert run["config"]["method"] == "vanilla" and run["config"]["profile_in_prompt"] is False
    assert run["config"]["padding_side"] in ("left", "right") and run["seed"] == 0
    assert any(p.endswith("test.jsonl") for p in run["data_sha256"])
    assert all(len(h) == 64 for h in run["data_sha256"].values())
    assert run["packages"]["torch"] and run["packages"]["transformers"] and run["packages"]["peft"]
    assert run["model"]["base"]["kind"] == "local" and run["method"]["method"] == "vanilla"
    assert run["timing"]["pairs_per_s"] > 0
    out = capsys.readouterr()
    assert "vanilla: 18 pairs / 3 questions" in out.out and out.err == ""
    # nothing half-written left behind
    assert sorted(os.listdir(tmp_path / "out")) == ["predictions.tsv", "summary.json"]


def test_persona_limit_and_fewshot(workspace, tmp_path):
    ws = workspace
    summary, preds = _run(ws, tmp_path / "persona", "--method", "persona", "--limit", "5")
    assert len(preds) == 5
    assert summary["counts"]["dropped"]["beyond --limit 5"] == 13
    assert summary["run"]["config"]["profile_in_prompt"] is True

    summary, preds = _run(ws, tmp_path / "fewshot", "--method", "fewshot", "--fewshot-k", "2", "--seed", "3")
    cfg = summary["run"]["config"]
    assert cfg["fewshot_k"] == 2 and cfg["seed"] == 3 and cfg["profile_in_prompt"] is False
    assert summary["run"]["method"]["options"]["k"] == 2
    assert any(p.endswith("train.jsonl") for p in summary["run"]["data_sha256"])
    assert len(preds) == 18


def test_cuma_adapter_gets_profile_rows(workspace, tmp_path):
    ws = workspace
    summary, preds = _run(ws, tmp_path / "cuma", "--adapter", ws["adapter"], "--batch-size", "5")
    cfg = summary["run"]["config"]
    assert cfg["method"] == "cuma" and cfg["uses_profile_embeds"] is True and cfg["profile_in_prompt"] is True
    assert any(p.endswith("profile_embeds.safetensors") for p in summary["run"]["data_sha256"])
    assert set(summary["run"]["model"]["adapter_sha256"]) >= {"adapter_config.json", "adapter_model.safetensors"}
    # same distributions as scoring the loaded adapter directly with each record's profile row
    from cuma import models

    base, tok = models.load_base_and_tokenizer(ws["model"])
    built = methods.load("cuma", base, ws["adapter"])
    direct = scoring.score_records(built.model, tok, ws["test"], profile_table=ws["table"], progress=False)
    for row, d in zip(preds, direct):
        assert row["id"] == d["id"]
        np.testing.assert_allclose([row["distribution"][k] for k in d["letters"]], d["probs"], atol=1e-6)
    # and not the same as with the profiles shuffled
    shuffled = scoring.score_records(built.model, tok, ws["test"], profile_table=ws["table"].roll(1, 0),
                                     progress=False)
    assert any(not np.allclose(a["probs"], b["probs"], atol=1e-4) for a, b in zip(direct, shuffled))


def test_errors(workspace, tmp_path):
    ws = workspace
    with pytest.raises(ValueError, match="--adapter"):
        eval_cli.run(_parse(["wvb", "--model", ws["model"], "--method", "lora", "--data", ws["data"],
                             "--out", str(tmp_path / "x"), "--no-progress"]))
    with pytest.raises(ValueError, match="no --adapter|takes no"):
        eval_cli.run(_parse(["wvb", "--model", ws["model"], "--method", "vanilla", "--adapter", ws["adapter"],
                             "--data", ws["data"], "--out", str(tmp_path / "x"), "--no-progress"]))
    with pytest.raises(ValueError, match="fewshot"):
        eval_cli.run(_parse(["wvb", "--model", ws["model"], "--method", "persona", "--fewshot-k", "2",
                             "--data", ws["data"], "--out", str(tmp_path / "x"), "--no-progress"]))
    with pytest.raises(FileNotFoundError):
        eval_cli.run(_parse(["wvb", "--model", ws["model"], "--method", "vanilla", "--data", ws["data"],
                             "--split", "nope", "--out", str(tmp_path / "x"), "--no-progress"]))
    assert not (tmp_path / "x").exists()


def test_dispatch_through_cuma_cli(workspace, tmp_path, capsys):
    from cuma import cli

    assert "eval" in cli.COMMANDS
    try:
        cli.build_parser()
    except ImportError as err:  # another subcommand's module is not there yet
        pytest.skip(f"cuma.cli cannot build its parser yet: {err}")
    out = tmp_path / "o"
    argv = ["eval", "wvb", "--model", workspace["model"], "--method", "vanilla", "--data", workspace["data"],
            "--out", str(out), "--no-progress", "--limit", "3"]
    assert cli.main(argv) == 0
    assert json.loads((out / "summary.json").read_text())["counts"]["pairs"] == 3
    assert cli.main(["eval", "wvb", "--model", workspace["model"], "--method", "lora", "--data", workspace["data"],
                     "--out", str(out), "--no-progress", "--overwrite"]) == 2
    assert "--adapter" in capsys.readouterr().err


def test_report_writers(tmp_path):
    from cuma.evaluate import report

    rows = [
        {"id": "p1:Q1", "question_id": "Q1", "participant_id": "p1", "profile": {"country": 'Co"te\td', "gender": "F"},
         "held_out": True, "letters": ["A", "B"], "probs": [0.25, 0.75], "gold_letter": "B", "gold_value": 2,
         "pred_letter": "B", "pred_value": 2},
        {"id": "p2:Q1", "question_id": "Q1", "participant_id": "p2", "profile": {"age_group": "25-34"},
         "letters": ["A", "B"], "probs": [1.0, 0.0], "gold_letter": "B", "gold_value": 2, "pred_letter": "A",
         "pred_value": 1},
    ]
    path = report.write_predictions_tsv(tmp_path / "predictions.tsv", rows)
    text = open(path).read()
    assert text.splitlines()[0].split("\t") == [
        "id", "question_id", "participant_id", "country", "age_group", "gender", "held_out", "gold_letter",
        "gold_value", "pred_letter", "pred_value", "correct", "entropy", "distribution"]
    assert all(len(line.split("\t")) == 14 for line in text.splitlines())
    back = report.read_predictions_tsv(path)
    assert back[0]["country"] == 'Co"te d' and back[0]["correct"] == "true" and back[0]["held_out"] == "true"
    assert back[0]["distribution"] == {"A": 0.25, "B": 0.75} and back[1]["correct"] == "false"
    assert back[1]["country"] == "" and float(back[1]["entropy"]) == 0.0
    report.atomic_write_json(tmp_path / "summary.json", {"x": float("nan"), "y": np.float32(0.5), "z": [1, 2]})
    assert json.loads((tmp_path / "summary.json").read_text()) == {"x": None, "y": 0.5, "z": [1, 2]}
    assert sorted(os.listdir(tmp_path)) == ["predictions.tsv", "summary.json"]  # no temp files left
    summary = report.build_summary({"accuracy": 0.5}, counts={"pairs": 2}, config={"a": 1}, data_files=[path],
                                   seed=3)
    assert summary["run"]["data_sha256"] == {os.path.abspath(path): report.sha256_file(path)}
    assert summary["run"]["seed"] == 3 and summary["run"]["packages"]["numpy"]


def test_evaluate_wvb_is_what_the_cli_scores(workspace, tmp_path):
    """The library call behind `cuma eval wvb`: the same predictions and metrics as the command, dropped records
    counted by reason, and a routed method given its profile rows."""
    from cuma import models
    from cuma.evaluate.wvb import WVBEvalConfig, evaluate_wvb

    ws = workspace
    summary, preds = _run(ws, tmp_path / "cli", "--adapter", ws["adapter"], "--batch-size", "4")
    base, tokenizer = models.load_base_and_tokenizer(ws["model"])
    built = methods.load(None, base, ws["adapter"])
    result = evaluate_wvb(built, tokenizer, ws["data"], WVBEvalConfig(batch_size=4, progress=False))
    assert result.method == "cuma" and result.uses_profile_embeds and result.profile_in_prompt
    assert [p["id"] for p in result.predictions] == [r["id"] for r in preds]
    assert [p["pred_letter"] for p in result.predictions] == [r["pred_letter"] for r in preds]
    assert result.metrics["accuracy"] == pytest.approx(summary["metrics"]["accuracy"])
    assert result.metrics["emd"]["mean"] == pytest.approx(summary["metrics"]["emd"]["mean"])
    assert result.counts == summary["counts"]
    assert result.counts["dropped"] == {"gold_letter not among the letters": 1}
    assert len(result.held_out) == 6 and len(result.seen) == 12
    assert any(f.endswith("profile_embeds.safetensors") for f in result.data_files)
    # data already loaded (what the demo passes) scores the same
    from cuma.data.records import load_prepared

    loaded = evaluate_wvb(built, tokenizer, load_prepared(ws["data"], validate=False), WVBEvalConfig(batch_size=4,
                                                                                                 progress=False))
    assert [p["probs"] for p in loaded.predictions] == [p["probs"] for p in result.predictions]
    assert loaded.counts["dropped"] == result.counts["dropped"]
    # a limit is counted as dropped; the profile switched off in the prompt is scored so and reported
    short = evaluate_wvb(built, tokenizer, ws["data"], WVBEvalConfig(limit=5, profile_in_prompt=False, progress=False))
    assert len(short.predictions) == 5 and short.counts["dropped"]["beyond --limit 5"] == 13
    assert short.profile_in_prompt is False and short.profile_in_prompt_trained is True
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        WVBEvalConfig(batch_size=0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate_wvb(built, tokenizer, tmp_path / "nowhere", WVBEvalConfig(progress=False))
