"""The method registry: every comparison of the paper buildable by name, with validated options."""

from __future__ import annotations

import json
import os

import pytest
import torch

from cuma import methods
from cuma.evaluate.fewshot import select_fewshot
from conftest import batch, profiles, tiny_llama

ALL_METHODS = {
    "cuma",
    "cuma-semantic",
    "cuma-soft",
    "cuma-minimal",
    "lora",
    "dora",
    "prefix",
    "fft",
    "hydralora",
    "mixlora",
    "vanilla",
    "persona",
    "fewshot",
}
PROMPTING = ("vanilla", "persona", "fewshot")

PDIM = 16

# small options so a tiny model trains visibly in a few steps
TINY_OPTIONS = {
    "cuma": dict(r=4, profile_dim=PDIM, router_hidden=16),
    "cuma-semantic": dict(r=4, router_hidden=16),
    "cuma-soft": dict(r=4, profile_dim=PDIM, router_hidden=16),
    "cuma-minimal": dict(r=4, router_hidden=16),
    "lora": dict(r=4),
    "dora": dict(r=4),
    "prefix": dict(num_virtual_tokens=4, encoder_hidden_size=16),
    "fft": dict(),
    "hydralora": dict(r=4, num_experts=3),
    "mixlora": dict(r=4, num_experts=3),
}
TRAINABLE = tuple(TINY_OPTIONS)


def _inputs(built=None, bsz=4, length=8):
    ids, mask = batch(bsz=bsz, length=length)
    kw = dict(input_ids=ids, attention_mask=mask)
    if built is not None and built.uses_profile:
        kw["profile_embeds"] = profiles(bsz=bsz, dim=built.profile_dim)
    return kw


def _logits(model, kw):
    model.eval()
    with torch.no_grad():
        return model(**kw).logits


# ------------------------------------------------------------------------------------------------- registry
def test_registry_lists_every_method():
    assert set(methods.list_methods()) == ALL_METHODS
    for name in ALL_METHODS:
        spec = methods.get_spec(name)
        assert spec.name == name and spec.paper and spec.summary
        assert spec.save_format in ("adapter", "full", "none")
    assert methods.get_spec("prefix").gradient_checkpointing_allowed is False
    assert methods.get_spec("fft").save_format == "full"
    assert all(methods.get_spec(n).prompting_only for n in PROMPTING)


def test_unknown_method_lists_valid_ones(llama):
    with pytest.raises(ValueError) as err:
        methods.build("qlora", llama)
    msg = str(err.value)
    assert "'qlora'" in msg
    for name in ALL_METHODS:
        assert name in msg


def test_inapplicable_option_is_an_error(llama):
    with pytest.raises(ValueError) as err:
        methods.build("lora", llama, profile_dim=16)
    msg = str(err.value)
    assert "'profile_dim'" in msg and "'lora'" in msg and "lora_alpha" in msg  # names it and lists the valid ones
    # an ablation's pinned setting is not an option, and the error says why
    with pytest.raises(ValueError, match="profile_dim.*fixed to 0"):
        methods.build("cuma-semantic", llama, profile_dim=16)
    with pytest.raises(ValueError, match="top_k"):
        methods.build("cuma-soft", llama, top_k=2)
    with pytest.raises(ValueError, match="balance_loss_coef"):
        methods.build("cuma-minimal", llama, balance_loss_coef=0.01)
    with pytest.raises(ValueError, match="profile_in_prompt"):
        methods.build("vanilla", llama, profile_in_prompt=True)
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        methods.build("fft", llama, num_virtual_tokens=8)
    # wrong type
    with pytest.raises(ValueError, match="'r'.*integer"):
        methods.build("lora", llama, r="eight")


def test_missing_target_module_names_existing_modules(llama):
    with pytest.raises(ValueError) as err:
        methods.build("lora", llama, target_modules=["q_proj", "qkv_proj"])
    msg = str(err.value)
    assert "'qkv_proj'" in msg and "'q_proj'" not in msg.split("exist")[0]
    for leaf in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert leaf in msg
    with pytest.raises(ValueError, match="c_attn"):
        methods.build("cuma", tiny_llama(), target_modules="c_attn", profile_dim=PDIM)
    with pytest.raises(ValueError, match="regex"):
        methods.build("hydralora", tiny_llama(), target_modules=r".*\.attn\.c_proj")
    with pytest.raises(ValueError, match="'ffn'"):
        methods.build("mixlora", tiny_llama(), ffn_modules=["ffn"])


