"""`cuma demo --quick` end to end on the embedded defaults (SmolLM2, MiniLM, synthetic population)."""

import json

import pytest

from cuma.cli import main


@pytest.mark.slow
def test_demo_quick_writes_the_report(tmp_path):
    out, work = tmp_path / "report", tmp_path / "work"
    assert main(["demo", "--quick", "--out", str(out), "--work", str(work)]) == 0
    report = (out / "report.md").read_text()
    for label in ("untrained + persona prompt", "| LoRA |", "semantic-only CuMA", "| CuMA |", "oracle"):
        assert label in report
    results = json.loads((out / "results.json").read_text())
    assert set(results["results"]) == {"persona", "lora", "cuma-semantic", "cuma"}
    for method, row in results["results"].items():
        assert 0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["entropy"] <= 1.0
        assert (row["trainable_parameters"] > 0) == (method != "persona")
    for name in ("metrics.png", "distributions.png", "expert_load.png"):
        assert (out / name).stat().st_size > 1000
    assert (work / "adapters" / "cuma" / "adapter_model.safetensors").is_file()
    assert results["test_pairs"]["seen"] > 0 and results["test_pairs"]["held_out"] > 0
    assert results["held_out_countries"] and all(c in results["zones"] for c in results["held_out_countries"])
    # every trained method has a learning curve from the training callback, the untrained model its step-0 point
    for method in ("lora", "cuma-semantic", "cuma"):
        curve = results["learning_curves"][method]
        assert curve and curve[-1]["step"] == results["config"]["steps"]
    assert results["learning_curves"]["persona"][0]["step"] == 0
    assert (out / "learning_curve.png").stat().st_size > 1000
    assert results["cuma_options"]["cuma"]["router_input_norm"] == "balanced"
    # the routers' profile centre was fitted on the training profiles and travels with the adapter
    import torch

    from cuma.data.records import load_prepared

    saved = json.loads((work / "adapters" / "cuma" / "adapter_config.json").read_text())
    data = load_prepared(work / "data" / "prepared")
    rows = sorted({r["profile_index"] for r in data.train})
    assert saved["router_profile_center"] == "train"
    from safetensors.torch import load_file

    weights = load_file(work / "adapters" / "cuma" / "adapter_model.safetensors")
    center = weights["base_model.cuma_profile_stats.center"]
    assert torch.allclose(center, data.profile_embeds[rows].mean(0), atol=1e-6)
    semantic = json.loads((work / "adapters" / "cuma-semantic" / "adapter_config.json").read_text())
    assert semantic["router_profile_center"] == "none" and semantic["profile_center"] is None
    assert results["routing"]["held_out"] == results["held_out_countries"]
    # the routing map was pooled from CuMA's test evaluation: every test country, every test prompt
    assert sorted(results["routing"]["countries"]) == sorted({r["profile"]["country"] for r in data.test})
    # the claims table: the five claims, accuracy differences with a paired interval around them
    claims = results["claims"]
    assert len(claims) == 5 and all(isinstance(c["met"], bool) for c in claims)
    for c in claims:
        if c["kind"] == "accuracy difference":
            assert c["interval"][0] <= c["measured"] <= c["interval"][1]
    assert "95% interval" in report
    # the routers' learning-rate split reached both CuMA runs (and no router-less method)
    import yaml

    from cuma.demo import DemoConfig
    from cuma.models import resolve_dtype_name

    demo_default = DemoConfig()

    for method, router_lr in (("cuma", 6e-3), ("cuma-semantic", 6e-3), ("lora", None)):
        resolved = yaml.safe_load((work / "adapters" / method / "resolved_config.yaml").read_text())
        assert resolved["train"]["router_learning_rate"] == router_lr
        assert resolved["train"]["split_by_length"] == 2  # every method alike
        assert resolved["train"]["loraplus_lr_ratio"] == demo_default.loraplus_lr_ratio
        # the frozen base in the demo's precision and attention, every method alike
        assert resolved["model"]["dtype"] == results["config"]["dtype"] == resolve_dtype_name(demo_default.dtype)
        assert resolved["model"]["attn_implementation"] == demo_default.attn_implementation
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(work / "adapters" / "cuma" / "adapter_model.safetensors").values()} == {torch.float32}


def test_demo_cli_passes_the_loraplus_ratio_and_refuses_a_bad_one():
    import argparse

    from cuma import demo

    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    cfg = demo.config_from_args(parser.parse_args([]))
    assert cfg.loraplus_lr_ratio is None
    assert "loraplus" not in demo.command_line(cfg)  # the default names no flag
    cfg = demo.config_from_args(parser.parse_args(["--loraplus-lr-ratio", "16"]))
    assert cfg.loraplus_lr_ratio == 16.0 and "--loraplus-lr-ratio 16.0" in demo.command_line(cfg)
    with pytest.raises(ValueError, match="--loraplus-lr-ratio must be positive"):
        demo.run(parser.parse_args(["--loraplus-lr-ratio", "0"]))


def test_demo_training_config_is_built_from_the_demo_config(tmp_path):
    """The training glue builds SFTRunConfig directly: every setting of the demo reaches the run's sections."""
    from cuma import demo
    from cuma.train.config import SFTRunConfig

    cfg = demo.DemoConfig(seed=3, steps=12, batch_size=4, loraplus_lr_ratio=4.0, attn_implementation="eager")
    for method in cfg.methods:
        run = demo.training_config(cfg, method, tmp_path / "data", tmp_path / method, options={"r": 4})
        assert isinstance(run, SFTRunConfig)
        assert run.method.name == method and run.data.path == str(tmp_path / "data")
        assert run.method.options == {**demo.method_options(method, cfg.conditioning), "r": 4}
        t = run.train
        assert (t.seed, t.max_steps, t.per_device_train_batch_size) == (3, 12, 4)
        assert t.learning_rate == cfg.learning_rate_of(method) and t.lr_scheduler_type == cfg.lr_scheduler
        assert t.logging_steps == 2 and t.save_strategy == "no" and t.report_to == ["none"]
        assert t.split_by_length == cfg.split_by_length and t.loraplus_lr_ratio == 4.0
        assert t.router_learning_rate == (cfg.router_learning_rate if method != "lora" else None)
        assert run.model.attn_implementation == "eager" and run.model.name_or_path == "smollm2-135m"
    assert demo.DemoConfig().learning_rate_of("lora") == 1e-3 and demo.DemoConfig().learning_rate_of("cuma") == 2e-3


def test_demo_fast_conditioning_is_declared_once():
    from cuma import demo

    from cuma.tuners.cuma.config import CONDITIONING_PRESETS

    # the demo names the preset; the preset (CuMAConfig.conditioning) is the one place its option values live
    assert demo.method_options("cuma", "fast")["conditioning"] == "fast"
    assert demo.method_options("cuma", "paper")["conditioning"] == "paper"
    assert not set(demo.method_options("cuma", "fast")) & set(CONDITIONING_PRESETS["fast"])
    assert demo.method_options("cuma-semantic", "fast")["conditioning"] == "fast"
    with pytest.raises(ValueError, match="--conditioning"):
        demo.method_options("cuma", "quick")
