"""One source for every option: the tuner config dataclasses. The registry's options, one lora_alpha rule, the
conditioning preset ('paper' / 'fast') in the library, the registry and the YAML/CLI configs, and the docs tables."""

import dataclasses
import json
import typing

import pytest
import torch
from conftest import batch, profiles, tiny_llama

import cuma
from cuma import methods
from cuma.config import load_config
from cuma.methods.describe import options_text, update_docs
from cuma.methods.options import _PEFT_BASE_FIELDS
from cuma.train.config import SFTRunConfig
from cuma.tuners.cuma.config import CONDITIONING_PRESETS, FAST_ROUTER_LR_RATIO
from cuma.tuners.cuma.model import profile_stats
from cuma.tuners.hydralora import HydraLoRAConfig
from cuma.tuners.mixlora import MixLoRAConfig

D = 16
TINY = dict(num_experts=3, router_hidden=8, profile_dim=D)
FAST = CONDITIONING_PRESETS["fast"]
PAPER = CONDITIONING_PRESETS["paper"]
# a method's own defaults where they differ from its config's (each one a deviation named in docs/methods.md)
METHOD_DEFAULTS = {
    "hydralora": {"r": 64, "target_modules": ["q_proj", "v_proj"]},
    "cuma-soft": {"balance_loss_coef": 0.0},
}
TUNED = {"cuma": cuma.CuMAConfig, "cuma-semantic": cuma.CuMAConfig, "cuma-soft": cuma.CuMAConfig,
         "cuma-minimal": cuma.CuMAConfig, "hydralora": HydraLoRAConfig, "mixlora": MixLoRAConfig}


# ------------------------------------------------------------------------------------------------ one lora_alpha rule
@pytest.mark.parametrize("r", [4, 8, 64])
def test_cuma_config_and_registry_give_the_same_scaling(r):
    built = methods.build("cuma", tiny_llama(), r=r, **TINY)
    config = built.model.peft_config["default"]
    assert cuma.CuMAConfig(r=r).lora_alpha == config.lora_alpha == built.options["lora_alpha"] == 2 * r
    assert cuma.CuMAConfig(r=r).scaling == config.scaling == 2.0
    # the command line goes through the same registry
    cli = load_config(SFTRunConfig, None, ["--method.name", "cuma", "--method.options.r", str(r)])
    assert methods.resolve_options("cuma", cli.method.options)["lora_alpha"] == 2 * r
    # an explicit alpha wins in both
    assert cuma.CuMAConfig(r=r, lora_alpha=16).scaling == 16 / r
    assert methods.build("cuma", tiny_llama(), r=r, lora_alpha=16, **TINY).model.peft_config["default"].scaling == 16 / r


@pytest.mark.parametrize("name, config_cls, options", [
    ("hydralora", HydraLoRAConfig, {"num_experts": 2}),
    ("mixlora", MixLoRAConfig, {"num_experts": 2, "top_k": 1}),
])
def test_every_tuner_applies_the_same_alpha_rule(name, config_cls, options):
    built = methods.build(name, tiny_llama(), r=64, **options)
    assert built.model.peft_config["default"].scaling == config_cls(r=64).scaling == 2.0
    assert built.options["lora_alpha"] == 128


def test_lora_follows_the_same_rule():
    built = methods.build("lora", tiny_llama(), r=64)
    assert built.model.peft_config["default"].lora_alpha == built.options["lora_alpha"] == 128


# ------------------------------------------------------------------------------------- options from the dataclasses
@pytest.mark.parametrize("name", sorted(TUNED))
def test_registry_options_are_the_config_fields(name):
    spec = methods.get_spec(name)
    config_cls = TUNED[name]
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    hints = typing.get_type_hints(config_cls)
    own = METHOD_DEFAULTS.get(name, {})
    for key, opt in spec.options.items():
        if key == "profile_in_prompt":  # the data option every method records
            continue
        f = fields[key]
        assert opt.help == f.metadata["help"], key
        assert opt.default == own.get(key, f.default), key
        literal = next((a for a in (hints[key], *typing.get_args(hints[key])) if typing.get_origin(a) is typing.Literal),
                       None)
        assert opt.choices == (typing.get_args(literal) if literal is not None else None), key
    # every field a user can set is an option, unless the method fixes it (fitted tensors and PEFT's fields are not)
    settable = {k for k, f in fields.items() if k not in _PEFT_BASE_FIELDS and not f.metadata.get("fitted")}
    dropped = {"top_k"} if name == "cuma-soft" else set()
    assert set(spec.options) - {"profile_in_prompt"} == settable - set(spec.fixed) - dropped


