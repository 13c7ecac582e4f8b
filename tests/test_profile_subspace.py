"""router_profile_subspace=k: the routers read the centred profile projected onto the training profiles' k leading
principal directions, so a profile unlike any training profile is read only where training shaped the router."""

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
    options = dict(r=4, lora_alpha=8, num_experts=4, top_k=2, profile_dim=D, router_hidden=16, init_weights=False,
                   router_profile_center="train")
    options.update(kw)
    return cuma.CuMAConfig(**options)


def logits(model, e):
    ids, mask = batch()
    return model(input_ids=ids, attention_mask=mask, profile_embeds=e).logits


def pair(k=3):
    """A centring model and a centring + projecting one with the same weights."""
    torch.manual_seed(0)
    centred = peft.get_peft_model(tiny_llama(), cfg()).eval()
    projected = peft.get_peft_model(tiny_llama(), cfg(router_profile_subspace=k)).eval()
    projected.load_state_dict(centred.state_dict())
    return centred, projected


def low_rank_profiles(n=8, rank=3, seed=1):
    """Profiles that vary along `rank` directions around a large shared part, as the demo's training profiles do."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.linalg.qr(torch.randn(D, rank, generator=g))[0].T  # (rank, D), orthonormal
    return 3.0 + torch.randn(n, rank, generator=g) @ directions, directions


def test_basis_is_orthonormal_and_spans_the_training_profiles():
    _, projected = pair(k=5)
    table, directions = low_rank_profiles(rank=3)
    assert cuma.fit_profile_center(projected, table) == ["default"]
    basis = profile_stats(projected, "default").basis
    assert basis.shape == (3, D)  # k=5 asked, the rows span 3: the null directions are not kept
    torch.testing.assert_close(basis @ basis.T, torch.eye(3), atol=1e-5, rtol=0)
    # the fitted basis spans the same directions as the ones the profiles were drawn on
    torch.testing.assert_close(basis.T @ basis, directions.T @ directions, atol=1e-5, rtol=0)


def test_projected_routing_equals_centred_routing_on_projected_embeddings():
    centred, projected = pair(k=2)
    table, _ = low_rank_profiles(rank=4)
    cuma.fit_profile_center(centred, table)
    cuma.fit_profile_center(projected, table)
    mean, basis = profile_stats(projected, "default").center, profile_stats(projected, "default").basis
    assert basis.shape == (2, D)
    e = profiles(3) + 3.0  # new profiles, off the training directions
    on_basis = mean + ((e - mean) @ basis.T) @ basis
    torch.testing.assert_close(logits(projected, e), logits(centred, on_basis), rtol=1e-5, atol=1e-5)
    assert (logits(projected, e) - logits(centred, e)).abs().max() > 1e-4  # the projection changes the routing


def test_a_training_profile_routes_as_under_centring_alone():
    centred, projected = pair(k=3)
    table, _ = low_rank_profiles(rank=3)
    cuma.fit_profile_center(centred, table)
    cuma.fit_profile_center(projected, table)
    torch.testing.assert_close(logits(projected, table[:3]), logits(centred, table[:3]), rtol=1e-4, atol=1e-4)


def test_unfitted_basis_is_a_clear_error():
    _, projected = pair()
    profile_stats(projected, "default").set("center", torch.zeros(D))  # a centre without its basis
    with pytest.raises(ValueError, match="no fitted profile_basis"):
        logits(projected, profiles())


def test_basis_saved_and_reloaded(tmp_path):
    from safetensors.torch import load_file

    _, projected = pair()
    cuma.fit_profile_center(projected, low_rank_profiles()[0])
    fitted = profile_stats(projected, "default")
    ref = logits(projected, profiles())
    projected.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["router_profile_subspace"] == 3 and saved["profile_basis"] is None
    weights = load_file(tmp_path / "adapter_model.safetensors")
    assert weights["base_model.cuma_profile_stats.basis"].shape == (3, D)
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    assert torch.equal(profile_stats(loaded, "default").basis, fitted.basis)
    assert torch.equal(profile_stats(loaded, "default").center, fitted.center)
    torch.testing.assert_close(logits(loaded, profiles()), ref, rtol=0, atol=0)


def test_an_old_adapter_with_centre_and_basis_in_its_config_still_loads(tmp_path):
    from safetensors.torch import load_file, save_file

    _, projected = pair()
    cuma.fit_profile_center(projected, low_rank_profiles()[0])
    fitted = profile_stats(projected, "default")
    ref = logits(projected, profiles())
    projected.save_pretrained(tmp_path)
    config_file = tmp_path / "adapter_config.json"
    saved = json.loads(config_file.read_text())
    saved["profile_center"], saved["profile_basis"] = fitted.center.tolist(), fitted.basis.tolist()
    config_file.write_text(json.dumps(saved))
    weights = load_file(tmp_path / "adapter_model.safetensors")
    weights = {k: v for k, v in weights.items() if "cuma_profile_stats" not in k}
    save_file(weights, tmp_path / "adapter_model.safetensors")
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    assert torch.equal(profile_stats(loaded, "default").basis, fitted.basis)
    torch.testing.assert_close(logits(loaded, profiles()), ref, rtol=0, atol=0)


def test_recipe_helper_fits_a_loaded_centre_without_basis():
    _, projected = pair()
    table, _ = low_rank_profiles()
    records = [{"profile_index": i} for i in range(table.shape[0])]
    assert fit_profile_centers(projected, records, table, None) == ["default"]
    assert profile_stats(projected, "default").basis is not None
    assert fit_profile_centers(projected, records, table, None) == []  # both fitted: kept


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="router_profile_subspace must be an integer >= 0"):
        cfg(router_profile_subspace=-1)
    with pytest.raises(ValueError, match="needs router_profile_center='train'"):
        cfg(router_profile_center="none", router_profile_subspace=4)
    with pytest.raises(ValueError, match="profile_basis must be a list of 1 to router_profile_subspace=2 rows"):
        cfg(router_profile_subspace=2, profile_basis=[[0.0] * D] * 3)
    with pytest.raises(ValueError, match="profile_basis must be a list"):
        cfg(router_profile_subspace=2, profile_basis=[[0.0] * 3])
    _, projected = pair()
    with pytest.raises(ValueError, match="span no direction"):
        cuma.fit_profile_center(projected, torch.ones(4, D))


def test_semantic_only_cuma_has_no_subspace_option():
    from cuma import methods

    assert "router_profile_subspace" in methods.get_spec("cuma").options
    assert "router_profile_subspace" not in methods.get_spec("cuma-semantic").options
