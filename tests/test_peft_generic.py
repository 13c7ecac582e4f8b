"""PEFT's own generic tuner tests, run against CuMA.

The test files come from the source distribution of the installed (pinned) PEFT release, fetched at test time with
``pip download peft==<version> --no-deps --no-binary :all:`` into ``~/.cache/cuma/peft-tests/`` (or
``$CUMA_PEFT_TESTS_CACHE``); nothing of PEFT's is copied into this repository. Their test matrices are lists that the
``pytest.mark.parametrize`` marks hold by reference, so replacing their contents in place makes PEFT's own test methods
run with CuMA configs instead of PEFT's methods:

* ``test_custom_models.TestPeftCustomModel`` on PEFT's small custom models (``model(X=...)``), ``TEST_CASES``;
* ``test_custom_models.TestMultipleActiveAdapters`` (two CuMA adapters active at once);
* ``test_custom_models.TestPeftFsdpStateDict`` (state-dict round trips of an FSDP-wrapped model, one process);
* ``test_decoder_models.TestDecoderModels`` on tiny Llama / Qwen3 decoders built in code (PEFT's list names hub
  models; these tests must not download weights).

Every call carries ``profile_embeds`` (added by ``prepare_inputs_for_testing``); the base models drop it (a pre-hook),
as a model without the adapter has no use for it. Tests that merge the adapter into the base weights are expected
failures: a routed mixture of experts has no single weight update to merge (CuMA raises ValueError). A few of PEFT's
methods are not generic tuner tests but checks of other methods (prompt learning, LoRA's weighted combination,
LoRA conversion); PEFT itself skips them for any method but theirs.

By default a representative subset runs (about a minute on 2 cores): ``CUMA_PEFT_TESTS=full`` runs every test of the
four classes (the figures in docs/cuma.md).
"""

from __future__ import annotations

import functools
import importlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types
from pathlib import Path

import peft
import pytest
import torch

import cuma
from cuma.tuners.cuma.config import CuMAConfig

PEFT_VERSION = peft.__version__
CACHE = Path(os.environ.get("CUMA_PEFT_TESTS_CACHE", Path.home() / ".cache" / "cuma" / "peft-tests"))
FULL = os.environ.get("CUMA_PEFT_TESTS", "").lower() == "full"
PROFILE_DIM = 6


def _download_tests() -> tuple[Path | None, str]:
    """PEFT's ``tests/`` folder of the installed release, downloaded once into the cache (atomically)."""
    target = CACHE / f"peft-{PEFT_VERSION}" / "tests"
    if (target / "testing_common.py").is_file() and (target / "test_custom_models.py").is_file():
        return target, ""
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", f"peft=={PEFT_VERSION}", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", "-d", tmp]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return None, f"`{' '.join(cmd)}` failed: {exc}"
        archives = sorted(Path(tmp).glob("peft-*.tar.gz"))
        if done.returncode != 0 or not archives:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            return None, f"`{' '.join(cmd)}` failed (exit {done.returncode}): {' / '.join(tail)}"
        prefix = f"peft-{PEFT_VERSION}/tests/"
        out = Path(tmp) / "extract"
        with tarfile.open(archives[0]) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix) and (m.isfile() or m.isdir())]
            if not members:
                return None, f"{archives[0].name} has no {prefix} folder"
            tar.extractall(out, members=members, filter="data")
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(out / f"peft-{PEFT_VERSION}" / "tests", target)  # atomic: a half-extracted copy is never used
        except OSError:
            if not (target / "testing_common.py").is_file():
                raise
    return target, ""


def _import_upstream(tests_dir: Path):
    """PEFT's test modules imported as the package ``peft_upstream_tests`` (they import each other relatively)."""
    if importlib.util.find_spec("diffusers") is None and "diffusers" not in sys.modules:
        # testing_common imports diffusers only to recognise a pipeline object; none is used here
        stub = types.ModuleType("diffusers")
        stub.StableDiffusionPipeline = type("StableDiffusionPipeline", (), {})
        sys.modules["diffusers"] = stub
    pkg = sys.modules.get("peft_upstream_tests")
    if pkg is None:
        pkg = types.ModuleType("peft_upstream_tests")
        pkg.__path__ = [str(tests_dir)]
        sys.modules["peft_upstream_tests"] = pkg
    custom = importlib.import_module("peft_upstream_tests.test_custom_models")
    decoders = importlib.import_module("peft_upstream_tests.test_decoder_models")
    return custom, decoders


