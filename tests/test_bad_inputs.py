"""The bad-input table: every input class of the command line, given a bad value, fails with a non-zero exit and a
message that names the file, field or option and what was expected, and leaves no output behind.

One row per case: ``ROWS[id] = setup``; ``setup(ctx)`` prepares the bad input under ``ctx.tmp`` and returns a
:class:`Case` (the argv for ``cuma.cli.main``, the phrases the error must contain, and the output path that must not
appear). Each row runs the real CLI in process.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch

from cuma import cli, methods
from conftest import tiny_llama

FIXTURES = Path(__file__).parent / "fixtures"
WVB = FIXTURES / "wvb_tiny"
PRISM = FIXTURES / "prism_tiny"
CA = FIXTURES / "ca_tiny" / "community_alignment.csv"
DIM = 16  # width of the random profile table of the prepared fixtures
LATIN1 = "Caf\xe9 Ardenia".encode("latin-1")  # one byte (0xe9) that is not UTF-8


@dataclass
class Case:
    argv: list[str]
    expect: list[str]  # phrases the error message must contain (case-sensitive)
    out: Optional[Path] = None  # must not exist afterwards (nor any temporary sibling of it)
    untouched: list[Path] = field(default_factory=list)  # files whose bytes must not change


@dataclass
class Ctx:
    tmp: Path
    model: Path
    prepared: Path
    adapter: Path
    prefs: Path
    choice: Path

    def copy(self, src: Path, name: Optional[str] = None) -> Path:
        dst = self.tmp / (name or src.name)
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            shutil.copy(src, dst)
        return dst


# ---------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tiny_model_dir, tiny_prepared):
    """A saved CuMA adapter (profile_dim 16) and prepared PRISM / Community Alignment folders with a 16-d table."""
    from safetensors.torch import save_file

    from cuma.data.community_alignment import prepare_community_alignment
    from cuma.data.prism import prepare_prism
    from cuma.data.records import read_jsonl

    root = tmp_path_factory.mktemp("bad-inputs")
    built = methods.build("cuma", tiny_llama(), r=2, num_experts=3, router_hidden=8, profile_dim=DIM,
                          init_weights=False)
    methods.save(built, root / "adapter")
    prepare_prism(PRISM / "survey.jsonl", PRISM / "conversations.jsonl", root / "prism", test_fraction=0.3,
                  valid_fraction=0.0, encoder=None)
    prepare_community_alignment(CA, root / "ca", test_fraction=0.3, valid_fraction=0.0, encoder=None)
    for folder in (root / "prism", root / "ca"):
        n = len(read_jsonl(folder / "profiles.jsonl"))
        save_file({"profile_embeds": torch.randn(n, DIM, generator=torch.Generator().manual_seed(0))},
                  str(folder / "profile_embeds.safetensors"))
    return {"model": tiny_model_dir, "prepared": tiny_prepared, "adapter": root / "adapter",
            "prefs": root / "prism", "choice": root / "ca"}


@pytest.fixture
def ctx(shared, tmp_path):
    return Ctx(tmp=tmp_path, **shared)


# ---------------------------------------------------------------------------------------------------- helpers


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _write_lines(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _edit_first(path: Path, edit: Callable[[dict], None]) -> None:
    rows = _lines(path)
    edit(rows[0])
    _write_lines(path, rows)


def _not_utf8(path: Path) -> None:
    """Put one latin-1 byte (0xe9) at the end of the first line of a text file (which every reader reaches)."""
    data = path.read_bytes()
    nl = data.find(b"\n")
    path.write_bytes(data[:nl] + b"\xe9" + data[nl:])


def _eval_wvb(ctx: Ctx, data: Path, *extra: str) -> list[str]:
    return ["eval", "wvb", "--model", str(ctx.model), "--data", str(data), "--out", str(ctx.tmp / "out"),
            "--no-progress", *extra]


def _eval_adapter(ctx: Ctx, adapter: Path, *extra: str) -> list[str]:
    return _eval_wvb(ctx, ctx.prepared, "--adapter", str(adapter), *extra)


def _sft(ctx: Ctx, *extra: str, config: Optional[Path] = None, data: Optional[Path] = None) -> list[str]:
    argv = ["train", "sft"]
    if config is not None:
        argv += ["--config", str(config)]
    argv += ["--model.name_or_path", str(ctx.model), "--data.path", str(data or ctx.prepared),
             "--train.output_dir", str(ctx.tmp / "out"), "--train.max_steps", "1", "--method.name", "lora",
             "--method.options.r", "2", "--train.report_to", "none", *extra]
    return argv


def _data_wvb(ctx: Ctx, src: Path, *extra: str) -> list[str]:
    return ["data", "wvb", "--wvb", str(src), "--out", str(ctx.tmp / "out"), "--train-pairs", "4", "--test-pairs", "2",
            "--no-embeddings", *extra]


def _prism(ctx: Ctx, survey: Path, conversations: Path, *extra: str) -> list[str]:
    return ["data", "prism", "--survey", str(survey), "--conversations", str(conversations), "--out",
            str(ctx.tmp / "out"), "--no-embeddings", *extra]


# ---------------------------------------------------------------------------------------------------- rows

ROWS: dict[str, Callable[[Ctx], Case]] = {}


def row(name: str):
    def deco(fn):
        ROWS[name] = fn
        return fn

    return deco


# --- cuma data wvb: the WorldValuesBench checkout


@row("data-wvb/value-column-missing")
def _(ctx):
    src = ctx.copy(WVB)
    tsv = src / "WorldValuesBench" / "train" / "train_value_qa.tsv"
    lines = [line.split("\t") for line in tsv.read_text(encoding="utf-8").splitlines()]
    col = lines[0].index("Q122")
    tsv.write_text("\n".join("\t".join(c for i, c in enumerate(line) if i != col) for line in lines) + "\n",
                   encoding="utf-8")
    return Case(_data_wvb(ctx, src), ["train_value_qa.tsv", "Q122", "question_metadata.json"], ctx.tmp / "out")


@row("data-wvb/tsv-not-utf8")
def _(ctx):
    src = ctx.copy(WVB)
    tsv = src / "WorldValuesBench" / "test" / "test_demographic_qa.tsv"
    _not_utf8(tsv)
    return Case(_data_wvb(ctx, src), ["test_demographic_qa.tsv", "not UTF-8", "0xe9 at line 1"], ctx.tmp / "out")


@row("data-wvb/json-not-utf8")
def _(ctx):
    src = ctx.copy(WVB)
    f = src / "dataset_construction" / "codebook.json"
    f.write_bytes(f.read_bytes().replace(b"Very important", LATIN1, 1))
    return Case(_data_wvb(ctx, src), ["codebook.json", "not UTF-8"], ctx.tmp / "out")


@row("data-wvb/json-broken")
def _(ctx):
    src = ctx.copy(WVB)
    f = src / "dataset_construction" / "question_metadata.json"
    f.write_text(f.read_text(encoding="utf-8")[:-40], encoding="utf-8")
    return Case(_data_wvb(ctx, src), ["question_metadata.json", "not valid JSON"], ctx.tmp / "out")


@row("data-wvb/pairs-option")
def _(ctx):
    return Case(["data", "wvb", "--wvb", str(WVB), "--out", str(ctx.tmp / "out"), "--train-pairs", "many",
                 "--test-pairs", "2"], ["--train-pairs", "many"], ctx.tmp / "out")


@row("data-wvb/unknown-question-id")
def _(ctx):
    return Case(_data_wvb(ctx, WVB, "--question-ids", "Q1,Q999"), ["Q999", "question_metadata.json"], ctx.tmp / "out")


@row("data-wvb/output-is-a-file")
def _(ctx):
    (ctx.tmp / "out").write_text("not a folder")
    return Case(_data_wvb(ctx, WVB), [str(ctx.tmp / "out"), "not a directory"], untouched=[ctx.tmp / "out"])


# --- cuma data synth


@row("data-synth/participants")
def _(ctx):
    return Case(["data", "synth", "--out", str(ctx.tmp / "out"), "--participants", "0"], ["participants", "0"],
                ctx.tmp / "out")


# --- cuma data prism / ca


@row("data-prism/max-turns-0")
def _(ctx):
    return Case(_prism(ctx, PRISM / "survey.jsonl", PRISM / "conversations.jsonl", "--max-turns", "0"),
                ["--max-turns", "positive integer", "'0'"], ctx.tmp / "out")


@row("data-prism/max-turns-negative")
def _(ctx):
    return Case(_prism(ctx, PRISM / "survey.jsonl", PRISM / "conversations.jsonl", "--max-turns", "-1"),
                ["--max-turns", "positive integer", "'-1'"], ctx.tmp / "out")


@row("data-prism/survey-not-utf8")
def _(ctx):
    survey = ctx.copy(PRISM / "survey.jsonl")
    _not_utf8(survey)
    return Case(_prism(ctx, survey, PRISM / "conversations.jsonl"), [str(survey), "not UTF-8"], ctx.tmp / "out")


@row("data-prism/missing-column")
def _(ctx):
    convs = ctx.tmp / "conversations.jsonl"
    rows = _lines(PRISM / "conversations.jsonl")
    for r in rows:
        r.pop("conversation_history", None)
    _write_lines(convs, rows)
    return Case(_prism(ctx, PRISM / "survey.jsonl", convs), [str(convs), "conversation_history"], ctx.tmp / "out")


@row("data-ca/csv-not-utf8")
def _(ctx):
    csv = ctx.copy(CA)
    _not_utf8(csv)
    return Case(["data", "ca", "--input", str(csv), "--out", str(ctx.tmp / "out"), "--no-embeddings"],
                [str(csv), "not UTF-8"], ctx.tmp / "out")


@row("data-ca/max-turns-0")
def _(ctx):
    return Case(["data", "ca", "--input", str(CA), "--out", str(ctx.tmp / "out"), "--no-embeddings", "--max-turns",
                 "0"], ["--max-turns", "positive integer"], ctx.tmp / "out")


# --- cuma train sft: the YAML config, overrides and the prepared-data folder


@row("train-sft/yaml-duplicate-key")
def _(ctx):
    cfg = ctx.tmp / "run.yaml"
    cfg.write_text("train:\n  learning_rate: 1.0e-4\n  seed: 1\n  learning_rate: 5.0e-4\n", encoding="utf-8")
    return Case(_sft(ctx, config=cfg), [str(cfg), "learning_rate", "duplicate key", "line 4"], ctx.tmp / "out")


@row("train-sft/yaml-not-utf8")
def _(ctx):
    cfg = ctx.tmp / "run.yaml"
    cfg.write_bytes(b"# " + LATIN1 + b"\ntrain:\n  seed: 1\n")
    return Case(_sft(ctx, config=cfg), [str(cfg), "not UTF-8"], ctx.tmp / "out")


@row("train-sft/yaml-unknown-key")
def _(ctx):
    cfg = ctx.tmp / "run.yaml"
    cfg.write_text("train:\n  learning_rat: 1.0e-4\n", encoding="utf-8")
    return Case(_sft(ctx, config=cfg), ["learning_rat", "unknown key", "learning_rate"], ctx.tmp / "out")


@row("train-sft/config-missing")
def _(ctx):
    return Case(_sft(ctx, config=ctx.tmp / "nope.yaml"), [str(ctx.tmp / "nope.yaml"), "does not exist"],
                ctx.tmp / "out")


@row("train-sft/data-missing")
def _(ctx):
    return Case(_sft(ctx, data=ctx.tmp / "nodata"), [str(ctx.tmp / "nodata"), "does not exist"], ctx.tmp / "out")


@row("train-sft/override-type")
def _(ctx):
    return Case(_sft(ctx, "--train.learning_rate", "fast"), ["train.learning_rate", "fast"], ctx.tmp / "out")


@row("train-sft/method-option")
def _(ctx):
    return Case(_sft(ctx, "--method.options.r", "eight"), ["'r'", "integer", "eight"], ctx.tmp / "out")


@row("train-sft/manifest-broken")
def _(ctx):
    data = ctx.copy(ctx.prepared, "data")
    (data / "manifest.json").write_text('{"seed": 0,', encoding="utf-8")
    return Case(_sft(ctx, data=data), [str(data / "manifest.json"), "not valid JSON"], ctx.tmp / "out")


@row("train-sft/jsonl-not-utf8")
def _(ctx):
    data = ctx.copy(ctx.prepared, "data")
    _not_utf8(data / "train.jsonl")
    return Case(_sft(ctx, data=data), [str(data / "train.jsonl"), "not UTF-8"], ctx.tmp / "out")


@row("train-sft/option-value-out-of-scale")
def _(ctx):
    data = ctx.copy(ctx.prepared, "data")

    def edit(r):
        r["option_values"] = [v + 100 for v in r["option_values"]]
        r["gold_value"] += 100

    _edit_first(data / "train.jsonl", edit)
    return Case(_sft(ctx, data=data), [str(data / "train.jsonl") + ":1", "option_values", "scale_min"],
                ctx.tmp / "out")


@row("train-sft/profile-index-text")
def _(ctx):
    data = ctx.copy(ctx.prepared, "data")
    _edit_first(data / "train.jsonl", lambda r: r.update(profile_index="abc"))
    return Case(_sft(ctx, data=data), [str(data / "train.jsonl") + ":1", "profile_index", "integer"], ctx.tmp / "out")


@row("train-sft/embeds-corrupt")
def _(ctx):
    data = ctx.copy(ctx.prepared, "data")
    (data / "profile_embeds.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    return Case(_sft(ctx, data=data), [str(data / "profile_embeds.safetensors"), "safetensors"], ctx.tmp / "out")


# --- cuma train dpo / grpo: the SFT output they start from and the preference folder


def _pref(ctx: Ctx, stage: str, *extra: str, sft: Optional[Path] = None, data: Optional[Path] = None) -> list[str]:
    argv = ["train", stage, "--model.name_or_path", str(ctx.model), "--data.path", str(data or ctx.prefs),
            "--train.output_dir", str(ctx.tmp / "out"), "--train.max_steps", "1", "--train.report_to", "none"]
    if sft is not None:
        argv += ["--init.sft_path", str(sft)]
    return argv + list(extra)


@row("train-dpo/method-record-broken")
def _(ctx):
    sft = ctx.copy(ctx.adapter, "sft")
    (sft / "cuma_method.json").write_text('{"method": "cuma", "options": {', encoding="utf-8")
    return Case(_pref(ctx, "dpo", sft=sft), [str(sft / "cuma_method.json"), "not valid JSON"], ctx.tmp / "out")


@row("train-dpo/embeds-corrupt")
def _(ctx):
    data = ctx.copy(ctx.prefs, "prefs")
    (data / "profile_embeds.safetensors").write_bytes(b"garbage")
    return Case(_pref(ctx, "dpo", sft=ctx.adapter, data=data),
                [str(data / "profile_embeds.safetensors"), "safetensors"], ctx.tmp / "out")


@row("train-grpo/sft-path-missing")
def _(ctx):
    return Case(_pref(ctx, "grpo", sft=ctx.tmp / "nosft"), [str(ctx.tmp / "nosft")], ctx.tmp / "out")


@row("train-grpo/judge")
def _(ctx):
    return Case(_pref(ctx, "grpo", "--reward.judge", "oracle", sft=ctx.adapter), ["reward.judge", "oracle", "http"],
                ctx.tmp / "out")


# --- cuma eval wvb: the prepared-data folder


@row("eval-wvb/data-missing")
def _(ctx):
    return Case(_eval_wvb(ctx, ctx.tmp / "nodata", "--method", "vanilla"), [str(ctx.tmp / "nodata"), "does not exist"],
                ctx.tmp / "out")


@row("eval-wvb/batch-size")
def _(ctx):
    return Case(_eval_wvb(ctx, ctx.prepared, "--method", "vanilla", "--batch-size", "0"), ["--batch-size", ">= 1"],
                ctx.tmp / "out")


@row("eval-wvb/manifest-broken")
def _(ctx):
    data = ctx.copy(ctx.prepared, "data")
    (data / "manifest.json").write_text("[1, 2", encoding="utf-8")
    return Case(_eval_wvb(ctx, data, "--method", "vanilla"), [str(data / "manifest.json"), "not valid JSON"],
                ctx.tmp / "out")


@row("eval-wvb/jsonl-not-utf8")
def _(ctx):
    data = ctx.copy(ctx.prepared, "data")
    _not_utf8(data / "test.jsonl")
    return Case(_eval_wvb(ctx, data, "--method", "vanilla"), [str(data / "test.jsonl"), "not UTF-8"], ctx.tmp / "out")


@row("eval-wvb/option-value-out-of-scale")
def _(ctx):
    data = ctx.copy(ctx.prepared, "data")

    def edit(r):
        r["option_values"] = [v * 100 for v in r["option_values"]]
        r["gold_value"] *= 100

    _edit_first(data / "test.jsonl", edit)
    return Case(_eval_wvb(ctx, data, "--method", "vanilla"),
                [str(data / "test.jsonl") + ":1", "option_values", "scale_min", "scale_max"], ctx.tmp / "out")


@row("eval-wvb/profile-index-text")
def _(ctx):
    data = ctx.copy(ctx.prepared, "data")
    _edit_first(data / "test.jsonl", lambda r: r.update(profile_index="abc"))
    return Case(_eval_wvb(ctx, data, "--adapter", str(ctx.adapter)),
                [str(data / "test.jsonl") + ":1", "profile_index", "integer", "'abc'"], ctx.tmp / "out")


@row("eval-wvb/profile-index-out-of-range")
def _(ctx):
    data = ctx.copy(ctx.prepared, "data")
    _edit_first(data / "test.jsonl", lambda r: r.update(profile_index=999))
    return Case(_eval_wvb(ctx, data, "--adapter", str(ctx.adapter)),
                [str(data / "test.jsonl") + ":1", "profile_index", "999", "profile_embeds.safetensors"],
                ctx.tmp / "out")


@row("eval-wvb/embeds-corrupt")
def _(ctx):
    data = ctx.copy(ctx.prepared, "data")
    (data / "profile_embeds.safetensors").write_bytes(b"\x00" * 5)
    return Case(_eval_wvb(ctx, data, "--adapter", str(ctx.adapter)),
                [str(data / "profile_embeds.safetensors"), "safetensors"], ctx.tmp / "out")


@row("eval-wvb/embeds-wrong-width")
def _(ctx):
    from safetensors.torch import save_file

    data = ctx.copy(ctx.prepared, "data")
    n = len(_lines(data / "profiles.jsonl"))
    save_file({"profile_embeds": torch.zeros(n, DIM + 4)}, str(data / "profile_embeds.safetensors"))
    return Case(_eval_wvb(ctx, data, "--adapter", str(ctx.adapter)),
                [str(data / "profile_embeds.safetensors"), f"{DIM + 4}-d", f"profile_dim={DIM}"], ctx.tmp / "out")


# --- cuma eval wvb: the adapter folder


@row("eval-adapter/method-record-broken")
def _(ctx):
    adapter = ctx.copy(ctx.adapter, "adapter")
    (adapter / "cuma_method.json").write_bytes(b'{"method": "cuma"')
    return Case(_eval_adapter(ctx, adapter), [str(adapter / "cuma_method.json"), "not valid JSON"], ctx.tmp / "out")


@row("eval-adapter/method-record-not-utf8")
def _(ctx):
    adapter = ctx.copy(ctx.adapter, "adapter")
    (adapter / "cuma_method.json").write_bytes(b'{"method": "' + LATIN1 + b'"}')
    return Case(_eval_adapter(ctx, adapter), [str(adapter / "cuma_method.json"), "not UTF-8"], ctx.tmp / "out")


@row("eval-adapter/no-weights")
def _(ctx):
    adapter = ctx.copy(ctx.adapter, "adapter")
    (adapter / "adapter_model.safetensors").unlink()
    return Case(_eval_adapter(ctx, adapter), [str(adapter), "no adapter weights", "adapter_model.safetensors"],
                ctx.tmp / "out")


@row("eval-adapter/config-disagrees-with-weights")
def _(ctx):
    adapter = ctx.copy(ctx.adapter, "adapter")
    f = adapter / "adapter_config.json"
    cfg = json.loads(f.read_text())
    cfg["profile_dim"] = 24
    f.write_text(json.dumps(cfg))
    return Case(_eval_adapter(ctx, adapter),
                [str(f), "'profile_dim'", "24", "profile_dim=16", "(8, 48)", "(8, 56)"], ctx.tmp / "out")


@row("eval-adapter/config-broken")
def _(ctx):
    adapter = ctx.copy(ctx.adapter, "adapter")
    (adapter / "adapter_config.json").write_text('{"peft_type": "CUMA", ', encoding="utf-8")
    return Case(_eval_adapter(ctx, adapter), [str(adapter / "adapter_config.json"), "not valid JSON"],
                ctx.tmp / "out")


@row("eval-adapter/wrong-method")
def _(ctx):
    return Case(_eval_adapter(ctx, ctx.adapter, "--method", "lora"),
                ["cuma_method.json", "holds method 'cuma'", "'lora'"], ctx.tmp / "out")


@row("eval-adapter/plain-peft-wrong-method")
def _(ctx):
    adapter = ctx.copy(ctx.adapter, "adapter")
    (adapter / "cuma_method.json").unlink()
    return Case(_eval_adapter(ctx, adapter, "--method", "hydralora"),
                [str(adapter / "adapter_config.json"), "peft_type", "'CUMA'", "'HYDRALORA'"], ctx.tmp / "out")


@row("eval-adapter/missing-folder")
def _(ctx):
    return Case(_eval_adapter(ctx, ctx.tmp / "nowhere"), ["--adapter", str(ctx.tmp / "nowhere"), "does not exist"],
                ctx.tmp / "out")


# --- cuma eval choice / winrate


@row("eval-choice/profile-index-out-of-range")
def _(ctx):
    data = ctx.copy(ctx.choice, "ca")
    _edit_first(data / "choice_test.jsonl", lambda r: r.update(profile_index=57))
    return Case(["eval", "choice", "--model", str(ctx.model), "--adapter", str(ctx.adapter), "--data", str(data),
                 "--out", str(ctx.tmp / "out"), "--no-progress"],
                [str(data / "choice_test.jsonl"), "profile_index", "57", "profile_embeds.safetensors"], ctx.tmp / "out")


@row("eval-choice/profile-index-text")
def _(ctx):
    data = ctx.copy(ctx.choice, "ca")
    _edit_first(data / "choice_test.jsonl", lambda r: r.update(profile_index="abc"))
    return Case(["eval", "choice", "--model", str(ctx.model), "--adapter", str(ctx.adapter), "--data", str(data),
                 "--out", str(ctx.tmp / "out"), "--no-progress"],
                [str(data / "choice_test.jsonl"), "profile_index", "'abc'"], ctx.tmp / "out")


@row("eval-winrate/num-samples")
def _(ctx):
    return Case(["eval", "winrate", "--model", str(ctx.model), "--candidate-method", "persona", "--data",
                 str(ctx.prefs), "--out", str(ctx.tmp / "out"), "--num-samples", "0"], ["--num-samples", ">= 1"],
                ctx.tmp / "out")


@row("eval-winrate/judge-url")
def _(ctx):
    return Case(["eval", "winrate", "--model", str(ctx.model), "--candidate-method", "persona", "--data",
                 str(ctx.prefs), "--out", str(ctx.tmp / "out"), "--judge", "http", "--judge-url", "ftp://judge",
                 "--judge-model", "m", "--num-samples", "1", "--max-new-tokens", "2"],
                ["ftp://judge", "http://", "https://"], ctx.tmp / "out")


# --- cuma analyze


@row("analyze-collapse/summary-broken")
def _(ctx):
    run = ctx.tmp / "run"
    run.mkdir()
    (run / "summary.json").write_text("{", encoding="utf-8")
    return Case(["analyze", "collapse", "--runs", str(run), "--out", str(ctx.tmp / "out")],
                [str(run / "summary.json"), "not valid JSON"], ctx.tmp / "out")


@row("analyze-routing/adapter-no-weights")
def _(ctx):
    adapter = ctx.copy(ctx.adapter, "adapter")
    (adapter / "adapter_model.safetensors").unlink()
    return Case(["analyze", "routing", "--model", str(ctx.model), "--adapter", str(adapter), "--data",
                 str(ctx.prepared), "--out", str(ctx.tmp / "out"), "--no-progress"],
                [str(adapter), "no adapter weights"], ctx.tmp / "out")


# --- cuma params / plan


@row("params/config-json-broken")
def _(ctx):
    cfg = ctx.tmp / "config.json"
    cfg.write_text('{"model_type": "llama",', encoding="utf-8")
    return Case(["params", "--model", str(cfg), "--method", "lora"], [str(cfg), "not valid JSON"])


@row("params/option")
def _(ctx):
    return Case(["params", "--model", str(ctx.model), "--method", "cuma", "-o", "top_k=two"],
                ["'top_k'", "integer", "two"])


@row("plan/gpus")
def _(ctx):
    return Case(["plan", "--model", str(ctx.model), "--gpus", "0"], ["--gpus", ">= 1"])


@row("demo/method-learning-rate")
def _(ctx):
    return Case(["demo", "--quick", "--out", str(ctx.tmp / "r"), "--work", str(ctx.tmp / "w"),
                 "--method-learning-rate", "dora=1e-3"], ["--method-learning-rate", "METHOD=LR", "'cuma'"])


@row("data-synth/profile-fields")
def _(ctx):
    return Case(["data", "synth", "--out", str(ctx.tmp / "syn"), "--participants", "100", "--questions", "4",
                 "--profile-fields", "B_COUNTRY,X003R"], ["profile_fields", "Q289", "latent mode"], ctx.tmp / "syn")


# --- output locations: checked before any work (a file in the way, a non-empty --out without --overwrite)


def _file_in_the_way(ctx: Ctx) -> Path:
    blocker = ctx.tmp / "blocker"
    blocker.write_text("a file, not a folder\n")
    return blocker


@row("output/eval-wvb-out-not-empty")
def _(ctx):
    out = ctx.tmp / "out"
    out.mkdir()
    (out / "summary.json").write_text('{"earlier": "run"}\n')
    return Case(_eval_wvb(ctx, ctx.prepared, "--method", "vanilla"), ["--out", "not empty", "--overwrite"],
                untouched=[out / "summary.json"])


@row("output/eval-choice-out-not-empty")
def _(ctx):
    out = ctx.tmp / "o"
    out.mkdir()
    (out / "predictions.jsonl").write_text("{}\n")
    return Case(["eval", "choice", "--model", str(ctx.model), "--method", "vanilla", "--data", str(ctx.choice),
                 "--out", str(out)], ["--out", "not empty", "--overwrite"], untouched=[out / "predictions.jsonl"])


@row("output/eval-wvb-out-under-a-file")
def _(ctx):
    blocker = _file_in_the_way(ctx)
    return Case(["eval", "wvb", "--model", str(ctx.model), "--method", "vanilla", "--data", str(ctx.prepared),
                 "--out", str(blocker / "out")], ["--out", "is a file, not a directory"], untouched=[blocker])


@row("output/train-output-dir-under-a-file")
def _(ctx):
    blocker = _file_in_the_way(ctx)
    return Case(_sft(ctx, "--train.output_dir", str(blocker / "run"), "--train.save_strategy", "no"),
                ["train.output_dir", "is a file, not a directory"], untouched=[blocker])


@row("output/data-synth-out-under-a-file")
def _(ctx):
    blocker = _file_in_the_way(ctx)
    return Case(["data", "synth", "--out", str(blocker / "syn"), "--participants", "100", "--questions", "4"],
                ["--out", "is a file, not a directory"], untouched=[blocker])


@row("output/data-wvb-out-not-empty")
def _(ctx):
    out = ctx.tmp / "out"
    out.mkdir()
    (out / "manifest.json").write_text("{}\n")
    return Case(_data_wvb(ctx, WVB), ["--out", "not empty", "--overwrite"], untouched=[out / "manifest.json"])


@row("output/analyze-out-under-a-file")
def _(ctx):
    blocker = _file_in_the_way(ctx)
    return Case(["analyze", "collapse", "--runs", str(ctx.tmp), "--out", str(blocker / "a")],
                ["--out", "is a file, not a directory"], untouched=[blocker])


# ---------------------------------------------------------------------------------------------------- the table


def _leftovers(out: Path) -> list[str]:
    parent = out.parent
    if not parent.is_dir():
        return []
    return sorted(p.name for p in parent.iterdir() if p.name == out.name or p.name.startswith(f".{out.name}."))


@pytest.mark.parametrize("name", list(ROWS))
def test_bad_input(name, ctx, capsys):
    case = ROWS[name](ctx)
    before = {p: p.read_bytes() for p in case.untouched}
    try:
        rc = cli.main(case.argv)
    except SystemExit as exc:  # argparse: usage error
        rc = exc.code
    err = capsys.readouterr().err
    assert rc not in (0, None), f"{name}: exit status 0; stderr: {err}"
    assert "Traceback" not in err
    message = " ".join(err.split())
    missing = [phrase for phrase in case.expect if phrase not in message]
    assert not missing, f"{name}: the error does not say {missing}: {err}"
    if case.out is not None:
        assert not _leftovers(case.out), f"{name}: left {_leftovers(case.out)} behind"
    for p, data in before.items():
        assert p.read_bytes() == data, f"{name}: changed {p}"
