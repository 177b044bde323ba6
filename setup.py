"""Packaging for mm_megatron: 3D-parallel multimodal (LLaVA-style) pretraining on megatron-core.

Install (see README.md): ``make install`` creates ``.venv/`` with a Python >= 3.12 interpreter and
installs this package in editable mode with the ``dev`` extra.
"""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="mm_megatron",
    version="0.1.0",
    description="3D-parallel multimodal (LLaVA-style) pretraining on NVIDIA megatron-core",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["mm_megatron", "mm_megatron.*"]),
    python_requires=">=3.12",
    install_requires=[
        "megatron-core==0.19.2",
        "torch>=2.6",
        "numpy",
        "pillow",
        "webdataset>=1.0",
        "tensorboard",
        "safetensors",
        "transformers>=4.46",
        "tokenizers",
        "einops",
        "psutil",  # megatron dist_checkpointing's writer needs it
        "pyyaml",
        "tqdm",
        "matplotlib",  # the bench sweep's plot
        "megatron-energon>=7.4,<8",  # second data backend (energon-prepared datasets)
    ],
    extras_require={
        # GPU only. Builds against the local CUDA toolkit.
        "te": ["transformer-engine[pytorch]>=2.20,<2.21"],
        "dev": ["pytest>=8", "pytest-timeout", "ruff==0.17.5"],
    },
    entry_points={"console_scripts": ["mm-megatron=mm_megatron.cli:main"]},
)
