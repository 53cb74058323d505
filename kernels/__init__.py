"""Triton kernels of oreo_fast, installed as ``oreo_fast.kernels``.

Importing this package never fails: without Triton, ``TRITON_AVAILABLE`` is false and the
kernel modules are simply not imported. Callers (``oreo_fast.ops``) dispatch on it.
"""
try:
    import triton  # noqa: F401

    TRITON_AVAILABLE = True
except ImportError:  # pragma: no cover - depends on the installation
    TRITON_AVAILABLE = False

__all__ = ["TRITON_AVAILABLE"]
