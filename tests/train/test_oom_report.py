"""A training worker killed by SIGKILL (what the out-of-memory killer sends) is reported by
rank, with the knobs that lower memory, instead of torchrun's bare "exitcode -9"."""
import os

import pytest
from test_train import tiny  # noqa: F401 (the tiny trainer fixture)

from oreo_fast.pipeline.iterate import describe_failure, launch_training

TORCHRUN_REPORT = """torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
Root Cause (first observed failure):
[0]:
  time      : 2026-11-29_19:40:00
  host      : node
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 4242)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 4242
"""


def test_sigkill_report_names_the_rank_and_the_knobs():
    line = describe_failure(1, TORCHRUN_REPORT, ["micro_batch_size=4"])
    assert "rank 1 killed by SIGKILL" in line
    assert "micro_batch_size (now 4)" in line and "gradient_checkpointing=true" in line
    assert "the training process" in describe_failure(-9, "", [])
    assert describe_failure(1, "Traceback: ValueError", []) == "training failed (exit 1)"


@pytest.mark.slow
def test_a_killed_torchrun_worker_is_reported_by_rank(tiny, tmp_path, monkeypatch):  # noqa: F811
    root, _, _ = tiny
    monkeypatch.setenv("OREO_FAULT_KILL_AT_STEP", "1:1")
    overrides = [f"policy={root / 'policy'}", f"reference={root / 'ref'}",
                 f"train_file={root / 'traj.jsonl'}", f"output_dir={tmp_path / 'run'}",
                 "global_batch_size=8", "micro_batch_size=3", "progress=false", "epochs=2"]
    with pytest.raises(RuntimeError) as failure:
        launch_training(overrides, 2, tmp_path / "train.log", threads=1)
    first_line = str(failure.value).splitlines()[0]
    assert "rank 1 killed by SIGKILL" in first_line, first_line
    assert "micro_batch_size (now 3)" in first_line
    assert os.environ["OREO_FAULT_KILL_AT_STEP"] == "1:1"
