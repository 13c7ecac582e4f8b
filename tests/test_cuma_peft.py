"""CuMA as a PEFT method: plumbing of profile_embeds, save/load, generation, checkpointing, adapters, dtypes."""

import json
import os

import peft
import pytest
import torch
from conftest import batch, profiles, tiny_llama, tiny_qwen3

import cuma
from cuma.tuners.cuma.layer import CuMALayer

D = 16


def cfg(**kw):
    options = dict(r=4, lora_alpha=8, num_experts=4, top_k=2, profile_dim=D, router_hidden=16, init_weights=False)
    options.update(kw)
    return cuma.CuMAConfig(**options)


def logits(model, ids, mask, e, **kw):
    return model(input_ids=ids, attention_mask=mask, profile_embeds=e, **kw).logits


@pytest.fixture
def model():
    return peft.get_peft_model(tiny_llama(), cfg()).eval()


def test_b_zero_equals_base_model():
    base = tiny_llama()
    ids, mask = batch()
    ref = base(input_ids=ids, attention_mask=mask).logits
    m = peft.get_peft_model(base, cfg(init_weights=True)).eval()
    torch.testing.assert_close(logits(m, ids, mask, profiles()), ref, rtol=0, atol=0)


def test_disable_adapter_reproduces_base_exactly(model):
    ids, mask = batch()
    ref = tiny_llama()(input_ids=ids, attention_mask=mask).logits
    adapted = logits(model, ids, mask, profiles())
    assert (adapted - ref).abs().max() > 1e-4
    with model.disable_adapter():
        off = logits(model, ids, mask, profiles())
    torch.testing.assert_close(off, ref, rtol=0, atol=0)


def test_mixed_profile_batch_rows_match_single_rows(model):
    ids, mask = batch(3, 7)
    e = profiles(3)
    full = logits(model, ids, mask, e)
    for i in range(3):
        alone = logits(model, ids[i : i + 1], mask[i : i + 1], e[i : i + 1])
        torch.testing.assert_close(full[i : i + 1], alone, rtol=1e-5, atol=1e-5)


def test_profile_changes_output(model):
    ids, mask = batch(1, 7)
    a = logits(model, ids, mask, torch.full((1, D), 2.0))
    b = logits(model, ids, mask, torch.full((1, D), -2.0))
    assert (a - b).abs().max() > 1e-4


def test_save_load_bit_exact_under_any_adapter_name(tmp_path, model):
    ids, mask = batch()
    e = profiles()
    ref = logits(model, ids, mask, e)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "CUMA" and saved["num_experts"] == 4
    assert (tmp_path / "adapter_model.safetensors").exists()
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("---") and "library_name: peft" in card

    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(logits(loaded, ids, mask, e), ref, rtol=0, atol=0)

    other = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path, adapter_name="culture").eval()
    torch.testing.assert_close(logits(other, ids, mask, e), ref, rtol=0, atol=0)
    # every weight restored, router included
    src = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "cuma_" in k}
    dst = {k.replace(".culture", ""): v for k, v in other.state_dict().items() if "cuma_" in k}
    assert src.keys() == dst.keys() and any("cuma_router" in k for k in src)
    for k in src:
        assert torch.equal(src[k], dst[k]), k


def test_profile_projection_saved_with_adapter(tmp_path):
    m = peft.get_peft_model(tiny_llama(), cfg(profile_proj_layers=2, profile_proj_dim=8)).eval()
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    assert any("cuma_profile_proj" in n for n in names)
    assert m.base_model.model.model.layers[0].self_attn.q_proj.cuma_router["default"].profile_dim == 8
    ids, mask = batch()
    e = profiles()
    with torch.no_grad():
        for p in m.base_model.cuma_profile_proj.parameters():
            p.add_(0.1)
    ref = logits(m, ids, mask, e)
    m.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(logits(loaded, ids, mask, e), ref, rtol=0, atol=0)


def test_generate_with_beams_and_return_sequences(model):
    ids, mask = batch(2, 5)
    e = profiles(2)
    out = model.generate(
        input_ids=ids, attention_mask=mask, profile_embeds=e, max_new_tokens=4, num_beams=3,
        num_return_sequences=2, do_sample=False,
    )
    assert out.shape == (4, 9)
    sampled = model.generate(
        input_ids=ids, attention_mask=mask, profile_embeds=e, max_new_tokens=4, do_sample=True,
        num_return_sequences=3,
    )
    assert sampled.shape == (6, 9)
    # greedy generation of row 1 inside the batch equals row 1 alone (rows carry their own profile)
    both = model.generate(input_ids=ids, attention_mask=mask, profile_embeds=e, max_new_tokens=4, do_sample=False)
    one = model.generate(input_ids=ids[1:], attention_mask=mask[1:], profile_embeds=e[1:], max_new_tokens=4, do_sample=False)
    assert torch.equal(both[1:], one)


