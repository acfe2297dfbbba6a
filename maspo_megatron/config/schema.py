"""The top-level `Config`: one section per concern."""
from __future__ import annotations

import dataclasses

from maspo_megatron.config.algorithm import AlgorithmConfig
from maspo_megatron.config.data import DataConfig, RewardConfig
from maspo_megatron.config.fields import option
from maspo_megatron.config.model import ModelConfig
from maspo_megatron.config.parallel import ParallelConfig
from maspo_megatron.config.rollout import RolloutConfig
from maspo_megatron.config.trainer import TrainerConfig


@dataclasses.dataclass
class Config:
    model: ModelConfig = option(factory=ModelConfig)
    parallel: ParallelConfig = option(factory=ParallelConfig)
    rollout: RolloutConfig = option(factory=RolloutConfig)
    algorithm: AlgorithmConfig = option(factory=AlgorithmConfig)
    data: DataConfig = option(factory=DataConfig)
    reward: RewardConfig = option(factory=RewardConfig)
    trainer: TrainerConfig = option(factory=TrainerConfig)

    def validate(self) -> None:
        if self.algorithm.aggregation == "seq-mean-token-sum-norm" and self.algorithm.norm_length is None:
            self.algorithm.norm_length = self.rollout.max_new_tokens
        synthetic = not self.data.train_files
        if synthetic and self.data.synthetic.answer_format == "plain" and self.reward.name == "math" and self.reward.answer_pattern is None:
            raise ValueError(
                "data.synthetic.answer_format: 'plain' answers carry no \\boxed{} or ####, so the math reward needs "
                "reward.answer_pattern (e.g. '^\\s*(\\d+)\\s*$'); without it every response scores unparsable"
            )
