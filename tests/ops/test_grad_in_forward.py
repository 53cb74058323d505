"""The grad-in-forward OREO loss (oreo_fast.ops.grad_in_forward) against the reference in
float64 (1e-10): every output and every gradient (hidden, weight, values; logits), every
level, both KL estimators, num_sequences, separate grad_outputs on the value and the policy
loss, odd vocabularies, several chunks, steps longer and shorter than a chunk, the response
fallback, masked, padded and fully masked rows; torch and (interpreted) Triton; the in-place
logits variant; bf16 against float32. Two tests swap in a broken carry and a step-splitting
chunk packer and show that the reference comparison then fails."""
import numpy as np
import pytest
import torch

from oreo_fast import state_mask_for_level
from oreo_fast.ops import chunk_plan, reference
from oreo_fast.ops import grad_in_forward as gif

F64 = torch.float64
IMPLS = ["torch", "triton"]
GV, GP = 2.5, -0.7  # grad_output of the value loss and of the policy loss


def batch(V=37, H=5, dtype=F64, seed=0, logits=False):
    """B = 4, T = 12: a prompt, a multi-turn gap, right padding, a fully masked sequence, and
    steps of 1 to 6 actions (sequence 1's first action precedes its first step start)."""
    g = torch.Generator().manual_seed(seed)
    B, T = 4, 12
    m = torch.zeros(B, T, dtype=torch.bool)
    m[0, 2:] = True  # prompt of 2
    m[1, 3:9] = True
    m[1, 5] = False  # an observation token inside the response
    m[3, :] = True  # sequence 2 stays fully masked
    step_start = torch.zeros(B, T, dtype=torch.bool)
    step_start[0, [2, 3, 7]] = True  # steps of 1, 4 and 5 actions
    step_start[1, [4, 7]] = True  # action 3 has no state before it
    step_start[3, [0, 6]] = True  # two steps of 6
    actions = torch.randint(0, V, (B, T), generator=g)
    actions[~m] = -100  # out of range where masked: must be ignored
    args = dict(
        actions=actions,
        values=(0.3 * torch.randn(B, T, generator=g, dtype=F64)).to(dtype).requires_grad_(),
        rewards=torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=F64).to(dtype),
        action_mask=m,
    )
    hidden = torch.randn(B, T, H, generator=g, dtype=F64)
    weight = torch.randn(V, H, generator=g, dtype=F64)
    ref_hidden = hidden + 0.1 * torch.randn(B, T, H, generator=g, dtype=F64)
    ref_weight = weight + 0.3 * torch.randn(V, H, generator=g, dtype=F64)
    if logits:
        args["logits"] = (hidden @ weight.t()).to(dtype).requires_grad_()
        args["ref_logits"] = (ref_hidden @ ref_weight.t()).to(dtype)
    else:
        args.update(hidden=hidden.to(dtype).requires_grad_(),
                    weight=weight.to(dtype).requires_grad_(), ref_hidden=ref_hidden.to(dtype), ref_weight=ref_weight.to(dtype))
    return args, step_start


def leaves(args):
    return [args[k] for k in ("logits", "hidden", "weight", "values") if k in args]


def run(out, args):
    """Every output, and every gradient of GV * value_loss + GP * policy_loss."""
    fields = torch.stack([x.detach().double() for x in out])
    grads = torch.autograd.grad(GV * out.value_loss + GP * out.policy_loss, leaves(args))
    return fields, grads


def expected(args, S, **kw):
    kw = {k: v for k, v in kw.items() if k in ("beta", "kl_coef", "kl_estimator", "num_sequences")}
    if "logits" in args:
        logits, ref_logits = args["logits"], args["ref_logits"]
    else:
        logits = args["hidden"] @ args["weight"].t()
        ref_logits = args["ref_hidden"] @ args["ref_weight"].t()
    safe_actions = args["actions"].clamp(min=0)  # the reference gathers at every position
    out = reference.oreo_loss_reference(logits, ref_logits, safe_actions, args["values"],
                                        args["rewards"], args["action_mask"], S, **kw)
    return run(out, args)


def call(args, S, **kw):
    fn = gif.oreo_loss_gif if "logits" in args else gif.oreo_loss_fused_linear_gif
    return run(fn(**args, state_mask=S, **kw), args)


def assert_match(got, want, tol=1e-10):
    torch.testing.assert_close(got[0], want[0], rtol=tol, atol=tol, msg="outputs")
    for i, (x, y) in enumerate(zip(got[1], want[1])):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol, msg=f"gradient {i}")


