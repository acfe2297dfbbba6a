"""Built-in policy losses; importing this package registers them (one module per family)."""
from maspo_megatron.algorithms.losses import gspo, maspo, ppo, sapo  # noqa: F401
