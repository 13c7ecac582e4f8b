"""MixLoRA tuner: FFN blocks as sparse mixtures of LoRA experts (top-2 of 8), plain LoRA on attention, Mixtral
load-balancing term over all layers."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import batch, tiny_llama, tiny_qwen3
from peft import PeftModel, get_peft_model
from peft import mapping as peft_mapping
from safetensors.torch import load_file
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

import cuma
from cuma import MixLoRAConfig, MixLoRAModel
from cuma.tuners.mixlora import MixLoRAFFN, MixLoRALayer
from cuma.tuners.mixlora import Linear as MixLoRALinear


def mix(model=None, **kw):
    kw.setdefault("lora_dropout", 0.0)
    return get_peft_model(model if model is not None else tiny_llama(), MixLoRAConfig(**kw))


def logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def blocks(model) -> list[MixLoRAFFN]:
    return [m for m in model.modules() if isinstance(m, MixLoRAFFN)]


def padded_batch():
    ids, mask = batch(bsz=3, length=9)
    mask[0, :3] = 0  # left padding
    mask[2, -2:] = 0  # right padding
    return ids, mask


def test_registered_with_peft():
    assert peft_mapping.PEFT_TYPE_TO_CONFIG_MAPPING["MIXLORA"] is MixLoRAConfig
    assert peft_mapping.PEFT_TYPE_TO_TUNER_MAPPING["MIXLORA"] is MixLoRAModel
    assert peft_mapping.PEFT_TYPE_TO_PREFIX_MAPPING["MIXLORA"] == "mixlora_"


def test_config_defaults_and_validation():
    c = MixLoRAConfig()
    assert (c.num_experts, c.top_k, c.router_aux_loss_coef, c.router_init_range) == (8, 2, 0.001, 0.02)
    assert c.target_modules == {"q_proj", "k_proj", "v_proj", "o_proj"} and c.ffn_modules == ["mlp"]
    assert (c.expert_rank, c.expert_scaling) == (8, 2.0)
    c = MixLoRAConfig(r=8, lora_alpha=16, expert_r=4, expert_alpha=16, expert_dropout=0.1)
    assert (c.expert_rank, c.expert_scaling, c.expert_lora_dropout) == (4, 4.0, 0.1)
    for bad in (
        dict(top_k=9),
        dict(top_k=0),
        dict(r=0),
        dict(router_aux_loss_coef=-1.0),
        dict(ffn_modules=[]),
        dict(target_modules=["q_proj", "up_proj"]),  # FFN projections belong to the experts
        dict(bias="lora_only"),
    ):
        with pytest.raises(ValueError):
            MixLoRAConfig(**bad)
    with pytest.raises(ValueError, match="all-linear"):
        mix(target_modules="all-linear")
    with pytest.raises(ValueError, match="name no module"):
        mix(ffn_modules=["ffn"])
    with pytest.raises(ValueError, match="cannot turn"):
        mix(ffn_modules=["self_attn"])  # not a gated FFN


def test_structure():
    model = mix()
    layer = model.base_model.model.model.layers[0]
    assert isinstance(layer.mlp, MixLoRAFFN)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert isinstance(getattr(layer.self_attn, name), MixLoRALinear)
    ffn = layer.mlp
    assert ffn.mixlora_router["default"].bias is None
    assert tuple(ffn.mixlora_router["default"].weight.shape) == (8, 32)
    assert tuple(ffn.mixlora_gate_A["default"].shape) == (8, 32, 8)
    assert tuple(ffn.mixlora_down_B["default"].shape) == (8, 8, 32)
    w = ffn.mixlora_router["default"].weight
    assert w.std().item() == pytest.approx(0.02, rel=0.3)  # N(0, 0.02)
    # only attention, or only the FFN
    only_ffn = mix(target_modules=[])
    assert not any(isinstance(m, MixLoRALinear) for m in only_ffn.modules()) and len(blocks(only_ffn)) == 2
    only_layer1 = mix(layers_to_transform=[1])
    assert len(blocks(only_layer1)) == 1
    assert isinstance(only_layer1.base_model.model.model.layers[1].mlp, MixLoRAFFN)


def test_trainable_parameter_count():
    r, n = 4, 8
    model = mix(r=r, num_experts=n)  # 2 layers, hidden 32, intermediate 64, q/o 32->32, k/v 32->16
    attention = r * (32 + 32) * 2 + r * (32 + 16) * 2
    ffn = 32 * n + n * (32 * r + r * 64) * 2 + n * (64 * r + r * 32)
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == 2 * (attention + ffn)
    assert total == sum(p.numel() for p in tiny_llama().parameters()) + trainable
    assert all(not p.requires_grad for name, p in model.named_parameters() if "mixlora_" not in name)


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen3])
def test_starts_as_the_base_model(make):
    ids, mask = padded_batch()
    ref = logits(make(), ids, mask)
    model = mix(make())
    assert torch.equal(logits(model, ids, mask), ref)


def literal_mixlora_ffn(block: MixLoRAFFN, x: torch.Tensor) -> torch.Tensor:
    """Test oracle, the paper's formula token by token: sum over the kept experts of w_i * expert_i(x), where expert_i
    is the frozen FFN with expert i's LoRA on gate, up and down (W_down applied per expert)."""
    ffn = block.base_layer
    cfg = block.mixlora_settings["default"]
    s = cfg.expert_scaling
    ga, gb = block.mixlora_gate_A["default"], block.mixlora_gate_B["default"]
    ua, ub = block.mixlora_up_A["default"], block.mixlora_up_B["default"]
    da, db = block.mixlora_down_A["default"], block.mixlora_down_B["default"]
    xf = x.reshape(-1, x.shape[-1])
    probs = torch.softmax(xf @ block.mixlora_router["default"].weight.T, dim=-1)
    out = torch.zeros_like(xf)
    for t in range(xf.shape[0]):
        top_w, top_i = probs[t].topk(cfg.top_k)
        top_w = top_w / top_w.sum()
        for w, e in zip(top_w, top_i):
            g = ffn.gate_proj(xf[t]) + s * (xf[t] @ ga[e] @ gb[e])
            u = ffn.up_proj(xf[t]) + s * (xf[t] @ ua[e] @ ub[e])
            h = ffn.act_fn(g) * u
            out[t] += w * (ffn.down_proj(h) + s * (h @ da[e] @ db[e]))
    return out.reshape(x.shape)