def test_generate_beam_rows_get_their_own_profile(model):
    """With beams, row i's profile must be repeated for its beams (interleaved), not tiled across the batch."""
    ids, mask = batch(2, 5)
    e = profiles(2)
    both = model.generate(input_ids=ids, attention_mask=mask, profile_embeds=e, max_new_tokens=3, num_beams=2, do_sample=False)
    for i in range(2):
        one = model.generate(
            input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1], profile_embeds=e[i : i + 1],
            max_new_tokens=3, num_beams=2, do_sample=False,
        )
        assert torch.equal(both[i : i + 1], one)


def test_concatenated_batch_needs_a_row_per_example(model):
    """Outside generation nothing is guessed: a 2B batch (DPO's chosen + rejected) with B profile rows is an error;
    the caller passes the rows of every part (the DPO collator tiles them)."""
    ids, mask = batch(4, 6)
    e = profiles(2)
    with pytest.raises(ValueError, match="2 rows but the batch has 4"):
        logits(model, ids, mask, e)
    tiled = logits(model, ids, mask, e.repeat(2, 1))
    first = logits(model, ids[:2], mask[:2], e)
    torch.testing.assert_close(tiled[:2], first, rtol=1e-5, atol=1e-6)


def test_gradients_equal_with_and_without_gradient_checkpointing():
    ids, mask = batch()
    e = profiles()

    def grads(checkpointing):
        m = peft.get_peft_model(tiny_llama(), cfg(profile_proj_layers=1))
        if checkpointing:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            m.enable_input_require_grads()
        m.train()
        out = m(input_ids=ids, attention_mask=mask, labels=ids, profile_embeds=e)
        loss = out.loss + cuma.pop_balance_loss(m)
        loss.backward()
        assert cuma.pop_balance_loss(m) is None  # the recompute during backward records nothing
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}

    g0, g1 = grads(False), grads(True)
    assert g0.keys() == g1.keys() and len(g0) > 0
    for n in g0:
        torch.testing.assert_close(g0[n], g1[n], rtol=1e-4, atol=1e-6, msg=n)


def test_missing_profile_is_a_clear_error(model):
    ids, mask = batch()
    with pytest.raises(ValueError, match="pass profile_embeds"):
        model(input_ids=ids, attention_mask=mask)


def test_stale_profile_not_reused(model):
    ids, mask = batch()
    model(input_ids=ids, attention_mask=mask, profile_embeds=profiles())
    with pytest.raises(ValueError, match="pass profile_embeds"):
        model(input_ids=ids, attention_mask=mask)


def test_wrong_width_is_a_clear_error(model):
    ids, mask = batch()
    with pytest.raises(ValueError, match="width 7 .* profile_dim=16"):
        model(input_ids=ids, attention_mask=mask, profile_embeds=torch.randn(3, 7))
    with pytest.raises(ValueError, match="2-D tensor"):
        model(input_ids=ids, attention_mask=mask, profile_embeds=torch.randn(D))


def test_rows_that_do_not_fit_are_a_clear_error(model):
    ids, mask = batch(3)
    with pytest.raises(ValueError, match="2 rows but the batch has 3"):
        model(input_ids=ids, attention_mask=mask, profile_embeds=profiles(2))


def test_merge_raises_clear_error(model):
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()


def test_named_adapters_coexist_and_switch():
    base = tiny_llama()
    m = peft.get_peft_model(base, cfg(), adapter_name="policy")
    m.add_adapter("reference", cfg(r=2))
    ids, mask = batch()
    e = profiles()
    m.set_adapter("policy")
    a = logits(m, ids, mask, e)
    m.set_adapter("reference")
    b = logits(m, ids, mask, e)
    assert (a - b).abs().max() > 1e-4
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(".reference" in n for n in trainable)
    m.set_adapter("policy")
    torch.testing.assert_close(logits(m, ids, mask, e), a, rtol=0, atol=0)


def test_delete_adapter_removes_all_state():
    m = peft.get_peft_model(tiny_llama(), cfg(profile_proj_layers=1, share_router_qkv=True, target_modules=["q_proj", "k_proj", "v_proj"]), adapter_name="first")
    m.add_adapter("second", cfg(profile_proj_layers=1))
    m.delete_adapter("second")
    assert not any(".second" in n for n, _ in m.named_parameters())
    for mod in m.modules():
        if isinstance(mod, CuMALayer):
            for state in (mod.cuma_settings, mod.cuma_dropout, mod._router_owner, mod.cuma_A, mod.cuma_router):
                assert "second" not in state
    assert "second" not in m.base_model.cuma_profile_proj and "second" not in m.peft_config
    assert any(".first" in n for n, _ in m.named_parameters())


