"""Triton kernels of oreo_fast, installed as ``oreo_fast.kernels``.

Importing this package never fails: without Triton, ``TRITON_AVAILABLE`` is false and the
kernel modules are simply not imported. Callers (``oreo_fast.ops``) dispatch on it.
"""
import torch

try:
    import triton  # noqa: F401

    TRITON_AVAILABLE = True
except ImportError:  # pragma: no cover - depends on the installation
    TRITON_AVAILABLE = False



def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The one precision rule of every implementation (kernels, PyTorch paths, the
    reference): float64 is computed in float64, everything else (bf16, fp16, fp32) in
    float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


__all__ = ["TRITON_AVAILABLE", "compute_dtype"]