@pytest.mark.parametrize("name", ["cuma-semantic", "cuma-soft", "cuma-minimal"])
def test_an_ablation_lists_only_what_it_fixes(name):
    full, spec = methods.get_spec("cuma"), methods.get_spec(name)
    gone = set(full.options) - set(spec.options)
    assert gone == (set(spec.fixed) - set(full.fixed)) | ({"top_k"} if name == "cuma-soft" else set())
    for key in gone & set(spec.fixed):  # an option it fixes is refused by name
        with pytest.raises(ValueError, match=f"{key} is fixed to"):
            methods.resolve_options(name, {key: full.options[key].default})
    # everything else is cuma's option, with cuma's help
    for key in spec.options:
        assert spec.options[key].help == full.options[key].help


def test_help_texts_say_what_an_option_does_not_what_an_experiment_found():
    for name in TUNED:
        for key, opt in methods.get_spec(name).options.items():
            assert opt.help and "demo" not in opt.help.lower() and "docs/" not in opt.help, (name, key)


def test_docs_option_tables_are_generated_from_the_registry():
    assert update_docs("docs/methods.md", check=True), "run: python -m cuma.methods.describe docs/methods.md"


def test_cli_lists_the_options_with_their_help(capsys):
    from cuma.cli import main

    assert main(["train", "sft", "--method-options", "cuma"]) == 0
    out = capsys.readouterr().out
    assert "conditioning ('paper' / 'fast'; default 'paper')" in out
    assert cuma.CuMAConfig.__dataclass_fields__["conditioning"].metadata["help"] in out
    semantic = options_text("cuma-semantic")
    assert "profile_dim=0" in semantic and "\n  profile_dim (" not in semantic  # fixed, so not listed as an option


# ------------------------------------------------------------------------------------------- the conditioning preset
def test_fast_preset_sets_the_router_options_and_explicit_values_win():
    fast = cuma.CuMAConfig(conditioning="fast", profile_dim=D)
    assert {k: getattr(fast, k) for k in FAST} == FAST == {
        "router_input_norm": "balanced", "router_token_init_scale": 0.1, "router_profile_center": "train"}
    paper = cuma.CuMAConfig(profile_dim=D)
    assert paper.conditioning == "paper" and {k: getattr(paper, k) for k in PAPER} == PAPER
    mixed = cuma.CuMAConfig(conditioning="fast", profile_dim=D, router_token_init_scale=0.5)
    assert mixed.router_token_init_scale == 0.5 and mixed.router_input_norm == "balanced"
    # no profile input: the profile-reading part of the preset does not apply
    semantic = cuma.CuMAConfig(conditioning="fast", profile_dim=0)
    assert semantic.router_profile_center == "none" and semantic.router_input_norm == "balanced"
    with pytest.raises(ValueError, match="conditioning must be one of"):
        cuma.CuMAConfig(conditioning="quick")
    assert FAST_ROUTER_LR_RATIO == 3.0


