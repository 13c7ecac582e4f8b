"""The frozen base's precision and attention: `dtype="auto"` resolution, `model.attn_implementation`, an SFT run on a
bf16 base (adapters stay fp32 and learn), and how the demo records and names its precision."""

import warnings

import pytest
import torch
from test_sft import config
from transformers import TrainerCallback

from cuma import demo, models
from cuma.train.config import ModelSection, attention_kwargs
from cuma.train.sft import run_sft


def test_named_dtypes_pass_through_and_bad_ones_are_refused():
    for name in ("float32", "bfloat16", "float16"):
        assert models.resolve_dtype_name(name) == name
    with pytest.raises(ValueError, match=r"--dtype: expected 'auto', 'float32', 'bfloat16' or 'float16', got 'bf16'"):
        models.resolve_dtype_name("bf16", option="--dtype")


def test_auto_follows_native_bf16(monkeypatch):
    assert models.resolve_dtype_name("auto") == ("bfloat16" if models.native_bf16() else "float32")
    monkeypatch.setattr(models, "native_bf16", lambda device=None: False)
    assert models.resolve_dtype_name("auto") == "float32"
    monkeypatch.setattr(models, "native_bf16", lambda device=None: True)
    assert models.resolve_dtype_name("auto") == "bfloat16"


def test_native_bf16_is_false_off_cpu_and_cuda():
    assert models.native_bf16("meta") is False
    if not torch.cuda.is_available():
        assert models.native_bf16("cuda") is False


def test_attention_kwargs_validates_the_name():
    assert attention_kwargs(ModelSection()) == {}
    assert attention_kwargs(ModelSection(attn_implementation="eager")) == {"attn_implementation": "eager"}
    with pytest.raises(ValueError, match="model.attn_implementation: expected one of"):
        attention_kwargs(ModelSection(attn_implementation="fast"))


@pytest.mark.parametrize("method", ["lora", "cuma"])
def test_sft_on_a_bf16_base_keeps_fp32_adapters_that_learn(method, tiny_model_dir, tiny_prepared, tmp_path):
    cfg = config(tiny_model_dir, tiny_prepared, tmp_path / "out", method, steps=3)
    cfg.model.dtype, cfg.model.attn_implementation = "bfloat16", "eager"
    seen = {}

    class Record(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            seen["attn"] = model.config._attn_implementation
            seen["frozen"] = {p.dtype for p in model.parameters() if not p.requires_grad}
            seen["trainable"] = {p.dtype for p in model.parameters() if p.requires_grad}
            seen["before"] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

        def on_train_end(self, args, state, control, model=None, **kwargs):
            seen["moved"] = any(not torch.equal(p.detach(), seen["before"][n])
                                for n, p in model.named_parameters() if p.requires_grad)

    run = run_sft(cfg, callbacks=[Record()])
    assert seen["attn"] == "eager"
    assert seen["frozen"] == {torch.bfloat16} and seen["trainable"] == {torch.float32}
    assert seen["moved"] and torch.isfinite(torch.tensor(run["train_loss"]))


def test_demo_names_its_precision_only_where_it_differs(monkeypatch):
    monkeypatch.setattr(models, "native_bf16", lambda device=None: True)
    assert "--dtype" not in demo.command_line(demo.DemoConfig())
    default = models.resolve_dtype_name(demo.DemoConfig().dtype)
    other = "float32" if default == "bfloat16" else "bfloat16"
    assert f"--dtype {other}" in demo.command_line(demo.DemoConfig(dtype=other))
    assert "--dtype" not in demo.command_line(demo.DemoConfig(dtype=default))


def test_demo_cli_takes_the_dtype(monkeypatch):
    import argparse

    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    assert demo.config_from_args(parser.parse_args(["--dtype", "float32"])).dtype == "float32"
    with pytest.raises(SystemExit):
        parser.parse_args(["--dtype", "half"])


def test_emulated_bf16_is_named_and_the_demo_warns_before_any_work(monkeypatch):
    monkeypatch.setattr(models, "native_bf16", lambda device=None: False)
    assert models.emulated_bf16_note("float32") is None
    assert "no native bf16" in models.emulated_bf16_note("bfloat16", "cpu")
    monkeypatch.setattr(models, "native_bf16", lambda device=None: True)
    assert models.emulated_bf16_note("bfloat16", "cpu") is None

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(models, "native_bf16", lambda device=None: False)
    monkeypatch.setattr(demo.recipe, "Progress", stop)  # the first thing run_demo builds after resolving the precision
    with pytest.warns(UserWarning, match=r"--dtype: bfloat16 was requested but cpu has no native bf16"):
        with pytest.raises(Stop):
            demo.run_demo(demo.DemoConfig(dtype="bfloat16"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(Stop):
            demo.run_demo(demo.DemoConfig(dtype="auto"))  # auto resolves to float32 here: nothing to warn about
