"""The fast path of the routed layers (cuma.tuners.fused, cuma.kernels): exact against the reference path, static shapes
that torch.compile captures without graph breaks, and the Triton top-k experts through Triton's CPU interpreter."""

import importlib.util
import json
import warnings

import peft
import pytest
import torch
from conftest import batch, profiles, tiny_llama

import cuma
from cuma.routing_state import RoutingScope
from cuma.tuners import fused
from cuma.tuners.cuma.layer import Linear as CuMALinear
from cuma.tuners.hydralora.layer import Linear as HydraLinear

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install triton): the Triton "
                                  "kernels are checked through its CPU interpreter, TRITON_INTERPRET=1")
FAST = ["fused", pytest.param("triton", marks=needs_triton)]


@pytest.fixture
def interpret(monkeypatch):
    """Run Triton kernels in Triton's CPU interpreter for this test."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def make_cuma(seed=0, d_in=12, d_out=10, profile_dim=5, **cfg):
    torch.manual_seed(seed)
    options = dict(r=3, lora_alpha=6, num_experts=4, top_k=2, profile_dim=profile_dim, router_hidden=8,
                   init_weights=False)
    options.update(cfg)
    config = cuma.CuMAConfig(target_modules=["x"], **options)
    scope = RoutingScope("cuma")
    return CuMALinear(torch.nn.Linear(d_in, d_out), "default", config, scope).train(), scope, config


def run_layer(layer, scope, x, e, mask, fast_path):
    """Output, recorded balance terms and the gradients of x and every trainable parameter (through both)."""
    layer.cuma_settings["default"].fast_path = fast_path
    x = x.detach().clone().requires_grad_(True)
    with scope.call(profile_rows=e, token_mask=mask, records_balance=True) as call:
        y = layer(x)
    terms = list(call.balance_terms)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(7))
    loss = (y * w).sum() + sum(terms, torch.zeros(()))
    params = [p for p in layer.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [x, *params], allow_unused=True)
    return y.detach(), [t.detach() for t in terms], grads


def assert_same(ref, new):
    (y0, t0, g0), (y1, t1, g1) = ref, new
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    assert len(t0) == len(t1)
    for a, b in zip(t0, t1):
        torch.testing.assert_close(b, a, rtol=0, atol=0)  # the same operations: the balance term is identical
    for a, b in zip(g0, g1):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------- exact vs reference


@pytest.mark.parametrize("fast_path", FAST)
@pytest.mark.parametrize(
    "options",
    [
        dict(top_k=2),
        dict(top_k=1),
        dict(top_k=2, shared_A=True),
        dict(top_k=1, shared_A=True),
        dict(soft_routing=True),
        dict(soft_routing=True, shared_A=True),
        dict(top_k=2, use_rslora=True, profile_dim=0),
        dict(top_k=3, num_experts=6, router_layers=3),
        dict(top_k=2, router_input_norm="balanced", router_profile_gain=2.0, router_token_init_scale=0.5),
    ],
    ids=["k2", "k1", "k2-sharedA", "k1-sharedA", "soft", "soft-sharedA", "semantic-rslora", "k3-of-6-deep-router",
         "balanced-router-input"],
)
def test_cuma_fast_path_equals_reference(fast_path, options, monkeypatch):
    if fast_path == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    layer, scope, config = make_cuma(**options)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 9, 12, generator=g)
    e = torch.randn(3, 5, generator=g) if config.profile_dim else None
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, 6:] = 0  # right padding
    mask[2, :2] = 0  # left padding
    ref = run_layer(layer, scope, x, e, mask, "off")
    assert ref[1], "the reference recorded no balance term"
    assert_same(ref, run_layer(layer, scope, x, e, mask, fast_path))


@pytest.mark.parametrize("fast_path", FAST)
def test_cuma_fast_path_with_dropout_draws_the_same_masks(fast_path, monkeypatch):
    if fast_path == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    layer, scope, _ = make_cuma(lora_dropout=0.3, router_dropout=0.2)
    x, e = torch.randn(2, 7, 12), torch.randn(2, 5)
    torch.manual_seed(11)
    ref = run_layer(layer, scope, x, e, None, "off")
    torch.manual_seed(11)
    assert_same(ref, run_layer(layer, scope, x, e, None, fast_path))


def test_cuma_fast_path_2d_input_and_eval_mode_record_nothing():
    layer, scope, _ = make_cuma(profile_dim=0)
    layer.eval()
    x = torch.randn(5, 12)
    ref = layer(x)
    layer.cuma_settings["default"].fast_path = "fused"
    with scope.call(records_balance=False) as call:
        y = layer(x)
    assert not call.balance_terms
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)


def test_cuma_fast_path_shared_router_and_record_gates():
    """q/k/v sharing one router: the followers reuse the owner's gates in the fast path too; record_gates sees them."""
    ids, mask = batch()
    e = profiles()
    outs = {}
    for fast_path in ("off", "fused"):
        cfg = cuma.CuMAConfig(r=2, lora_alpha=4, num_experts=4, profile_dim=16, init_weights=False,
                              target_modules=["q_proj", "k_proj", "v_proj"], share_router_qkv=True, fast_path=fast_path)
        torch.manual_seed(3)
        model = peft.get_peft_model(tiny_llama(), cfg).train()
        with cuma.record_gates(model) as rec:
            out = model(input_ids=ids, attention_mask=mask, profile_embeds=e, labels=ids)
        loss = out.loss + cuma.pop_balance_loss(model)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        outs[fast_path] = (out.logits.detach(), loss.detach(), grads, {k: v[0] for k, v in rec.gates.items()})
    (l0, s0, g0, r0), (l1, s1, g1, r1) = outs["off"], outs["fused"]
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s1, s0, rtol=1e-6, atol=1e-7)
    assert g0.keys() == g1.keys() and len(g0) > 0
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-5, msg=name)
    assert r0.keys() == r1.keys()
    for name in r0:
        torch.testing.assert_close(r1[name], r0[name])


