"""maspo_megatron: MASPO reinforcement learning with verifiable rewards on Megatron-Core."""

__version__ = "0.1.0"