def test_print_trainable_parameters_is_right(capsys):
    m = peft.get_peft_model(tiny_llama(), cfg())
    hidden, kv, n, r = 32, 16, 4, 4
    router = (hidden + D) * 16 + 16 + 16 * n + n
    per_layer = (n * hidden * r + n * r * hidden + router) + (n * hidden * r + n * r * kv + router)
    trainable, total = m.get_nb_trainable_parameters()
    assert trainable == 2 * per_layer
    m.print_trainable_parameters()
    assert f"trainable params: {trainable:,}" in capsys.readouterr().out


def test_shared_routers_across_qkv():
    shared = peft.get_peft_model(
        tiny_llama(), cfg(target_modules=["q_proj", "k_proj", "v_proj"], share_router_qkv=True)
    ).eval()
    separate = peft.get_peft_model(tiny_llama(), cfg(target_modules=["q_proj", "k_proj", "v_proj"])).eval()
    routers = lambda m: sum(1 for n, _ in m.named_modules() if n.endswith("cuma_router.default"))  # noqa: E731
    assert routers(separate) == 6 and routers(shared) == 2
    ids, mask = batch()
    e = profiles()
    with cuma.record_gates(shared) as rec:
        shared(input_ids=ids, attention_mask=mask, profile_embeds=e)
    layer0 = {k.rsplit(".", 1)[-1]: v[0] for k, v in rec.gates.items() if ".layers.0." in k}
    assert torch.equal(layer0["q_proj"], layer0["k_proj"]) and torch.equal(layer0["q_proj"], layer0["v_proj"])
    shared.train()
    shared(input_ids=ids, attention_mask=mask, profile_embeds=e)
    from cuma.routing_state import take_finished

    terms = take_finished([shared.base_model.routing_scope])
    assert len(terms) == 2  # one balance term per router, not per projection


def test_shared_router_save_load(tmp_path):
    m = peft.get_peft_model(tiny_llama(), cfg(target_modules=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"], share_router_qkv=True, share_router_gate_up=True)).eval()
    ids, mask = batch()
    e = profiles()
    ref = logits(m, ids, mask, e)
    m.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(logits(loaded, ids, mask, e), ref, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_adapter_dtype_follows_peft_conventions(dtype):
    base = tiny_llama().to(dtype)
    m = peft.get_peft_model(base, cfg())
    layer = m.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.cuma_A["default"].dtype == torch.float32  # autocast_adapter_dtype upcasts
    assert layer.cuma_router["default"].layers[0].weight.dtype == torch.float32
    assert layer.base_layer.weight.dtype == dtype
    out = m(input_ids=batch()[0], profile_embeds=profiles())
    assert out.logits.dtype == dtype and torch.isfinite(out.logits.float()).all()
    m2 = peft.get_peft_model(tiny_llama().to(dtype), cfg(), autocast_adapter_dtype=False)
    assert m2.base_model.model.model.layers[0].self_attn.q_proj.cuma_A["default"].dtype == dtype


def test_modules_to_save(tmp_path):
    m = peft.get_peft_model(tiny_llama(), cfg(modules_to_save=["lm_head"]))
    assert any("lm_head.modules_to_save" in n and p.requires_grad for n, p in m.named_parameters())
    with torch.no_grad():
        m.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.5)
    ids, mask = batch()
    e = profiles()
    ref = logits(m.eval(), ids, mask, e)
    m.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(logits(loaded, ids, mask, e), ref, rtol=0, atol=0)


def test_works_on_qwen3_and_causal_lm_task_type():
    m = peft.get_peft_model(tiny_qwen3(), cfg(task_type="CAUSAL_LM")).eval()
    assert type(m).__name__ == "PeftModelForCausalLM"
    ids, mask = batch()
    out = m(input_ids=ids, attention_mask=mask, labels=ids, profile_embeds=profiles())
    assert torch.isfinite(out.loss)
    g = m.generate(input_ids=ids, attention_mask=mask, profile_embeds=profiles(), max_new_tokens=3, num_beams=2)
    assert g.shape[0] == 3


def test_training_reduces_loss():
    torch.manual_seed(0)
    m = peft.get_peft_model(tiny_llama(), cfg(init_weights=True)).train()
    ids, mask = batch(4, 8)
    e = profiles(4)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        out = m(input_ids=ids, attention_mask=mask, labels=ids, profile_embeds=e)
        loss = out.loss + cuma.pop_balance_loss(m)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.05


def test_unload_removes_the_capture_hook_and_restores_the_base():
    base = tiny_llama()
    ids, mask = batch()
    ref = base(input_ids=ids, attention_mask=mask).logits
    m = peft.get_peft_model(base, cfg())
    assert len(base._forward_pre_hooks) == 1
    restored = m.unload()
    assert len(restored._forward_pre_hooks) == 0
    torch.testing.assert_close(restored(input_ids=ids, attention_mask=mask).logits, ref, rtol=0, atol=0)
