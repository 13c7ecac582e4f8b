"""The inference route of the CuMA layers (eval mode, no gradients: serving, evaluation, generate) computes the same
function as the reference route: probabilities equal to 1e-5, greedy generations identical, per-call state only."""

from __future__ import annotations

import peft
import pytest
import torch
from conftest import batch, profiles, tiny_llama

import cuma
from cuma.tuners.cuma.layer import CuMALayer
from cuma.tuners.cuma.model import fit_profile_center

FAST = dict(router_input_norm="balanced", router_token_init_scale=0.1, router_profile_center="train")
CONFIGS = {
    "paper": {},
    "fast conditioning": FAST,
    "fast + subspace": {**FAST, "router_profile_subspace": 3},
    "profile projection": dict(profile_proj_layers=2, profile_proj_dim=6),
    "semantic-only": dict(profile_dim=0),
    "soft routing": dict(soft_routing=True),
    "shared A": dict(shared_A=True),
    "shared qkv router": dict(share_router_qkv=True, target_modules=["q_proj", "k_proj", "v_proj"]),
    "fused fast path": dict(fast_path="fused", **FAST),
}


def build(options: dict, seed: int = 0):
    opts = dict(r=2, lora_alpha=4, num_experts=4, top_k=2, profile_dim=16, router_hidden=8, init_weights=False)
    opts.update(options)
    torch.manual_seed(seed)
    model = peft.get_peft_model(tiny_llama(seed=seed), cuma.CuMAConfig(**opts)).eval()
    if opts.get("router_profile_center") == "train":
        fit_profile_center(model, profiles(12, seed=5))
    with torch.no_grad():  # gains away from their initial values, so that folding them in is tested
        for name, p in model.named_parameters():
            if name.endswith(("token_gain", "profile_gain")):
                p.uniform_(0.5, 2.0)
    return model


def _reference_route(m):
    """Within the monkeypatch context ``m``, every call takes the reference route."""
    m.setattr(CuMALayer, "_infers", lambda self, config, x: False)


def _profile_kw(model, rows, seed=3):
    dim = model.peft_config["default"].profile_dim
    return {"profile_embeds": profiles(rows, dim=dim, seed=seed)} if dim else {}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_inference_route_equals_reference(name, monkeypatch):
    model = build(CONFIGS[name])
    ids, mask = batch(3, 7)
    mask[1, :2] = 0  # left padding in one row
    kw = _profile_kw(model, 3)
    taken = []
    monkeypatch.setattr(CuMALayer, "_infer", _spy(CuMALayer._infer, taken))
    with torch.no_grad():
        fast = model(input_ids=ids, attention_mask=mask, **kw).logits.softmax(-1)
    assert taken, "the inference route did not run"
    with monkeypatch.context() as m:
        _reference_route(m)
        with torch.no_grad():
            ref = model(input_ids=ids, attention_mask=mask, **kw).logits.softmax(-1)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=0)


def _spy(fn, taken):
    def wrapper(self, *args, **kwargs):
        taken.append(1)
        return fn(self, *args, **kwargs)

    return wrapper


