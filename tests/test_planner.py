"""`cuma plan`: parameter figures against the paper's table, memory formulas against hand computation."""

from __future__ import annotations

import json

import pytest
from test_accounting import FFN, H, KV_OUT, L, Q_OUT, QWEN3_8B_PARAMS, VOCAB, hand_cuma, hand_lora, qwen3_8b_config

from cuma import planner

GIB = 1024**3


@pytest.fixture(scope="module")
def cuma_r64():
    return planner.plan(qwen3_8b_config(), "cuma", seq_len=1024, batch=16, gpus=8,
                        options=dict(r=64, lora_alpha=128, profile_dim=1024))


def test_parameter_figures_match_the_paper(cuma_r64):
    assert cuma_r64["parameters"] == QWEN3_8B_PARAMS
    assert cuma_r64["trainable"] == hand_cuma(64)
    assert round(cuma_r64["trainable_percent"], 2) == 4.15
    r8 = planner.plan(qwen3_8b_config(), "cuma", seq_len=1024, batch=16, gpus=8, options=dict(r=8, profile_dim=1024))
    assert r8["trainable"] == hand_cuma(8) and round(r8["trainable_percent"], 2) == 1.53
    lora = planner.plan(qwen3_8b_config(), "lora", seq_len=1024, batch=16, gpus=8, options=dict(r=64))
    assert lora["trainable"] == hand_lora(64) and round(lora["trainable_percent"], 2) == 0.37
    # LoRA saves r activations per adapted projection: 2 projections x 36 layers x 64
    assert lora["adapter_activations_per_token"] == 2 * L * 64


def test_memory_formulas_by_hand(cuma_r64):
    P, T, N, s, b = QWEN3_8B_PARAMS, hand_cuma(64), 8, 1024, 2
    assert cuma_r64["micro_batch"] == b and cuma_r64["gradient_accumulation"] == 1
    # adapters: per CuMA projection x@A_cat and its gated copy (2 N r), fp32 probs+gates (4 N), router hidden (2*256)
    per_proj = 2 * 8 * 64 + 4 * 8 + 2 * 256
    assert cuma_r64["adapter_activations_per_token"] == L * 2 * per_proj
    # a Qwen3 layer: 2 RMSNorm in/out pairs (4h), q/k-norm inputs, rotated q, k, v, attention output, SwiGLU (4i)
    per_token_layer = 4 * H + 2 * Q_OUT + 2 * KV_OUT + (Q_OUT + KV_OUT) + 4 * FFN + 2 * per_proj
    layer = 2 * s * b * per_token_layer
    logits = 6 * s * b * VOCAB
    rows = {(r["zero"], r["checkpointing"]): r for r in cuma_r64["rows"]}
    assert len(rows) == 8
    for (stage, ckpt), r in rows.items():
        weights = 2 * (P + T) / (N if stage == 3 else 1)
        grads = 2 * T / (N if stage >= 2 else 1)
        optim = 12 * T / (N if stage >= 1 else 1)
        act = (2 * s * b * H * L + layer if ckpt else L * layer) + logits
        assert r["activations_per_layer"] == layer
        assert r["weights"] == pytest.approx(weights) and r["gradients"] == pytest.approx(grads)
        assert r["optimizer"] == pytest.approx(optim) and r["activations"] == act
        assert r["total"] == pytest.approx(weights + grads + optim + act)
    # the headline figures, written out (GiB): ZeRO-2 without / with checkpointing, ZeRO-3 with checkpointing
    assert rows[(2, False)]["total"] / GIB == pytest.approx(29.72, abs=0.01)
    assert rows[(2, True)]["total"] / GIB == pytest.approx(19.07, abs=0.01)
    assert rows[(3, True)]["total"] / GIB == pytest.approx(5.16, abs=0.01)


def test_cost_by_hand(cuma_r64):
    P, T, s = QWEN3_8B_PARAMS, hand_cuma(64), 1024
    attn = 2 * s * Q_OUT * L
    fwd = 2 * (P + T) + attn
    bwd = 2 * (P + T) + 2 * T + 2 * attn
    rows = {(r["zero"], r["checkpointing"]): r for r in cuma_r64["rows"]}
    assert rows[(0, False)]["flops_per_token"] == fwd + bwd
    assert rows[(0, True)]["flops_per_token"] == 2 * fwd + bwd
    assert rows[(0, False)]["tokens_per_step"] == 16 * s
    ring = 2 * 7 / 8
    assert rows[(2, False)]["comm_bytes_per_gpu_per_step"] == pytest.approx(ring * 2 * T)
    assert rows[(3, True)]["comm_bytes_per_gpu_per_step"] == pytest.approx(ring * 2 * T + 3 * ring / 2 * 2 * (P + T))


def test_batch_must_split_over_gpus():
    with pytest.raises(ValueError, match="multiple"):
        planner.plan(qwen3_8b_config(), "lora", seq_len=8, batch=6, gpus=4)


def test_cli_plan(tmp_path, capsys):
    from cuma.cli import main

    qwen3_8b_config().save_pretrained(tmp_path)
    argv = ["plan", "--model", str(tmp_path / "config.json"), "--method", "cuma", "--r", "64", "--profile-dim", "1024",
            "--seq-len", "1024", "--batch", "16", "--gpus", "8", "--zero", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "trainable 339,905,088 (4.15%)" in out and "2*" in out and "29.72" in out
    assert main(argv + ["--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["trainable"] == hand_cuma(64) and len(data["rows"]) == 8


# ------------------------------------------------------------------------------------------------ GPU check script


def _gpu_check_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod, path


def test_gpu_check_model_is_about_1b_and_the_script_parses():
    import subprocess

    from cuma import accounting

    mod, path = _gpu_check_module()
    model = accounting.meta_model(mod.qwen3_config(dry_run=False))
    n = sum(p.numel() for p in model.parameters())
    assert 0.9e9 < n < 1.3e9
    assert subprocess.run(["bash", "-n", str(path.with_suffix(".sh"))]).returncode == 0


@pytest.mark.slow
def test_gpu_check_dry_run_on_cpu(tmp_path):
    import os
    import subprocess
    import sys

    _, path = _gpu_check_module()
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(path), "--dry-run", "--json", str(tmp_path / "g.json")],
                          capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ratio cuma_fast/lora tokens_per_s" in proc.stdout
    data = json.loads((tmp_path / "g.json").read_text())
    assert data["device"] == "cpu"
    for name in ("lora", "cuma_reference", "cuma_fast", "cuma_loop"):
        m = data["methods"][name]
        assert "error" not in m, m.get("traceback")
        assert m["tokens_per_s"] > 0 and "peak_memory_gib" in m and m["generate_tokens_per_s"] > 0
    assert data["ratios"]["cuma_fast/cuma_reference tokens_per_s"] > 0