_tests_dir, _why = _download_tests()
if _tests_dir is None:
    pytest.skip(f"PEFT {PEFT_VERSION}'s test files could not be fetched: {_why}", allow_module_level=True)
upstream, upstream_decoders = _import_upstream(_tests_dir)


# ------------------------------------------------------------------------------------------------ the CuMA matrix

# small routers and experts so that PEFT's models (10 -> 20 -> 2) stay small; the experts start as the identity (B = 0)
# as PEFT's matrices expect, and tests that need a visible adapter set init_weights=False (set_init_weights_false)
_SMALL = {"r": 2, "num_experts": 4, "top_k": 2, "router_hidden": 8, "profile_dim": PROFILE_DIM}

CUSTOM_CASES = [
    ("CuMA MLP lin0", "MLP", CuMAConfig, {**_SMALL, "target_modules": ["lin0"]}),
    ("CuMA MLP lin0 lin1", "MLP", CuMAConfig, {**_SMALL, "target_modules": ["lin0", "lin1"]}),
    ("CuMA MLP fast conditioning", "MLP", CuMAConfig,
     {**_SMALL, "target_modules": ["lin0", "lin1"], "router_input_norm": "balanced", "router_token_init_scale": 0.1}),
    ("CuMA MLP semantic-only", "MLP", CuMAConfig, {**_SMALL, "target_modules": ["lin0"], "profile_dim": 0}),
    ("CuMA MLP profile projection", "MLP", CuMAConfig,
     {**_SMALL, "target_modules": ["lin0"], "profile_proj_layers": 1, "profile_proj_dim": 3}),
    ("CuMA MLP soft routing", "MLP", CuMAConfig, {**_SMALL, "target_modules": ["lin1"], "soft_routing": True}),
    ("CuMA MLP fused fast path", "MLP", CuMAConfig, {**_SMALL, "target_modules": ["lin0"], "fast_path": "fused"}),
    ("CuMA MLP modules_to_save", "MLP", CuMAConfig, {**_SMALL, "target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    ("CuMA MLP_LayerNorm", "MLP_LayerNorm", CuMAConfig, {**_SMALL, "target_modules": ["lin0"]}),
    ("CuMA MLP2", "MLP2", CuMAConfig, {**_SMALL, "target_modules": ["lin0", "lin1"]}),
]
# the subset of every CI run: the paper's router, the fast conditioning, semantic-only, two models
SUBSET_CASES = {"CuMA MLP lin0", "CuMA MLP fast conditioning", "CuMA MLP semantic-only", "CuMA MLP2"}

_VISIBLE = {**_SMALL, "init_weights": False}  # as PEFT's own multi-adapter cases: each adapter changes the output
MULTI_ADAPTER_CASES = [
    ("CuMA Same", "cuma", CuMAConfig, {**_VISIBLE, "target_modules": ["lin0"]}, {**_VISIBLE, "target_modules": ["lin0"]}),
    ("CuMA Different", "cuma", CuMAConfig, {**_VISIBLE, "target_modules": ["lin0"]},
     {**_VISIBLE, "target_modules": ["lin1"]}),
]

DECODER_IDS = ["cuma-tiny-llama", "cuma-tiny-qwen3"]
DECODER_CONFIGS = [
    (CuMAConfig, {**_SMALL, "task_type": "CAUSAL_LM", "target_modules": ["q_proj", "v_proj"]}),
    (CuMAConfig, {**_SMALL, "task_type": "CAUSAL_LM", "target_modules": ["q_proj", "v_proj"], "profile_dim": 0}),
    (CuMAConfig, {**_SMALL, "task_type": "CAUSAL_LM", "target_modules": ["q_proj", "v_proj"], "router_input_norm":
                  "balanced", "router_token_init_scale": 0.1, "share_router_qkv": True}),
]

# tests that merge the adapter into the base weights: CuMA refuses (ValueError), so these are expected failures
MERGE_TESTS = {
    "test_merge_layers", "test_merge_layers_fp16", "test_merge_layers_is_idempotent",
    "test_merge_layers_is_deterministic_in_train_mode", "test_safe_merge", "test_disable_adapters_with_merging",
    "test_merge_layers_multi", "test_merge_layers_nan", "test_multiple_active_adapters_merge_and_unmerge",
    "test_sequential_merge_matches_batch_merge", "test_unmerge_after_sequential_merge_restores_base",
    "test_delete_merged_adapter_raises_without_mutation", "test_delete_merged_adapter_only_rejects_the_merged_one",
}


def _replace(matrix: list, rows: list) -> None:
    matrix[:] = rows  # in place: the parametrize marks of PEFT's test methods hold this very list


_replace(upstream.TEST_CASES, CUSTOM_CASES if FULL else [c for c in CUSTOM_CASES if c[0] in SUBSET_CASES])
_replace(upstream.MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES, MULTI_ADAPTER_CASES)
_replace(upstream.ALL_PEFT_CONFIG_CLASSES, [CuMAConfig])
_replace(upstream_decoders.PEFT_DECODER_MODELS_TO_TEST, DECODER_IDS if FULL else DECODER_IDS[:1])
_replace(upstream_decoders.ALL_CONFIGS, DECODER_CONFIGS if FULL else DECODER_CONFIGS[1:])

# tests that build their own inputs (generate(input_ids) alone, inputs_embeds alone): a profile-routed adapter rightly
# refuses a call without profile_embeds (tested in tests/test_cuma_peft.py), so they run for the semantic-only config
NEEDS_NO_PROFILE = {"test_generate_pos_args", "test_generate_half_prec", "test_passing_input_embeds_works"}


def _merging_not_supported(original):
    """PEFT's own hook for methods that cannot merge (it skips Lily and ShadowPEFT); for CuMA the merge part of a
    test is an expected failure, reached after the test's forward checks ran."""

    @functools.wraps(original)
    def check(model_id, config_cls, config_kwargs):
        if issubclass(config_cls, CuMAConfig):
            pytest.xfail("CuMA adapters cannot be merged: a routed mixture has no single weight update")
        return original(model_id, config_cls, config_kwargs)

    return check


for _module in (upstream, upstream_decoders, sys.modules["peft_upstream_tests.testing_common"]):
    if hasattr(_module, "_skip_if_merging_not_supported"):
        _module._skip_if_merging_not_supported = _merging_not_supported(_module._skip_if_merging_not_supported)


# ------------------------------------------------------------------------------------------------ models and inputs


def _has_cuma(model: torch.nn.Module) -> bool:
    return any(hasattr(m, "_routing_scope") for m in model.modules())


def _drop_profile(module, args, kwargs):
    """A model without the adapter ignores the profile (PEFT's reference outputs come from the bare model); one with
    CuMA layers injected directly (``inject_adapter_in_model``) takes it itself."""
    if "profile_embeds" in kwargs and not _has_cuma(module):
        kwargs = {k: v for k, v in kwargs.items() if k != "profile_embeds"}
        return args, kwargs
    return None


def _accepting_profile(model: torch.nn.Module) -> torch.nn.Module:
    model.register_forward_pre_hook(_drop_profile, with_kwargs=True)
    if hasattr(model, "generate"):
        model.generate = functools.partial(_generate_ignoring_profile, model, model.generate)
    return model


def _generate_ignoring_profile(model, generate, *args, **kwargs):
    if "profile_embeds" in kwargs and not _has_cuma(model):
        kwargs.pop("profile_embeds")
    return generate(*args, **kwargs)


def _profiles(rows: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(rows)
    return torch.nn.functional.normalize(torch.randn(rows, PROFILE_DIM, generator=g), dim=-1).to(device)


class CustomModels:
    """PEFT's custom models (``MockTransformerWrapper``), taking a profile they ignore."""

    @classmethod
    def from_pretrained(cls, model_id, dtype=None, **kwargs):
        return _accepting_profile(upstream.MockTransformerWrapper.from_pretrained(model_id, dtype=dtype))


class TinyDecoders:
    """Tiny decoders built in code in place of PEFT's hub models (same seed, same model for the same id)."""

    @classmethod
    def from_pretrained(cls, model_id, dtype=None, device_map=None, **kwargs):
        from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

        common = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2)
        if model_id == "cuma-tiny-llama":
            config = LlamaConfig(**common)
        elif model_id == "cuma-tiny-qwen3":
            config = Qwen3Config(head_dim=4, **common)
        else:
            raise ValueError(f"no tiny decoder named {model_id!r}")
        config._name_or_path = model_id  # what a hub model records (PEFT checks adapter_config.json against it)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        if dtype is not None and dtype != "auto":
            model = model.to(dtype)
        if device_map not in (None, "cpu", "auto") and not isinstance(device_map, dict):
            model = model.to(device_map)
        return _accepting_profile(model.eval())


def _with_profile(inputs: dict) -> dict:
    first = next(v for v in inputs.values() if isinstance(v, torch.Tensor))
    return {**inputs, "profile_embeds": _profiles(first.shape[0], first.device)}


def _without_profile_only(fn):
    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        if kwargs.get("config_kwargs", {}).get("profile_dim", 0):
            pytest.skip("the test calls the model without profile_embeds, which a profile-routed adapter refuses")
        return fn(self, *args, **kwargs)

    return wrapper


def _direct_injection_refused_with_projection(fn):
    """PEFT reads "shared state" from a class flag of the tuner (``uses_shared_state``); CuMA has it only with a
    profile projection (a per-adapter option), so it refuses ``inject_adapter_in_model`` for that case with PEFT's
    message. The test's direct-injection branch then fails where it expects the class flag: an expected failure,
    once the refusal itself is checked."""

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        if kwargs.get("config_kwargs", {}).get("profile_proj_layers", 0):
            with pytest.raises(ValueError, match="shared state.*get_peft_model"):
                fn(self, *args, **kwargs)
            pytest.xfail("CuMA refuses direct injection with a profile projection per adapter, PEFT's test expects "
                         "a tuner-class flag")
        return fn(self, *args, **kwargs)

    return wrapper


def _expected_failure(fn, reason: str):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    return pytest.mark.xfail(raises=ValueError, strict=True, reason=reason)(wrapper)


_MATRICES = (upstream.TEST_CASES, upstream.MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES, upstream.ALL_PEFT_CONFIG_CLASSES,
             upstream_decoders.ALL_CONFIGS)


def _runs_the_matrix(fn) -> bool:
    """Whether a test method of PEFT's is parametrised over one of the replaced matrices (a generic tuner test);
    the others test one PEFT method (LoRA's DoRA merges, IA3's convolutions, ...) and do not concern CuMA."""
    for mark in getattr(fn, "pytestmark", []):
        if mark.name == "parametrize" and any(arg is m for arg in mark.args for m in _MATRICES):
            return True
    return False


def _cuma_tests(cls: type, base: type) -> type:
    """PEFT's generic test methods of ``base`` for CuMA: the merge tests as expected failures, the other methods'
    own tests left out."""
    for name in dir(base):
        if not name.startswith("test_"):
            continue
        fn = getattr(base, name)
        if not _runs_the_matrix(fn):
            setattr(cls, name, None)  # not collected
        elif name in MERGE_TESTS:
            setattr(cls, name, _expected_failure(fn, "CuMA adapters cannot be merged"))
        elif name in NEEDS_NO_PROFILE:
            setattr(cls, name, _without_profile_only(fn))
        elif name == "test_load_model_low_cpu_mem_usage":
            setattr(cls, name, _direct_injection_refused_with_projection(fn))
    return cls


# ------------------------------------------------------------------------------------------------ PEFT's test classes


@functools.partial(_cuma_tests, base=upstream.TestPeftCustomModel)
class TestCuMACustomModels(upstream.TestPeftCustomModel):
    transformers_class = CustomModels

    def prepare_inputs_for_testing(self):
        return _with_profile(super().prepare_inputs_for_testing())


@functools.partial(_cuma_tests, base=upstream.TestMultipleActiveAdapters)
class TestCuMAMultipleActiveAdapters(upstream.TestMultipleActiveAdapters):
    def prepare_inputs_for_testing(self):
        return _with_profile(super().prepare_inputs_for_testing())

    def resolve_model_cls(self, tuner_method):
        return _accepting_profile(super().resolve_model_cls(tuner_method))


@functools.partial(_cuma_tests, base=upstream.TestPeftFsdpStateDict)
class TestCuMAFsdpStateDict(upstream.TestPeftFsdpStateDict):
    transformers_class = CustomModels

    def prepare_inputs_for_testing(self):
        return _with_profile(super().prepare_inputs_for_testing())


@functools.partial(_cuma_tests, base=upstream_decoders.TestDecoderModels)
class TestCuMADecoderModels(upstream_decoders.TestDecoderModels):
    transformers_class = TinyDecoders

    def prepare_inputs_for_testing(self):
        return _with_profile(super().prepare_inputs_for_testing())