def n_chunks(args, S, rows):
    return len(chunk_plan.ChunkPlan(args["action_mask"].numpy(), S.numpy(), rows).chunks)


KW = dict(beta=0.1, kl_coef=0.05, num_sequences=7)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("level", ["token", "step", "response"])
@pytest.mark.parametrize("kl_estimator", ["full", "k3"])
@pytest.mark.parametrize("rows", [4, 64])
def test_fused_linear_matches_reference(impl, level, kl_estimator, rows):
    """rows = 4: many chunks, steps of 5 and 6 longer than a chunk (it grows), responses that
    do not fit (response level falls back); rows = 64: one chunk holds everything."""
    args, step_start = batch()
    S = state_mask_for_level(args["action_mask"], level, step_start)
    kw = dict(KW, kl_estimator=kl_estimator, level=level)
    if rows == 4 and level != "response":
        assert n_chunks(args, S, 4) >= 5
    got = call(args, S, impl=impl, chunk_budget_bytes=rows * 37 * 8, **kw)
    assert_match(got, expected(args, S, **kw))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("V,block_v", [(1, None), (7, None), (37, 16), (4099, None)])
@pytest.mark.parametrize("level", ["token", "step"])
def test_logits_level_matches_reference(impl, V, block_v, level):
    args, step_start = batch(V=V, logits=True)
    S = state_mask_for_level(args["action_mask"], level, step_start)
    kw = dict(KW, level=level)
    got = call(args, S, impl=impl, chunk_budget_bytes=3 * V * 8, block_v=block_v, **kw)
    assert_match(got, expected(args, S, **kw))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("V", [7, 4099])
def test_fused_linear_odd_vocabularies(impl, V):
    args, step_start = batch(V=V, H=3)
    S = state_mask_for_level(args["action_mask"], "step", step_start)
    kw = dict(KW, level="step", kl_estimator="full")
    got = call(args, S, impl=impl, chunk_budget_bytes=5 * V * 8, **kw)
    assert_match(got, expected(args, S, **kw))


