"""Reloading adapters: options come from the adapter's own adapter_config.json, the method is inferred from it when
there is no cuma_method.json, a config that disagrees with its weights is explained, and methods.save is atomic."""

from __future__ import annotations

import json
import os

import pytest

from cuma import cli, methods
from conftest import tiny_llama

TINY = {
    "cuma": dict(r=2, num_experts=3, router_hidden=8, profile_dim=16),
    "cuma-semantic": dict(r=2, num_experts=3, router_hidden=8),
    "cuma-soft": dict(r=2, num_experts=3, router_hidden=8, profile_dim=16),
    "cuma-minimal": dict(r=2, num_experts=3, router_hidden=8),
    "lora": dict(r=2),
    "dora": dict(r=2),
    "hydralora": dict(r=2, num_experts=2),
    "mixlora": dict(r=2, num_experts=2, top_k=1),
}


@pytest.mark.parametrize("name", list(TINY))
def test_the_method_of_a_plain_peft_adapter_is_inferred(name, tmp_path):
    built = methods.build(name, tiny_llama(), **TINY[name])
    built.model.save_pretrained(tmp_path / "a")  # PEFT's own save: no cuma_method.json
    assert not (tmp_path / "a" / methods.METHOD_FILE).exists()
    assert methods.infer_method(tmp_path / "a") == name
    again = methods.load(None, tiny_llama(), tmp_path / "a")
    assert again.name == name and again.profile_dim == built.profile_dim and again.options["r"] == 2


def test_plain_save_pretrained_adapter_evaluates_on_its_own_profile_dim(tmp_path, tiny_model_dir, tiny_prepared,
                                                                        capsys):
    built = methods.build("cuma", tiny_llama(), r=2, num_experts=3, router_hidden=8, profile_dim=16)
    built.model.save_pretrained(tmp_path / "a")
    loaded = methods.load("cuma", tiny_llama(), tmp_path / "a")  # the registry default would be 384
    assert loaded.profile_dim == 16 and loaded.uses_profile
    for extra in ([], ["--method", "cuma"]):
        out = tmp_path / f"out{len(extra)}"
        rc = cli.main(["eval", "wvb", "--model", str(tiny_model_dir), "--adapter", str(tmp_path / "a"), "--data",
                       str(tiny_prepared), "--out", str(out), "--no-progress", "--limit", "4", *extra])
        assert rc == 0, capsys.readouterr().err
        summary = json.loads((out / "summary.json").read_text())
        assert summary["run"]["method"]["method"] == "cuma" and summary["run"]["method"]["profile_dim"] == 16
        assert summary["run"]["config"]["uses_profile_embeds"] is True and summary["counts"]["pairs"] == 4


def test_adapter_config_wins_over_the_record(tmp_path):
    built = methods.build("cuma", tiny_llama(), r=2, num_experts=3, router_hidden=8, profile_dim=16)
    methods.save(built, tmp_path / "a")
    rec_file = tmp_path / "a" / methods.METHOD_FILE
    rec = json.loads(rec_file.read_text())
    rec["options"]["profile_dim"] = 384
    rec_file.write_text(json.dumps(rec))
    with pytest.warns(UserWarning, match=r"profile_dim \(384 vs 16\).*adapter_config.json"):
        loaded = methods.load(None, tiny_llama(), tmp_path / "a")
    assert loaded.profile_dim == 16
    # the record's None (a library default) is no disagreement; an unchanged save reloads with its own options
    assert methods.load(None, tiny_llama(), _fresh_save(tmp_path / "b")).options == _fresh_built().options


def _fresh_built():
    return methods.build("hydralora", tiny_llama(), r=2, num_experts=2)


def _fresh_save(path):
    methods.save(_fresh_built(), path)
    return path


def test_a_config_that_disagrees_with_its_weights_names_the_field(tmp_path):
    built = methods.build("cuma", tiny_llama(), r=2, num_experts=3, router_hidden=8, profile_dim=16)
    methods.save(built, tmp_path / "a")
    cfg_file = tmp_path / "a" / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["r"] = 4
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as info:
        methods.load(None, tiny_llama(), tmp_path / "a")
    msg = str(info.value)
    assert str(cfg_file) in msg and "field 'r' is 4 there" in msg and "r=2" in msg
    assert "(3, 32, 2)" in msg and "(3, 32, 4)" in msg and "size mismatch" not in msg


def test_method_record_without_a_method_name_is_named(tmp_path):
    methods.save(_fresh_built(), tmp_path / "a")
    (tmp_path / "a" / methods.METHOD_FILE).write_text('{"options": {}}')
    with pytest.raises(ValueError, match=r"cuma_method.json: field 'method' must be a method name"):
        methods.load(None, tiny_llama(), tmp_path / "a")


def test_save_is_atomic(tmp_path, monkeypatch):
    built = _fresh_built()
    out = tmp_path / "run"

    def broken(path, **kw):
        with open(os.path.join(path, "adapter_config.json"), "w") as fh:
            fh.write("{")  # half of a save
        raise OSError("disk full")

    monkeypatch.setattr(built.model, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        methods.save(built, out)
    assert sorted(os.listdir(tmp_path)) == []  # no folder, no temporary sibling

    # a run folder that already holds checkpoints and an earlier save: a failed save leaves it as it was
    monkeypatch.undo()
    (out / "checkpoint-1").mkdir(parents=True)
    (out / "checkpoint-1" / "trainer_state.json").write_text("{}")
    methods.save(built, out)
    before = {n: (out / n).read_bytes() for n in os.listdir(out) if (out / n).is_file()}
    monkeypatch.setattr(built.model, "save_pretrained", broken)
    with pytest.raises(OSError):
        methods.save(built, out)
    assert {n: (out / n).read_bytes() for n in os.listdir(out) if (out / n).is_file()} == before
    assert sorted(os.listdir(tmp_path)) == ["run"]
    # a successful save into it keeps the checkpoints
    monkeypatch.undo()
    methods.save(built, out)
    assert (out / "checkpoint-1" / "trainer_state.json").is_file() and (out / methods.METHOD_FILE).is_file()
    assert methods.load(None, tiny_llama(), out).name == "hydralora"
