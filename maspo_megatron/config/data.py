"""Prompt data and rewards."""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional

from maspo_megatron.config.fields import option


@dataclasses.dataclass
class SyntheticTaskConfig:
    num_train: int = option(2000, ge=1)
    num_val: int = option(200, ge=1)
    max_operand: int = option(9, ge=1)
    num_operands: int = option(2, ge=2)


@dataclasses.dataclass
class DataConfig:
    train_files: List[str] = option(factory=list, help="jsonl/parquet prompt files; empty = synthetic task")
    val_files: Dict[str, str] = option(factory=dict, help="validation sets by name")
    format: str = option("auto", choices=("auto", "verl", "slime", "plain", "gsm8k", "math"))
    prompt_key: Optional[str] = None
    answer_key: Optional[str] = None
    chat_template: str = option("tokenizer", help="'tokenizer' (apply_chat_template), 'none', or a format string with {prompt}")
    max_prompt_tokens: int = option(512, ge=1)
    seed: int = option(0, ge=0)
    shuffle: bool = True
    synthetic: SyntheticTaskConfig = option(factory=SyntheticTaskConfig)


@dataclasses.dataclass
class RewardConfig:
    name: str = option("math", help="registry name or 'module:function'")
    timeout_s: float = option(5.0, gt=0)
    memory_limit_mb: int = option(2048, ge=64)
    num_workers: Optional[int] = option(None, ge=1, help="default: number of cores")
    correct: float = 1.0
    wrong: float = 0.0
    unparsable: float = 0.0
    timed_out: float = 0.0
