"""Torch twins of the Gated DeltaNet ops: the causal conv and the gated delta rule.

Both run over one step's tokens of N sequences packed in order (lengths `query_lens`, offsets
`query_start`), each resuming from its saved state, and return the states to save. A new
sequence passes a zero state. Shape letters: T tokens, N sequences, C conv channels, K conv
taps, HK / HV key / value heads, Dk / Dv their dims. The recurrence is float32 throughout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_CHUNK = 64


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor,
                  query_start: torch.Tensor, query_lens: list[int],
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal convolution with SiLU, per sequence, from its last K-1 inputs.

    Semantics, for each sequence n with tokens x_n [t, C] and window s_n = state[n] [C, K-1]:
        xs = cat(s_n, x_n^T)                                   # [C, K-1+t]
        y_n[i, c] = silu(sum_j weight[c, j] * xs[c, i + j])    # i < t
        new_state[n] = xs[:, t:]                               # the last K-1 inputs
    Args: x [T, C], weight [C, K], state [N, C, K-1], query_start [N+1] (unused by the twin).
    Returns: y [T, C] in x's dtype, new_state [N, C, K-1] in state's dtype.
    """
    width = weight.shape[1] - 1
    if all(n == 1 for n in query_lens):  # decode: every sequence at once
        xs = torch.cat((state.to(x.dtype), x[:, :, None]), dim=-1)  # [N, C, K]
        y = F.conv1d(xs, weight[:, None, :].to(x.dtype), groups=x.shape[1])[:, :, 0]
        return F.silu(y), xs[:, :, xs.shape[-1] - width:].to(state.dtype)
    outs, states, start = [], [], 0
    for n, length in enumerate(query_lens):
        xs = torch.cat((state[n].to(x.dtype), x[start:start + length].T), dim=-1)[None]
        y = F.conv1d(xs, weight[:, None, :].to(x.dtype), groups=x.shape[1])[0]  # [C, t]
        outs.append(F.silu(y).T)
        states.append(xs[0, :, xs.shape[-1] - width:])
        start += length
    return torch.cat(outs), torch.stack(states).to(state.dtype)


def _l2norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + 1e-6)


def _prepare(q: torch.Tensor, k: torch.Tensor, num_value_heads: int) -> tuple[torch.Tensor, ...]:
    """L2-normalized float32 q (scaled by Dk**-0.5) and k, each key head repeated for the
    HV / HK value heads it serves (value head h reads key head h // (HV / HK))."""
    repeat = num_value_heads // k.shape[-2]
    q, k = (t.float().repeat_interleave(repeat, dim=-2) for t in (q, k))
    return _l2norm(q) * q.shape[-1] ** -0.5, _l2norm(k)


def recurrent_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                   beta: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of each of N sequences. q, k [N, HV, Dk] (prepared), v [N, HV, Dv], g, beta
    [N, HV], state [N, HV, Dk, Dv], all float32 -> o [N, HV, Dv], new state."""
    state = state * g.exp()[..., None, None]
    predicted = (state * k[..., None]).sum(dim=-2)  # S^T k  [N, HV, Dv]
    delta = (v - predicted) * beta[..., None]
    state = state + k[..., None] * delta[..., None, :]
    return (state * q[..., None]).sum(dim=-2), state


def chunked_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                 beta: torch.Tensor, state: torch.Tensor,
                 chunk: int = _CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """The same recurrence over t tokens of one sequence, in chunks (the UT/WY form).

    q, k [HV, t, Dk] (prepared), v [HV, t, Dv], g, beta [HV, t], state [HV, Dk, Dv], float32.
    Within a chunk with cumulative log-decay c_i = g_1 + ... + g_i and L the unit lower
    triangle of (beta_i k_i . k_j) exp(c_i - c_j):
        u = L^-1 (beta v),  w = L^-1 (beta exp(c) k),  v' = u - w S
        o = exp(c) q S + ((q k^T) * exp(c_i - c_j) [j <= i]) v'
        S <- exp(c_last) S + (exp(c_last - c) k)^T v'
    Returns o [HV, t, Dv], the state after the last token.
    """
    length = k.shape[1]
    pad = -length % chunk
    q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    g, beta = (F.pad(t, (0, pad)) for t in (g, beta))  # padding: no decay, no update
    heads, n = k.shape[0], k.shape[1] // chunk
    q, k, v = (t.reshape(heads, n, chunk, -1) for t in (q, k, v))
    g, beta = g.reshape(heads, n, chunk), beta.reshape(heads, n, chunk)
    cum = g.cumsum(dim=-1)
    lower = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    decay = (cum[..., :, None] - cum[..., None, :]).masked_fill(~lower, float("-inf")).exp()
    k_beta = k * beta[..., None]
    system = (k_beta @ k.transpose(-1, -2)) * decay
    u = torch.linalg.solve_triangular(system, v * beta[..., None], upper=False,
                                      unitriangular=True)
    w = torch.linalg.solve_triangular(system, k_beta * cum.exp()[..., None], upper=False,
                                      unitriangular=True)
    attn = (q @ k.transpose(-1, -2)) * decay
    q_decayed = q * cum.exp()[..., None]
    k_decayed = k * (cum[..., -1:] - cum).exp()[..., None]
    chunk_decay = cum[..., -1].exp()[..., None, None]
    out = torch.empty_like(v)
    for i in range(n):
        v_new = u[:, i] - w[:, i] @ state
        out[:, i] = q_decayed[:, i] @ state + attn[:, i] @ v_new
        state = state * chunk_decay[:, i] + k_decayed[:, i].transpose(-1, -2) @ v_new
    return out.reshape(heads, n * chunk, -1)[:, :length], state


def gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                     beta: torch.Tensor, state: torch.Tensor, query_start: torch.Tensor,
                     query_lens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated delta rule per sequence, from its saved state (q/k L2-normalized inside).

    Semantics, per sequence and value head h (key head h // (HV / HK)), state S [Dk, Dv]:
        q_t <- l2norm(q_t) / sqrt(Dk);  k_t <- l2norm(k_t)
        S <- exp(g_t) S;  S <- S + k_t (beta_t (v_t - S^T k_t))^T;  o_t = S^T q_t
    Args: q, k [T, HK, Dk], v [T, HV, Dv], g (log decay, <= 0) and beta [T, HV] float32,
        state [N, HV, Dk, Dv] float32, query_start [N+1] (unused by the twin).
    Returns: o [T, HV, Dv] in v's dtype, new_state [N, HV, Dk, Dv] float32.
    """
    qp, kp = _prepare(q, k, v.shape[1])
    vf, g, beta = v.float(), g.float(), beta.float()
    if all(n == 1 for n in query_lens):  # decode: one recurrent step for every sequence
        out, new_state = recurrent_step(qp, kp, vf, g, beta, state.float())
        return out.to(v.dtype), new_state
    outs, states, start = [], [], 0
    for n, length in enumerate(query_lens):
        part = slice(start, start + length)
        o, s = chunked_rule(*(t[part].transpose(0, 1) for t in (qp, kp, vf, g, beta)),
                            state[n].float())
        outs.append(o.transpose(0, 1))
        states.append(s)
        start += length
    return torch.cat(outs).to(v.dtype), torch.stack(states)
