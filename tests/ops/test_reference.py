"""oreo_fast.ops.reference against an explicit Python loop, and autograd.gradcheck where the
objective has no stop-gradient in the way."""
import pytest
import torch

from loop_reference import losses_loop, per_token_loop
from oreo_fast import state_mask_for_level
from oreo_fast.ops import reference

F64 = torch.float64


def make_batch(B=3, T=9, V=11, seed=0, left_pad=(0, 2, 1), prompt=(2, 1, 3), right_pad=(0, 0, 2)):
    """Random logits plus masks with left padding, a prompt, a response and right padding."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=F64)
    ref_logits = logits + 0.5 * torch.randn(B, T, V, generator=g, dtype=F64)
    actions = torch.randint(0, V, (B, T), generator=g)
    action_mask = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        action_mask[b, left_pad[b] + prompt[b]: T - right_pad[b]] = True
    step_start = torch.rand(B, T, generator=g) < 0.35
    values = torch.randn(B, T, generator=g, dtype=F64) * 0.3
    rewards = torch.tensor([1.0, 0.0, 1.0][:B], dtype=F64)
    return logits, ref_logits, actions, action_mask, step_start, values, rewards


@pytest.mark.parametrize("level", ["token", "step", "response"])
@pytest.mark.parametrize("kl_estimator", ["full", "k3"])
def test_reference_matches_python_loop(level, kl_estimator):
    logits, ref_logits, actions, m, step_start, values, rewards = make_batch()
    S = state_mask_for_level(m, level, step_start)
    out = reference.oreo_loss_reference(
        logits, ref_logits, actions, values, rewards, m, S,
        beta=0.1, kl_coef=0.05, kl_estimator=kl_estimator,
    )
    per_token = per_token_loop(logits, ref_logits, actions)
    value_loss, policy_loss = losses_loop(per_token, values, rewards, m, S, 0.1, 0.05, kl_estimator)
    assert out.value_loss.item() == pytest.approx(value_loss, rel=1e-10, abs=1e-12)
    assert out.policy_loss.item() == pytest.approx(policy_loss, rel=1e-10, abs=1e-12)
    assert out.loss.item() == pytest.approx(value_loss + policy_loss, rel=1e-10)


def test_per_token_quantities_match_loop():
    logits, ref_logits, actions, *_ = make_batch(V=5)
    logp, ref_logp, kl = reference.token_logprobs_and_kl(logits, ref_logits, actions)
    loop = torch.tensor(per_token_loop(logits, ref_logits, actions), dtype=F64)
    torch.testing.assert_close(torch.stack([logp, ref_logp, kl], -1), loop, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("level", ["token", "step", "response"])
def test_policy_gradient_is_the_semi_gradient(level):
    """d L_pi / d logp_i = sum over states t whose own tokens include i of
    2 * res_t * beta / (n_states * B): the stop-gradients cut everything else."""
    _, _, _, m, step_start, values, rewards = make_batch()
    B, T = m.shape
    g = torch.Generator().manual_seed(3)
    logp = (torch.randn(B, T, generator=g, dtype=F64) - 2).requires_grad_()
    ref_logp = torch.randn(B, T, generator=g, dtype=F64) - 2
    S = state_mask_for_level(m, level, step_start)
    beta = 0.2
    out = reference.bellman_losses(logp, ref_logp, None, values, rewards, m, S, beta=beta,
                                   kl_coef=0.0, kl_estimator="k3")
    (grad,) = torch.autograd.grad(out.policy_loss, logp)
    expected = torch.zeros(B, T, dtype=F64)
    for b in range(B):
        lr = [(logp[b, t] - ref_logp[b, t]).item() if m[b, t] else 0.0 for t in range(T)]
        states = [t for t in range(T) if S[b, t]]
        for k, t in enumerate(states):
            nxt = states[k + 1] if k + 1 < len(states) else T
            res = values[b, t].item() - rewards[b].item() + beta * sum(lr[t:])
            for i in range(t, nxt):
                if m[b, i]:
                    expected[b, i] += 2 * res * beta / (len(states) * B)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)


def test_gradcheck_per_token_quantities():
    logits, ref_logits, actions, *_ = make_batch(B=2, T=3, V=5)
    logits.requires_grad_()
    torch.autograd.gradcheck(
        lambda z: reference.token_logprobs_and_kl(z, ref_logits, actions), (logits,)
    )


def test_gradcheck_value_loss_and_response_level_policy_loss():
    """The value loss in V and the response-level policy loss in the logits have no
    stop-gradient on the differentiated path, so finite differences must agree."""
    logits, ref_logits, actions, m, _, values, rewards = make_batch(B=2, T=6, V=4,
                                                                    left_pad=(0, 1), prompt=(1, 2),
                                                                    right_pad=(1, 0))
    S = state_mask_for_level(m, "response")
    values.requires_grad_()
    logits.requires_grad_()

    def value_loss(v):
        return reference.oreo_loss_reference(logits.detach(), ref_logits, actions, v, rewards, m, S,
                                             beta=0.3).value_loss

    def policy_loss(z):
        return reference.oreo_loss_reference(z, ref_logits, actions, values.detach(), rewards, m,
                                             S, beta=0.3, kl_coef=0.2).policy_loss

    torch.autograd.gradcheck(value_loss, (values,))
    torch.autograd.gradcheck(policy_loss, (logits,))


def test_sequences_without_states_or_actions_contribute_zero():
    logits, ref_logits, actions, m, _, values, rewards = make_batch()
    m[1] = False  # sequence 1: no action at all (e.g. an empty or fully truncated response)
    S = state_mask_for_level(m, "token")
    out = reference.oreo_loss_reference(logits, ref_logits, actions, values, rewards, m, S)
    keep = torch.tensor([0, 2])
    sub = reference.oreo_loss_reference(logits[keep], ref_logits[keep], actions[keep],
                                        values[keep], rewards[keep], m[keep], S[keep])
    assert torch.isfinite(out.loss)
    # sequence 1 adds nothing to the sums; the batch mean still divides by all 3 sequences
    torch.testing.assert_close(out.loss * 3, sub.loss * 2)
    empty = reference.oreo_loss_reference(logits, ref_logits, actions, values, rewards,
                                          torch.zeros_like(m), torch.zeros_like(m))
    assert empty.loss.item() == 0.0 and torch.isfinite(empty.first_value)


def test_num_sequences_makes_splits_add_up():
    """Two halves normalised by the global count sum to the loss of the whole batch."""
    logits, ref_logits, actions, m, step_start, values, rewards = make_batch()
    S = state_mask_for_level(m, "step", step_start)
    whole = reference.oreo_loss_reference(logits, ref_logits, actions, values, rewards, m, S)
    parts = [
        reference.oreo_loss_reference(logits[i], ref_logits[i], actions[i], values[i], rewards[i],
                                      m[i], S[i], num_sequences=3).loss
        for i in (slice(0, 1), slice(1, 3))
    ]
    torch.testing.assert_close(parts[0] + parts[1], whole.loss)


def test_next_state_index_and_reverse_cumsum():
    S = torch.tensor([[False, True, False, False, True, False]])
    assert reference.next_state_index(S).tolist() == [[1, 4, 4, 4, 6, 6]]
    x = torch.tensor([[1.0, 2.0, 3.0]])
    assert reference.reverse_cumsum(x).tolist() == [[6.0, 5.0, 3.0]]


def test_diagnostics():
    logits, ref_logits, actions, m, _, values, rewards = make_batch()
    S = state_mask_for_level(m, "token")
    out = reference.oreo_loss_reference(logits, ref_logits, actions, values, rewards, m, S)
    logp, ref_logp, _ = reference.token_logprobs_and_kl(logits, ref_logits, actions)
    log_ratio = torch.where(m, logp - ref_logp, torch.zeros_like(logp))
    first = [int(S[b].nonzero()[0]) for b in range(3)]
    A_first = [log_ratio[b, first[b]:].sum().item() for b in range(3)]
    V_first = [values[b, first[b]].item() for b in range(3)]
    assert out.first_value.item() == pytest.approx(sum(V_first) / 3)
    assert out.first_advantage.item() == pytest.approx(sum(A_first) / 3)
    assert not out.kl.requires_grad and out.kl.item() > 0
