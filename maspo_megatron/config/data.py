"""Prompt data and rewards."""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional

from maspo_megatron.config.fields import option


@dataclasses.dataclass
class SyntheticTaskConfig:
    num_train: int = option(2000, ge=1)
    num_val: int = option(200, ge=1)
    max_operand: int = option(9, ge=1)
    num_operands: int = option(2, ge=2)
    min_operand: int = option(0, ge=0, help="smallest operand value")
    operations: List[str] = option(factory=lambda: ["+"], help="subset of '+', '-', '*'; a '-' never yields a negative")
    templates: str = option("symbolic", choices=("symbolic", "words", "mixed"), help="phrasing: '3+4=', 'What is 3 plus 4?', or both")
    answer_format: str = option(
        "boxed", choices=("boxed", "hash", "plain"),
        help="what the model should answer: \\boxed{7}, #### 7, or 7 alone (plain: set reward.answer_pattern, e.g. '^\\s*(\\d+)\\s*$')",
    )
    reference_noise: float = option(
        0.0, ge=0.0, lt=1.0,
        help="fraction of TRAIN problems whose warm-up reference has one answer digit replaced by another "
             "(imperfect demonstrations: the warmed-up policy keeps a thin tail on wrong digits); rewards "
             "and held-out references are never noisy",
    )

    def validate(self) -> None:
        bad = [op for op in self.operations if op not in ("+", "-", "*")]
        if bad or not self.operations:
            raise ValueError(f"operations: {self.operations!r} must be a non-empty subset of ['+', '-', '*']")
        if self.min_operand > self.max_operand:
            raise ValueError(f"min_operand: {self.min_operand} must be <= max_operand ({self.max_operand})")


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
    dynamic_sampling: bool = option(False, help="DAPO: drop groups whose rewards are all equal and refill")
    max_extra_rounds: int = option(3, ge=0, help="dynamic sampling: extra generation rounds to refill dropped groups")
    oversample_factor: float = option(1.0, ge=1.0, help="dynamic sampling: prompts generated per needed group in a refill round")
    synthetic: SyntheticTaskConfig = option(factory=SyntheticTaskConfig)


@dataclasses.dataclass
class RewardConfig:
    name: str = option("math", help="registry name or 'module:function'")
    timeout_s: float = option(5.0, gt=0)
    memory_limit_mb: int = option(2048, ge=64)
    num_workers: Optional[int] = option(None, ge=0, help="default: number of cores; 0 = score in the calling process (no isolation)")
    start_method: str = option("forkserver", choices=("forkserver", "spawn", "fork"), help="how worker processes start")
    correct: float = 1.0
    wrong: float = 0.0
    unparsable: float = 0.0
    timed_out: float = 0.0
    error: float = option(0.0, help="reward when the reward function raises or its worker dies")
    answer_pattern: Optional[str] = option(None, help="math: extra regex whose group 1 is the final answer")
    max_answer_chars: int = option(512, ge=1, help="math: longer extracted answers count as unparsable")
    options: Dict[str, Any] = option(factory=dict, help="keyword options passed to the reward function")

    def validate(self) -> None:
        if self.answer_pattern is not None:
            import re

            try:
                re.compile(self.answer_pattern)
            except re.error as exc:
                raise ValueError(f"answer_pattern: invalid regex {self.answer_pattern!r} ({exc})") from None
