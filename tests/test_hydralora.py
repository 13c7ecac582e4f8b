"""HydraLoRA tuner: shared A, N B heads, dense softmax router on the layer input, no balance loss."""

from __future__ import annotations

import pytest
import torch
from conftest import batch, tiny_llama, tiny_qwen3
from peft import PeftModel, get_peft_model
from peft import mapping as peft_mapping
from safetensors.torch import load_file

import cuma
from cuma import HydraLoRAConfig, HydraLoRAModel
from cuma.tuners.hydralora import HydraLoRALayer


# Qwen3-8B, the model of the CuMA paper's table
QWEN3_8B_PARAMS = 8_190_735_360
QWEN3_8B = dict(layers=36, hidden=4096, q_out=4096, v_out=1024)


def hydra(model=None, **kw):
    kw.setdefault("lora_dropout", 0.0)
    return get_peft_model(model if model is not None else tiny_llama(), HydraLoRAConfig(**kw))


def logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def hydra_params_per_projection(d_in: int, d_out: int, r: int, n: int, router_hidden: int) -> int:
    a = d_in * r
    b = n * r * d_out
    if router_hidden == 0:
        router = d_in * n  # the paper's router: Linear(d_in -> N), no bias
    else:
        router = d_in * router_hidden + router_hidden + router_hidden * n + n
    return a + b + router


def test_registered_with_peft():
    assert peft_mapping.PEFT_TYPE_TO_CONFIG_MAPPING["HYDRALORA"] is HydraLoRAConfig
    assert peft_mapping.PEFT_TYPE_TO_TUNER_MAPPING["HYDRALORA"] is HydraLoRAModel
    assert peft_mapping.PEFT_TYPE_TO_PREFIX_MAPPING["HYDRALORA"] == "hydralora_"


def test_config_defaults_and_validation():
    c = HydraLoRAConfig()
    assert (c.r, c.lora_alpha, c.num_experts, c.heads, c.router_hidden) == (8, 16, 8, 8, 0)
    assert c.target_modules == {"gate_proj", "up_proj", "down_proj"}
    assert c.router_layers == 1 and not c.router_has_bias
    assert HydraLoRAConfig(router_hidden=256).router_has_bias
    assert HydraLoRAConfig(r=4, lora_alpha=8, use_rslora=True).scaling == pytest.approx(4.0)
    for bad in (dict(r=0), dict(num_experts=0), dict(router_hidden=-1), dict(lora_dropout=1.0), dict(bias="lora_only")):
        with pytest.raises(ValueError):
            HydraLoRAConfig(**bad)


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen3])
def test_starts_as_the_base_model(make):
    ids, mask = batch()
    ref = logits(make(), ids, mask)
    model = hydra(make())
    assert torch.equal(logits(model, ids, mask), ref)


def test_dense_forward_matches_per_head_loop():
    model = hydra(target_modules=["q_proj", "v_proj", "down_proj"], init_weights=False, num_experts=3, r=4)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, HydraLoRALayer)
    x = torch.randn(2, 5, layer.in_features)
    with torch.no_grad():
        got = layer(x)
        a, b = layer.hydralora_A["default"], layer.hydralora_B["default"]
        router = layer.hydralora_router["default"]
        g = torch.softmax(router(x).float(), dim=-1)
        assert torch.allclose(g.sum(-1), torch.ones(2, 5))
        expected = layer.base_layer(x)
        scaling = layer.hydralora_settings["default"].scaling
        for i in range(3):  # slow oracle: one head at a time
            expected = expected + scaling * g[..., i : i + 1] * ((x @ a) @ b[i])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # a 2-D input (tokens, features) works too
    with torch.no_grad():
        torch.testing.assert_close(layer(x[0]), got[0], rtol=1e-5, atol=1e-6)


def test_disable_adapter_gives_base_logits():
    ids, mask = batch()
    ref = logits(tiny_llama(), ids, mask)
    model = hydra(init_weights=False)
    assert not torch.allclose(logits(model, ids, mask), ref)
    with model.disable_adapter():
        assert torch.equal(logits(model, ids, mask), ref)


