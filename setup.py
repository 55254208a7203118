"""Packaging for the distillation pipeline.

Dependencies are ranges, not pins, so that the locally built CPU torch 2.13.0 satisfies them and
pip never pulls a CUDA build on a development machine; the Makefile installs the pinned torch first.
"""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "torch>=2.4,<3",
    "deepspeed>=0.16,<0.20",
    "megatron-core>=0.16,<0.17",
    "webdataset>=0.2.100,<2",
    "tensorboard>=2.16,<3",
    "tokenizers>=0.20,<1",
    "transformers>=4.45,<6",
    "safetensors>=0.4,<1",
    "huggingface_hub>=0.24,<3",
    "numpy>=1.26,<3",
    "pyyaml>=6,<7",
    "tqdm>=4.66,<5",
    "zstandard>=0.22,<1",
    "pyarrow>=15,<30",
    "matplotlib>=3.7,<4",
]

EXTRAS = {
    "gpu": ["flash-attn>=2.6,<3"],
    "dev": ["pytest>=8,<10", "pytest-timeout>=2.3,<3", "pytest-xdist>=3.6,<4"],
}

setup(
    name="distill-pipeline",
    version="0.1.0",
    description="Knowledge distillation during LLM pretraining with f-divergences over vocab-parallel logits",
    python_requires=">=3.10",  # 3.10 is kept working by tests/unit/test_python_compat.py; 3.12+ untested
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Operating System :: POSIX :: Linux",
    ],
    packages=find_packages(include=["pipeline", "pipeline.*", "tokenization", "tokenization.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["distill=pipeline.cli:main"]},
)
