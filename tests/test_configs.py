"""The shipped configs and scripts: every config resolves to valid method options; the loader's error messages."""

import glob
import os
import stat
from dataclasses import dataclass, field

import pytest

from cuma import methods
from cuma.config import ConfigError, load_config, parse_overrides
from cuma.train.config import SFTRunConfig

CONFIGS = sorted(f for f in glob.glob("configs/wvb/*.yaml") if not os.path.basename(f).startswith("_"))


def test_configs_exist():
    assert len(CONFIGS) >= 10


@pytest.mark.parametrize("path", CONFIGS)
def test_every_config_resolves(path):
    cfg = load_config(SFTRunConfig, path)
    options = dict(cfg.method.options)
    if cfg.method.profile_in_prompt is not None:
        options["profile_in_prompt"] = cfg.method.profile_in_prompt
    methods.resolve_options(cfg.method.name, options)
    assert cfg.train.num_train_epochs == 3 and cfg.train.lr_scheduler_type == "constant"


def test_paper_learning_rates():
    assert load_config(SFTRunConfig, "configs/wvb/cuma_r8.yaml").train.learning_rate == 2e-5
    r64 = load_config(SFTRunConfig, "configs/wvb/cuma_r64.yaml")
    assert r64.train.learning_rate == 5e-6 and r64.method.options["r"] == 64
    llama = load_config(SFTRunConfig, "configs/wvb/cuma_llama31_r64.yaml")
    assert llama.method.options["target_modules"] == ["q_proj", "k_proj"] and llama.method.options["r"] == 64


def test_overrides_dotted_leaf_and_dict_keys():
    cfg = load_config(
        SFTRunConfig, "configs/wvb/cuma_r8.yaml",
        ["--train.learning_rate", "1e-4", "--max_steps=7", "--method.options.r", "4", "--report_to", "none"],
    )
    assert cfg.train.learning_rate == 1e-4 and cfg.train.max_steps == 7
    assert cfg.method.options["r"] == 4 and cfg.method.options["num_experts"] == 8
    assert cfg.train.report_to == ["none"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--train.learing_rate", "1"], "train.learing_rate: unknown key"),
        (["--train.max_steps", "abc"], "train.max_steps: expected an integer"),
        (["--train.bf16", "maybe"], "train.bf16: expected true or false"),
        (["--seed"], "missing value"),
        (["--dtype_x", "1"], "unknown key"),
    ],
)
def test_bad_overrides_name_the_key(argv, message):
    with pytest.raises(ConfigError, match=message):
        load_config(SFTRunConfig, None, argv)


def test_bad_yaml_names_the_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  learning_rat: 1\n")
    with pytest.raises(ConfigError, match="train.learning_rat: unknown key"):
        load_config(SFTRunConfig, p)
    p.write_text("model:\n  name_or_path: [1, 2]\n")
    with pytest.raises(ConfigError, match="model.name_or_path: expected a string"):
        load_config(SFTRunConfig, p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(SFTRunConfig, tmp_path / "missing.yaml")


@dataclass
class _A:
    x: int = 0


@dataclass
class _B:
    x: int = 0


@dataclass
class _Both:
    a: _A = field(default_factory=_A)
    b: _B = field(default_factory=_B)


def test_ambiguous_leaf_is_an_error():
    with pytest.raises(ConfigError, match="ambiguous; use one of a.x, b.x"):
        parse_overrides(_Both, ["--x", "1"])
    assert parse_overrides(_Both, ["--b.x", "1"]) == {"b": {"x": 1}}


SCRIPTS = [
    "train_cuma_wvs_sft.sh", "train_cuma_wvs_sft_r64_a128_lr5e6.sh", "train_cuma_wvs_sft_llama3.1_r64_lr5e-6.sh",
    "train_cuma_wvs_sft_r64_a128_lr5e6_ablation_minimal.sh", "train_cuma_wvs_sft_r64_a128_lr5e6_ablation_soft_routing.sh",
    "train_cuma_wvs_sft_wo_demo.sh", "train_lora_wvs_sft.sh", "train_fft_wvs_sft.sh", "train_hydralora_wvs_sft.sh",
    "train_mixlora_wvs_sft.sh", "train_prefix_wvs_sft.sh", "evaluate_wvs.sh", "evaluate_wvs_few_shot.sh",
    "train_cuma_wvs_sft_zeroshot.sh", "prepare_wvs.sh", "prepare_wvs_zeroshot.sh",
    "train_cuma_facebook_sft_dpo.sh", "train_cuma_prism_sft_dpo.sh", "train_lora_facebook_sft_dpo.sh",
    "train_lora_prism_sft_dpo.sh", "train_cuma_prism_grpo.sh", "evaluate_dpo.sh", "evaluate_prism_dpo.sh",
    "evaluate_facebook_vanilla.sh", "evaluate_facebook_persona.sh", "evaluate_facebook_fewshot.sh",
]


@pytest.mark.parametrize("name", SCRIPTS)
def test_authors_script_names_exist_and_point_at_real_configs(name):
    path = os.path.join("scripts", name)
    assert os.path.isfile(path) and os.stat(path).st_mode & stat.S_IXUSR
    text = open(path).read()
    for token in text.split():
        if token.startswith("configs/"):
            assert os.path.isfile(token.strip('"')), token


PAPER_CUMA_CONFIGS = [f for f in CONFIGS + sorted(glob.glob("configs/*/cuma_*_sft.yaml"))
                      if os.path.basename(f).startswith("cuma") and "_fast" not in f]
FAST_CONFIGS = sorted(glob.glob("configs/*/cuma_*_fast*.yaml"))


@pytest.mark.parametrize("path", PAPER_CUMA_CONFIGS)
def test_configs_that_reproduce_the_paper_keep_the_papers_router(path):
    cfg = load_config(SFTRunConfig, path)
    resolved = methods.resolve_options(cfg.method.name, cfg.method.options)
    assert resolved["conditioning"] == "paper" and resolved["router_input_norm"] == "none"
    assert resolved["router_token_init_scale"] == 1.0 and cfg.train.router_learning_rate is None
    assert "paper's router" in open(path).read()


@pytest.mark.parametrize("path", FAST_CONFIGS)
def test_fast_configs_give_the_recommended_router_at_the_recommended_router_lr(path):
    from cuma.tuners.cuma.config import CONDITIONING_PRESETS, FAST_ROUTER_LR_RATIO

    cfg = load_config(SFTRunConfig, path)
    resolved = methods.resolve_options(cfg.method.name, cfg.method.options)
    assert {k: resolved[k] for k in CONDITIONING_PRESETS["fast"]} == CONDITIONING_PRESETS["fast"]
    assert cfg.train.router_learning_rate == pytest.approx(FAST_ROUTER_LR_RATIO * cfg.train.learning_rate)


def test_there_are_fast_configs():
    assert {"configs/wvb/cuma_r8_fast.yaml", "configs/wvb/cuma_r64_fast.yaml"} <= set(FAST_CONFIGS)
    assert os.path.isfile("scripts/train_cuma_wvs_sft_fast.sh")
