"""train.objective=distribution: the loss against hand-computed values, gradients, the collator, and a training step
of every method family through run_sft on a tiny model and a prepared opinions folder built in code."""

import glob
import json
import math
import os

import pytest
import torch
from conftest import tiny_chat_tokenizer
from test_sft import TINY, config

from cuma.train.distribution import (DistributionCollator, check_objective, distribution_loss, tokenize_cell)
from cuma.train.sft import run_sft


def make_opinions(root, groups=6, questions=5, mode="group", seed=0, dim=16):
    """A prepared opinions folder: ``groups`` countries whose answers depend on the country (two cultural modes),
    ``questions`` questions (the odd ones ordinal), split by ``mode``; a random ``dim``-d profile table."""
    from safetensors.torch import save_file

    from cuma.data.opinions import OpinionCell, ReadResult, assign_splits, write_opinions
    from cuma.profiles import Profile

    g = torch.Generator().manual_seed(seed)
    cells = []
    for gi in range(groups):
        profile = Profile(country=f"Land{gi}")
        gid = f"country=Land{gi}"
        for qi in range(questions):
            k = 3 if qi % 2 else 2
            logits = torch.randn(k, generator=g) + (2.0 if gi % 2 else -2.0) * torch.linspace(-1, 1, k)
            t = torch.softmax(logits, 0).tolist()
            t = [x / sum(t) for x in t]
            cells.append(OpinionCell(
                cell_id=f"q{qi}::{gid}", group_id=gid, group=profile.to_dict(), profile_text=profile.to_text(),
                question_id=f"q{qi}", question=f"Question number {qi}?", options=[f"opt{j}" for j in range(k)],
                ordinal=bool(qi % 2), option_values=None, target=t, weight=float(10 + gi), source="fixture"))
    result = ReadResult(source="opinions-json", cells=cells)
    info = assign_splits(result.cells, mode, seed=seed, test_fraction=0.34, valid_fraction=0.2,
                         skipped=result.skipped)
    write_opinions(root, result, info, encoder=None)
    n = len({c.group_id for c in result.cells})
    save_file({"profile_embeds": torch.randn(n, dim, generator=g)}, str(root / "profile_embeds.safetensors"))
    return root


@pytest.fixture(scope="session")
def tiny_opinions(tmp_path_factory):
    return make_opinions(tmp_path_factory.mktemp("opinions") / "prepared")


def test_loss_is_the_cross_entropy_against_the_target():
    z = torch.tensor([[1.0, 2.0, 0.0], [0.5, -1.0, 9.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    t = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.4, 0.0]])
    w = torch.tensor([1.0, 3.0])
    got = distribution_loss(z, mask, t, w, w.sum().expand(2))
    p0 = [math.exp(x) / sum(math.exp(y) for y in (1.0, 2.0, 0.0)) for x in (1.0, 2.0, 0.0)]
    p1 = [math.exp(x) / (math.exp(0.5) + math.exp(-1.0)) for x in (0.5, -1.0)]
    ce0 = -(0.2 * math.log(p0[0]) + 0.3 * math.log(p0[1]) + 0.5 * math.log(p0[2]))
    ce1 = -(0.6 * math.log(p1[0]) + 0.4 * math.log(p1[1]))  # the padded third letter takes no probability
    assert got.item() == pytest.approx((1 * ce0 + 3 * ce1) / 4, rel=1e-6)
    # forward KL up to the target's entropy: at p = t the loss is the entropy and its gradient vanishes
    zt = torch.log(t[:1]).clone().requires_grad_(True)
    loss = distribution_loss(zt, mask[:1], t[:1], torch.ones(1), torch.ones(1))
    loss.backward()
    entropy = -sum(x * math.log(x) for x in (0.2, 0.3, 0.5))
    assert loss.item() == pytest.approx(entropy, rel=1e-6)
    assert zt.grad.abs().max().item() < 1e-6


def test_cdf_term_is_the_normalised_w1_on_ordinal_rows_only():
    z = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.5, 0.25, 0.25]]))
    t = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    mask = torch.ones(2, 3, dtype=torch.bool)
    one = torch.ones(2)
    plain = distribution_loss(z, mask, t, one, one * 2)
    with_cdf = distribution_loss(z, mask, t, one, one * 2, ordinal=torch.tensor([True, False]), cdf_weight=2.0)
    w1 = (abs(0.5 - 0.0) + abs(0.75 - 0.0)) / 2  # |P - T| over the first two cumulative sums, / (K - 1)
    assert (with_cdf - plain).item() == pytest.approx(2.0 * w1 / 2, rel=1e-6)  # one of two rows is ordinal


