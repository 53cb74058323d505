"""HSDP (issue 16): a 2-D (dp_replicate x dp_shard) mesh, 4 gloo processes with the tiny
model: 2 x 2 trains like 1 x 4 (FSDP over all) and 4 x 1 (pure replication), and its sharded
checkpoint and export work."""
import json
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp

from oreo_fast.models import ValueModel, load_policy
from processes import run_process_group
from test_reliability import _env
from test_train import _free_port, tiny  # noqa: F401


@pytest.mark.slow
def test_hsdp_2x2_equals_1x4_and_4x1(tiny, tmp_path):  # noqa: F811
    root, _, _ = tiny
    args = dict(policy=root / "policy", reference=root / "ref", train_file=root / "traj.jsonl",
                global_batch_size=8, micro_batch_size=2, policy_lr=1e-3, value_lr=1e-3,
                beta=0.1, kl_coef=0.05, progress="false", epochs=1, threads=1, save_every=2)
    runs = {}
    for replicate in (2, 1, 4):
        out = tmp_path / f"r{replicate}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=4",
               f"--master_port={_free_port()}", "-m", "oreo_fast.train",
               *[f"{k}={v}" for k, v in args.items()], f"output_dir={out}",
               f"dp_replicate={replicate}"]
        proc = run_process_group(cmd, env=_env(), timeout=400)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert json.loads((out / "checkpoints" / "step-2" / "manifest.json").read_text())[
            "world_size"] == 4
        # the shards on disk show the mesh: a weight is cut into 4 / replicate chunks
        reader = dcp.FileSystemReader(str(out / "checkpoints" / "step-2"))
        chunks = reader.read_metadata().state_dict_metadata[
            "policy.model.model.layers.0.mlp.up_proj.weight"].chunks
        assert len(chunks) == 4 // replicate, (replicate, chunks)
        runs[replicate] = ([json.loads(line)["loss"] for line in open(out / "metrics.jsonl")],
                           load_policy(out / "policy").state_dict(),
                           ValueModel.from_pretrained(out / "value").state_dict())
    start = load_policy(root / "policy").state_dict()
    assert any(not torch.equal(start[k], v) for k, v in runs[2][1].items())  # it trained
    for other in (1, 4):
        assert runs[2][0] == pytest.approx(runs[other][0], rel=1e-5)
        for a, b in zip(runs[2][1:], runs[other][1:]):
            for k in a:
                torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_a_replicate_count_that_does_not_divide_the_processes_is_a_config_error():
    from oreo_fast.errors import ConfigError
    from oreo_fast.train.parallelize import data_parallel_mesh

    with pytest.raises(ConfigError, match="dp_replicate: 2 does not divide the 3 processes"):
        data_parallel_mesh(torch.device("cpu"), 3, 2)
    assert data_parallel_mesh(torch.device("cpu"), 3, 1) is None
