"""maspo_megatron."""
