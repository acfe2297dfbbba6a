"""Launching training jobs: nemo-run recipes (LocalExecutor / SlurmExecutor), the per-rank entry,
and the memory planner behind `python -m maspo_megatron plan`. sbatch scripts live in slurm/."""
from maspo_megatron.launch.cluster import LaunchConfig

__all__ = ["LaunchConfig"]
