"""Every implementation of the per-token ops against the plain reference: values and gradients
in float64 (tolerance 1e-10), odd and one-block-plus vocabularies, masked and padded rows,
grad_output != 1, strided logits, bf16 against a float32 golden run."""
import pytest
import torch

from oreo_fast import ops
from oreo_fast.ops import fused_linear

F64 = torch.float64
IMPLS = ["torch", "triton"]


def make_inputs(B, T, V, dtype=F64, seed=0, H=None, masked_rows=((0, 0), (1, 1)), pad_left=1,
                pad_right=1):
    """Logits with a sliced time axis (non-contiguous), masks with left/right padding and some
    fully masked rows; H set: hidden states and LM heads instead of logits."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, :pad_left] = False  # left padding / prompt
    mask[-1, T - pad_right:] = False  # right padding
    for b, t in masked_rows:
        if b < B and t < T:
            mask[b, t] = False
    if B > 2:
        mask[2] = False  # a fully masked sequence
    actions = torch.randint(0, V, (B, T), generator=g)
    actions[~mask] = -100  # padding ids out of range must be ignored where masked
    if H is None:
        policy = (2 * torch.randn(B, T + 1, V, generator=g)).to(dtype)[:, :-1]
        ref = policy.detach() + torch.randn(B, T, V, generator=g).to(dtype)
        return policy, ref, actions, mask
    hidden = torch.randn(B, T, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) / H**0.5).to(dtype)
    ref_weight = weight + 0.3 * (torch.randn(V, H, generator=g) / H**0.5).to(dtype)
    return hidden, weight, hidden + 0.1 * torch.randn(B, T, H, generator=g).to(dtype), ref_weight, actions, mask


def upstream(B, T, dtype=F64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, generator=g, dtype=dtype), torch.randn(B, T, generator=g, dtype=dtype)


def run_logits(impl, logits, ref, actions, mask, g_logp, g_kl, **kw):
    logits = logits.detach().requires_grad_()
    logp, ref_logp, kl = ops.token_logprobs_kl(logits, ref, actions, mask, impl=impl, **kw)
    ((logp * g_logp).sum() + (kl * g_kl).sum()).backward()
    return logp.detach(), ref_logp, kl.detach(), logits.grad


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("V,block_v", [(1, None), (7, None), (37, 16), (4099, None)])
def test_logits_level_matches_reference(impl, V, block_v):
    B, T = (3, 5) if V < 4099 else (2, 4)
    logits, ref, actions, mask = make_inputs(B, T, V)
    g_logp, g_kl = upstream(B, T)
    expected = run_logits("reference", logits, ref, actions, mask, g_logp, g_kl)
    got = run_logits(impl, logits, ref, actions, mask, g_logp, g_kl, block_v=block_v)
    for name, x, y in zip(("logp", "ref_logp", "kl", "grad"), got, expected):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10, msg=name)
    # masked positions: zero outputs and zero gradient rows
    assert (got[0][~mask] == 0).all() and (got[3][~mask] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_gradcheck(impl):
    logits, ref, actions, mask = make_inputs(2, 3, 6)
    logits = logits.detach().requires_grad_()
    torch.autograd.gradcheck(
        lambda z: ops.token_logprobs_kl(z, ref, actions, mask, impl=impl, block_v=4), (logits,)
    )


@pytest.mark.parametrize("impl", IMPLS)
def test_kl_off_gives_logprobs_only(impl):
    logits, ref, actions, mask = make_inputs(2, 4, 9)
    g_logp, _ = upstream(2, 4)
    zero = torch.zeros(2, 4, dtype=F64)
    logp, _, kl, grad = run_logits(impl, logits, ref, actions, mask, g_logp, zero, compute_kl=False)
    e_logp, _, _, e_grad = run_logits("reference", logits, ref, actions, mask, g_logp, zero)
    torch.testing.assert_close(logp, e_logp)
    torch.testing.assert_close(grad, e_grad)
    assert (kl == 0).all()


def test_triton_inplace_backward_overwrites_logits_with_their_gradient():
    logits, ref, actions, mask = make_inputs(2, 4, 37)
    logits = logits.contiguous()
    g_logp, g_kl = upstream(2, 4)
    expected = run_logits("reference", logits, ref, actions, mask, g_logp, g_kl)[3]
    buffer = logits.clone()
    leaf = buffer.detach().requires_grad_()
    logp, _, kl = ops.token_logprobs_kl(leaf, ref, actions, mask, impl="triton",
                                        inplace_backward=True, block_v=16)
    ((logp * g_logp).sum() + (kl * g_kl).sum()).backward()
    torch.testing.assert_close(leaf.grad, expected, rtol=1e-10, atol=1e-10)
    # the logits buffer itself now holds the gradient (no second [B, T, V] buffer)
    torch.testing.assert_close(buffer, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("impl", IMPLS)
def test_negative_infinite_logits(impl):
    """Vocabulary entries banned with -inf: p = 0 there, KL stays finite."""
    logits, ref, actions, mask = make_inputs(2, 3, 20)
    logits = logits.clone()
    logits[..., :3] = float("-inf")  # the whole first block (block_v=4) is -inf
    logits[..., 10] = float("-inf")
    actions[mask] = actions[mask].clamp(min=11)
    g_logp, g_kl = upstream(2, 3)
    got = run_logits(impl, logits, ref, actions, mask, g_logp, g_kl, block_v=4)
    finite = logits.clamp(min=-1e4)  # exp(-1e4) == 0 in float64: same distribution
    expected = run_logits("reference", finite, ref, actions, mask, g_logp, g_kl)
    for x, y in zip(got, expected):
        assert torch.isfinite(x).all()
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)


def test_reference_side_gets_no_gradient():
    logits, ref, actions, mask = make_inputs(2, 3, 7)
    ref = ref.detach().requires_grad_()
    for impl in IMPLS:
        logp, ref_logp, kl = ops.token_logprobs_kl(logits.detach().requires_grad_(), ref, actions,
                                                   mask, impl=impl)
        (logp.sum() + kl.sum()).backward()
        assert ref.grad is None and not ref_logp.requires_grad


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_against_float32_golden(impl):
    """bf16 logits, float32 accumulation: outputs within 1e-5 of the float32 run on the same
    values; the bf16 gradient within bf16 rounding (1e-2 relative to its scale)."""
    logits, ref, actions, mask = make_inputs(2, 6, 1000, dtype=torch.bfloat16)
    g_logp, g_kl = upstream(2, 6, dtype=torch.float32)
    got = run_logits(impl, logits, ref, actions, mask, g_logp, g_kl)
    golden = run_logits("reference", logits.float(), ref.float(), actions, mask, g_logp, g_kl)
    assert got[3].dtype == torch.bfloat16
    for x, y in zip(got[:3], golden[:3]):
        assert x.dtype == torch.float32
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    scale = golden[3].abs().max()
    torch.testing.assert_close(got[3].float(), golden[3], rtol=0, atol=1e-2 * scale)


# ---------------------------------------------------------------- hidden level


def run_fused(impl, hidden, weight, ref_hidden, ref_weight, actions, mask, g_logp, g_kl, **kw):
    hidden = hidden.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    logp, ref_logp, kl = ops.fused_linear_token_logprobs_kl(
        hidden, weight, ref_hidden, ref_weight, actions, mask, impl=impl, **kw
    )
    ((logp * g_logp).sum() + (kl * g_kl).sum()).backward()
    return logp.detach(), ref_logp, kl.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("V,chunk_rows,block_v", [(7, 3, None), (4099, 5, None), (50, 100, 16)])
def test_fused_linear_matches_logits_level(impl, V, chunk_rows, block_v):
    B, T, H = 3, 4, 8
    inputs = make_inputs(B, T, V, H=H)
    g_logp, g_kl = upstream(B, T)
    expected = run_fused("reference", *inputs, g_logp, g_kl)
    got = run_fused(impl, *inputs, g_logp, g_kl, chunk_rows=chunk_rows, block_v=block_v)
    for name, x, y in zip(("logp", "ref_logp", "kl", "d_hidden", "d_weight"), got, expected):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10, msg=name)
    mask = inputs[-1]
    assert (got[3][~mask] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_fused_linear_without_kl_skips_the_reference_recompute(impl):
    """With the KL off the backward must not touch the reference: poisoning its inputs after
    the forward leaves the gradients finite and equal to the reference implementation's."""
    hidden, weight, ref_hidden, ref_weight, actions, mask = make_inputs(2, 4, 30, H=6)
    g_logp, _ = upstream(2, 4)
    expected = run_fused("reference", hidden, weight, ref_hidden, ref_weight, actions, mask,
                         g_logp, torch.zeros(2, 4, dtype=F64))
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref_h, ref_w = ref_hidden.clone(), ref_weight.clone()
    logp, _, kl = ops.fused_linear_token_logprobs_kl(h, w, ref_h, ref_w, actions, mask,
                                                     impl=impl, compute_kl=False, chunk_rows=3)
    ref_h.data.fill_(float("nan"))  # .data: no version bump, a read would see NaN
    ref_w.data.fill_(float("nan"))
    (logp * g_logp).sum().backward()
    assert (kl == 0).all()
    torch.testing.assert_close(logp.detach(), expected[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h.grad, expected[3], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(w.grad, expected[4], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("impl", IMPLS)
def test_unused_kl_output_skips_the_reference_in_backward(impl):
    """KL computed but not in the loss: the logits-level backward must not read the reference."""
    logits, ref, actions, mask = make_inputs(2, 3, 9)
    z = logits.detach().clone().requires_grad_()
    r = ref.clone()
    logp, _, _ = ops.token_logprobs_kl(z, r, actions, mask, impl=impl)
    r.data.fill_(float("nan"))
    logp.sum().backward()
    assert torch.isfinite(z.grad).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_fused_linear_bf16_against_float32_golden(impl):
    """bf16 hidden and weights; the logits are rounded to bf16 by the matmul, as in the bf16
    models of the paper: log-probs within 0.05 of the float32 golden, the weight gradient
    (accumulated in float32, returned in bf16) within 2e-2 of its scale."""
    B, T, H, V = 2, 8, 32, 300
    hidden, weight, ref_hidden, ref_weight, actions, mask = make_inputs(B, T, V, H=H,
                                                                        dtype=torch.bfloat16)
    g_logp, g_kl = upstream(B, T, dtype=torch.float32)
    got = run_fused(impl, hidden, weight, ref_hidden, ref_weight, actions, mask, g_logp, g_kl,
                    chunk_rows=5)
    golden = run_fused("reference", hidden.float(), weight.float(), ref_hidden.float(),
                       ref_weight.float(), actions, mask, g_logp, g_kl)
    assert got[3].dtype == torch.bfloat16 and got[4].dtype == torch.bfloat16
    for x, y in zip(got[:3], golden[:3]):
        torch.testing.assert_close(x, y, rtol=0, atol=5e-2)
    for x, y in zip(got[3:], golden[3:]):
        torch.testing.assert_close(x.float(), y, rtol=0, atol=2e-2 * y.abs().max())


@pytest.mark.parametrize("impl", IMPLS)
def test_fused_linear_gradcheck(impl):
    hidden, weight, ref_hidden, ref_weight, actions, mask = make_inputs(2, 3, 5, H=3)
    hidden.requires_grad_()
    weight.requires_grad_()
    torch.autograd.gradcheck(
        lambda h, w: ops.fused_linear_token_logprobs_kl(h, w, ref_hidden, ref_weight, actions,
                                                        mask, impl=impl, chunk_rows=2),
        (hidden, weight),
    )


# ---------------------------------------------------------------- argument checks


@pytest.mark.parametrize("mutate,name", [
    (lambda a: {**a, "actions": a["actions"].double()}, "actions"),
    (lambda a: {**a, "actions": a["actions"][:, :-1]}, "actions"),
    (lambda a: {**a, "action_mask": a["action_mask"].double()}, "action_mask"),
    (lambda a: {**a, "action_mask": a["action_mask"][:1]}, "action_mask"),
    (lambda a: {**a, "logits": a["logits"].long()}, "logits"),
    (lambda a: {**a, "ref_logits": a["ref_logits"][..., :-1]}, "vocabularies"),
    (lambda a: {**a, "ref_logits": a["ref_logits"][:, :-1]}, "[B, T]"),
    (lambda a: {**a, "actions": a["actions"].masked_fill(a["action_mask"], 99)}, "actions out of range"),
])
def test_bad_arguments_name_the_argument(mutate, name):
    logits, ref, actions, mask = make_inputs(2, 3, 7)
    args = dict(logits=logits, ref_logits=ref, actions=actions, action_mask=mask)
    with pytest.raises(ValueError, match=name.replace("[", r"\[").replace("]", r"\]")):
        ops.token_logprobs_kl(**mutate(args))


def test_bad_impl_and_fused_shapes():
    logits, ref, actions, mask = make_inputs(2, 3, 7)
    with pytest.raises(ValueError, match="impl"):
        ops.token_logprobs_kl(logits, ref, actions, mask, impl="cuda")
    hidden, weight, ref_hidden, ref_weight, actions, mask = make_inputs(2, 3, 7, H=4)
    with pytest.raises(ValueError, match="weight"):
        ops.fused_linear_token_logprobs_kl(hidden, weight[:, :3], ref_hidden, ref_weight, actions, mask)
    with pytest.raises(ValueError, match="chunk_rows"):
        ops.fused_linear_token_logprobs_kl(hidden, weight, ref_hidden, ref_weight, actions, mask,
                                           impl="torch", chunk_rows=0)


def test_weight_grad_accumulates_in_float32_by_vocab_slices():
    g = torch.Generator().manual_seed(0)
    grad_z = torch.randn(6, 45, generator=g).to(torch.bfloat16)
    h = torch.randn(6, 4, generator=g).to(torch.bfloat16)
    acc = torch.ones(45, 4)
    fused_linear.accumulate_weight_grad(acc, grad_z, h, vocab_slice=16)  # 45 = 16 + 16 + 13
    expected = 1 + grad_z.float().t() @ h.float()
    torch.testing.assert_close(acc, expected, rtol=1e-2, atol=1e-2)
    acc64 = torch.zeros(45, 4, dtype=F64)
    fused_linear.accumulate_weight_grad(acc64, grad_z.double(), h.double())
    torch.testing.assert_close(acc64, grad_z.double().t() @ h.double())


@pytest.mark.parametrize("impl", IMPLS)
def test_rows_beyond_int32_offsets(impl):
    """A row that starts past 2**31 elements (N * V > 2**31 in a real batch). The storage is
    allocated but never touched beyond the two rows, so it costs almost no memory."""
    V = 33
    storage = torch.empty(2**31 + 2 * V, dtype=torch.bfloat16)
    logits = storage.as_strided((2, 1, V), (2**31, V, 1))
    g = torch.Generator().manual_seed(0)
    logits.copy_(torch.randn(2, 1, V, generator=g).to(torch.bfloat16))
    ref = torch.randn(2, 1, V, generator=g).to(torch.bfloat16)
    actions = torch.tensor([[3], [30]])
    mask = torch.ones(2, 1, dtype=torch.bool)
    got = ops.token_logprobs_kl(logits, ref, actions, mask, impl=impl, block_v=16)
    expected = ops.token_logprobs_kl(logits.contiguous(), ref, actions, mask, impl="reference")
    for x, y in zip(got, expected):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    del storage
