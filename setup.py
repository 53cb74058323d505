"""Packaging for oreo_fast.

The Triton kernels live in the top-level ``kernels/`` folder of the repository but are
installed as ``oreo_fast.kernels``: a top-level module named ``kernels`` would shadow
Hugging Face's ``kernels`` package.
"""
from setuptools import find_packages, setup

setup(
    name="oreo_fast",
    version="0.1.0",
    description="Fast, faithful OREO (Offline REasoning Optimization) training with fused Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["oreo_fast", "oreo_fast.*"]) + ["oreo_fast.kernels"],
    package_dir={"oreo_fast.kernels": "kernels"},
    # torch is not pinned here: on CPU machines install the CPU wheel first
    # (`pip install torch==2.13.0`), otherwise pip resolves the multi-GB CUDA build.
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy",
        # >=4.56: from_pretrained(dtype=...), DynamicCache(config=...); tested with 5.24 (the
        # KV cache goes by its 5.24 name `cache` where the model takes it, else
        # `past_key_values`: oreo_fast.models.cache_arg). Raise the bound after testing a newer one.
        "transformers>=4.56,<5.25",
        "tokenizers>=0.20",
        "safetensors>=0.4",
        "tqdm",
        "math-verify>=0.7",
        "matplotlib",
    ],
    extras_require={
        "dev": [
            "pytest>=8",
            "pytest-benchmark>=4",
            "hypothesis>=6",
            "liger-kernel>=0.5",
            "datasets>=3",  # ~30 s more on `make setup` here; the datasets-input tests need it
            "peft>=0.13",  # the LoRA tests (train config `lora=`)
        ],
        # LoRA adapters on the policy and/or the value model (train config `lora=`)
        "lora": ["peft>=0.13"],
        "flash": ["flash-attn>=2.6"],
        # problems and trajectories from parquet / arrow / save_to_disk / cached hub datasets
        "datasets": ["datasets>=3", "pyarrow>=15"],
        # `oreo-fast sample --engine vllm` (CUDA only; vLLM pins its own torch build)
        "vllm": ["vllm>=0.8"],
    },
    entry_points={"console_scripts": ["oreo-fast = oreo_fast.cli:main"]},
)
