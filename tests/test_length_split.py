"""`train.split_by_length`: a batch run as micro-batches of similar length, each padded only to its own longest row,
trains like the whole batch."""

import math

import pytest
import torch
from safetensors.torch import load_file

from test_sft import config

from cuma.train.collator import split_by_length
from cuma.train.sft import run_sft


def _batch(lengths, width=None):
    width = width or max(lengths)
    rows = len(lengths)
    ids = torch.zeros(rows, width, dtype=torch.long)
    mask = torch.zeros(rows, width, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.arange(1, n + 1) + 100 * i
        mask[i, :n] = 1
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "profile_embeds": torch.arange(rows, dtype=torch.float32)[:, None].repeat(1, 3)}


def test_split_keeps_every_row_and_token_and_drops_padding():
    batch = _batch([9, 3, 7, 4, 8, 2])
    parts = split_by_length(batch, 2)
    assert [p["input_ids"].shape for p in parts] == [(3, 4), (3, 9)]  # rows 5, 1, 3 (lengths 2, 3, 4) / 2, 4, 0
    # every row once, with its own profile row and all of its tokens
    seen = {}
    for p in parts:
        for r in range(p["input_ids"].shape[0]):
            row = int(p["profile_embeds"][r, 0])
            n = int(p["attention_mask"][r].sum())
            seen[row] = n
            assert torch.equal(p["input_ids"][r, :n], batch["input_ids"][row, :n])
            assert torch.equal(p["labels"][r, :n], batch["labels"][row, :n])
    assert seen == {0: 9, 1: 3, 2: 7, 3: 4, 4: 8, 5: 2}
    real = int(batch["attention_mask"].sum())
    assert sum(p["attention_mask"].numel() for p in parts) < batch["attention_mask"].numel()
    assert sum(int(p["attention_mask"].sum()) for p in parts) == real


def test_split_edge_cases_and_errors():
    batch = _batch([5, 2, 4])
    assert split_by_length(batch, 1) == [batch]
    assert len(split_by_length(batch, 10)) == 3  # at most one micro-batch per row
    assert split_by_length(_batch([4]), 2)[0]["input_ids"].shape == (1, 4)
    with pytest.raises(ValueError, match="parts must be >= 1"):
        split_by_length(batch, 0)
    left = dict(batch, attention_mask=batch["attention_mask"].flip(1))
    with pytest.raises(ValueError, match="right padding"):
        split_by_length(left, 2)


@pytest.mark.parametrize("method,options", [("lora", {"lora_dropout": 0.0}),
                                            ("cuma", {"lora_dropout": 0.0, "balance_loss_coef": 0.0})])
def test_split_training_equals_whole_batch_training(method, options, tiny_model_dir, tiny_prepared, tmp_path):
    """Without the balance term (the only per-micro-batch quantity) and without dropout (whose masks are drawn per
    forward), the split run's adapter equals the whole-batch run's to rounding: the same rows per step and the same
    task-loss gradient."""
    weights = {}
    for parts in (1, 2):
        cfg = config(tiny_model_dir, tiny_prepared, tmp_path / f"p{parts}", method, steps=3,
                     per_device_train_batch_size=6, split_by_length=parts)
        cfg.method.options.update(options)
        run = run_sft(cfg)
        assert run["global_step"] == 3
        weights[parts] = load_file(str(tmp_path / f"p{parts}" / "adapter_model.safetensors"))
    assert weights[1].keys() == weights[2].keys()
    moved = 0
    for k in weights[1]:
        torch.testing.assert_close(weights[2][k], weights[1][k], rtol=1e-4, atol=1e-6, msg=k)
        moved += int(weights[1][k].abs().sum() > 0)
    assert moved > 0


def test_split_training_with_the_balance_term(tiny_model_dir, tiny_prepared, tmp_path):
    cfg = config(tiny_model_dir, tiny_prepared, tmp_path / "out", "cuma", steps=2, per_device_train_batch_size=6,
                 split_by_length=3)
    run = run_sft(cfg)
    assert run["global_step"] == 2 and math.isfinite(run["train_loss"])
    balance = [h["balance_loss"] for h in run["log_history"] if "balance_loss" in h]
    assert balance and all(math.isfinite(x) and x > 0 for x in balance)  # the routers' term is there, per step


def test_split_by_length_must_be_a_positive_integer(tiny_model_dir, tiny_prepared, tmp_path):
    cfg = config(tiny_model_dir, tiny_prepared, tmp_path / "bad", "lora", split_by_length=0)
    with pytest.raises(ValueError, match="train.split_by_length must be an integer >= 1"):
        run_sft(cfg)