@pytest.mark.parametrize("impl", IMPLS)
def test_inplace_logits_hold_the_gradient(impl):
    """inplace=True: the caller's logits buffer becomes d loss / d logits (masked rows 0)."""
    args, step_start = batch(logits=True)
    S = state_mask_for_level(args["action_mask"], "step", step_start)
    kw = dict(KW, level="step")
    want = expected(args, S, **kw)
    buffer = args["logits"].detach().clone()
    args["logits"] = buffer.detach().requires_grad_()  # shares the storage of buffer
    out = gif.oreo_loss_gif(**args, state_mask=S, impl=impl, inplace=True,
                            chunk_budget_bytes=4 * 37 * 8, **kw)
    (GV * out.value_loss + GP * out.policy_loss).backward()
    torch.testing.assert_close(args["logits"].grad, want[1][0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(buffer, want[1][0], rtol=1e-10, atol=1e-10)
    assert (buffer[~args["action_mask"]] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_inplace_on_logits_of_a_matmul(impl):
    """In place on a non-leaf: logits = hidden @ weight.T (the matmul saves only its inputs),
    the gradients reach hidden and weight."""
    args, step_start = batch()
    S = state_mask_for_level(args["action_mask"], "token")
    want = expected(args, S, **KW)
    hidden, weight = args.pop("hidden"), args.pop("weight")
    logits = hidden @ weight.t()
    ref_logits = args.pop("ref_hidden") @ args.pop("ref_weight").t()
    out = gif.oreo_loss_gif(logits, ref_logits, **args, state_mask=S, impl=impl, inplace=True,
                            **KW)
    grads = torch.autograd.grad(GV * out.value_loss + GP * out.policy_loss,
                                (hidden, weight, args["values"]))
    for x, y in zip(grads, want[1]):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)


def test_aot_specs_compile_for_sm90():
    """Every spec of aot_specs() compiles for sm_90 with the real compiler (ptxas ships with
    Triton), in a process without the interpreter."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    script = (
        "import triton\n"
        "from triton.backends.compiler import GPUTarget\n"
        "from oreo_fast.kernels.oreo_grad_in_forward import aot_specs\n"
        "specs = aot_specs()\n"
        "for s in specs:\n"
        "    k = triton.compile(triton.compiler.ASTSource(fn=s['kernel'], signature=s['signature'],"
        " constexprs=s['constexprs']), target=GPUTarget('cuda', 90, 32),"
        " options={'num_warps': s['num_warps']})\n"
        "    assert k.asm.get('cubin'), s['label']\n"
        "print(len(specs))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.split()[-1]) == 32  # 4 dtypes x 2 estimators x 2 blocks x 2 kernels


def test_backward_reaches_parameters_through_autograd():
    """An nn.Linear head gets its .grad from loss.backward(), like any parameter (FSDP2)."""
    args, _ = batch()
    head = torch.nn.Linear(5, 37, bias=False, dtype=F64)
    with torch.no_grad():
        head.weight.copy_(args["weight"])
    S = state_mask_for_level(args["action_mask"], "token")
    want = expected(args, S, **KW)
    args["weight"] = head.weight
    out = gif.oreo_loss_fused_linear_gif(**args, state_mask=S, impl="torch", **KW)
    (GV * out.value_loss + GP * out.policy_loss).backward()
    torch.testing.assert_close(head.weight.grad, want[1][1], rtol=1e-10, atol=1e-10)
    with pytest.raises(RuntimeError, match="one backward"):
        out = gif.oreo_loss_fused_linear_gif(**args, state_mask=S, impl="torch", **KW)
        out.loss.backward(retain_graph=True)
        out.loss.backward()


def test_response_fallback_only_when_the_response_does_not_fit(monkeypatch):
    calls = []
    original = gif.two_pass_loss
    monkeypatch.setattr(gif, "two_pass_loss",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    args, _ = batch()
    S = state_mask_for_level(args["action_mask"], "response")
    kw = dict(KW, level="response")
    want = expected(args, S, **kw)
    assert_match(call(args, S, impl="torch", chunk_budget_bytes=12 * 37 * 8, **kw), want)
    assert not calls  # the longest response (12 actions) fits 12 rows
    assert_match(call(args, S, impl="torch", chunk_budget_bytes=11 * 37 * 8, **kw), want)
    assert calls == [1]


@pytest.mark.parametrize("budget_rows", [64, 11])
def test_frozen_lm_head_gets_no_weight_gradient(monkeypatch, budget_rows):
    """A frozen LM head (LoRA training): the same losses and hidden / value gradients, and
    no weight gradient computed at all, on the gradient-in-forward path (64 rows) and the
    two-pass fallback (11 rows: the 12-action response does not fit)."""
    from oreo_fast.ops import fused_linear

    args, _ = batch()
    S = state_mask_for_level(args["action_mask"], "response")
    kw = dict(KW, level="response")
    want = expected(args, S, **kw)
    args["weight"] = args["weight"].detach()  # requires no gradient

    def refuse(*_):
        raise AssertionError("weight gradient computed for a frozen LM head")

    monkeypatch.setattr(gif, "accumulate_weight_grad", refuse)
    monkeypatch.setattr(fused_linear, "accumulate_weight_grad", refuse)
    out = gif.oreo_loss_fused_linear_gif(**args, state_mask=S, impl="torch",
                                         chunk_budget_bytes=budget_rows * 37 * 8, **kw)
    grads = torch.autograd.grad(GV * out.value_loss + GP * out.policy_loss,
                                [args["hidden"], args["values"]])
    fields = torch.stack([x.detach().double() for x in out])
    assert_match((fields, grads), (want[0], (want[1][0], want[1][2])))


def test_value_loss_only_and_detached_values():
    """Only one loss in the backward (the other's grad_output is None); values without grad."""
    args, step_start = batch()
    S = state_mask_for_level(args["action_mask"], "step", step_start)
    kw = dict(KW, level="step")
    out = gif.oreo_loss_fused_linear_gif(**args, state_mask=S, impl="torch", **kw)
    ref = reference.oreo_loss_reference(args["hidden"] @ args["weight"].t(),
                                        args["ref_hidden"] @ args["ref_weight"].t(),
                                        args["actions"].clamp(min=0), args["values"],
                                        args["rewards"], args["action_mask"], S, beta=0.1, kl_coef=0.05,
                                        num_sequences=7)
    got = torch.autograd.grad(out.value_loss, args["values"])[0]
    torch.testing.assert_close(got, torch.autograd.grad(ref.value_loss, args["values"])[0],
                               rtol=1e-10, atol=1e-10)
    args["values"] = args["values"].detach()
    out = gif.oreo_loss_fused_linear_gif(**args, state_mask=S, impl="torch", **kw)
    got = torch.autograd.grad(out.policy_loss, args["weight"])[0]
    torch.testing.assert_close(got, torch.autograd.grad(ref.policy_loss, args["weight"])[0],
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_against_float32(impl):
    """bf16 hidden and weights (logits rounded to bf16 by the matmul): outputs within 2%
    (+ 2e-2 absolute: a sum of ten bf16-rounded log-ratios moves by about 1%) and gradients
    within 3% of their scale of a float32 run on the same bf16 values."""
    args, step_start = batch(V=300, H=16, dtype=torch.bfloat16)
    S = state_mask_for_level(args["action_mask"], "step", step_start)
    kw = dict(KW, level="step")
    got = call(args, S, impl=impl, chunk_budget_bytes=4 * 300 * 4, **kw)
    assert all(x.dtype == torch.bfloat16 for x in got[1])
    golden_args = {k: (v.detach().float().requires_grad_(v.requires_grad)
                       if torch.is_tensor(v) and v.is_floating_point() else v)
                   for k, v in args.items()}
    want = expected(golden_args, S, **kw)
    torch.testing.assert_close(got[0], want[0], rtol=2e-2, atol=2e-2)
    for x, y in zip(got[1], want[1]):
        torch.testing.assert_close(x.float(), y, rtol=0, atol=3e-2 * y.abs().max())


@pytest.mark.parametrize("mutant", ["drop_carry", "split_steps"])
def test_broken_walk_fails_the_comparison(monkeypatch, mutant):
    """The comparison above must catch a carry that does not cross chunks, and chunks cut
    inside a step (the mutants are swapped in through the module-level hooks)."""
    args, step_start = batch()
    S = state_mask_for_level(args["action_mask"], "step", step_start)
    kw = dict(KW, level="step")
    want = expected(args, S, **kw)
    assert_match(call(args, S, impl="torch", chunk_budget_bytes=3 * 37 * 8, **kw), want)
    if mutant == "drop_carry":
        monkeypatch.setattr(gif, "_update_carry", lambda carry, b, lr: None)
    else:
        def fixed_size(cuts, rows):
            total = int(cuts[-1])
            return [(i, min(i + rows, total)) for i in range(0, total, rows)]
        monkeypatch.setattr(chunk_plan, "pack_chunks", fixed_size)
    with pytest.raises((AssertionError, IndexError)):  # wrong values, or a state not in its chunk
        assert_match(call(args, S, impl="torch", chunk_budget_bytes=3 * 37 * 8, **kw), want)


def test_pack_chunks_ends_chunks_only_at_allowed_cuts():
    cuts = np.array([1, 2, 7, 8, 9, 15])
    assert chunk_plan.pack_chunks(cuts, 3) == [(0, 2), (2, 7), (7, 9), (9, 15)]
    assert chunk_plan.pack_chunks(cuts, 100) == [(0, 15)]
    assert chunk_plan.pack_chunks(np.array([], dtype=np.int64), 3) == []


@pytest.mark.parametrize("change,match", [
    (dict(level="sentence"), "level"),
    (dict(kl_estimator="k2"), "kl_estimator"),
    (dict(beta=float("nan")), "beta"),
    (dict(impl="reference"), "impl"),
    (dict(chunk_budget_bytes=0), "chunk_budget_bytes"),
    (dict(num_sequences=0), "num_sequences"),
    (dict(rewards=torch.tensor([1.0, float("nan"), 0.0, 0.0], dtype=F64)), "rewards contain NaN"),
    (dict(state_mask=torch.zeros(4, 12, dtype=torch.bool)), "state_mask must equal"),
    (dict(values=torch.zeros(4, 11, dtype=F64)), "values"),
    (dict(weight=torch.zeros(37, 4, dtype=F64)), "weight"),
])
def test_argument_errors_name_the_argument(change, match):
    args, _ = batch()
    args["state_mask"] = state_mask_for_level(args["action_mask"], "token")
    args.update({k: v for k, v in change.items() if k in args or k == "state_mask"})
    kw = {k: v for k, v in change.items() if k not in args}
    with pytest.raises(ValueError, match=match):
        gif.oreo_loss_fused_linear_gif(**args, **kw)


def test_fully_masked_batch_gives_zero_losses_and_gradients():
    args, _ = batch()
    args["action_mask"] = torch.zeros(4, 12, dtype=torch.bool)
    out = gif.oreo_loss_fused_linear_gif(**args, state_mask=args["action_mask"], impl="torch")
    assert float(out.loss.detach()) == 0.0
    grads = torch.autograd.grad(out.loss, leaves(args))
    assert all((g == 0).all() for g in grads)