def test_options_from_strings_as_the_cli_gives_them():
    o = methods.resolve_options("cuma", {"r": "64", "target_modules": "q_proj, k_proj", "shared_A": "true"})
    assert o["r"] == 64 and o["target_modules"] == ["q_proj", "k_proj"] and o["shared_A"] is True
    assert o["lora_alpha"] == 128  # alpha defaults to 2r, the paper's pairing
    assert methods.resolve_options("cuma", {})["lora_alpha"] == 16
    assert methods.resolve_options("lora", {})["r"] == 64 and methods.resolve_options("lora", {})["lora_alpha"] == 128
    assert methods.resolve_options("lora", {"target_modules": r".*\.(q|v)_proj"})["target_modules"] == r".*\.(q|v)_proj"


def test_cuma_family_configs_and_records(llama):
    b = methods.build("cuma", llama, profile_dim=PDIM)
    cfg = b.model.peft_config["default"]
    assert (cfg.r, cfg.lora_alpha, cfg.num_experts, cfg.top_k, cfg.profile_dim) == (8, 16, 8, 2, PDIM)
    assert cfg.target_modules == {"q_proj", "v_proj"} and not cfg.shared_A and cfg.router_hidden == 256
    assert b.uses_profile and b.profile_in_prompt and b.profile_dim == PDIM

    sem = methods.build("cuma-semantic", tiny_llama())
    assert sem.model.peft_config["default"].profile_dim == 0 and not sem.uses_profile
    soft = methods.build("cuma-soft", tiny_llama(), profile_dim=PDIM)
    assert soft.model.peft_config["default"].soft_routing and soft.uses_profile
    mini = methods.build("cuma-minimal", tiny_llama())
    mcfg = mini.model.peft_config["default"]
    assert mcfg.profile_dim == 0 and mcfg.balance_loss_coef == 0 and not mini.uses_profile
    # the prompt option is recorded with the run
    off = methods.build("cuma", tiny_llama(), profile_dim=PDIM, profile_in_prompt=False)
    assert off.profile_in_prompt is False and off.record()["profile_in_prompt"] is False
    json.dumps(off.record())


def test_baseline_defaults(llama):
    lora = methods.build("lora", llama)
    cfg = lora.model.peft_config["default"]
    assert (cfg.r, cfg.lora_alpha, set(cfg.target_modules)) == (64, 128, {"q_proj", "v_proj"})
    hydra = methods.build("hydralora", tiny_llama())
    hcfg = hydra.model.peft_config["default"]
    assert (hcfg.r, hcfg.num_experts, hcfg.router_hidden, set(hcfg.target_modules)) == (64, 8, 0, {"q_proj", "v_proj"})
    mix = methods.build("mixlora", tiny_llama())
    xcfg = mix.model.peft_config["default"]
    assert (xcfg.r, xcfg.num_experts, xcfg.top_k, xcfg.router_aux_loss_coef) == (8, 8, 2, 0.001)
    pre = methods.build("prefix", tiny_llama())
    pcfg = pre.model.peft_config["default"]
    assert pcfg.num_virtual_tokens == 32 and pcfg.prefix_projection


# ------------------------------------------------------------------------------------- every trainable method
@pytest.mark.parametrize("name", TRAINABLE)
def test_train_save_reload_disable(name, tmp_path):
    base = tiny_llama()
    kw = _inputs()
    base_logits = _logits(base, kw)
    built = methods.build(name, base, **TINY_OPTIONS[name])
    kw = _inputs(built)
    model = built.model
    assert built.trainable_parameters > 0
    assert built.trainable_parameters == sum(p.numel() for p in model.parameters() if p.requires_grad)
    if name == "fft":
        assert built.trainable_parameters == built.base_parameters == built.total_parameters

    # a few AdamW steps on one fixed batch reduce the loss
    torch.manual_seed(0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3 if name == "fft" else 1e-2)
    model.train()
    losses = []
    for _ in range(4):
        out = model(**kw, labels=kw["input_ids"])
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 1e-3, losses

    trained = _logits(model, kw)
    assert not torch.allclose(trained, base_logits, atol=1e-4)

    # disabling the adapter gives the base model back where PEFT allows it
    if built.spec.supports_disable:
        with torch.no_grad(), built.disable_adapter():
            torch.testing.assert_close(model(**kw).logits, base_logits, rtol=0, atol=1e-6)
        torch.testing.assert_close(_logits(model, kw), trained, rtol=0, atol=1e-6)
    else:
        with pytest.raises(ValueError, match="no adapter to disable"):
            built.disable_adapter()

    # save and reload give identical logits
    out_dir = methods.save(built, tmp_path / name)
    files = set(os.listdir(out_dir))
    assert methods.METHOD_FILE in files
    if built.spec.save_format == "adapter":
        assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    else:
        assert {"config.json", "model.safetensors"} <= files
    record = methods.read_record(out_dir)
    assert record["method"] == name and record["profile_in_prompt"] is True
    reloaded = methods.load(name, tiny_llama(), out_dir)
    assert reloaded.spec is built.spec and reloaded.options == built.options
    torch.testing.assert_close(_logits(reloaded.model, kw), trained, rtol=0, atol=1e-6)
    assert reloaded.trainable_parameters == 0  # reloaded for inference by default
    # the name may come from the record
    again = methods.load(None, tiny_llama(), out_dir)
    torch.testing.assert_close(_logits(again.model, kw), trained, rtol=0, atol=1e-6)


