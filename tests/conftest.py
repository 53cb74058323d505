"""Test setup: without CUDA the Triton kernels run in the interpreter, which must be switched
on before triton decorates any kernel, hence here, before anything imports oreo_fast."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device():
    return DEVICE
