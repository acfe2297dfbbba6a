"""Typed configuration: dataclasses per concern, YAML + dotted overrides, validated at load time.

    from maspo_megatron.config import load_config
    cfg = load_config("examples/cpu_tiny.yaml", ["algorithm.maspo.alpha=0.5"])
"""
from maspo_megatron.config.algorithm import AlgorithmConfig
from maspo_megatron.config.data import DataConfig, RewardConfig, SyntheticTaskConfig
from maspo_megatron.config.fields import option
from maspo_megatron.config.loader import ConfigError, apply_override, from_dict, load_config, read_yaml, to_dict
from maspo_megatron.config.model import ModelConfig
from maspo_megatron.config.parallel import ParallelConfig
from maspo_megatron.config.rollout import RolloutConfig, SGLangConfig, WeightSyncConfig
from maspo_megatron.config.schema import Config
from maspo_megatron.config.trainer import TrainerConfig

__all__ = [
    "AlgorithmConfig", "Config", "ConfigError", "DataConfig", "ModelConfig", "ParallelConfig",
    "RewardConfig", "RolloutConfig", "SGLangConfig", "SyntheticTaskConfig", "TrainerConfig", "WeightSyncConfig",
    "apply_override", "from_dict", "load_config", "option", "read_yaml", "to_dict",
]
