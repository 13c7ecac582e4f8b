"""CuMA layer maths: dense experts vs a per-expert loop oracle, gates, balance term, routing by profile."""

import math

import peft
import pytest
import torch
from conftest import batch, profiles, tiny_llama

import cuma
from cuma.routing import Router, switch_balance_loss, topk_gates
from cuma.routing_state import RoutingScope
from cuma.tuners.cuma.layer import CuMALayer, Linear


def make_layer(d_in=12, d_out=10, profile_dim=5, seed=0, **cfg):
    torch.manual_seed(seed)
    base = torch.nn.Linear(d_in, d_out)
    options = dict(r=3, lora_alpha=6, num_experts=4, top_k=2, profile_dim=profile_dim, router_hidden=8, init_weights=False)
    options.update(cfg)
    config = cuma.CuMAConfig(target_modules=["x"], **options)
    scope = RoutingScope("cuma")
    layer = Linear(base, "default", config, scope)
    return layer, scope, config


def loop_oracle(layer: CuMALayer, x, profile):
    """Slow reference: route, then apply each kept expert on its own tokens (one Python iteration per expert)."""
    cfg = layer.cuma_settings["default"]
    router = layer.cuma_router["default"]
    # concat literally (the fast router splits the first Linear instead)
    h = torch.cat([x, profile[:, None, :].expand(-1, x.shape[1], -1)], dim=-1) if profile is not None else x
    first = router.layers[0]
    logits = torch.nn.functional.linear(h, first.weight, first.bias)
    for lin in router.layers[1:]:
        logits = lin(torch.relu(logits))
    probs = torch.softmax(logits.float(), -1)
    vals, idx = probs.topk(cfg.effective_top_k, -1)
    vals = vals / vals.sum(-1, keepdim=True)
    out = layer.base_layer(x)
    flat_x = x.reshape(-1, x.shape[-1])
    delta = torch.zeros(flat_x.shape[0], layer.out_features)
    flat_idx, flat_vals = idx.reshape(flat_x.shape[0], -1), vals.reshape(flat_x.shape[0], -1)
    for i in range(cfg.num_experts):
        a = layer.cuma_A["default"] if cfg.shared_A else layer.cuma_A["default"][i]
        b = layer.cuma_B["default"][i]
        rows, slot = (flat_idx == i).nonzero(as_tuple=True)
        if rows.numel() == 0:
            continue
        contrib = (flat_x[rows] @ a @ b) * flat_vals[rows, slot, None] * cfg.scaling
        delta = delta.index_add(0, rows, contrib)
    return out + delta.reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("shared_A", [False, True])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_dense_equals_loop_oracle_outputs_and_grads(shared_A, use_rslora):
    layer, scope, _ = make_layer(shared_A=shared_A, use_rslora=use_rslora)
    x = torch.randn(3, 6, 12, requires_grad=True)
    e = torch.randn(3, 5)
    with scope.call(profile_rows=e):
        y = layer(x)
    params = [layer.cuma_A["default"], layer.cuma_B["default"], *layer.cuma_router["default"].parameters()]
    w = torch.randn_like(y)
    grads = torch.autograd.grad((y * w).sum(), [x, *params])

    x2 = x.detach().clone().requires_grad_(True)
    y2 = loop_oracle(layer, x2, e)
    grads2 = torch.autograd.grad((y2 * w).sum(), [x2, *params])
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-6)
    for g1, g2 in zip(grads, grads2):
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)


def test_scaling_rslora():
    assert cuma.CuMAConfig(r=16, lora_alpha=32).scaling == 2.0
    assert cuma.CuMAConfig(r=16, lora_alpha=32, use_rslora=True).scaling == 8.0


def test_gates_nonnegative_sum_to_one_exactly_k():
    logits = torch.randn(4, 9, 8)
    for k in (1, 2, 3):
        g = topk_gates(logits, k)
        assert (g.weights >= 0).all()
        torch.testing.assert_close(g.weights.sum(-1), torch.ones(4, 9))
        assert ((g.weights > 0).sum(-1) == k).all()
        # the kept weights are renormalised probabilities, not a second softmax
        probs = torch.softmax(logits, -1)
        top = probs.topk(k, -1).values
        torch.testing.assert_close(g.weights.topk(k, -1).values, top / top.sum(-1, keepdim=True))
    soft = topk_gates(logits, 8)
    torch.testing.assert_close(soft.weights, torch.softmax(logits, -1))