def test_save_and_load_round_trip_is_bit_exact(tmp_path):
    ids, mask = batch()
    model = hydra(init_weights=False, router_hidden=16, target_modules=["q_proj", "v_proj"])
    before = logits(model, ids, mask)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists()
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert loaded.peft_config["default"].peft_type == "HYDRALORA"
    assert loaded.peft_config["default"].router_hidden == 16
    assert torch.equal(logits(loaded, ids, mask), before)
    saved = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert saved and all(".hydralora_" in k for k in saved)
    # everything the adapter adds to the model, and nothing else, is in the file
    base_keys = {"base_model.model." + k for k in tiny_llama().state_dict()}
    added = {k.replace(".default", "", 1) for k in model.state_dict() if k.replace(".base_layer", "") not in base_keys}
    assert added == saved
    # the checkpoint carries no adapter name: it loads under another name too
    other = PeftModel.from_pretrained(tiny_llama(), tmp_path, adapter_name="other")
    assert torch.equal(logits(other, ids, mask), before)
    lazy = PeftModel.from_pretrained(tiny_llama(), tmp_path, low_cpu_mem_usage=True)
    assert torch.equal(logits(lazy, ids, mask), before)


def test_merging_is_refused_and_unload_returns_the_base():
    ids, mask = batch()
    ref = logits(tiny_llama(), ids, mask)
    model = hydra(init_weights=False)
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="cannot be merged"):
        model.base_model.merge_adapter()
    base = model.unload()
    assert not any(isinstance(m, HydraLoRALayer) for m in base.modules())
    assert torch.equal(logits(base, ids, mask), ref)


def test_delete_adapter_removes_all_state():
    ids, mask = batch()
    model = hydra()
    before = logits(model, ids, mask)
    model.add_adapter("second", HydraLoRAConfig(target_modules=["q_proj"], init_weights=False, lora_dropout=0.0))
    assert any(".second" in k for k in model.state_dict())
    model.set_adapter("second")
    assert not torch.equal(logits(model, ids, mask), before)
    model.set_adapter("default")
    model.delete_adapter("second")
    assert "second" not in model.peft_config
    assert not any("second" in k for k in model.state_dict())
    for layer in model.modules():
        if isinstance(layer, HydraLoRALayer):
            assert "second" not in layer.hydralora_settings and "second" not in layer.hydralora_dropout
    assert torch.equal(logits(model, ids, mask), before)


def test_trainable_parameter_count():
    r, n = 4, 3
    model = hydra(r=r, num_experts=n)  # gate/up/down of a 2-layer Llama, hidden 32, intermediate 64
    per_layer = (
        hydra_params_per_projection(32, 64, r, n, 0) * 2  # gate_proj, up_proj
        + hydra_params_per_projection(64, 32, r, n, 0)  # down_proj
    )
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == 2 * per_layer
    assert total == sum(p.numel() for p in tiny_llama().parameters()) + trainable
    assert all(not p.requires_grad for n_, p in model.named_parameters() if "hydralora_" not in n_)


def test_qwen3_8b_percentage_formula():
    """The CuMA paper's HydraLoRA row (2.31% of Qwen3-8B): r=64, shared A, 8 heads, q_proj + v_proj, one MLP router
    Linear(4096->256)+ReLU+Linear(256->8) with biases per adapted projection (two per layer)."""
    q = 4096 * 64 + 8 * 64 * 4096 + (4096 * 256 + 256 + 256 * 8 + 8)
    v = 4096 * 64 + 8 * 64 * 1024 + (4096 * 256 + 256 + 256 * 8 + 8)
    assert (q, v) == (3_410_184, 1_837_320)
    total = 36 * (q + v)
    assert total == 188_910_144
    assert total == QWEN3_8B["layers"] * (
        hydra_params_per_projection(4096, 4096, 64, 8, 256) + hydra_params_per_projection(4096, 1024, 64, 8, 256)
    )
    assert round(100 * total / QWEN3_8B_PARAMS, 2) == 2.31  # 2.3064%
    # the paper's faithful linear bias-free router would give 1.41%, i.e. the table used the MLP router
    linear = 36 * (hydra_params_per_projection(4096, 4096, 64, 8, 0) + hydra_params_per_projection(4096, 1024, 64, 8, 0))
    assert round(100 * linear / QWEN3_8B_PARAMS, 2) == 1.41


