"""Guards the registration of our tuners inside PEFT (there is no public plugin API; see src/cuma/_registry.py).

If a PEFT upgrade changes the dispatch tables or PeftModel's forward-argument filtering, these tests fail first and
say what broke."""

import peft
import pytest
import torch
from conftest import batch, tiny_llama
from peft import mapping as peft_mapping

import cuma


def test_peft_version_is_the_tested_minor():
    major, minor = (int(x) for x in peft.__version__.split(".")[:2])
    assert (major, minor) == (0, 21), f"cuma's PEFT registration was tested on peft 0.21.x, found {peft.__version__}"


def test_tuner_is_in_every_dispatch_table():
    assert peft_mapping.PEFT_TYPE_TO_CONFIG_MAPPING["CUMA"] is cuma.CuMAConfig
    assert peft_mapping.PEFT_TYPE_TO_TUNER_MAPPING["CUMA"] is cuma.CuMAModel
    assert peft_mapping.PEFT_TYPE_TO_PREFIX_MAPPING["CUMA"] == "cuma_"


def test_config_round_trips_through_peft_config_loader(tmp_path):
    cfg = cuma.CuMAConfig(r=4, num_experts=3, top_k=1, profile_dim=8)
    cfg.save_pretrained(tmp_path)
    loaded = peft.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, cuma.CuMAConfig) and loaded.num_experts == 3 and loaded.top_k == 1


def test_profile_kwarg_is_stripped_before_the_base_model():
    m = peft.get_peft_model(tiny_llama(), cuma.CuMAConfig(profile_dim=8, num_experts=2, top_k=1, r=2))
    assert "profile_embeds" in m.special_peft_forward_args
    ids, mask = batch()
    with m.disable_adapter():  # the tuner hook is skipped here, so only PeftModel's filtering protects the base
        m(input_ids=ids, attention_mask=mask, profile_embeds=torch.zeros(3, 8))
    lora = peft.get_peft_model(tiny_llama(), peft.LoraConfig(target_modules=["q_proj"]))
    assert "profile_embeds" not in lora.special_peft_forward_args


def test_registration_is_idempotent_and_refuses_clashes():
    cuma.register_tuner("CUMA", cuma.CuMAConfig, cuma.CuMAModel, prefix="cuma_", takes_profile=True)

    class Other(cuma.CuMAModel):
        pass

    with pytest.raises(RuntimeError, match="already has a tuner"):
        cuma.register_tuner("CUMA", cuma.CuMAConfig, Other, prefix="cuma_", takes_profile=True)


# ------------------------------------------------------------------------------------------- PEFT conformance


TUNERS = [
    ("CUMA", lambda **kw: cuma.CuMAConfig(r=2, lora_alpha=4, num_experts=3, top_k=1, profile_dim=0, **kw), "cuma"),
    ("HYDRALORA", lambda **kw: cuma.HydraLoRAConfig(r=2, num_experts=3, **kw), "hydralora"),
    ("MIXLORA", lambda **kw: cuma.MixLoRAConfig(r=2, num_experts=3, top_k=1, **kw), "mixlora"),
]


@pytest.mark.parametrize("name,make,prefix", TUNERS)
def test_peft_type_is_a_real_peft_type_member(name, make, prefix):
    from peft.utils.peft_types import PeftType

    cfg = make()
    assert isinstance(cfg.peft_type, PeftType) and cfg.peft_type is PeftType(name) is getattr(PeftType, name)
    assert cfg.peft_type.value == name and name in [m.value for m in PeftType]
    assert peft_mapping.PEFT_TYPE_TO_TUNER_MAPPING[PeftType(name)] is peft_mapping.PEFT_TYPE_TO_TUNER_MAPPING[name]


@pytest.mark.parametrize("name,make,prefix", TUNERS)
def test_save_pretrained_writes_the_model_card_and_reloads(name, make, prefix, tmp_path):
    """PEFT's model-card step reads peft_type.value (a plain str crashed there); the FSDP state-dict helper too."""
    from peft.utils import get_peft_model_state_dict

    m = peft.get_peft_model(tiny_llama(), make(init_weights=False))
    m.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "library_name: peft" in card and "import cuma" in card
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "adapter_model.safetensors").is_file()
    state = get_peft_model_state_dict(m)
    assert state and all(prefix + "_" in k for k in state)
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    ids, mask = batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits,
                                   m.eval()(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=0)


@pytest.mark.parametrize("name,make,prefix", TUNERS)
@pytest.mark.parametrize("bias", ["all", "only"])
def test_bias_options_train_and_save_biases(name, make, prefix, bias, tmp_path):
    bias = "all" if bias == "all" else f"{prefix}_only"
    m = peft.get_peft_model(tiny_llama(attention_bias=True, mlp_bias=True), make(bias=bias))
    trainable = {n for n, p in m.named_parameters() if p.requires_grad and n.endswith(".bias")}
    base_biases = {n for n in trainable if f".{prefix}_" not in n}
    assert base_biases, "no base-model bias was made trainable"
    if bias == "all":
        assert any(".o_proj." in n or "down_proj" in n for n in base_biases)
    m.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert any(k.endswith(".bias") and f".{prefix}_" not in k for k in saved)


def test_frozen_load_freezes_the_profile_projection(tmp_path):
    m = peft.get_peft_model(tiny_llama(), cuma.CuMAConfig(r=2, num_experts=3, profile_dim=8, profile_proj_layers=1))
    m.save_pretrained(tmp_path)
    frozen = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=False)
    assert not [n for n, p in frozen.named_parameters() if p.requires_grad]
    trainable = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    names = [n for n, p in trainable.named_parameters() if p.requires_grad]
    assert any("cuma_profile_proj" in n for n in names) and any("cuma_router" in n for n in names)


def test_unknown_peft_type_error_names_import_cuma():
    from cuma._registry import ensure_registered

    ensure_registered("CUMA")
    with pytest.raises(ValueError, match="import cuma"):
        ensure_registered("NOT_A_METHOD")