def test_collator_carries_letters_target_and_the_batch_weight():
    tok = tiny_chat_tokenizer()
    rec = {"id": "c1", "question": "Q?", "letters": ["A", "B", "C"], "options": ["x", "y", "z"],
           "profile_text": "Country: Land0.", "profile_index": 1, "target": [0.2, 0.3, 0.5], "weight": 4.0,
           "ordinal": True}
    rec2 = {**rec, "id": "c2", "letters": ["A", "B"], "options": ["x", "y"], "target": [1.0, 0.0], "weight": 2.0,
            "ordinal": False, "profile_index": 0}
    ex = [tokenize_cell(r, tok, True, 512) for r in (rec, rec2)]
    assert ex[0]["input_ids"][-1] != ex[0]["letter_ids"][0]  # the prompt ends before the answer
    table = torch.arange(6.0).reshape(2, 3)
    batch = DistributionCollator(pad_token_id=0, profile_table=table, use_weights=True)(ex)
    assert batch["letter_ids"].shape == (2, 3) and batch["letter_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["target"][1].tolist() == [1.0, 0.0, 0.0]
    assert batch["cell_weight"].tolist() == [4.0, 2.0] and batch["cell_weight_total"].tolist() == [6.0, 6.0]
    assert batch["profile_embeds"].tolist() == [[3.0, 4.0, 5.0], [0.0, 1.0, 2.0]]
    assert "labels" not in batch
    unweighted = DistributionCollator(pad_token_id=0, uses_profile=False)(ex)
    assert unweighted["cell_weight"].tolist() == [1.0, 1.0] and "profile_embeds" not in unweighted
    with pytest.raises(ValueError, match="sum to 1"):
        tokenize_cell({**rec, "target": [0.5, 0.3, 0.5]}, tok, True, 512)
    with pytest.raises(ValueError, match="one probability per option"):
        tokenize_cell({**rec, "target": [0.5, 0.5]}, tok, True, 512)


def test_objective_options_are_checked():
    from cuma.train.config import TrainSection

    check_objective(TrainSection())
    with pytest.raises(ValueError, match="train.objective"):
        check_objective(TrainSection(objective="kl"))
    with pytest.raises(ValueError, match="train.cell_weighting"):
        check_objective(TrainSection(objective="distribution", cell_weighting="sqrt"))
    with pytest.raises(ValueError, match="train.cdf_loss_weight"):
        check_objective(TrainSection(objective="distribution", cdf_loss_weight=-1))
    with pytest.raises(ValueError, match="apply to train.objective=distribution only"):
        check_objective(TrainSection(cdf_loss_weight=0.5))


def test_trainer_loss_matches_the_hand_computed_loss(tiny_model_dir, tiny_opinions):
    """The task loss the trainer computes on a batch equals the cross-entropy computed from the model's logits."""
    from cuma import methods
    from cuma.models import load_base_and_tokenizer
    from cuma.train.distribution import cell_tokenizer, load_cells
    from cuma.train.sft import DistributionSFTTrainer

    base, tok = load_base_and_tokenizer(str(tiny_model_dir))
    built = methods.build("lora", base, **TINY["lora"])
    data = load_cells(tiny_opinions)
    records = data.split("train")[:3]
    tokenize = cell_tokenizer(tok)
    ex = [tokenize(r, tok, True, 512) for r in records]
    batch = DistributionCollator(pad_token_id=tok.pad_token_id, uses_profile=False)(ex)
    trainer = DistributionSFTTrainer.__new__(DistributionSFTTrainer)  # only task_loss's own state is needed
    trainer.cdf_loss_weight = 0.0
    trainer.loss_is_scaled_for_ga = None
    trainer.model_accepts_loss_kwargs, trainer.compute_loss_func, trainer.model = False, None, built.model
    got = trainer.task_loss(built.model, batch)
    # when the Trainer takes the loss as normalised for gradient accumulation, task_loss divides by the steps itself
    trainer.model_accepts_loss_kwargs, trainer.current_gradient_accumulation_steps = True, 2
    built.model.train()
    halved = trainer.task_loss(built.model, batch, num_items_in_batch=7)
    assert halved.item() == pytest.approx(got.item() / 2, rel=1e-5)
    built.model.eval()
    expected = 0.0
    for r, e in zip(records, ex):
        logits = built.model(input_ids=torch.tensor([e["input_ids"]])).logits[0, -1]
        logp = torch.log_softmax(logits[e["letter_ids"]], -1)
        expected += -(torch.tensor(r["target"]) * logp).sum().item()
    assert got.item() == pytest.approx(expected / 3, rel=1e-5)


def _cfg(tiny_model_dir, data, out, method, **train):
    cfg = config(tiny_model_dir, data, out, method, steps=2, objective="distribution", **train)
    return cfg


@pytest.mark.parametrize("method", ["lora", "dora", "cuma", "cuma-semantic", "cuma-soft", "cuma-minimal", "hydralora",
                                    "mixlora", "prefix", "fft"])
def test_every_method_family_trains_on_cells(method, tiny_model_dir, tiny_opinions, tmp_path):
    run = run_sft(_cfg(tiny_model_dir, tiny_opinions, tmp_path / "out", method))
    assert run["global_step"] == 2 and math.isfinite(run["train_loss"]) and run["train_loss"] > 0
    manifest = json.loads((tiny_opinions / "manifest.json").read_text())
    assert run["train_records"] == manifest["counts"]["cells"]["train"]  # one example per cell
    assert run["data"]["train_sha256"]
    if method in ("cuma", "cuma-semantic", "mixlora"):  # routed methods with a balance term keep it
        assert any("balance_loss" in h for h in run["log_history"]), run["log_history"]


def test_gradients_flow_and_the_loss_falls(tiny_model_dir, tiny_opinions, tmp_path):
    cfg = _cfg(tiny_model_dir, tiny_opinions, tmp_path / "out", "cuma", cell_weighting="weight", cdf_loss_weight=0.5,
               split_by_length=2, per_device_train_batch_size=4, learning_rate=1e-2)
    cfg.train.max_steps = 12
    run = run_sft(cfg)
    losses = [h["loss"] for h in run["log_history"] if "loss" in h]
    assert len(losses) >= 10 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3  # the adapters and routers moved the option distributions
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert any("cuma_B" in k and v.abs().sum() > 0 for k, v in weights.items())  # B starts at zero


def test_a_wvb_folder_is_refused_for_the_distribution_objective(tiny_model_dir, tiny_prepared, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a prepared opinions folder"):
        run_sft(_cfg(tiny_model_dir, tiny_prepared, tmp_path / "out", "lora"))


OPINION_CONFIGS = sorted(p for p in glob.glob("configs/opinions/*.yaml") if not os.path.basename(p).startswith("_"))


def test_opinion_configs_cover_every_trainable_method():
    from cuma import methods
    from cuma.config import load_config
    from cuma.train.config import SFTRunConfig

    names = {load_config(SFTRunConfig, p).method.name for p in OPINION_CONFIGS}
    assert names == {m for m in methods.list_methods() if methods.get_spec(m).trainable}


@pytest.mark.parametrize("path", OPINION_CONFIGS)
def test_every_opinion_config_resolves(path):
    from cuma import methods
    from cuma.config import load_config
    from cuma.train.config import SFTRunConfig

    cfg = load_config(SFTRunConfig, path)
    assert cfg.train.objective == "distribution"
    check_objective(cfg.train)
    methods.resolve_options(cfg.method.name, dict(cfg.method.options))


def test_cuma_train_sft_runs_an_opinions_config(tiny_model_dir, tiny_opinions, tmp_path):
    """`cuma train sft --config configs/opinions/cuma.yaml` with the tiny model (its options shrunk on the command
    line, as a user would)."""
    from cuma.cli import main

    out = tmp_path / "cli"
    argv = ["train", "sft", "--config", "configs/opinions/cuma.yaml", "--model.name_or_path", str(tiny_model_dir),
            "--data.path", str(tiny_opinions), "--train.output_dir", str(out), "--train.max_steps", "1",
            "--train.per_device_train_batch_size", "2", "--train.disable_tqdm", "true"]
    assert main(argv) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["global_step"] == 1 and math.isfinite(run["train_loss"])
    resolved = (out / "resolved_config.yaml").read_text()
    assert "objective: distribution" in resolved
