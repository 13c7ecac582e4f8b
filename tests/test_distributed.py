"""Multi-process training and evaluation on CPU (gloo), and the ZeRO-3 / DDP settings of the SFT recipe.

The two-process tests start ``tests/_dist_worker.py`` with ``python -m torch.distributed.run --nproc_per_node 2``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cuma import distributed

HERE = Path(__file__).resolve().parent
WORKER = HERE / "_dist_worker.py"
SRC = HERE.parent / "src" / "cuma"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               CUDA_VISIBLE_DEVICES="", ACCELERATE_USE_CPU="1")
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    return env


def _run(args, nproc: int, timeout: int = 180):
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(WORKER), *map(str, args)]
    else:
        cmd = [sys.executable, str(WORKER), *map(str, args)]
    proc = subprocess.run(cmd, cwd=HERE, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


# ------------------------------------------------------------------------------------------------ sharding


@pytest.mark.parametrize("n", [0, 1, 5, 7, 8, 13])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shards_cover_every_item_exactly_once(n, world):
    bounds = [distributed.shard_bounds(n, r, world) for r in range(world)]
    items = [i for a, b in bounds for i in range(a, b)]
    assert items == list(range(n))
    sizes = [b - a for a, b in bounds]
    assert max(sizes) - min(sizes) <= 1


def test_gather_in_one_process_is_identity():
    assert distributed.gather_in_order([3, 1, 2]) == [3, 1, 2]
    assert distributed.rank_and_world() == (0, 1)


# ------------------------------------------------------------------------------------------------ two processes


@pytest.mark.slow
def test_ddp_two_ranks_match_one_process(tmp_path):
    """2 ranks (gloo), find_unused_parameters=False, ranks routed to different experts: no unused-parameter error,
    identical adapters on both ranks, and the same adapters as one process on the same global batch."""
    _run(["train", tmp_path / "ddp"], nproc=2)
    _run(["train", tmp_path / "single"], nproc=1)
    r0 = torch.load(tmp_path / "ddp" / "rank0.pt")
    r1 = torch.load(tmp_path / "ddp" / "rank1.pt")
    one = torch.load(tmp_path / "single" / "rank0.pt")
    assert r0["world"] == r1["world"] == 2 and one["world"] == 1

    # the ranks route to different experts: their expert loads differ, and on each rank some expert gets far fewer
    # tokens than on the other
    load0, load1 = r0["loads"].sum(0), r1["loads"].sum(0)
    assert not torch.equal(load0, load1)
    assert (load0 - load1).abs().max() > 0.25 * load0.sum() / load0.numel()

    # the single-process run sees the same micro-batches (rank 0's, then rank 1's) and the same losses
    torch.testing.assert_close(torch.tensor(one["losses"][0::2]), torch.tensor(r0["losses"]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(one["losses"][1::2]), torch.tensor(r1["losses"]), rtol=1e-5, atol=1e-6)

    assert r0["state"].keys() == r1["state"].keys() == one["state"].keys()
    assert any("cuma_router" in k for k in r0["state"]) and any("cuma_A" in k for k in r0["state"])
    for k in r0["state"]:
        torch.testing.assert_close(r0["state"][k], r1["state"][k], rtol=0, atol=0, msg=k)  # bit-identical ranks
        torch.testing.assert_close(r0["state"][k], one["state"][k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.slow
def test_distributed_eval_gathers_each_record_once(tmp_path, tiny_prepared):
    """7 records on 2 ranks (4 + 3): the gathered predictions equal the single-process ones, in order, no repeats."""
    import sys as _sys

    _sys.path.insert(0, str(HERE))
    from _dist_worker import eval_model
    from conftest import tiny_chat_tokenizer

    from cuma.data.records import load_prepared
    from cuma.evaluate.scoring import score_records

    n = 7
    _run(["eval", tmp_path / "ddp", tiny_prepared, n], nproc=2)
    got = json.loads((tmp_path / "ddp" / "predictions.json").read_text())
    assert got["world"] == 2
    data = load_prepared(tiny_prepared)
    records = data.test[:n]
    assert len(records) == n
    want = score_records(eval_model(), tiny_chat_tokenizer(), records, batch_size=2,
                         profile_table=data.profile_embeds, progress=False)
    preds = got["predictions"]
    assert [p["id"] for p in preds] == [r["id"] for r in records]
    assert len({p["id"] for p in preds}) == n
    for a, b in zip(preds, want):
        assert a["pred_letter"] == b["pred_letter"]
        assert a["probs"] == pytest.approx(b["probs"], abs=1e-6)


# ------------------------------------------------------------------------------------------------ DDP / ZeRO-3


def test_sft_turns_the_unused_parameter_search_off(tiny_prepared, tmp_path):
    from test_sft import TINY

    from cuma import methods
    from cuma.config import load_config
    from cuma.train.config import SFTRunConfig
    from cuma.train.sft import _sft_args
    from conftest import tiny_llama

    cfg = load_config(SFTRunConfig, None, ["--train.output_dir", str(tmp_path), "--train.report_to", "none"])
    built = methods.build("cuma", tiny_llama(), profile_dim=16, **TINY["cuma"])
    args = _sft_args(cfg, built, has_eval=False)
    assert args.ddp_find_unused_parameters is False


def test_every_expert_parameter_gets_a_gradient_even_when_unrouted():
    """The reason find_unused_parameters can be off: with top-1 routing most experts get no token, yet every
    parameter has a (possibly zero) gradient after backward."""
    import peft
    from conftest import batch, profiles, tiny_llama

    import cuma

    torch.manual_seed(0)
    model = peft.get_peft_model(tiny_llama(), cuma.CuMAConfig(r=2, lora_alpha=4, num_experts=6, top_k=1,
                                                              profile_dim=16, router_hidden=8, init_weights=False))
    ids, mask = batch(1, 3)
    model(input_ids=ids, attention_mask=mask, labels=ids, profile_embeds=profiles(1)).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


def _zero_json(tmp_path, stage):
    path = tmp_path / f"z{stage}.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": stage}}))
    return path


def test_zero_stage_detection(tmp_path, monkeypatch):
    for k in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE", "ACCELERATE_DEEPSPEED_CONFIG_FILE"):
        monkeypatch.delenv(k, raising=False)
    assert distributed.zero_stage(None) == 0
    assert distributed.zero_stage(_zero_json(tmp_path, 2)) == 2
    assert distributed.zero_stage({"zero_optimization": {"stage": 3}}) == 3
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(_zero_json(tmp_path, 3))}
    assert distributed.zero_stage(None, environ=env) == 3
    assert distributed.zero_stage(None, environ={"ACCELERATE_USE_DEEPSPEED": "true",
                                                 "ACCELERATE_DEEPSPEED_ZERO_STAGE": "1"}) == 1
    root = HERE.parent / "configs" / "deepspeed"
    assert distributed.zero_stage(root / "zero2.json") == 2 and distributed.zero_stage(root / "zero3.json") == 3


class _FakeDeepSpeed:
    def __init__(self):
        self.calls = []
        fake = self

        class utils:
            @staticmethod
            def set_z3_leaf_modules(model, classes):
                fake.calls.append((model, list(classes)))

        self.utils = utils


def _bf16_cuma():
    import peft
    from conftest import tiny_llama

    import cuma

    base = tiny_llama().to(torch.bfloat16)
    return peft.get_peft_model(base, cuma.CuMAConfig(r=2, lora_alpha=4, num_experts=3, profile_dim=16,
                                                     router_hidden=8))


def test_zero3_registers_cuma_layers_as_leaves_and_casts_adapters():
    from cuma.tuners.cuma.layer import Linear

    model = _bf16_cuma()
    assert any(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)  # PEFT upcasts adapters
    fake = _FakeDeepSpeed()
    done = distributed.prepare_for_zero3(model, {"zero_optimization": {"stage": 3}}, import_deepspeed=lambda: fake)
    assert len(fake.calls) == 1 and fake.calls[0][0] is model and fake.calls[0][1] == [Linear]
    assert done["stage"] == 3 and done["cast"]
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_zero3_registration_is_a_no_op_elsewhere():
    model = _bf16_cuma()
    fake = _FakeDeepSpeed()
    for stage in (0, 1, 2):
        done = distributed.prepare_for_zero3(model, stage=stage, import_deepspeed=lambda: fake)
        assert done["leaf_classes"] == [] and done["cast"] == []
    assert fake.calls == []

    def missing():
        raise ImportError("No module named 'deepspeed'")

    done = distributed.prepare_for_zero3(model, stage=3, import_deepspeed=missing)
    assert done["leaf_classes"] == [] and "not importable" in done["reason"]
    assert any(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)  # untouched


def test_real_import_without_deepspeed_is_a_no_op(monkeypatch):
    """The real import path: deepspeed is not installed here, so ZeRO-3 preparation does nothing and does not fail."""
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed -> ImportError
    done = distributed.prepare_for_zero3(_bf16_cuma(), stage=3)
    assert done["leaf_classes"] == []


def test_adapters_never_read_a_base_weight_shape():
    """Under ZeRO-3 a partitioned weight has shape (0,): the tuners must use in_features / out_features."""
    files = sorted(str(p) for p in (SRC / "tuners").rglob("*.py")) + [str(SRC / "routing.py")]
    assert distributed.iter_base_shape_reads(files) == []


def test_launch_configs_are_consistent():
    import yaml

    root = HERE.parent / "configs"
    kinds = {}
    for name in ("ddp", "zero2", "zero3", "fsdp2"):
        cfg = yaml.safe_load((root / "accelerate" / f"{name}.yaml").read_text())
        kinds[name] = cfg["distributed_type"]
        if cfg["distributed_type"] == "DEEPSPEED":
            ds = cfg["deepspeed_config"]["deepspeed_config_file"]
            assert (HERE.parent / ds).is_file(), ds
            assert distributed.zero_stage(HERE.parent / ds) == int(name[-1])
    assert kinds == {"ddp": "MULTI_GPU", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED", "fsdp2": "FSDP"}
    z3 = json.loads((root / "deepspeed" / "zero3.json").read_text())
    assert z3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