def test_config_reproduces_the_paper_count_on_a_tiny_analogue():
    """Same construction on the tiny Qwen3 (hidden 32, q 32->32, v 32->16, 2 layers), counted from the real model."""
    config = dict(r=64, lora_alpha=128, num_experts=8, target_modules=["q_proj", "v_proj"], router_hidden=256)
    model = hydra(tiny_qwen3(), **config)
    trainable, _ = model.get_nb_trainable_parameters()
    expected = 2 * (hydra_params_per_projection(32, 32, 64, 8, 256) + hydra_params_per_projection(32, 16, 64, 8, 256))
    assert trainable == expected
    router = model.base_model.model.model.layers[0].self_attn.q_proj.hydralora_router["default"]
    assert [tuple(l.weight.shape) for l in router.layers] == [(256, 32), (8, 256)]
    assert all(l.bias is not None for l in router.layers)
    # the faithful default is a linear bias-free router
    model = hydra(tiny_qwen3(), target_modules=["q_proj"])
    router = model.base_model.model.model.layers[0].self_attn.q_proj.hydralora_router["default"]
    assert len(router.layers) == 1 and router.layers[0].bias is None


def test_config_reproduces_the_paper_count_on_qwen3_8b_meta():
    """The real Qwen3-8B architecture on the meta device (no memory): 188,910,144 adapter parameters, 2.31%."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(
        vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
    )
    with torch.device("meta"):
        base = Qwen3ForCausalLM(cfg)
        assert sum(p.numel() for p in base.parameters()) == QWEN3_8B_PARAMS
        model = get_peft_model(
            base,
            HydraLoRAConfig(r=64, lora_alpha=128, num_experts=8, target_modules=["q_proj", "v_proj"], router_hidden=256),
        )
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == 188_910_144
    assert round(100 * trainable / QWEN3_8B_PARAMS, 2) == 2.31


def test_modules_to_save(tmp_path):
    ids, mask = batch()
    model = hydra(init_weights=False, modules_to_save=["lm_head"])
    lm_head = model.base_model.model.lm_head
    assert all(p.requires_grad for p in lm_head.modules_to_save["default"].parameters())
    with torch.no_grad():
        lm_head.modules_to_save["default"].weight.add_(0.01)
    before = logits(model, ids, mask)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert torch.equal(logits(loaded, ids, mask), before)


def test_training_reduces_loss_and_reaches_every_adapter_parameter():
    ids, mask = batch(bsz=2, length=10)
    model = hydra(init_weights=False, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"])
    model.train()
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert params and all("hydralora_" in n for n in params)
    for n, p in params.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    assert cuma.pop_balance_loss(model) is None  # HydraLoRA has no balance loss
    model.zero_grad()

    model = hydra()  # default init: B = 0, starts as the base model
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    for _ in range(4):
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_record_gates_gives_dense_softmax_gates():
    ids, mask = batch()
    mask[0, :2] = 0
    model = hydra(target_modules=["q_proj"], num_experts=4)
    with cuma.record_gates(model) as rec:
        logits(model, ids, mask)
    assert len(rec.layer_names()) == 2
    for name in rec.layer_names():
        g = rec.gates[name][0]
        assert g.shape == (3, 7, 4)
        assert (g > 0).all()  # dense: no top-k
        torch.testing.assert_close(g.sum(-1), torch.ones(3, 7))
        assert torch.equal(rec.masks[name][0], mask.bool())


def test_bf16_base_keeps_fp32_adapter_and_runs():
    model = hydra(tiny_llama().to(torch.bfloat16), init_weights=False)
    layer = model.base_model.model.model.layers[0].mlp.gate_proj
    assert layer.hydralora_A["default"].dtype == torch.float32
    ids, mask = batch()
    out = logits(model, ids, mask)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_gradient_checkpointing_training_step():
    ids, mask = batch()
    model = hydra(init_weights=False, target_modules=["q_proj", "down_proj"])
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "hydralora_" in n]
    assert grads and all(g is not None for g in grads)
