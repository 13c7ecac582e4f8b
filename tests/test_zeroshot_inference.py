"""experiments/demo/zeroshot_inference.py (docs/notes/demo-investigation.md): an unseen profile routed as its nearest training
profiles. The table it builds must keep every training row and give each other row its neighbours' mean."""

import importlib.util
from pathlib import Path

import torch


def _module(monkeypatch):
    folder = Path(__file__).resolve().parent.parent / "experiments" / "demo"
    monkeypatch.syspath_prepend(str(folder))  # the script imports its folder's _shared, as when run from there
    path = folder / "zeroshot_inference.py"
    spec = importlib.util.spec_from_file_location("zeroshot_inference", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_unseen_rows_take_their_nearest_training_rows_mean_and_training_rows_stay(monkeypatch):
    mod = _module(monkeypatch)
    g = torch.Generator().manual_seed(0)
    train = torch.randn(6, 8, generator=g)
    # two unseen profiles, each a small step from one training profile (rows 1 and 4)
    unseen = torch.stack([train[1] + 0.01 * torch.randn(8, generator=g), train[4] + 0.01 * torch.randn(8, generator=g)])
    table = torch.cat([train, unseen])
    rows = list(range(6))
    assert mod.neighbour_table(table, rows, 0) is table  # k = 0: what CuMA does, no copy
    one = mod.neighbour_table(table, rows, 1)
    assert torch.equal(one[:6], train)
    assert torch.equal(one[6], train[1]) and torch.equal(one[7], train[4])
    # k = 2: the mean of the nearest two by centred cosine, computed independently here
    centred = torch.nn.functional.normalize(table - train.mean(0), dim=-1)
    two = mod.neighbour_table(table, rows, 2)
    for i in (6, 7):
        nearest = (centred[i] @ centred[:6].T).topk(2).indices
        assert torch.allclose(two[i], train[nearest].mean(0))
    assert torch.equal(table[6], unseen[0])  # the input table is not modified
    # k above the bank's size: every training row
    assert torch.allclose(mod.neighbour_table(table, rows, 50)[7], train.mean(0))
