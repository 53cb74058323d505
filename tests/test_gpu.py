"""CUDA-only checks (marker ``gpu``; skipped without a CUDA device, run by ``make gpu-check``):
every Triton kernel compiled on the GPU against the torch reference, per dtype; the trainer's
flash-attention backend against SDPA; Liger-Kernel's patched modules against the unpatched.

Tolerances: float32 1e-5 relative (the kernels reorder sums), bf16/fp16 inputs are compared
with the reference computed from the same rounded inputs in float32, so only the kernels'
own accumulation differs (float32 accumulators: 1e-4 relative, 1e-3 absolute on log-probs).
"""
import math
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1e-4, atol=1e-3),
       torch.float16: dict(rtol=1e-4, atol=1e-3)}


def _inputs(dtype, B=3, T=37, V=151936, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    logits = torch.randn(B, T, V, device="cuda", generator=gen).mul(3).to(dtype)
    ref = torch.randn(B, T, V, device="cuda", generator=gen).mul(3).to(dtype)
    actions = torch.randint(0, V, (B, T), device="cuda", generator=gen)
    mask = torch.rand(B, T, device="cuda", generator=gen) > 0.2
    return logits, ref, actions, mask


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_token_logprobs_kl_kernel_equals_reference(dtype):
    from oreo_fast import ops

    logits, ref, actions, mask = _inputs(dtype)
    leaf = logits.clone().requires_grad_()
    got = ops.token_logprobs_kl(leaf, ref, actions, mask, impl="triton")
    expected_leaf = logits.float().clone().requires_grad_()
    expected = ops.token_logprobs_kl(expected_leaf, ref.float(), actions, mask,
                                     impl="reference")
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.float(), e.float(), **TOL[dtype])
    (got[0].sum() + got[2].sum()).backward()
    (expected[0].sum() + expected[2].sum()).backward()
    torch.testing.assert_close(leaf.grad.float(), expected_leaf.grad, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_linear_kernel_equals_reference(dtype):
    from oreo_fast import ops

    gen = torch.Generator(device="cuda").manual_seed(1)
    B, T, H, V = 2, 45, 1536, 151936
    hidden = torch.randn(B, T, H, device="cuda", generator=gen).to(dtype)
    weight = (torch.randn(V, H, device="cuda", generator=gen) / math.sqrt(H)).to(dtype)
    ref_hidden = torch.randn(B, T, H, device="cuda", generator=gen).to(dtype)
    ref_weight = (torch.randn(V, H, device="cuda", generator=gen) / math.sqrt(H)).to(dtype)
    actions = torch.randint(0, V, (B, T), device="cuda", generator=gen)
    mask = torch.rand(B, T, device="cuda", generator=gen) > 0.2
    results = {}
    for impl in ("triton", "reference"):
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        logp, _, kl = ops.fused_linear_token_logprobs_kl(h, w, ref_hidden, ref_weight, actions,
                                                         mask, impl=impl)
        (logp.float().sum() + kl.float().sum()).backward()
        results[impl] = (logp.float(), kl.float(), h.grad.float(), w.grad.float())
    # the reference materialises logits in the input dtype: half-precision products differ
    tol = TOL[dtype] if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for g, e in zip(results["triton"], results["reference"]):
        torch.testing.assert_close(g, e, **tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cascade_kernel_equals_torch_path(dtype):
    from oreo_fast.search.cascade import ChildGroups, cascade_attention

    gen = torch.Generator(device="cuda").manual_seed(2)
    parents, children, heads, kv_heads, dim, prefix, suffix = 3, 4, 12, 2, 128, 300, 24
    n = parents * children

    def rand(*shape):
        return torch.randn(*shape, device="cuda", generator=gen).to(dtype)

    parent = torch.arange(parents, device="cuda").repeat_interleave(children)
    query = rand(n, 1, heads, dim).transpose(1, 2)
    pk, pv = rand(parents, kv_heads, prefix, dim), rand(parents, kv_heads, prefix, dim)
    pm = torch.ones(parents, prefix, dtype=torch.long, device="cuda")
    pm[1, :40] = 0
    sk, sv = rand(n, kv_heads, suffix, dim), rand(n, kv_heads, suffix, dim)
    sm = torch.ones(n, suffix, dtype=torch.long, device="cuda")
    sm[::3, -5:-1] = 0
    groups = ChildGroups.from_parent(parent, parents)
    scale = 1 / math.sqrt(dim)
    out, lse = cascade_attention(query, pk, pv, pm, groups, sk, sv, sm, scale, impl="triton")
    up = [t.float() for t in (query, pk, pv)] + [pm, groups] + [sk.float(), sv.float(), sm]
    ref_out, ref_lse = cascade_attention(*up, scale, impl="torch")
    tol = TOL[dtype] if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out.float(), ref_out, **tol)
    torch.testing.assert_close(lse.float(), ref_lse.float(), rtol=1e-4, atol=1e-3)


def _tiny_qwen(attn):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=1024, hidden_size=256, intermediate_size=512,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         attn_implementation=attn)
    return Qwen2ForCausalLM(config).to("cuda", torch.bfloat16).eval()


def test_flash_attention_equals_sdpa():
    pytest.importorskip("flash_attn")
    ids = torch.randint(0, 1024, (2, 200), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :50] = 0  # left padding
    with torch.no_grad():
        sdpa = _tiny_qwen("sdpa")(input_ids=ids, attention_mask=mask).logits
        flash = _tiny_qwen("flash_attention_2")(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(flash[real].float(), sdpa[real].float(), rtol=2e-2, atol=2e-2)


def test_liger_patched_equals_unpatched():
    """In a fresh process: Liger's patches replace the modelling classes for the session."""
    pytest.importorskip("liger_kernel")
    script = textwrap.dedent("""
        import torch
        from transformers import Qwen2Config, Qwen2ForCausalLM
        from liger_kernel.transformers import _apply_liger_kernel
        config = Qwen2Config(vocab_size=1024, hidden_size=256, intermediate_size=512,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        torch.manual_seed(0)
        plain = Qwen2ForCausalLM(config).cuda().eval()
        ids = torch.randint(0, 1024, (2, 64), device="cuda")
        with torch.no_grad():
            expected = plain(input_ids=ids).logits
        _apply_liger_kernel("qwen2", rms_norm=True, rope=True, swiglu=True,
                            cross_entropy=False, fused_linear_cross_entropy=False)
        patched = Qwen2ForCausalLM(config).cuda().eval()
        patched.load_state_dict(plain.state_dict())
        assert type(patched.model.norm).__name__ != type(plain.model.norm).__name__
        with torch.no_grad():
            got = patched(input_ids=ids).logits
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
