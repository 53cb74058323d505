"""The public losses: every impl and level against the reference, at logits and hidden level,
plus argument checks."""
import pytest
import torch

import oreo_fast
from oreo_fast import state_mask_for_level
from oreo_fast.ops import reference

F64 = torch.float64


def batch(B=3, T=7, V=29, H=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    action_mask = torch.zeros(B, T, dtype=torch.bool)
    action_mask[0, 2:] = True  # prompt of 2 tokens
    action_mask[1, 3:6] = True  # left and right padding around it
    if B > 2:
        action_mask[2, 1:] = True
    step_start = torch.rand(B, T, generator=g) < 0.4
    values = (0.3 * torch.randn(B, T, generator=g, dtype=F64)).requires_grad_()
    rewards = torch.tensor([1.0, 0.0, 1.0][:B], dtype=F64)
    actions = torch.randint(0, V, (B, T), generator=g)
    out = dict(actions=actions, values=values, rewards=rewards, action_mask=action_mask)
    if H is None:
        out["logits"] = torch.randn(B, T, V, generator=g, dtype=F64).requires_grad_()
        out["ref_logits"] = out["logits"].detach() + 0.4 * torch.randn(B, T, V, generator=g, dtype=F64)
    else:
        out["hidden"] = torch.randn(B, T, H, generator=g, dtype=F64).requires_grad_()
        out["weight"] = torch.randn(V, H, generator=g, dtype=F64).requires_grad_()
        out["ref_hidden"] = out["hidden"].detach() + 0.1 * torch.randn(B, T, H, generator=g, dtype=F64)
        out["ref_weight"] = out["weight"].detach() + 0.1 * torch.randn(V, H, generator=g, dtype=F64)
    return out, step_start


def results(out, leaves):
    fields = torch.stack([out.loss, out.value_loss, out.policy_loss, out.kl, out.residual_abs,
                          out.first_value, out.first_advantage])
    grads = torch.autograd.grad(out.loss * 1.7, leaves)  # grad_output != 1
    return fields.detach(), grads


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("level", ["token", "step", "response"])
@pytest.mark.parametrize("kl_estimator", ["full", "k3"])
def test_oreo_loss_matches_reference(impl, level, kl_estimator):
    args, step_start = batch()
    S = state_mask_for_level(args["action_mask"], level, step_start)
    kw = dict(beta=0.1, kl_coef=0.05, level=level, kl_estimator=kl_estimator)
    leaves = (args["logits"], args["values"])
    expected = results(reference.oreo_loss_reference(**args, state_mask=S, **{
        k: v for k, v in kw.items() if k != "level"}), leaves)
    got = results(oreo_fast.oreo_loss(**args, state_mask=S, impl=impl, **kw), leaves)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-10, atol=1e-12)
    for x, y in zip(got[1], expected[1]):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("level", ["token", "step", "response"])
@pytest.mark.parametrize("kl_estimator", ["full", "k3"])
def test_fused_linear_loss_matches_logits_level(impl, level, kl_estimator):
    args, step_start = batch(H=5, V=37)
    S = state_mask_for_level(args["action_mask"], level, step_start)
    kw = dict(beta=0.1, kl_coef=0.05, level=level, kl_estimator=kl_estimator)
    leaves = (args["hidden"], args["weight"], args["values"])
    logits = args["hidden"] @ args["weight"].t()
    ref_logits = args["ref_hidden"] @ args["ref_weight"].t()
    expected = results(oreo_fast.oreo_loss(logits, ref_logits, args["actions"], args["values"],
                                           args["rewards"], args["action_mask"], S,
                                           impl="reference", **kw), leaves)
    got = results(oreo_fast.oreo_loss_fused_linear(**args, state_mask=S, impl=impl, chunk_rows=4,
                                                   **kw), leaves)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-10, atol=1e-12)
    for x, y in zip(got[1], expected[1]):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


def test_auto_is_torch_on_cpu_and_matches():
    args, _ = batch()
    S = state_mask_for_level(args["action_mask"], "token")
    a = oreo_fast.oreo_loss(**args, state_mask=S, impl="auto").loss
    b = oreo_fast.oreo_loss(**args, state_mask=S, impl="reference").loss
    torch.testing.assert_close(a, b)


def test_multi_turn_masks():
    """Observation tokens between assistant turns are neither states nor actions; at token
    level the last action of a turn links to the first action of the next turn."""
    args, _ = batch(B=2, T=10)
    m = torch.zeros(2, 10, dtype=torch.bool)
    m[:, 1:4] = True  # assistant turn 1
    m[:, 6:9] = True  # assistant turn 2, after observation tokens 4..5
    args["action_mask"] = m
    S = state_mask_for_level(m, "token")
    out = oreo_fast.oreo_loss(**args, state_mask=S, impl="torch")
    ref = reference.oreo_loss_reference(**args, state_mask=S)
    torch.testing.assert_close(out.loss, ref.loss)
    # garbage in observation logits must not leak (no NaN from masked rows)
    args["logits"] = args["logits"].detach().clone()
    args["logits"][:, 4:6] = float("nan")
    assert torch.isfinite(oreo_fast.oreo_loss(**args, state_mask=S, impl="torch").loss)


def _expect_error(match, **changes):
    args, step_start = batch()
    S = state_mask_for_level(args["action_mask"], changes.pop("_level", "token"), step_start)
    kwargs = dict(level="token")
    kwargs.update({k: changes.pop(k) for k in list(changes) if k in ("level", "beta", "kl_coef", "kl_estimator", "impl")})
    args.update(changes)
    args.setdefault("state_mask", S)
    with pytest.raises(ValueError, match=match):
        oreo_fast.oreo_loss(**args, **kwargs)


def test_argument_errors_name_the_argument():
    _expect_error("values", values=torch.zeros(3, 6, dtype=F64))
    _expect_error("values", values=torch.zeros(3, 7, dtype=torch.long))
    _expect_error("rewards", rewards=torch.zeros(2, dtype=F64))
    _expect_error("rewards contain NaN", rewards=torch.tensor([1.0, float("nan"), 0.0], dtype=F64))
    _expect_error("state_mask", state_mask=torch.zeros(3, 6, dtype=torch.bool))
    _expect_error("state_mask must equal action_mask", _level="step", level="token")
    _expect_error("first action", _level="token", level="response")
    _expect_error("subset", state_mask=torch.ones(3, 7, dtype=torch.bool), level="step")
    _expect_error("level", level="sentence")
    _expect_error("kl_estimator", kl_estimator="k2")
    _expect_error("beta", beta=float("nan"))
    _expect_error("kl_coef", kl_coef=-1.0)
    _expect_error("actions", actions=torch.zeros(3, 7))