def test_sparse_forward_matches_the_literal_formula():
    model = mix(init_weights=False)
    block = model.base_model.model.model.layers[0].mlp
    x = torch.randn(2, 6, 32)
    with torch.no_grad():
        torch.testing.assert_close(block(x), literal_mixlora_ffn(block, x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(block(x[0]), literal_mixlora_ffn(block, x[0]), rtol=1e-5, atol=1e-6)


def test_frozen_projections_run_once_per_token():
    model = mix(init_weights=False)
    block = model.base_model.model.model.layers[0].mlp
    rows = {"gate_proj": [], "up_proj": [], "down_proj": []}
    hooks = [
        getattr(block.base_layer, name).register_forward_hook(
            lambda m, args, out, name=name: rows[name].append(args[0].reshape(-1, args[0].shape[-1]).shape[0])
        )
        for name in rows
    ]
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        block(x)
    for h in hooks:
        h.remove()
    assert rows == {"gate_proj": [10], "up_proj": [10], "down_proj": [10]}


def test_disable_adapter_gives_base_logits():
    ids, mask = padded_batch()
    ref = logits(tiny_llama(), ids, mask)
    model = mix(init_weights=False)
    assert not torch.allclose(logits(model, ids, mask), ref)
    with model.disable_adapter():
        assert torch.equal(logits(model, ids, mask), ref)
    assert not torch.allclose(logits(model, ids, mask), ref)


def test_save_and_load_round_trip_is_bit_exact(tmp_path):
    ids, mask = padded_batch()
    model = mix(init_weights=False, expert_r=4, num_experts=4)
    before = logits(model, ids, mask)
    model.save_pretrained(tmp_path)
    saved = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert saved and all(".mixlora_" in k and ".default" not in k for k in saved)
    assert any(k.endswith("mlp.mixlora_router.weight") for k in saved)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    cfg = loaded.peft_config["default"]
    assert (cfg.peft_type, cfg.expert_r, cfg.num_experts) == ("MIXLORA", 4, 4)
    assert torch.equal(logits(loaded, ids, mask), before)
    other = PeftModel.from_pretrained(tiny_llama(), tmp_path, adapter_name="other")
    assert torch.equal(logits(other, ids, mask), before)
    lazy = PeftModel.from_pretrained(tiny_llama(), tmp_path, low_cpu_mem_usage=True)
    assert torch.equal(logits(lazy, ids, mask), before)


def test_deepcopy_gets_its_own_balance_accumulator():
    """TRL deep-copies the policy for a reference model: the copy must record into its own accumulator."""
    ids, mask = padded_batch()
    model = mix(init_weights=False)
    ref = copy.deepcopy(model)
    model.train()
    ref.train()
    ref(input_ids=ids, attention_mask=mask)
    assert cuma.pop_balance_loss(model) is None
    assert cuma.pop_balance_loss(ref) is not None


def test_merging_is_refused_and_unload_returns_the_base():
    ids, mask = padded_batch()
    ref = logits(tiny_llama(), ids, mask)
    model = mix(init_weights=False)
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="cannot be merged"):
        model.base_model.merge_adapter()
    base = model.unload()
    assert not any(isinstance(m, MixLoRALayer) for m in base.modules())
    assert torch.equal(logits(base, ids, mask), ref)


def test_delete_adapter_removes_all_state():
    ids, mask = padded_batch()
    model = mix()
    before = logits(model, ids, mask)
    model.add_adapter("second", MixLoRAConfig(init_weights=False, lora_dropout=0.0, num_experts=4))
    model.set_adapter("second")
    assert not torch.equal(logits(model, ids, mask), before)
    model.train()
    model(input_ids=ids, attention_mask=mask)
    model.set_adapter("default")
    model.delete_adapter("second")
    assert "second" not in model.peft_config
    assert not any("second" in k for k in model.state_dict())
    for layer in model.modules():
        if isinstance(layer, MixLoRALayer):
            assert "second" not in layer.mixlora_settings and "second" not in layer.mixlora_dropout
    model.eval()
    assert torch.equal(logits(model, ids, mask), before)


def test_two_active_adapters_are_refused_in_the_ffn():
    model = mix()
    model.add_adapter("second", MixLoRAConfig(lora_dropout=0.0))
    model.base_model.set_adapter(["default", "second"])
    ids, mask = batch()
    with pytest.raises(ValueError, match="one adapter at a time"):
        logits(model, ids, mask)


def forward_capturing_router_logits(model, **inputs) -> tuple[torch.Tensor, ...]:
    """Runs a forward and returns each block's router logits (tokens, N), recomputed from the block inputs."""
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, args: seen.append((m, args[0]))) for b in blocks(model)]
    try:
        model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    return tuple(
        (x.reshape(-1, x.shape[-1]).float() @ b.mixlora_router["default"].weight.float().T).detach() for b, x in seen
    )


