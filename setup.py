"""megatron-dapo: DAPO reinforcement learning for reasoning LLMs on megatron-core."""

import os

from setuptools import find_packages, setup

# CPU hosts (and CI) use the CPU build of torch 2.13.0. GPU hosts running SGLang 0.5.23 need the CUDA
# torch it pins: scripts/install_gpu.sh sets MEGATRON_DAPO_TORCH_VERSION=2.14.1 and pins it in build environments
# too (Transformer Engine compiles against whatever torch its build environment has). Everything else
# is pinned once for both: transformers/tokenizers at the versions SGLang 0.5.23 pins.
TORCH_VERSION = os.environ.get("MEGATRON_DAPO_TORCH_VERSION", "2.13.0")

setup(
    name="megatron-dapo",
    version="0.1.0",
    description="DAPO reinforcement learning for reasoning LLMs on megatron-core, with SGLang or transformers rollouts",
    packages=find_packages(include=["megatron_dapo", "megatron_dapo.*"]),
    python_requires=">=3.10",
    install_requires=[
        f"torch=={TORCH_VERSION}",
        "megatron-core==0.16.1",
        "transformers==5.19.0",  # = sglang 0.5.23's pin
        "tokenizers==0.23.2",  # = sglang 0.5.23's pin
        "safetensors==0.8.0",
        "datasets==5.2.0",
        "tensorboard==2.21.0",
        "math-verify==0.9.0",
        "PyYAML==6.0.3",
        "tqdm==4.70.1",
        "psutil==7.2.2",  # used by megatron-core's dist-checkpoint saving, not declared by it
        "numpy>=1.26",
        "matplotlib==3.11.2",  # report.png (Agg, no display needed)
        "scipy==1.17.1",  # the ablation figures' paired t intervals (examples/ablation/figures.py)
    ],
    extras_require={
        # GPU hosts only; never installed on CPU hosts (a half-installed TE breaks `import megatron.core`).
        # TE 2.11.0: the newest release in megatron-core 0.16.1's tested range (>=2.9,<2.12, its `dev` extra).
        "gpu": ["transformer-engine[pytorch]==2.11.0", "sglang==0.5.23"],
        "launch": ["nemo-run==0.11.1", "leptonai==0.27.3"],
        "wandb": ["wandb==0.31.0"],  # logging.wandb
        "dev": ["pytest==9.2.0", "wandb==0.31.0"],
    },
    entry_points={"console_scripts": ["megatron-dapo=megatron_dapo.cli:main"]},
)