def test_build_with_fast_conditioning_records_resolved_values_and_reloads(tmp_path):
    built = methods.build("cuma", tiny_llama(), conditioning="fast", init_weights=False, **TINY)
    for key, value in {**FAST, "conditioning": "fast"}.items():
        assert built.options[key] == value
        assert getattr(built.model.peft_config["default"], key) == value
    cuma.fit_profile_center(built.model, profiles(5) + 1.0)
    ids, mask = batch()
    ref = built.model(input_ids=ids, attention_mask=mask, profile_embeds=profiles()).logits
    methods.save(built, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert {k: saved[k] for k in (*FAST, "conditioning")} == {**FAST, "conditioning": "fast"}
    assert json.loads((tmp_path / "cuma_method.json").read_text())["options"]["router_input_norm"] == "balanced"
    again = methods.load(None, tiny_llama(), tmp_path)
    assert again.options["conditioning"] == "fast"
    assert torch.equal(profile_stats(again.model, "default").center, profile_stats(built.model, "default").center)
    out = again.model(input_ids=ids, attention_mask=mask, profile_embeds=profiles()).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    # the weights file alone carries the fitted centre into a freshly built model too
    fresh = methods.build("cuma", tiny_llama(), conditioning="fast", init_weights=False, **TINY)
    methods.load_weights(fresh, tmp_path)
    assert torch.equal(profile_stats(fresh.model, "default").center, profile_stats(built.model, "default").center)


def test_paper_conditioning_is_the_papers_router():
    built = methods.build("cuma", tiny_llama(), conditioning="paper", **TINY)
    assert {k: built.options[k] for k in PAPER} == PAPER
    router = built.model.base_model.model.model.layers[0].self_attn.q_proj.cuma_router["default"]
    assert router.input_norm == "none"


@pytest.mark.parametrize("name", ["cuma-semantic", "cuma-minimal"])
def test_fast_conditioning_of_a_semantic_only_ablation_keeps_only_its_profile_free_parts(name):
    built = methods.build(name, tiny_llama(), conditioning="fast", num_experts=3, router_hidden=8, init_weights=False)
    config = built.model.peft_config["default"]
    assert (config.router_input_norm, config.router_token_init_scale) == ("balanced", 0.1)
    assert config.router_profile_center == "none" and config.profile_dim == 0
    ids, mask = batch()
    assert torch.isfinite(built.model(input_ids=ids, attention_mask=mask).logits).all()  # nothing to fit


def test_fast_conditioning_for_soft_routing():
    config = methods.build("cuma-soft", tiny_llama(), conditioning="fast", **TINY).model.peft_config["default"]
    assert config.soft_routing and {k: getattr(config, k) for k in FAST} == FAST


def test_conditioning_from_the_command_line_and_yaml(tmp_path):
    cfg = load_config(SFTRunConfig, None, ["--method.name", "cuma", "--method.options.conditioning", "fast"])
    assert methods.resolve_options("cuma", cfg.method.options)["router_input_norm"] == "balanced"
    p = tmp_path / "c.yaml"
    p.write_text("method:\n  name: cuma-semantic\n  options: {conditioning: fast}\n")
    resolved = methods.resolve_options("cuma-semantic", load_config(SFTRunConfig, p).method.options)
    assert resolved["router_token_init_scale"] == 0.1
    with pytest.raises(ValueError, match="'conditioning' of method 'cuma' must be one of"):
        methods.resolve_options("cuma", {"conditioning": "fastest"})


# ------------------------------------------------------------------------------- the default of `cuma train sft`
def test_cuma_train_sft_trains_the_fast_router_where_the_config_leaves_it_unset():
    from cuma.train.cli import SFT_DEFAULT_CONDITIONING, apply_sft_defaults

    assert SFT_DEFAULT_CONDITIONING == "fast"
    cfg = load_config(SFTRunConfig, None, ["--method.name", "cuma", "--train.learning_rate", "2e-3"])
    assert apply_sft_defaults(cfg) == {"method.options.conditioning": "fast", "train.router_learning_rate": 6e-3}
    assert cfg.method.options["conditioning"] == "fast" and cfg.train.router_learning_rate == 6e-3
    # an explicit choice is kept: the paper's router at the main lr, or fast with its own router lr
    paper = load_config(SFTRunConfig, "configs/wvb/cuma_r8.yaml")
    assert apply_sft_defaults(paper) == {} and paper.train.router_learning_rate is None
    own = load_config(SFTRunConfig, None, ["--method.options.conditioning", "fast", "--train.router_learning_rate", "1e-3"])
    assert apply_sft_defaults(own) == {} and own.train.router_learning_rate == 1e-3
    # methods without a router preset are untouched
    lora = load_config(SFTRunConfig, None, ["--method.name", "lora"])
    assert apply_sft_defaults(lora) == {} and lora.method.options == {}


def test_print_config_shows_the_sft_default(capsys):
    from cuma.cli import main

    assert main(["train", "sft", "--print-config", "--method.name", "cuma-semantic"]) == 0
    out = capsys.readouterr().out
    assert "conditioning: fast" in out and "router_learning_rate: 6.0e-05" in out
