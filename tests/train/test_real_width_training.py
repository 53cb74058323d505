"""One OREO training step under torchrun, 2 processes against 1, on models at the widths of
real checkpoints (tests/real_widths.py), one decoder layer each: sharding, the loss and the
saved outputs with GQA, tied and untied heads and a padded vocabulary."""
import json
import socket
import sys

import pytest
import torch
from processes import run_process_group
from real_widths import REAL_CONFIGS, real_policy, real_tokenizer, records

from oreo_fast.models import ValueModel, load_policy, save_model

NAMES = list(REAL_CONFIGS)


@pytest.fixture(scope="module")
def tokenizer():
    return real_tokenizer()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_one_training_step_on_two_processes_equals_one(name, tokenizer, tmp_path):
    for role, seed in (("policy", 0), ("ref", 1)):
        save_model(real_policy(name, tokenizer, layers=1, seed=seed), tokenizer, tmp_path / role)
    with open(tmp_path / "traj.jsonl", "w") as f:
        for row in records(2):  # one right, one wrong
            f.write(json.dumps(row) + "\n")
    args = dict(policy=tmp_path / "policy", reference=tmp_path / "ref",
                train_file=tmp_path / "traj.jsonl", global_batch_size=2, micro_batch_size=1,
                policy_lr=1e-4, value_lr=1e-4, warmup_ratio=0, max_steps=1, progress="false",
                level="step", threads=1)
    runs = {}
    for n in (1, 2):
        out = tmp_path / f"world{n}"
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}",
               f"--master_port={_free_port()}", "-m", "oreo_fast.train",
               *[f"{k}={v}" for k, v in args.items()], f"output_dir={out}"]
        proc = run_process_group(cmd, timeout=400)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[n] = ([json.loads(line) for line in open(out / "metrics.jsonl")],
                   load_policy(out / "policy").state_dict(),
                   ValueModel.from_pretrained(out / "value").state_dict())
    (rows1, pol1, val1), (rows2, pol2, val2) = runs[1], runs[2]
    assert len(rows1) == len(rows2) == 1
    for key in ("loss", "value_loss", "policy_loss", "kl"):
        assert rows1[0][key] == pytest.approx(rows2[0][key], rel=1e-4, abs=1e-7), key
    start = load_policy(tmp_path / "policy").state_dict()
    assert any(not torch.equal(pol1[k], start[k]) for k in pol1)  # the step changed weights
    for k in pol1:
        torch.testing.assert_close(pol1[k], pol2[k], rtol=1e-4, atol=1e-6)
    for k in val1:
        torch.testing.assert_close(val1[k], val2[k], rtol=1e-4, atol=1e-6)