@pytest.mark.parametrize("fast_path", FAST)
def test_hydralora_fast_path_equals_reference(fast_path, monkeypatch):
    if fast_path == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    for hidden in (0, 8):
        torch.manual_seed(0)
        config = cuma.HydraLoRAConfig(target_modules=["x"], r=3, lora_alpha=6, num_experts=4, lora_dropout=0.0,
                                      router_hidden=hidden, init_weights=False)
        layer = HydraLinear(torch.nn.Linear(12, 10), "default", config).train()
        params = [p for p in layer.parameters() if p.requires_grad]
        x = torch.randn(3, 8, 12)
        res = []
        for mode in ("off", fast_path):
            config.fast_path = mode
            xx = x.clone().requires_grad_(True)
            y = layer(xx)
            w = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
            res.append((y.detach(), torch.autograd.grad((y * w).sum(), [xx, *params])))
        torch.testing.assert_close(res[1][0], res[0][0], rtol=1e-5, atol=1e-5)
        for a, b in zip(res[0][1], res[1][1]):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------- static shapes


def _cuma_routed_delta(router, x3, profile, mask, a, b, base, top_k: int, scaling: float, coef: float):
    """One CuMA layer's routed delta as the layer runs it on the fast path, minus the Python-side call lookup."""
    w, probs, sel, term = fused.route_topk(router, x3, profile, top_k, mask, coef)
    out = fused.mix_experts(x3, a, b, w, scaling, base)
    return out, term