def test_gates_computed_in_fp32():
    g = topk_gates(torch.randn(2, 3, 8, dtype=torch.bfloat16), 2)
    assert g.weights.dtype == torch.float32


def test_balance_term_matches_hand_computation():
    probs = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.1, 0.2, 0.6, 0.1], [0.4, 0.1, 0.1, 0.4]])
    logits = probs.log()[None]  # (1, 3, 4)
    mask = torch.tensor([[1, 1, 0]])
    g = topk_gates(logits, 2)
    # tokens 0 and 1 count: token0 -> experts {0,1}, token1 -> {2,1}
    f = torch.tensor([1, 2, 1, 0]) / (2 * 2)
    p = (probs[0] + probs[1]) / 2
    expected = 4 * (f * p).sum()
    torch.testing.assert_close(switch_balance_loss(g, mask), expected)
    # perfectly uniform routing gives 1
    uni = topk_gates(torch.zeros(1, 4, 4), 4)
    torch.testing.assert_close(switch_balance_loss(uni), torch.tensor(1.0))


def test_router_split_first_linear_equals_concat():
    torch.manual_seed(0)
    r = Router(6, 3, 4, hidden=5, num_layers=2)
    x, e = torch.randn(2, 7, 6), torch.randn(2, 3)
    cat = torch.cat([x, e[:, None].expand(-1, 7, -1)], -1)
    ref = r.layers[1](torch.relu(r.layers[0](cat)))
    torch.testing.assert_close(r(x, e), ref)


def test_router_depth_configurable():
    assert len(Router(6, 3, 4, num_layers=1).layers) == 1
    assert len(Router(6, 3, 4, num_layers=3).layers) == 3


def test_two_profiles_route_the_same_text_differently():
    layer, scope, _ = make_layer(profile_dim=5, seed=3)
    x = torch.randn(1, 8, 12).repeat(2, 1, 1)
    e = torch.stack([torch.full((5,), 3.0), torch.full((5,), -3.0)])
    with cuma.record_gates(torch.nn.Sequential(layer)) as rec, scope.call(profile_rows=e):
        layer(x)
    g = next(iter(rec.gates.values()))[0]
    assert not torch.equal(g[0].argmax(-1), g[1].argmax(-1)) or not torch.allclose(g[0], g[1])
    assert (g[0] - g[1]).abs().max() > 1e-3


def test_semantic_only_routing_needs_no_profile():
    layer, _, _ = make_layer(profile_dim=0)
    assert layer.cuma_router["default"].profile_dim == 0
    y = layer(torch.randn(2, 4, 12))  # also outside any call: nothing to read
    assert y.shape == (2, 4, 10)


def test_soft_routing_uses_all_experts():
    layer, scope, _ = make_layer(soft_routing=True)
    with cuma.record_gates(torch.nn.Sequential(layer)) as rec, scope.call(profile_rows=torch.randn(2, 5)):
        layer(torch.randn(2, 4, 12))
    g = next(iter(rec.gates.values()))[0]
    assert ((g > 0).sum(-1) == 4).all()


def test_layer_exposes_features_and_refuses_merge():
    layer, _, _ = make_layer()
    assert (layer.in_features, layer.out_features) == (12, 10)
    with pytest.raises(ValueError, match="cannot be merged"):
        layer.merge()


def test_balance_terms_recorded_only_in_training_and_popped():
    base = tiny_llama()
    model = peft.get_peft_model(base, cuma.CuMAConfig(r=2, lora_alpha=4, num_experts=4, profile_dim=16))
    ids, mask = batch()
    e = profiles()
    model.eval()
    model(input_ids=ids, attention_mask=mask, profile_embeds=e)
    assert cuma.pop_balance_loss(model) is None
    model.train()
    model(input_ids=ids, attention_mask=mask, profile_embeds=e)
    total = cuma.pop_balance_loss(model)
    # 2 decoder layers x (q_proj, v_proj) routers, each term >= 1 (equality at perfect balance), times 0.01
    assert total is not None and total.requires_grad
    assert 4 * 0.01 - 1e-6 <= total.item() <= 4 * 0.01 * 4
    assert cuma.pop_balance_loss(model) is None  # buffer cleared


