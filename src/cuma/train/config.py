"""Typed configuration of a conditional SFT run; `configs/*.yaml` map onto these dataclasses (see cuma.config)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class ModelSection:
    name_or_path: str = "smollm2-135m"  # hub id, local folder, or the embedded default
    dtype: str = "float32"  # float32 | bfloat16 | float16


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


@dataclass
class TrainSection:
    output_dir: str = "runs/sft"
    seed: int = 0
    learning_rate: float = 2e-5
    router_learning_rate: Optional[float] = None  # separate lr for routers / profile projection (None: same)
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
    resume_from_checkpoint: Optional[str] = None  # a checkpoint dir, or "latest" for the newest in output_dir
    deepspeed: Optional[str] = None  # a DeepSpeed JSON config (launch with accelerate)
    dataloader_num_workers: int = 0
    disable_tqdm: bool = False


@dataclass
class SFTRunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    method: MethodSection = field(default_factory=MethodSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
