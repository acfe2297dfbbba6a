"""The CPU edge: what lets Megatron-Core run on gloo where there is no CUDA (tests, laptops).

Imported only by `parallel/device.py` when the process has no CUDA device; nothing in trainer/,
algorithms/ or the model code knows about it.
"""
from maspo_megatron.parallel.cpu.shim import cpu_shim_enabled, enable_cpu_shim

__all__ = ["cpu_shim_enabled", "enable_cpu_shim"]
