"""router_profile_center='train': the routers read the profile embedding minus the training profiles' mean."""

import json

import peft
import pytest
import torch
from conftest import batch, profiles, tiny_llama

import cuma
from cuma.train.preference import fit_profile_centers
from cuma.tuners.cuma.model import profile_stats

D = 16


def cfg(**kw):
    options = dict(r=4, lora_alpha=8, num_experts=4, top_k=2, profile_dim=D, router_hidden=16, init_weights=False)
    options.update(kw)
    return cuma.CuMAConfig(**options)


def logits(model, e, ids_mask=None):
    ids, mask = ids_mask or batch()
    return model(input_ids=ids, attention_mask=mask, profile_embeds=e).logits


def pair():
    """A centring model and a plain one with the same weights."""
    torch.manual_seed(0)
    plain = peft.get_peft_model(tiny_llama(), cfg()).eval()
    centred = peft.get_peft_model(tiny_llama(), cfg(router_profile_center="train")).eval()
    centred.load_state_dict(plain.state_dict())
    return plain, centred


def test_centred_routing_equals_routing_on_centred_embeddings():
    plain, centred = pair()
    table = profiles(6) + 3.0  # a large shared part, as sentence embeddings have
    assert cuma.fit_profile_center(centred, table) == ["default"]
    mean = table.mean(0)
    e = table[:3]
    torch.testing.assert_close(logits(centred, e), logits(plain, e - mean), rtol=1e-5, atol=1e-5)
    assert (logits(centred, e) - logits(plain, e)).abs().max() > 1e-4  # the centring changes the routing


def test_unfitted_centre_is_a_clear_error():
    _, centred = pair()
    with pytest.raises(ValueError, match="fit_profile_center"):
        logits(centred, profiles())


def test_centre_saved_with_the_adapter_weights_and_reloaded_bit_exact(tmp_path):
    from safetensors.torch import load_file

    _, centred = pair()
    cuma.fit_profile_center(centred, profiles(5) + 1.0)
    center = profile_stats(centred, "default").center
    ref = logits(centred, profiles())
    centred.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["router_profile_center"] == "train" and saved["profile_center"] is None  # not a float list any more
    weights = load_file(tmp_path / "adapter_model.safetensors")
    assert torch.equal(weights["base_model.cuma_profile_stats.center"], center)
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    assert torch.equal(profile_stats(loaded, "default").center, center)
    torch.testing.assert_close(logits(loaded, profiles()), ref, rtol=0, atol=0)


def test_an_adapter_saved_with_the_centre_in_its_config_still_loads(tmp_path):
    """Adapters saved before the centre became a buffer kept it as a float list in adapter_config.json."""
    import warnings

    from safetensors.torch import load_file, save_file

    _, centred = pair()
    cuma.fit_profile_center(centred, profiles(5) + 1.0)
    center = profile_stats(centred, "default").center
    ref = logits(centred, profiles())
    centred.save_pretrained(tmp_path)
    # rewrite the save into the old layout: the centre in the config, not in the weights file
    config_file = tmp_path / "adapter_config.json"
    saved = json.loads(config_file.read_text())
    saved["profile_center"] = center.tolist()
    config_file.write_text(json.dumps(saved))
    weights = load_file(tmp_path / "adapter_model.safetensors")
    del weights["base_model.cuma_profile_stats.center"]
    save_file(weights, tmp_path / "adapter_model.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "missing adapter keys" for the centre it read from the config
        loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    assert torch.equal(profile_stats(loaded, "default").center, center)
    assert loaded.peft_config["default"].profile_center is None  # moved to the buffer
    torch.testing.assert_close(logits(loaded, profiles()), ref, rtol=0, atol=0)
    # saved again, it is in the new layout
    loaded.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["profile_center"] is None
    again = load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert torch.equal(again["base_model.cuma_profile_stats.center"], center)


def test_recipe_fits_once_per_distinct_training_profile_and_keeps_a_fitted_centre():
    _, centred = pair()
    table = torch.arange(3 * D, dtype=torch.float32).reshape(3, D)
    records = [{"profile_index": 0}, {"profile_index": 0}, {"profile_index": 0}, {"profile_index": 2}]
    assert fit_profile_centers(centred, records, table, None) == ["default"]
    expected = table[[0, 2]].mean(0)  # profile 0 counts once, profile 1 (not in training) not at all
    assert torch.allclose(profile_stats(centred, "default").center, expected)
    assert fit_profile_centers(centred, [{"profile_index": 1}], table, None) == []  # already fitted: kept
    assert torch.allclose(profile_stats(centred, "default").center, expected)


def test_bad_centre_options_are_named():
    with pytest.raises(ValueError, match="router_profile_center"):
        cfg(router_profile_center="mean")
    with pytest.raises(ValueError, match="profile_dim > 0"):
        cfg(router_profile_center="train", profile_dim=0)
    with pytest.raises(ValueError, match="profile_center must be a list of profile_dim=16"):
        cfg(router_profile_center="train", profile_center=[0.0] * 3)
    _, centred = pair()
    with pytest.raises(ValueError, match="width 5"):
        cuma.fit_profile_center(centred, torch.zeros(4, 5))
    with pytest.raises(ValueError, match="NaN"):
        cuma.fit_profile_center(centred, torch.full((2, D), float("nan")))


def test_semantic_only_method_has_no_centre_option():
    from cuma import methods

    assert "router_profile_center" in methods.get_spec("cuma").options
    assert "router_profile_center" not in methods.get_spec("cuma-semantic").options


def test_refitted_centre_is_used_at_once():
    plain, centred = pair()
    cuma.fit_profile_center(centred, profiles(4) + 1.0)
    e = profiles()
    logits(centred, e)  # the first centre is now in use
    table = profiles(5, seed=7) - 2.0
    cuma.fit_profile_center(centred, table)
    torch.testing.assert_close(logits(centred, e), logits(plain, e - table.mean(0)), rtol=1e-5, atol=1e-5)