@pytest.mark.parametrize("shared_A", [False, True])
@pytest.mark.parametrize("top_k", [2, 4])
def test_routed_delta_compiles_forward_and_backward_without_graph_breaks(shared_A, top_k):
    layer, _, config = make_cuma(shared_A=shared_A, top_k=min(top_k, 4), soft_routing=top_k == 4)
    router, a, b = layer.cuma_router["default"], layer.cuma_A["default"], layer.cuma_B["default"]
    g = torch.Generator().manual_seed(4)
    x3 = torch.randn(2, 6, 12, generator=g, requires_grad=True)
    profile = torch.randn(2, 5, generator=g)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    base = torch.randn(2, 6, 10, generator=g, requires_grad=True)
    args = (router, x3, profile, mask, a, b, base, config.effective_top_k, config.scaling, 0.01)

    torch._dynamo.reset()
    explained = torch._dynamo.explain(_cuma_routed_delta)(*args)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1

    # fullgraph=True fails on any break; aot_eager traces the backward graph too (AOTAutograd), so a data-dependent
    # shape or a host synchronisation in either direction would fail here
    compiled = torch.compile(_cuma_routed_delta, fullgraph=True, backend="aot_eager")
    params = [x3, base, a, b, *router.parameters()]
    outs = []
    for fn in (_cuma_routed_delta, compiled):
        out, term = fn(*args)
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
        outs.append((out.detach(), term.detach(), torch.autograd.grad((out * w).sum() + term, params)))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-6, atol=1e-6)
    for p0, p1 in zip(outs[0][2], outs[1][2]):
        torch.testing.assert_close(p1, p0, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def test_hydralora_delta_compiles_without_graph_breaks():
    torch.manual_seed(0)
    config = cuma.HydraLoRAConfig(target_modules=["x"], r=3, lora_alpha=6, num_experts=4, init_weights=False)
    layer = HydraLinear(torch.nn.Linear(12, 10), "default", config)
    router, a, b = layer.hydralora_router["default"], layer.hydralora_A["default"], layer.hydralora_B["default"]

    def delta(x3):
        return fused.mix_experts(x3, a, b, fused.route_dense(router, x3), config.scaling)

    torch._dynamo.reset()
    x3 = torch.randn(2, 5, 12, requires_grad=True)
    assert torch._dynamo.explain(delta)(x3).graph_break_count == 0
    out = torch.compile(delta, fullgraph=True, backend="aot_eager")(x3)
    (gx,) = torch.autograd.grad(out.sum(), [x3])
    (gx_ref,) = torch.autograd.grad(delta(x3).sum(), [x3])
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


@pytest.mark.slow
def test_fast_path_compile_option_runs_inductor_and_matches():
    """fast_path_compile=True: routing and experts through torch.compile (inductor's C++ backend on the CPU)."""
    layer, scope, config = make_cuma()
    x, e = torch.randn(2, 7, 12), torch.randn(2, 5)
    ref = run_layer(layer, scope, x, e, None, "off")
    config.fast_path_compile = True
    torch._dynamo.reset()
    try:
        assert_same(ref, run_layer(layer, scope, x, e, None, "fused"))
    finally:
        torch._dynamo.reset()


# --------------------------------------------------------------------------------------------- Triton kernels


@needs_triton
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_triton_topk_experts_equal_the_dense_mixture(interpret, shared, k):
    """The kernels straight: 70 tokens (blocks of 64 slots straddle experts), r=5 and d=20 (padded blocks), one empty
    expert, against the dense gated mixture, forward and every gradient."""
    from cuma.kernels import routed_lora

    g = torch.Generator().manual_seed(k + 10 * shared)
    m, d, r, n, out = 70, 20, 5, 6, 11
    h = torch.randn(m, d, generator=g, requires_grad=True)
    a = (torch.randn(d, r, generator=g) if shared else torch.randn(n, d, r, generator=g)).requires_grad_(True)
    b = torch.randn(n, r, out, generator=g, requires_grad=True)
    logits = torch.randn(m, n, generator=g)
    logits[:, 3] = -30.0  # expert 3 never kept
    vals, idx = logits.softmax(-1).topk(k, -1)
    w = (vals / vals.sum(-1, keepdim=True)).requires_grad_(True)
    base = torch.randn(m, out, generator=g, requires_grad=True)
    y = routed_lora.topk_lora_experts(h, a, b, idx, w * 1.5, base)
    dense = torch.zeros(m, n).scatter(-1, idx, w)
    y_ref = fused.mix_experts(h, a, b, dense, 1.5, base)
    gy = torch.randn(y.shape, generator=g)
    params = [h, a, b, w, base]
    grads = torch.autograd.grad((y * gy).sum(), params)
    grads_ref = torch.autograd.grad((y_ref * gy).sum(), params)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for name, g1, g0 in zip("h a b w base".split(), grads, grads_ref):
        torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-5, msg=name)