def test_trainable_reload_of_an_adapter(tmp_path):
    built = methods.build("lora", tiny_llama(), r=4, init_weights=False)
    methods.save(built, tmp_path)
    again = methods.load("lora", tiny_llama(), tmp_path, is_trainable=True)
    assert again.trainable_parameters == built.trainable_parameters
    with pytest.raises(ValueError, match="holds method 'lora'"):
        methods.load("dora", tiny_llama(), tmp_path)


# ----------------------------------------------------------------------------------------------------- prefix
def test_prefix_forces_gradient_checkpointing_off():
    base = tiny_llama()
    enable = getattr(base, "activation_checkpointing_enable", None) or base.gradient_checkpointing_enable
    enable()
    assert methods.gradient_checkpointing_on(base)
    built = methods.build("prefix", base, num_virtual_tokens=4)  # PEFT itself refuses a checkpointed model
    assert not methods.gradient_checkpointing_on(built.model)
    assert built.gradient_checkpointing_allowed is False
    overrides = built.training_overrides()
    assert overrides and set(overrides.values()) == {False}
    assert set(overrides) <= {"activation_checkpointing", "gradient_checkpointing"}
    assert built.record()["gradient_checkpointing_allowed"] is False
    assert methods.build("lora", tiny_llama(), r=4).training_overrides() == {}


def test_prefix_trainable_reload_explains_itself(tmp_path):
    built = methods.build("prefix", tiny_llama(), num_virtual_tokens=4)
    with torch.no_grad():
        for p in built.model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    methods.save(built, tmp_path)
    with pytest.raises(ValueError) as err:
        methods.load("prefix", tiny_llama(), tmp_path, is_trainable=True)
    msg = str(err.value)
    assert "cannot be reloaded as trainable" in msg and "resume_from_checkpoint" in msg and "load_weights" in msg
    # the documented route: build fresh, copy the trainable state in
    fresh = methods.build("prefix", tiny_llama(), num_virtual_tokens=4)
    methods.load_weights(fresh, tmp_path)
    want = {n: p for n, p in built.model.named_parameters() if p.requires_grad}
    got = {n: p for n, p in fresh.model.named_parameters() if p.requires_grad}
    assert want.keys() == got.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=0)
    with pytest.raises(ValueError, match="does not fit"):
        methods.load_weights(methods.build("prefix", tiny_llama(), num_virtual_tokens=8), tmp_path)


def test_prefix_resumes_through_trainer_checkpoints(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    ids, mask = batch(bsz=8, length=8)
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "labels": ids.tolist()})

    def trainer():
        built = methods.build("prefix", tiny_llama(), num_virtual_tokens=4, encoder_hidden_size=16)
        # a runner's settings, then what the method forces (prefix: gradient checkpointing off)
        settings = {"activation_checkpointing": True, **built.training_overrides()}
        args = TrainingArguments(
            output_dir=str(tmp_path),
            max_steps=4,
            save_steps=2,
            per_device_train_batch_size=4,
            learning_rate=1e-2,
            report_to=[],
            use_cpu=True,
            seed=0,
            disable_tqdm=True,
            **settings,
        )
        assert args.activation_checkpointing is False and args.gradient_checkpointing is False
        return built, Trainer(model=built.model, args=args, train_dataset=ds, callbacks=[methods.trainer_callback(built)])

    full, t1 = trainer()
    t1.train()
    assert methods.TRAINER_STATE_FILE in os.listdir(tmp_path / "checkpoint-2")
    resumed, t2 = trainer()
    t2.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    a = dict(full.model.named_parameters())
    for n, p in resumed.model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, a[n], rtol=0, atol=1e-6)
    assert methods.trainer_callback(methods.build("lora", tiny_llama(), r=4)) is None


