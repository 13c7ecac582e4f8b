"""The demo's settings: :class:`DemoConfig` (population, budget, evaluation) and the per-method options it trains.

Every option says what it does; the evidence behind the defaults (valid-split comparisons, timings) is in
``docs/demo.md`` and ``docs/notes/demo-investigation.md``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

__all__ = [
    "DEMO_PROFILE_FIELDS",
    "DEMO_ZONES",
    "METHOD_COLORS",
    "METHOD_LABELS",
    "DemoConfig",
    "device",
    "has_routers",
    "method_options",
]

# how the report and the figures name and colour each method
METHOD_LABELS = {
    "persona": "untrained + persona prompt",
    "lora": "LoRA",
    "cuma-semantic": "semantic-only CuMA",
    "cuma": "CuMA",
}
METHOD_COLORS = {"persona": "#999999", "lora": "#4c72b0", "cuma-semantic": "#dd8452", "cuma": "#55a868"}

# the demo's population: five Inglehart-Welzel zones that a sentence encoder tells apart, four countries each
DEMO_ZONES = ("Protestant Europe", "Orthodox Europe", "Confucian", "African-Islamic", "Latin America")
DEMO_PROFILE_FIELDS = ("B_COUNTRY", "X003R", "Q260", "Q289")  # country, age group, gender, religion



@dataclass
class DemoConfig:
    """One `cuma demo` run. ``cuma demo --help`` sets the commonest of these from the command line."""

    out: str = "report"  # report folder: report.md, figures, results.json
    work: str = "runs/demo"  # data, adapters, predictions and run records
    seed: int = 0  # seed of the population, the held-out countries, the split and training
    quick: bool = False  # smoke version (quick_version): tiny data, 3 steps; its numbers are noise
    # --- synthetic population (cuma.data.synthetic.SynthConfig)
    participants: int = 2000
    questions: int = 8
    modes: int = 5  # latent cultural modes (one per zone)
    zones: tuple = DEMO_ZONES
    countries: int = 20  # real countries, spread over the zones
    country_set: str = "zones"  # real countries of the zones ("zones") or invented names
    # how strongly a country's participants follow their country's dominant mode, the width of each mode's answer
    # distribution and the share of uniform noise: together they set how far the oracle is above mean collapse
    country_strength: float = 4.0
    answer_width: float = 0.7
    answer_noise: float = 0.04
    mode_layout: str = "random"  # how modes are assigned to zones
    profile_fields: tuple = DEMO_PROFILE_FIELDS
    held_out_per_zone: int = 1  # whole countries of every zone held out of training (the zero-shot test)
    # --- pairs (participant, question): test = seen-country pairs + held-out-country pairs
    train_pairs: int = 960
    test_pairs: int = 100  # seen-country test pairs
    held_out_test_pairs: int = 100  # held-out-country test pairs (zero-shot)
    valid_pairs: int = 24  # seen-country valid pairs scored during training (the learning curves)
    held_out_valid_pairs: int = 8  # held-out-country valid pairs of the learning curves
    # --- training: the same budget for every method
    methods: list[str] = field(default_factory=lambda: ["lora", "cuma-semantic", "cuma"])
    steps: int = 50  # optimizer steps per method
    batch_size: int = 8
    learning_rate: float = 2e-3
    method_learning_rates: dict = field(default_factory=lambda: {"lora": 1e-3})  # per-method overrides
    lr_scheduler: str = "linear"  # constant | linear (decays to 0 over the steps) | cosine
    router_learning_rate: Optional[float] = 6e-3  # the routers' lr (methods with routers only); None: the method's lr
    loraplus_lr_ratio: Optional[float] = None  # LoRA+: B matrices at this multiple of the lr; None: off
    conditioning: str = "fast"  # CuMA's router preset (CuMAConfig.conditioning): "fast" or "paper" (the paper's raw concat)
    curve_points: int = 2  # valid evaluations during training (the learning-curve figure); 0: none
    eval_batch_size: int = 16  # prompts per evaluation forward
    # every training batch runs as this many micro-batches of similar length, each padded only to its own longest
    # row: the same rows and task-loss gradient per step, fewer padded tokens; 1: whole batches
    split_by_length: int = 2
    # the frozen base's precision for every method (adapter weights stay float32): float32, bfloat16, or "auto"
    # (bfloat16 where the CPU / GPU multiplies it natively); float32 keeps the budget on CPUs without bf16
    dtype: str = "float32"
    attn_implementation: Optional[str] = None  # transformers' attention ("eager", "sdpa", ...); None: its default

    def quick_version(self) -> "DemoConfig":
        """The smoke version: the same recipe on tiny data (about 2 minutes on 2 cores)."""
        small = dict(participants=400, questions=4, countries=10, train_pairs=24, test_pairs=16, held_out_test_pairs=8,
                     valid_pairs=8, held_out_valid_pairs=4, steps=3, batch_size=4, curve_points=1)
        return DemoConfig(**{**asdict(self), **small, "quick": True})

    def synth_config(self):
        """The population's :class:`~cuma.data.synthetic.SynthConfig`."""
        from ..data.synthetic import SynthConfig

        return SynthConfig(participants=self.participants, questions=self.questions, modes=self.modes,
                           countries=self.countries, country_set=self.country_set, zones=tuple(self.zones),
                           profile_fields=tuple(self.profile_fields), country_strength=self.country_strength,
                           mode_layout=self.mode_layout if self.country_set == "zones" else "random",
                           answer_width=self.answer_width, answer_noise=self.answer_noise, seed=self.seed)

    def learning_rate_of(self, method: str) -> float:
        return self.method_learning_rates.get(method, self.learning_rate)


def device():
    """Where the demo runs: the trainer picks a GPU by itself, evaluation follows it."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def has_routers(method: str) -> bool:
    """Whether the method's layers route (the mixtures of experts: both CuMA variants, HydraLoRA, MixLoRA)."""
    from .. import methods

    return methods.get_spec(method).family in ("cuma", "mixture")


def method_options(method: str, conditioning: str = "fast") -> dict:
    """The options the demo trains ``method`` with: r=8 (alpha 16) for every method; the mixtures add 8 experts,
    top-2, router hidden 256 and the router preset ``conditioning`` (:class:`cuma.CuMAConfig`; the preset itself leaves
    out what a variant has no input for: semantic-only CuMA reads no profile). Options a method does not have are left
    out."""
    from .. import methods

    if method == "lora":
        return {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0}
    options = {"r": 8, "lora_alpha": 16, "num_experts": 8, "top_k": 2, "router_hidden": 256, "conditioning": conditioning}
    if conditioning not in ("fast", "paper"):
        raise ValueError(f"--conditioning must be 'fast' or 'paper', got {conditioning!r}")
    accepted = methods.get_spec(method).options
    return {k: v for k, v in options.items() if k in accepted}