@needs_triton
def test_triton_slot_sort_is_on_device_and_static(interpret):
    from cuma.kernels import routed_lora

    idx = torch.tensor([[2, 0], [0, 1], [2, 1], [0, 2]])
    order, tokens, experts, offsets = routed_lora.sort_slots(idx, 4)
    assert experts.tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    assert offsets.tolist() == [0, 3, 5, 8, 8]  # expert 3 empty
    assert (idx.reshape(-1)[order] == experts).all() and (order // 2 == tokens).all()


def test_triton_fast_path_falls_back_where_triton_cannot_run(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(fused, "_TRITON_FALLBACK_WARNED", False)
    layer, scope, _ = make_cuma()
    x, e = torch.randn(2, 7, 12), torch.randn(2, 5)
    ref = run_layer(layer, scope, x, e, None, "off")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        new = run_layer(layer, scope, x, e, None, "triton")
    assert any("fast_path='triton'" in str(w.message) for w in caught)
    assert_same(ref, new)


# --------------------------------------------------------------------------------------------- option and models


def test_fast_path_option_is_validated_and_saved(tmp_path):
    with pytest.raises(ValueError, match="fast_path must be one of"):
        cuma.CuMAConfig(fast_path="fast")
    with pytest.raises(ValueError, match="fast_path must be one of"):
        cuma.HydraLoRAConfig(fast_path="yes")
    assert cuma.CuMAConfig().fast_path == "off" and cuma.HydraLoRAConfig().fast_path == "off"
    model = peft.get_peft_model(tiny_llama(), cuma.CuMAConfig(r=2, lora_alpha=4, num_experts=4, profile_dim=16,
                                                               fast_path="fused"))
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["fast_path"] == "fused" and saved["fast_path_compile"] is False
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert loaded.peft_config["default"].fast_path == "fused"


@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_step_and_generation_match_the_reference(checkpointing):
    """A whole model: loss, balance loss and every gradient of a training step (with gradient checkpointing too), and
    greedy generation with mixed profiles."""
    ids, mask = batch(3, 8)
    mask[0, :3] = 0  # left padding
    e = profiles(3)
    res = {}
    for fast_path in ("off", "fused"):
        cfg = cuma.CuMAConfig(r=2, lora_alpha=4, num_experts=4, profile_dim=16, init_weights=False,
                              target_modules=["q_proj", "v_proj", "down_proj"], fast_path=fast_path)
        torch.manual_seed(5)
        model = peft.get_peft_model(tiny_llama(), cfg).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
            model.enable_input_require_grads()
        cuma.clear_balance_loss(model)
        out = model(input_ids=ids, attention_mask=mask, profile_embeds=e, labels=ids)
        aux = cuma.pop_balance_loss(model)
        (out.loss + aux).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.eval()
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=mask, profile_embeds=e, max_new_tokens=5,
                                 do_sample=False, pad_token_id=0)
        res[fast_path] = (out.loss.detach(), aux.detach(), grads, gen)
    (l0, a0, g0, s0), (l1, a1, g1, s1) = res["off"], res["fused"]
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a1, a0, rtol=0, atol=0)
    assert g0.keys() == g1.keys() and len(g0) > 0
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-5, msg=name)
    assert torch.equal(s1, s0)

