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