@pytest.mark.parametrize("name", ["paper", "fast conditioning", "shared qkv router"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_generation_identical(name, use_cache, monkeypatch):
    model = build(CONFIGS[name], seed=1)
    ids, mask = batch(2, 5, seed=4)
    kw = dict(max_new_tokens=8, do_sample=False, use_cache=use_cache, pad_token_id=0, **_profile_kw(model, 2))
    fast = model.generate(input_ids=ids, attention_mask=mask, **kw)
    with monkeypatch.context() as m:
        _reference_route(m)
        ref = model.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(fast, ref)
    beams = model.generate(input_ids=ids, attention_mask=mask, num_beams=2, num_return_sequences=2, **kw)
    with monkeypatch.context() as m:
        _reference_route(m)
        beams_ref = model.generate(input_ids=ids, attention_mask=mask, num_beams=2, num_return_sequences=2, **kw)
    assert torch.equal(beams, beams_ref)


def test_profile_part_stays_in_its_call():
    """Two calls with different profiles in a row: the second must not reuse the first call's profile part."""
    model = build(FAST)
    ids, mask = batch(2, 6)
    e1, e2 = profiles(2, seed=11), profiles(2, seed=12)
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask, profile_embeds=e1).logits
        b = model(input_ids=ids, attention_mask=mask, profile_embeds=e2).logits
        b_alone = build(FAST)(input_ids=ids, attention_mask=mask, profile_embeds=e2).logits
        a_again = model(input_ids=ids, attention_mask=mask, profile_embeds=e1).logits
    assert not torch.allclose(a, b)
    torch.testing.assert_close(b, b_alone)
    torch.testing.assert_close(a, a_again)


def test_cached_weights_follow_parameter_updates():
    """The inference route caches weights in the layout it needs; an update of any parameter (an optimiser step,
    load_state_dict) must show in the next call."""
    model = build(FAST)
    ids, mask = batch(2, 6)
    kw = _profile_kw(model, 2)
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask, **kw).logits
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(input_ids=ids, attention_mask=mask, labels=ids, **kw).loss.backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        after = model(input_ids=ids, attention_mask=mask, **kw).logits
    ref = build(FAST)
    ref.load_state_dict(model.state_dict())
    with torch.enable_grad():
        expected = ref(input_ids=ids, attention_mask=mask, **kw).logits.detach()
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, expected, atol=1e-5, rtol=1e-5)
    # a second load into the same model (in place: new values, same tensors)
    fresh = build(FAST, seed=7)
    model.load_state_dict(fresh.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask, **kw).logits,
                                   fresh(input_ids=ids, attention_mask=mask, **kw).logits, atol=1e-5, rtol=1e-5)


def test_record_gates_on_the_inference_route(monkeypatch):
    model = build(FAST)
    ids, mask = batch(2, 6)
    mask[0, :2] = 0
    kw = _profile_kw(model, 2)
    with torch.no_grad(), cuma.record_gates(model) as fast:
        model(input_ids=ids, attention_mask=mask, **kw)
    with monkeypatch.context() as m:
        _reference_route(m)
        with torch.no_grad(), cuma.record_gates(model) as ref:
            model(input_ids=ids, attention_mask=mask, **kw)
    for name in ref.layer_names():
        torch.testing.assert_close(fast.gates[name][0], ref.gates[name][0], atol=1e-6, rtol=0)
        assert torch.equal(fast.masks[name][0], ref.masks[name][0])


def test_generate_computes_each_profile_part_once(monkeypatch):
    """Within one generate call the profile is the same at every decode step: each router's profile part is computed
    once for the whole call, and again for the next call."""
    from cuma.routing import Router

    model = build(FAST)
    ids, mask = batch(2, 5)
    parts = []
    monkeypatch.setattr(Router, "profile_part", _spy(Router.profile_part, parts))
    routers = sum(1 for m in model.modules() if isinstance(m, Router))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, profile_embeds=profiles(2, seed=3))
    model.generate(input_ids=ids, attention_mask=mask, **kw)
    assert len(parts) == routers
    model.generate(input_ids=ids, attention_mask=mask, **kw)
    assert len(parts) == 2 * routers


def test_router_gains_saved_as_scalars_still_load():
    """The balanced router's gains are (1,)-shaped (FSDP refuses 0-d parameters); adapters saved when they were 0-d
    load unchanged."""
    from cuma.routing import Router

    r = Router(6, 4, 3, hidden=5, input_norm="balanced", profile_gain_init=2.0)
    old = {k: (v.reshape(()) if k.endswith("_gain") else v) for k, v in r.state_dict().items()}
    old["token_gain"] = torch.tensor(1.5)
    fresh = Router(6, 4, 3, hidden=5, input_norm="balanced")
    fresh.load_state_dict(old)
    assert fresh.token_gain.shape == (1,) and float(fresh.token_gain) == 1.5 and float(fresh.profile_gain) == 2.0
