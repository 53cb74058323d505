"""bfloat16 on the CPU: the trainer under FSDP2 mixed precision (bf16 parameters for compute,
float32 master weights and reductions) on 1 and 2 processes against float32 training, the
fused loss in bf16 at Qwen's vocabulary (V = 151,936); the cascade search in bf16 is in
tests/search/test_bf16_search.py.

Tolerances (stated here and in the README; measured values in the comments):
- trainer: per-step losses within 5e-3 relative of float32 (measured 2e-4); the policy's parameter change
  after two steps (all parameters together) within 10% (relative L2) of float32's change
  (measured 4.6% on 1 process).
- fused loss: log-probs and KL within 0.02 absolute of the float32 op on the same
  bf16-rounded inputs (measured: 0.0076 and 0.0017 at most; bf16 logits carry ~0.4%
  relative rounding), gradients within 1% relative L2 (measured 0.23% and 0.20%).
"""
import json
import os
import sys

import pytest
import torch
from processes import run_process_group
from test_train import _config, _free_port, tiny  # noqa: F401 (the tiny trainer fixture)

from oreo_fast.models import load_policy
from oreo_fast.train.trainer import Trainer


def rel_l2(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def _fit(config):
    Trainer(config).fit()
    rows = [json.loads(l) for l in open(os.path.join(config.output_dir, "metrics.jsonl"))]
    return rows, load_policy(os.path.join(config.output_dir, "policy")).state_dict()


def _torchrun(root, out, n, dtype):
    args = dict(policy=root / "policy", reference=root / "ref", train_file=root / "traj.jsonl",
                global_batch_size=8, micro_batch_size=3, policy_lr=1e-3, value_lr=1e-3,
                beta=0.1, kl_coef=0.05, progress="false", dtype=dtype, output_dir=out)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}",
           f"--master_port={_free_port()}", "-m", "oreo_fast.train",
           *[f"{k}={v}" for k, v in args.items()]]
    proc = run_process_group(cmd, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(l) for l in open(out / "metrics.jsonl")]
    return rows, load_policy(out / "policy").state_dict()


def _check_close(rows, params, rows32, params32, init):
    assert len(rows) == len(rows32) == 2
    for a, b in zip(rows, rows32):
        assert a["loss"] == pytest.approx(b["loss"], rel=5e-3)
        assert a["skipped"] == 0
    # all parameters together: Adam turns a near-zero gradient (the key biases', zero in
    # exact arithmetic: softmax ignores a shift shared by all keys) into a full-size step of
    # arbitrary sign, so tensor-by-tensor comparisons would measure rounding noise
    moved = torch.cat([(params[k] - init[k]).flatten() for k in params32])
    moved32 = torch.cat([(params32[k] - init[k]).flatten() for k in params32])
    assert moved32.norm() > 0
    print("bf16 vs fp32 policy update rel L2", rel_l2(moved, moved32), "losses",
          [(a["loss"], b["loss"]) for a, b in zip(rows, rows32)])
    assert rel_l2(moved, moved32) < 0.10


def test_trainer_bf16_one_process_close_to_fp32(tiny):
    root, _, _ = tiny
    init = load_policy(root / "policy").state_dict()
    rows32, params32 = _fit(_config(root, output_dir=str(root / "fp32")))
    config = _config(root, dtype="bfloat16", output_dir=str(root / "bf16"))
    trainer = Trainer(config)
    computed_in = []
    mlp = trainer.algorithm.policy.model.model.layers[0].mlp
    mlp.register_forward_pre_hook(lambda m, a: computed_in.append(m.gate_proj.weight.dtype))
    trainer.fit()
    rows = [json.loads(l) for l in open(os.path.join(config.output_dir, "metrics.jsonl"))]
    params = load_policy(os.path.join(config.output_dir, "policy")).state_dict()
    _check_close(rows, params, rows32, params32, init)
    # bf16 compute, fp32 master weights (what the optimizer steps) for both trained models
    assert computed_in and set(computed_in) == {torch.bfloat16}
    for module in trainer.algorithm.trained:
        assert {p.dtype for p in module.parameters()} == {torch.float32}


@pytest.mark.slow
def test_trainer_bf16_two_processes_close_to_fp32(tiny):
    root, _, _ = tiny
    init = load_policy(root / "policy").state_dict()
    rows32, params32 = _fit(_config(root, output_dir=str(root / "fp32_for_2")))
    rows, params = _torchrun(root, root / "bf16_world2", 2, "bfloat16")
    _check_close(rows, params, rows32, params32, init)


def test_fused_loss_bf16_at_qwen_vocabulary():
    from oreo_fast import ops

    gen = torch.Generator().manual_seed(0)
    B, T, H, V = 1, 6, 64, 151936
    hidden = torch.randn(B, T, H, generator=gen).to(torch.bfloat16)
    weight = (torch.randn(V, H, generator=gen) * 0.3).to(torch.bfloat16)
    ref_hidden = torch.randn(B, T, H, generator=gen).to(torch.bfloat16)
    ref_weight = (torch.randn(V, H, generator=gen) * 0.3).to(torch.bfloat16)
    actions = torch.randint(0, V, (B, T), generator=gen)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 0] = False
    out = {}
    for dtype in (torch.bfloat16, torch.float32):
        h = hidden.to(dtype).detach().clone().requires_grad_()
        w = weight.to(dtype).detach().clone().requires_grad_()
        logp, ref_logp, kl = ops.fused_linear_token_logprobs_kl(
            h, w, ref_hidden.to(dtype), ref_weight.to(dtype), actions, mask, chunk_rows=2)
        (logp.sum() + kl.sum()).backward()
        out[dtype] = (logp, ref_logp, kl, h.grad, w.grad)
    logp, ref_logp, kl, gh, gw = out[torch.bfloat16]
    logp32, ref_logp32, kl32, gh32, gw32 = out[torch.float32]
    assert torch.isfinite(logp).all() and torch.isfinite(gw.float()).all()
    assert (logp[0, 0], kl[0, 0]) == (0, 0)  # masked out
    for got, expected in ((logp, logp32), (ref_logp, ref_logp32), (kl, kl32)):
        torch.testing.assert_close(got.float(), expected, atol=0.02, rtol=0)
    assert rel_l2(gh, gh32) < 0.01 and rel_l2(gw, gw32) < 0.01