def test_balance_loss_is_mixtral_term_over_all_layers():
    ids, mask = padded_batch()
    model = mix(init_weights=False, router_aux_loss_coef=0.01)
    model.train()
    cuma.clear_balance_loss(model)
    router_logits = forward_capturing_router_logits(model, input_ids=ids, attention_mask=mask, labels=ids)
    assert len(router_logits) == 2
    expected = 0.01 * load_balancing_loss_func(router_logits, num_experts=8, top_k=2, attention_mask=mask)
    got = cuma.pop_balance_loss(model)
    assert got is not None and got.requires_grad
    torch.testing.assert_close(got.detach(), expected, rtol=1e-6, atol=1e-8)
    assert cuma.pop_balance_loss(model) is None  # popped

    # the concatenated term is not the mean of per-layer terms
    per_layer = [load_balancing_loss_func((lg,), 8, 2, mask) for lg in router_logits]
    assert not torch.allclose(expected, 0.01 * torch.stack(per_layer).mean())

    # without a mask every token counts; two forward calls give two terms (one each)
    first = forward_capturing_router_logits(model, input_ids=ids, labels=ids)
    second = forward_capturing_router_logits(model, input_ids=ids[:2], labels=ids[:2])
    expected = 0.01 * (load_balancing_loss_func(first, 8, 2, None) + load_balancing_loss_func(second, 8, 2, None))
    torch.testing.assert_close(cuma.pop_balance_loss(model).detach(), expected, rtol=1e-6, atol=1e-8)

    # clear drops what was recorded; eval records nothing; coefficient 0 switches it off
    model(input_ids=ids, labels=ids)
    cuma.clear_balance_loss(model)
    assert cuma.pop_balance_loss(model) is None
    model.eval()
    model(input_ids=ids, attention_mask=mask)
    assert cuma.pop_balance_loss(model) is None
    off = mix(router_aux_loss_coef=0.0)
    off.train()
    off(input_ids=ids, attention_mask=mask)
    assert cuma.pop_balance_loss(off) is None