# --------------------------------------------------------------------------------------------------- prompting
@pytest.mark.parametrize("name", PROMPTING)
def test_prompting_baselines_leave_the_model_untouched(name, tmp_path):
    base = tiny_llama()
    kw = _inputs()
    ref = _logits(base, kw)
    built = methods.build(name, base)
    assert built.model is base and built.trainable_parameters == 0 and not built.spec.trainable
    assert built.prompt_mode == name
    assert built.profile_in_prompt is {"vanilla": False, "persona": True, "fewshot": False}[name]
    torch.testing.assert_close(_logits(built.model, kw), ref, rtol=0, atol=0)
    with built.disable_adapter():
        torch.testing.assert_close(_logits(built.model, kw), ref, rtol=0, atol=0)
    methods.save(built, tmp_path)
    assert os.listdir(tmp_path) == [methods.METHOD_FILE]
    again = methods.load(None, tiny_llama(), tmp_path)
    assert again.spec.name == name and again.options == built.options


def test_prompting_options():
    few = methods.build("fewshot", tiny_llama(), k=3, seed=7, profile_in_prompt=True)
    assert few.options["k"] == 3 and few.options["seed"] == 7 and few.options["key"] == "country"
    assert few.profile_in_prompt
    with pytest.raises(ValueError, match="must be one of"):
        methods.build("persona", tiny_llama(), profile_in_prompt=False)


# ------------------------------------------------------------------------------------------------- few-shot
def _records():
    recs = []
    for i in range(12):
        recs.append({"id": i, "country": "EG" if i < 6 else "SE", "answer": i})
    recs.append({"id": 12, "country": "JP", "answer": 12})
    recs.append({"id": 13, "country": "JP", "answer": 13})
    return recs


def test_fewshot_same_country_when_enough():
    recs = _records()
    target = recs[0]
    shots = select_fewshot(recs, target, k=4, seed=0)
    assert len(shots) == 4
    assert all(s["country"] == "EG" for s in shots)
    assert target not in shots and len({s["id"] for s in shots}) == 4
    # exactly k same-country records besides the target: all of them
    shots = select_fewshot(recs, target, k=5, seed=0)
    assert sorted(s["id"] for s in shots) == [1, 2, 3, 4, 5]


def test_fewshot_random_fallback_and_exclusion():
    recs = _records()
    target = recs[12]  # JP has only one other record
    shots = select_fewshot(recs, target, k=3, seed=0)
    assert len(shots) == 3 and all(s["id"] != 12 for s in shots)
    assert any(s["country"] != "JP" for s in shots)
    # an identical copy of the target is never a shot; asking for more than exist gives all the others
    copy = dict(target)
    shots = select_fewshot(recs, copy, k=100, seed=0)
    assert len(shots) == len(recs) - 1 and all(s["id"] != 12 for s in shots)
    # target without the key: random
    shots = select_fewshot(recs, {"id": 99}, k=2, seed=0)
    assert len(shots) == 2
    assert select_fewshot(recs, target, k=0) == []
    with pytest.raises(ValueError):
        select_fewshot(recs, target, k=-1)


def test_fewshot_is_seeded_and_deterministic():
    recs = _records()
    a = select_fewshot(recs, recs[6], k=3, seed=1)
    b = select_fewshot(list(recs), dict(recs[6]), k=3, seed=1)
    assert [s["id"] for s in a] == [s["id"] for s in b]
    picks = {tuple(s["id"] for s in select_fewshot(recs, recs[6], k=3, seed=s)) for s in range(10)}
    assert len(picks) > 1  # the seed matters


def test_fewshot_key_may_live_in_the_profile():
    recs = [{"id": i, "profile": {"country": "EG" if i % 2 else "SE"}} for i in range(10)]
    shots = select_fewshot(recs, recs[1], k=3, seed=0)
    assert all(s["profile"]["country"] == "EG" for s in shots) and recs[1] not in shots
    shots = select_fewshot(recs, recs[1], k=3, seed=0, key="profile.country")
    assert all(s["profile"]["country"] == "EG" for s in shots)