def test_balance_term_excludes_padding():
    """Right padding leaves the real tokens' hidden states unchanged (causal attention), so with the mask excluded
    the balance term must equal the unpadded batch's; counting the pads would change it."""
    base = tiny_llama()
    cfg = cuma.CuMAConfig(r=2, lora_alpha=4, num_experts=4, profile_dim=16, target_modules=["q_proj"], init_weights=False)
    model = peft.get_peft_model(base, cfg).train()
    ids, mask = batch(2, 6)
    e = profiles(2)
    model(input_ids=ids, attention_mask=mask, profile_embeds=e)
    unpadded = cuma.pop_balance_loss(model)
    pad = torch.full((2, 4), 5, dtype=torch.long)
    padded_ids, padded_mask = torch.cat([ids, pad], 1), torch.cat([mask, torch.zeros_like(pad)], 1)
    with cuma.record_gates(model) as rec:
        model(input_ids=padded_ids, attention_mask=padded_mask, profile_embeds=e)
    padded = cuma.pop_balance_loss(model)
    torch.testing.assert_close(padded, unpadded)
    m = next(iter(rec.masks.values()))[0]
    assert m.shape == (2, 10) and not m[:, 6:].any() and m[:, :6].all()
    # the same batch without its mask counts the pads and gives a different term
    model(input_ids=padded_ids, profile_embeds=e)
    assert not torch.allclose(cuma.pop_balance_loss(model), unpadded)


def test_balanced_router_inputs_scale_each_part_to_unit_rms():
    torch.manual_seed(0)
    r = Router(6, 4, 3, hidden=5, num_layers=2, input_norm="balanced", profile_gain_init=2.0)
    assert float(r.token_gain) == 1.0 and float(r.profile_gain) == 2.0
    x, e = torch.randn(2, 7, 6) * 9.0, torch.nn.functional.normalize(torch.randn(2, 4), dim=-1)
    xn = x / x.pow(2).mean(-1, keepdim=True).sqrt()
    en = 2.0 * e / e.pow(2).mean(-1, keepdim=True).sqrt()
    cat = torch.cat([xn, en[:, None].expand(-1, 7, -1)], -1)
    ref = r.layers[1](torch.relu(r.layers[0](cat)))
    torch.testing.assert_close(r(x, e), ref, rtol=1e-5, atol=1e-5)
    # the scale of the raw input no longer matters; the gains are trained
    torch.testing.assert_close(r(x * 100, e * 0.5), ref, rtol=1e-4, atol=1e-4)
    r(x, e).sum().backward()
    assert r.token_gain.grad is not None and r.profile_gain.grad is not None


def test_token_init_scale_makes_the_first_routing_follow_the_profile():
    torch.manual_seed(0)
    ref = Router(6, 4, 3, hidden=5)
    torch.manual_seed(0)
    small = Router(6, 4, 3, hidden=5, token_init_scale=0.1)
    torch.testing.assert_close(small.layers[0].weight[:, :6], 0.1 * ref.layers[0].weight[:, :6])
    torch.testing.assert_close(small.layers[0].weight[:, 6:], ref.layers[0].weight[:, 6:])
    with pytest.raises(ValueError, match="input_norm"):
        Router(6, 4, 3, input_norm="layer")


def test_fast_conditioning_options_are_saved_and_reloaded(tmp_path):
    base = tiny_llama()
    cfg = cuma.CuMAConfig(r=2, lora_alpha=4, num_experts=4, profile_dim=16, router_input_norm="balanced",
                          router_profile_gain=3.0, router_token_init_scale=0.1, init_weights=False)
    model = peft.get_peft_model(base, cfg).eval()
    model.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    c = loaded.peft_config["default"]
    assert (c.router_input_norm, c.router_profile_gain, c.router_token_init_scale) == ("balanced", 3.0, 0.1)
    ids, mask = batch()
    e = profiles()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask, profile_embeds=e).logits,
                                   model(input_ids=ids, attention_mask=mask, profile_embeds=e).logits)
    with pytest.raises(ValueError, match="router_input_norm"):
        cuma.CuMAConfig(router_input_norm="layer")