def test_record_gates_gives_top2_of_8_per_block():
    ids, mask = padded_batch()
    model = mix(init_weights=False)
    with cuma.record_gates(model) as rec:
        logits(model, ids, mask)
    names = rec.layer_names()
    assert names == ["base_model.model.model.layers.0.mlp", "base_model.model.model.layers.1.mlp"]
    for name in names:
        g = rec.gates[name][0]
        assert g.shape == (3, 9, 8)
        assert ((g > 0).sum(-1) == 2).all()
        torch.testing.assert_close(g.sum(-1), torch.ones(3, 9))
        assert torch.equal(rec.masks[name][0], mask.bool())
    # nothing of the call is left on the model: the Mixtral statistics lived in the call
    assert not any(hasattr(m, "_calls") for m in model.modules())


def test_training_reduces_loss_and_gradients_reach_the_adapter():
    ids, mask = batch(bsz=2, length=10)
    model = mix(init_weights=False)
    model.train()
    with cuma.record_gates(model) as rec:
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
    (out.loss + cuma.pop_balance_loss(model)).backward()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert params and all("mixlora_" in n for n in params)
    for name, p in params.items():
        assert p.grad is not None, name
    for name, block in zip(rec.layer_names(), blocks(model)):
        hit = (rec.gates[name][0] > 0).reshape(-1, 8).any(0)  # experts that received tokens
        assert block.mixlora_router["default"].weight.grad.abs().sum() > 0
        for attr in ("gate_A", "gate_B", "up_A", "up_B", "down_A", "down_B"):
            grad = getattr(block, f"mixlora_{attr}")["default"].grad
            per_expert = grad.flatten(1).abs().sum(1) > 0
            assert torch.equal(per_expert, hit), attr  # unrouted experts get exactly zero, without error
    model.zero_grad()

    model = mix(lora_dropout=0.05)  # default init: B = 0
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    for _ in range(4):
        cuma.clear_balance_loss(model)
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        (loss + cuma.pop_balance_loss(model)).backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_modules_to_save(tmp_path):
    ids, mask = padded_batch()
    model = mix(init_weights=False, modules_to_save=["lm_head"])
    lm_head = model.base_model.model.lm_head
    assert all(p.requires_grad for p in lm_head.modules_to_save["default"].parameters())
    with torch.no_grad():
        lm_head.modules_to_save["default"].weight.add_(0.01)
    before = logits(model, ids, mask)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert torch.equal(logits(loaded, ids, mask), before)


def test_generate_with_cache_matches_the_base_at_init():
    ids, mask = batch(bsz=3, length=9)
    mask[0, :3] = 0  # left padding, as for generation
    base = tiny_llama()
    model = mix(tiny_llama())
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, **kw), base.generate(ids, attention_mask=mask, **kw))
    trained = mix(init_weights=False)
    with torch.no_grad():
        out = trained.generate(input_ids=ids, attention_mask=mask, **kw)
    assert out.shape == (3, 13)


def test_bf16_base_keeps_fp32_router_and_runs():
    model = mix(tiny_llama().to(torch.bfloat16), init_weights=False)
    block = blocks(model)[0]
    assert block.mixlora_router["default"].weight.dtype == torch.float32
    assert block.mixlora_gate_A["default"].dtype == torch.float32
    ids, mask = padded_batch()
    out = logits(model, ids, mask)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_gradient_checkpointing_training_step():
    ids, mask = padded_batch()
    model = mix(init_weights=False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    cuma.clear_balance_loss(model)
    loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    aux = cuma.pop_balance_loss(model)
    (loss + aux).backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "mixlora_router" in n)
