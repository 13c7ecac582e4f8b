"""Typed configuration of a conditional SFT run; `configs/*.yaml` map onto these dataclasses (see cuma.config)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class ModelSection:
    name_or_path: str = "smollm2-135m"  # hub id, local folder, or the embedded default
    dtype: str = "float32"  # float32 | bfloat16 | float16 (the frozen base's; trainable adapter weights stay fp32)
    # None: transformers' default (sdpa); "eager" is faster for the demo's short prompts on the CPU, above all in bf16
    attn_implementation: Optional[str] = None


ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


def attention_kwargs(model: ModelSection) -> dict[str, Any]:
    """``from_pretrained`` keyword for ``model.attn_implementation`` (none for transformers' default)."""
    if model.attn_implementation is None:
        return {}
    if model.attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"model.attn_implementation: expected one of {list(ATTN_IMPLEMENTATIONS)} or null, "
                         f"got {model.attn_implementation!r}")
    return {"attn_implementation": model.attn_implementation}


@dataclass
class MethodSection:
    name: str = "cuma"  # any name of cuma.methods.list_methods()
    options: dict[str, Any] = field(default_factory=dict)  # method options, validated by the registry
    profile_in_prompt: Optional[bool] = None  # None: the method's default (True for the CuMA family and persona)


@dataclass
class DataSection:
    path: str = "runs/data/synth"  # a prepared-data directory (`cuma data wvb` / `cuma data synth --prepare`)
    train_split: str = "train"
    eval_split: Optional[str] = None  # e.g. "valid": evaluation loss during training
    max_length: int = 512
    limit: Optional[int] = None  # use only the first N training records (smoke runs)
    encoder: Optional[str] = None  # encode profiles on the fly with this encoder instead of the precomputed table
    format: str = "auto"  # wvb (choice records) | conversations (sft_*.jsonl of a preference folder) | auto: by keys


@dataclass
class TrainSection:
    output_dir: str = "runs/sft"
    seed: int = 0
    learning_rate: float = 2e-5
    router_learning_rate: Optional[float] = None  # separate lr for routers / profile projection (None: same)
    # LoRA+ (Hayou et al., 2024): the adapters' B matrices (lora_B, cuma_B, hydralora_B, mixlora_*_B) learn at this
    # multiple of learning_rate; None: the same lr as A
    loraplus_lr_ratio: Optional[float] = None
    num_train_epochs: float = 3.0
    max_steps: int = -1
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    lr_scheduler_type: str = "constant"
    warmup_steps: float = 0.0  # >= 1: steps; < 1: fraction of the total steps
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    bf16: bool = False
    fp16: bool = False
    logging_steps: int = 10
    save_strategy: str = "steps"  # steps | epoch | no
    save_steps: int = 500
    save_total_limit: Optional[int] = 2
    eval_steps: Optional[int] = None
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    # "latest" (or "true"): the newest complete checkpoint-N in output_dir (incomplete ones are named and skipped; none
    # yet: a fresh start); a checkpoint folder; None: a fresh start, refused when output_dir already holds checkpoints
    resume_from_checkpoint: Optional[str] = None
    deepspeed: Optional[str] = None  # a DeepSpeed JSON config (launch with accelerate)
    dataloader_num_workers: int = 0
    disable_tqdm: bool = False
    # > 1: each batch runs as this many micro-batches of similar length (rows sorted by length, each padded only to
    # its own longest row) before the optimizer step: the same rows and task-loss gradient per step, less padding
    split_by_length: int = 1
    # sft: one example per respondent, token loss on the answer; distribution: one example per opinion cell
    # (`cuma data opinions`), cross-entropy of the option-letter softmax against the cell's target (train/distribution.py)
    objective: str = "sft"
    cell_weighting: str = "none"  # distribution only: none (every cell once) | weight (by the cell's weight)
    cdf_loss_weight: float = 0.0  # distribution only: weight of the normalised-W1 (CDF) term on ordinal questions


@dataclass
class SFTRunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    method: MethodSection = field(default_factory=MethodSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)


# ---------------------------------------------------------------------------------------------------------------
# preference stages (`cuma train dpo|grpo`): start from a `cuma train sft` output; the reference is that SFT policy


@dataclass
class InitSection:
    sft_path: Optional[str] = None  # a `cuma train sft` output; None: build method.name fresh (reference = base model)


@dataclass
class PreferenceDataSection:
    path: str = "runs/data/prism"  # a prepared preference folder (`cuma data prism|ca`)
    train_split: str = "train"
    eval_split: Optional[str] = None
    limit: Optional[int] = None  # use only the first N training records (smoke runs)
    encoder: Optional[str] = None  # encode profiles on the fly with this encoder instead of the precomputed table


@dataclass
class PreferenceTrainSection(TrainSection):
    output_dir: str = "runs/dpo"
    learning_rate: float = 5e-6
    num_train_epochs: float = 1.0
    per_device_train_batch_size: int = 4
    per_device_eval_batch_size: int = 4


@dataclass
class DPOSection:
    beta: float = 0.1  # paper: 0.1
    loss_type: str = "sigmoid"  # any of TRL's DPO loss types
    max_length: Optional[int] = 1024  # prompt + completion tokens
    truncation_mode: str = "keep_start"  # TRL 1.16 supports keep_start only for text
    label_smoothing: float = 0.0
    disable_dropout: bool = True


@dataclass
class DPORunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    method: MethodSection = field(default_factory=MethodSection)  # used when init.sft_path is None
    init: InitSection = field(default_factory=InitSection)
    data: PreferenceDataSection = field(default_factory=PreferenceDataSection)
    dpo: DPOSection = field(default_factory=DPOSection)
    train: PreferenceTrainSection = field(default_factory=PreferenceTrainSection)


@dataclass
class GRPOSection:
    beta: float = 0.04  # KL coefficient against the reference (the SFT policy); 0: no reference pass
    num_generations: int = 4  # completions per prompt (the group)
    max_completion_length: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    loss_type: Optional[str] = None  # None: TRL's default
    num_iterations: int = 1
    steps_per_generation: Optional[int] = None
    scale_rewards: Optional[str] = None  # None: TRL's default
    disable_dropout: bool = True


@dataclass
class RewardSection:
    judge: str = "transformers"  # http | transformers (cuma.evaluate.judges); ignored when model is set
    judge_options: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the judge class
    model: Optional[str] = None  # a reward-model path / hub id instead of the judge (TRL loads it)


@dataclass
class GRPOTrainSection(PreferenceTrainSection):
    output_dir: str = "runs/grpo"
    learning_rate: float = 1e-6


@dataclass
class GRPORunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    method: MethodSection = field(default_factory=MethodSection)  # used when init.sft_path is None
    init: InitSection = field(default_factory=InitSection)
    data: PreferenceDataSection = field(default_factory=PreferenceDataSection)
    grpo: GRPOSection = field(default_factory=GRPOSection)
    reward: RewardSection = field(default_factory=RewardSection)
    train: GRPOTrainSection = field(default_factory=GRPOTrainSection)
