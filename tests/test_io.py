"""Atomic outputs get the permissions the process's umask gives (not mkstemp's 0600 and
mkdtemp's 0700), so shared runs and results stay readable by others when the umask says so."""
import os
import stat

import pytest

from oreo_fast.io import atomic_dir, atomic_open, process_umask, write_json


@pytest.fixture
def umask():
    """Set the process umask for one test, restoring the caller's after."""
    before = os.umask(0o022)
    yield os.umask
    os.umask(before)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask,file_mode,dir_mode", [(0o022, 0o644, 0o755),
                                                     (0o077, 0o600, 0o700),
                                                     (0o002, 0o664, 0o775)])
def test_atomic_outputs_follow_the_umask(tmp_path, umask, mask, file_mode, dir_mode):
    umask(mask)
    assert process_umask() == mask
    write_json(tmp_path / "report.json", {"ok": True})
    with atomic_open(tmp_path / "weights.bin", "wb") as f:
        f.write(b"\0")
    with atomic_dir(tmp_path / "policy") as tmp:
        (tmp / "config.json").write_text("{}")
    assert _mode(tmp_path / "report.json") == file_mode
    assert _mode(tmp_path / "weights.bin") == file_mode
    assert _mode(tmp_path / "policy") == dir_mode
    assert _mode(tmp_path / "policy" / "config.json") == file_mode
    # replacing an existing output gives the same modes
    write_json(tmp_path / "report.json", {"ok": False})
    assert _mode(tmp_path / "report.json") == file_mode
