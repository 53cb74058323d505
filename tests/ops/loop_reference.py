"""An explicit, token-by-token Python loop of the OREO losses: the independent check of
oreo_fast.ops.reference (which is vectorised). Slow by design; tiny shapes only."""
import math



def per_token_loop(logits, ref_logits, actions):
    """Lists of (logp, ref_logp, kl) floats per row, computed one vocabulary entry at a time."""
    B, T, V = logits.shape
    out = []
    for b in range(B):
        row = []
        for t in range(T):
            z = [float(x) for x in logits[b, t]]
            r = [float(x) for x in ref_logits[b, t]]
            lse_z = math.log(sum(math.exp(x - max(z)) for x in z)) + max(z)
            lse_r = math.log(sum(math.exp(x - max(r)) for x in r)) + max(r)
            a = int(actions[b, t])
            kl = sum(math.exp(z[v] - lse_z) * ((z[v] - lse_z) - (r[v] - lse_r)) for v in range(V))
            row.append((z[a] - lse_z, r[a] - lse_r, kl))
        out.append(row)
    return out


def losses_loop(per_token, values, rewards, action_mask, state_mask, beta, kl_coef, kl_estimator):
    """(value_loss, policy_loss) as floats, following the paper's equations literally."""
    B = len(per_token)
    value_total, policy_total = 0.0, 0.0
    for b in range(B):
        T = len(per_token[b])
        m = [bool(action_mask[b, t]) for t in range(T)]
        S = [bool(state_mask[b, t]) for t in range(T)]
        lr = [per_token[b][t][0] - per_token[b][t][1] if m[t] else 0.0 for t in range(T)]
        R = float(rewards[b])
        states = [t for t in range(T) if S[t]]
        v_sq, p_sq = [], []
        for k, t in enumerate(states):
            nxt = states[k + 1] if k + 1 < len(states) else T
            own = sum(lr[t:nxt])  # the log-ratios this state's residual is trained through
            later = sum(lr[nxt:])  # A at the next state (stop-gradient)
            V = float(values[b, t])
            v_sq.append((V - R + beta * sum(lr[t:])) ** 2)
            p_sq.append((V - R + beta * own + beta * later) ** 2)
        if states:
            value_total += sum(v_sq) / len(v_sq)
            policy_total += sum(p_sq) / len(p_sq)
        actions_idx = [t for t in range(T) if m[t]]
        if actions_idx:
            kls = []
            for t in actions_idx:
                logp, ref_logp, kl = per_token[b][t]
                if kl_estimator == "k3":
                    d = ref_logp - logp
                    kl = math.exp(d) - d - 1
                kls.append(kl)
            policy_total += kl_coef * sum(kls) / len(kls)
    return value_total / B, policy_total / B
