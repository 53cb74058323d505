"""Packaging promises: the kernels install as oreo_fast.kernels (never a top-level `kernels`,
which would shadow Hugging Face's package) and import without Triton."""
import importlib
import importlib.metadata
import sys


def test_only_top_level_package_is_oreo_fast():
    top_level = importlib.metadata.distribution("oreo_fast").read_text("top_level.txt")
    assert top_level.split() == ["oreo_fast"]


def test_kernels_live_under_oreo_fast():
    import oreo_fast.kernels.token_logprobs_kl as module

    assert module.__name__ == "oreo_fast.kernels.token_logprobs_kl"


def test_kernels_package_imports_without_triton(monkeypatch):
    import oreo_fast.kernels

    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    try:
        reloaded = importlib.reload(oreo_fast.kernels)
        assert reloaded.TRITON_AVAILABLE is False
    finally:
        monkeypatch.undo()
        importlib.reload(oreo_fast.kernels)
    assert oreo_fast.kernels.TRITON_AVAILABLE is True


def test_installed_transformers_is_in_the_supported_range():
    """The transformers this run imports lies within setup.py's pinned range, and is exactly
    ``OREO_EXPECT_TRANSFORMERS`` when set (`make test` sets it for its second pass, over the
    lowest supported version laid over .venv), so that pass cannot silently test the newest."""
    import os
    import re
    from pathlib import Path

    import transformers
    from packaging.version import Version

    setup = (Path(__file__).resolve().parents[1] / "setup.py").read_text()
    low, high = re.search(r'"transformers>=([\d.]+),<([\d.]+)"', setup).groups()
    installed = Version(transformers.__version__)
    assert Version(low) <= installed < Version(high), (transformers.__version__, low, high)
    expected = os.environ.get("OREO_EXPECT_TRANSFORMERS")
    if expected:
        assert installed == Version(expected)
        assert installed.major == Version(low).major and installed.minor == Version(low).minor
