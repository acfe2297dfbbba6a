"""Built-in policy losses; importing this package registers them (one module per family)."""
from maspo_megatron.algorithms.losses import bapo, cispo, entropy_adv, gspo, maspo, ppo, sapo  # noqa: F401
