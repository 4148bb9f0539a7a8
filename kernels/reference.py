"""Torch twins of every loramux kernel: the readable specification the Triton kernels match.

Shape letters: T tokens, D_in/D_out around a linear, S adapter slots, R the slot rank
(--max-lora-rank), E experts, K top-k, H hidden, I expert intermediate size.
LoRA scale (alpha/r or alpha/sqrt(r)) is folded into B when an adapter is written to a slot,
so no op takes a scale. Ranks below R are zero-padded, which adds nothing.
Attention letters: B sequences, N/G query/KV heads, D head dim, W block-table width, R the
rotary dims of a head (R <= D; in rope ops only).
The elementwise twins (rms_norm, fused_add_rms_norm, qk_norm_rope, route, silu_and_mul) are
exactly the model's torch code, rounding order included (transformers' order), so a CPU run
stays bit-identical to transformers; their Triton versions keep the same casts.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from loramux.kernels.gated_delta import causal_conv1d, gated_delta_rule
from loramux.kernels.meta import LoraMeta

__all__ = ["MoeLora", "causal_conv1d", "fused_add_rms_norm", "fused_experts", "gated_delta_rule",
           "lora_delta", "paged_decode_attention", "paged_prefill_attention", "qk_norm_rope",
           "rms_norm", "route", "silu_and_mul"]

# The twins read device values on the host (unique, nonzero), so a CUDA graph cannot hold them.
CUDA_GRAPH_SAFE = False


class MoeLora(NamedTuple):
    """LoRA slot buffers of one MoE layer (one layout for 2D and 3D adapters).

    a_gate_up: [S, E, 2R, H]  rows [0:R] = A of gate (2D) or the shared gate_up A (3D),
                              rows [R:2R] = A of up (2D only)
    b_gate_up: [S, E, 2I, R]  rows [0:I] = B of gate, rows [I:2I] = B of up
    up_block:  [S] int32      which R-block of A the up half reads: 1 for 2D slots, 0 for 3D
                              slots (a 3D adapter's gate and up share one A)
    a_down:    [S, E, R, I]
    b_down:    [S, E, H, R]
    """

    a_gate_up: torch.Tensor
    b_gate_up: torch.Tensor
    up_block: torch.Tensor
    a_down: torch.Tensor
    b_down: torch.Tensor


def lora_delta(
    y: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    meta: LoraMeta,
    out_splits: tuple[int, ...],
) -> None:
    """Add the LoRA delta of every token's adapter slot to a (possibly multi-slice) linear.

    Semantics:
        R = b.shape[2]; o_j = sum(out_splits[:j])
        for t in range(T):
            s = meta.token_slot[t]
            if s < 0: continue
            h = x[t] @ a[s].T                                       # [n*R]
            for j in range(n):
                y[t, o_j:o_j+out_splits[j]] += h[j*R:(j+1)*R] @ b[s, o_j:o_j+out_splits[j]].T
    Args:
        y:    [T, D_out]       base linear output, updated in place
        x:    [T, D_in]        activations
        a:    [S, n*R, D_in]   one R-block of A per output slice (q/k/v, gate/up)
        b:    [S, D_out, R]
        meta: LoraMeta
        out_splits: n slice widths summing to D_out
    """
    if not meta.has_lora:
        return
    rank = b.shape[2]
    slots = meta.token_slot.long()
    for s in torch.unique(slots).tolist():
        if s < 0:
            continue
        rows = (slots == s).nonzero().squeeze(1)
        h = x[rows].float() @ a[s].float().T
        start = 0
        for j, width in enumerate(out_splits):
            hj = h[:, j * rank : (j + 1) * rank]
            delta = hj @ b[s, start : start + width].float().T
            y[rows, start : start + width] += delta.to(y.dtype)
            start += width


def _expert_lora(x: torch.Tensor, lora: MoeLora, slots: torch.Tensor, e: int) -> tuple:
    """gate_up and a closure for the down delta of tokens `x` routed to expert e."""
    rank = lora.b_down.shape[3]
    a = lora.a_gate_up[slots, e].float()  # [n, 2R, H]
    h = torch.einsum("nh,nrh->nr", x.float(), a)  # [n, 2R]
    up_start = lora.up_block[slots].long() * rank  # [n]
    idx = up_start[:, None] + torch.arange(rank, device=x.device)[None, :]
    h_gate, h_up = h[:, :rank], torch.gather(h, 1, idx)
    inter = lora.b_gate_up.shape[2] // 2
    b = lora.b_gate_up[slots, e].float()  # [n, 2I, R]
    gate = torch.einsum("nr,nir->ni", h_gate, b[:, :inter])
    up = torch.einsum("nr,nir->ni", h_up, b[:, inter:])
    return torch.cat([gate, up], dim=1)


def _down_lora(act: torch.Tensor, lora: MoeLora, slots: torch.Tensor, e: int) -> torch.Tensor:
    h = torch.einsum("ni,nri->nr", act.float(), lora.a_down[slots, e].float())
    return torch.einsum("nr,nhr->nh", h, lora.b_down[slots, e].float())


def fused_experts(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    lora: MoeLora | None,
    meta: LoraMeta | None,
) -> torch.Tensor:
    """Routed SiLU-gated experts with per-token MoE-LoRA, summed over top-k.

    Semantics:
        for t, k: e = topk_ids[t, k]; s = token_slot[t]
            if e < 0: continue                # another rank's expert (expert parallelism)
            gu = x[t] @ w_gate_up[e].T                                     # [2I]
            if s >= 0: gu[:I] += (x[t] @ A_gu[s, e, 0:R].T) @ B_gu[s, e, :I].T
                       gu[I:] += (x[t] @ A_gu[s, e, u*R:(u+1)*R].T) @ B_gu[s, e, I:].T
                                                                   (u = up_block[s])
            act = silu(gu[:I]) * gu[I:]                                    # [I]
            d = act @ w_down[e].T
            if s >= 0: d += (act @ A_down[s, e].T) @ B_down[s, e].T
            out[t] += topk_weights[t, k] * d
    Args:
        x: [T, H]; w_gate_up: [E, 2I, H] (gate rows then up rows); w_down: [E, H, I]
        topk_weights: [T, K] (x.dtype); topk_ids: [T, K] int, -1 for a pair left out
        lora: MoeLora slot buffers or None; meta: LoraMeta or None
    Returns:
        [T, H] in x.dtype
    """
    out = torch.zeros_like(x)
    use_lora = lora is not None and meta is not None and meta.has_lora
    token_slot = meta.token_slot.long() if use_lora else None
    inter = w_down.shape[2]
    for e in torch.unique(topk_ids).tolist():
        if e < 0:
            continue
        tok, pos = (topk_ids == e).nonzero(as_tuple=True)
        xs = x[tok]
        gate_up = F.linear(xs, w_gate_up[e])
        if use_lora:
            slots = token_slot[tok]
            has = (slots >= 0).nonzero().squeeze(1)
            if has.numel():
                delta = _expert_lora(xs[has], lora, slots[has], e)
                gate_up[has] += delta.to(gate_up.dtype)
        act = silu_and_mul(gate_up)
        down = F.linear(act, w_down[e])
        if use_lora and has.numel():
            down[has] += _down_lora(act[has], lora, slots[has], e).to(down.dtype)
        out.index_add_(0, tok, down * topk_weights[tok, pos, None])
    return out


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention of one query token per sequence over its first seq_len cached positions.

    Semantics:
        bs = block_size; g(h) = h // (N / G); L = seq_lens[b]
        for b, h: for j < L: K[j] = k_cache[block_tables[b, j // bs], j % bs, g(h)]  (V alike)
                  out[b, h] = softmax(scale * K @ q[b, h]) @ V       (zeros when L == 0)
    Args:
        q:            [B, N, D]      one query per sequence
        k_cache:      [num_blocks, block_size, G, D], v_cache alike
        block_tables: [B, W] int32   block ids (entries past a sequence's blocks: any valid id)
        seq_lens:     [B] int32      context length including this step's token (0: padding)
        scale:        softmax scale
    Returns:
        [B, N, D] in q.dtype

    All sequences go through one SDPA call: K/V are gathered through the whole tables to
    [B, G, W*bs, D], set to zero past each length, and masked there. The zeroing is what keeps
    sequences apart: past a length the gathered rows are table padding (block 0), stale rows of
    freed blocks or another sequence's blocks, and a mask alone passes their NaN / Inf on
    (NaN + -inf and 0 x NaN are NaN). The N/G query heads of a KV head ride as N/G query rows of
    that head, so no K/V is repeated and the masked memory-efficient kernel applies (SDPA's
    enable_gqa with a mask falls back to the slow math path).
    """
    num_seqs, num_heads, head_dim = q.shape
    k = k_cache[block_tables.long()].flatten(1, 2).transpose(1, 2)  # [B, G, L, D]
    v = v_cache[block_tables.long()].flatten(1, 2).transpose(1, 2)
    visible = torch.arange(k.shape[2], device=q.device)[None, :] < seq_lens[:, None]  # [B, L]
    k, v = (torch.where(visible[:, None, :, None], t, 0.0) for t in (k, v))
    q = q.reshape(num_seqs, k.shape[1], num_heads // k.shape[1], head_dim)  # [B, G, N/G, D]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible[:, None, None], scale=scale)
    out = out.reshape(num_seqs, num_heads, head_dim)
    return out.masked_fill((seq_lens == 0)[:, None, None], 0.0)


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start: torch.Tensor,
    seq_lens: torch.Tensor,
    max_query_len: int,
    scale: float,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its cached context (prefill, chunked
    prefill and decode rows alike).

    Semantics:
        bs = block_size; g(h) = h // (N / G); for sequence b: L = seq_lens[b],
        its new tokens are rows query_start[b] <= t < query_start[b + 1] (q_len of them), and
        new token j sits at position p = L - q_len + j
        for j < L: K[j] = k_cache[block_tables[b, j // bs], j % bs, g(h)]  (V alike)
        out[t, h] = softmax(scale * K[:p + 1] @ q[t, h]) @ V[:p + 1]
    Args:
        q:             [T, N, D]    the new tokens of all sequences, sequence after sequence
        k_cache:       [num_blocks, block_size, G, D], v_cache alike; already holding this
                       step's K/V
        block_tables:  [B, W] int32
        query_start:   [B + 1] int32 offsets of each sequence's rows in q
        seq_lens:      [B] int32     context length including this step's tokens (>= q_len)
        max_query_len: the largest q_len (sizes the Triton grid; unused here)
        scale:         softmax scale
    Returns:
        [T, N, D] in q.dtype

    One SDPA call per sequence over exactly its first L cached rows (nothing else of the cache
    is read), with the causal mask aligned bottom-right.
    """
    del max_query_len
    out = torch.empty_like(q)
    block_size = k_cache.shape[1]
    starts, lens = query_start.tolist(), seq_lens.tolist()
    for b, seq_len in enumerate(lens):
        start, end = starts[b], starts[b + 1]
        blocks = block_tables[b, :-(-seq_len // block_size)].long()
        k = k_cache[blocks].flatten(0, 1)[:seq_len].transpose(0, 1)[None]  # [1, G, L, D]
        v = v_cache[blocks].flatten(0, 1)[:seq_len].transpose(0, 1)[None]
        qi = q[start:end].transpose(0, 1)[None]  # [1, N, q_len, D]
        q_pos = torch.arange(seq_len - (end - start), seq_len, device=q.device)
        mask = torch.arange(seq_len, device=q.device)[None, :] <= q_pos[:, None]
        oi = F.scaled_dot_product_attention(qi, k, v, attn_mask=mask, scale=scale,
                                            enable_gqa=True)
        out[start:end] = oi[0].transpose(0, 1)
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             zero_centred: bool) -> torch.Tensor:
    """RMSNorm over the last dim, float32 inside (transformers' order).

    Semantics (h = x in float32, n = h / sqrt(mean(h^2) + eps)):
        plain:        weight * n.to(x.dtype)               (the product in the model dtype)
        zero_centred: (n * (1 + weight.float())).to(x.dtype)   (Qwen3.5 / Qwen3-Next)
    Args:
        x: [..., D]; weight: [D]
    Returns:
        [..., D] in x.dtype
    """
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if zero_centred:
        return (h * (1.0 + weight.float())).to(x.dtype)
    return weight * h.to(x.dtype)


def fused_add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    zero_centred: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add then RMSNorm (vLLM's fused_add_rms_norm, out of place).

    Semantics:
        s = x + residual        (in the model dtype; s = x when residual is None)
        return rms_norm(s, weight, eps, zero_centred), s
    Args:
        x:        [T, H]  the sublayer output (or the embeddings, with residual None)
        residual: [T, H]  the running residual stream, or None
        weight:   [H]
    Returns:
        (normed [T, H], new residual [T, H]), both in x.dtype
    """
    if residual is not None:
        x = x + residual
    return rms_norm(x, weight, eps, zero_centred), x


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [T] int, inv_freq [R/2] float32 -> cos, sin [T, R] in dtype:
    angle[t, i] = positions[t] * inv_freq[i % (R/2)] in float32 (rotate-half layout)."""
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on the first R dims of each head; the rest pass through.
    x [T, heads, D]; cos, sin [T, R], R <= D; products and sum in x.dtype."""
    rot = cos.shape[-1]
    if rot < x.shape[-1]:
        return torch.cat((apply_rope(x[..., :rot], cos, sin), x[..., rot:]), dim=-1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def qk_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    eps: float,
    zero_centred: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head RMSNorm of q and k (when weights are given), then rotate-half RoPE on the first
    R = 2 * len(inv_freq) dims of every head (partial rotary: dims R..D pass through).

    Semantics (x a head of q or k, w its norm weight, h = R / 2, i < R):
        x = rms_norm(x, w, eps, zero_centred)                     (if q_weight is not None)
        c, s = cos(p * inv_freq[i % h]), sin(...) in float32, then cast to the model dtype
        rot[i] = -x[i + h] if i < h else x[i - h]
        out[i] = x[i] * c + rot[i] * s   (each product and the sum rounded to the model dtype)
    Args:
        q: [T, N, D], k: [T, G, D] (any strides with a contiguous last dim)
        positions: [T] int; inv_freq: [R/2] float32
        q_weight, k_weight: [D] or None (no per-head q/k norm)
    Returns:
        (q [T, N, D], k [T, G, D]) new contiguous tensors in q.dtype
    """
    if q_weight is not None:
        q, k = rms_norm(q, q_weight, eps, zero_centred), rms_norm(k, k_weight, eps, zero_centred)
    cos, sin = rope_cos_sin(positions, inv_freq, q.dtype)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool,
          dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Router: softmax over experts in float32, top-k, optionally renormalised over the k
    (= Mixtral's softmax over the top-k logits).

    Semantics:
        p = softmax(router_logits.float())                       # [T, E]
        weights, ids = topk(p, K)                                # descending
        if renormalize: weights = weights / sum(weights)
    Args:
        router_logits: [T, E]
    Returns:
        (topk_weights [T, K] in dtype, topk_ids [T, K] int64)
    Ties: torch.topk's, which on a CPU picks an unspecified member of equal probabilities at
    the k-th place; the Triton kernel takes the lowest expert id (as CUDA's torch.topk does).
    """
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(dtype), ids


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SiLU-gated product of a fused gate/up output.

    Semantics: out = silu(x[:, :I]) * x[:, I:], silu rounded to x.dtype before the product.
    Args: x [T, 2I] (gate columns then up columns). Returns: [T, I] in x.dtype.
    """
    inter = x.shape[-1] // 2
    return F.silu(x[..., :inter]) * x[..., inter:]
