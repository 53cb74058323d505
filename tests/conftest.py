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


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run far faster on one thread, above all when the cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA: skipped, with the reason, on a machine without it."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (make gpu-check runs these)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
