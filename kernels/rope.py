"""qk_norm_rope: per-head RMSNorm of q and k, then rotate-half RoPE, in one launch.

One program per token walks q's N heads and then k's G heads as [heads, D] tiles. Each tile is
loaded twice, at its own dims and at the rotate-half partner dims (i +- R/2), so the rotation
needs no register shuffle; both copies are normalised with the head's one rstd. cos and sin come
from the token's position and inv_freq in the kernel (no [T, R] tables) in float32 and are cast
to the model dtype, and every product and sum is rounded as the torch twin rounds it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from loramux.kernels._utils import next_power_of_2


@triton.jit
def _norm(x, rstd, w, ZERO_CENTRED: tl.constexpr):
    """rms_norm of fp32 x [BLOCK_H, BLOCK_D] by its rows' rstd [BLOCK_H] and the model-dtype
    weight w [BLOCK_D], in the twin's casts; returns the model-dtype result as float32."""
    n = x * rstd[:, None]
    wf = w.to(tl.float32)[None, :]
    if ZERO_CENTRED:
        y = n * (1.0 + wf)
    else:
        y = n.to(w.dtype).to(tl.float32) * wf
    return y.to(w.dtype).to(tl.float32)


@triton.jit
def _heads(
    x_ptr, out_ptr, w_ptr, inv_freq_ptr, pos, eps, num_heads, head_dim, half,
    stride_h, stride_oh,
    HAS_NORM: tl.constexpr, ZERO_CENTRED: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    mask = (offs_h < num_heads)[:, None] & d_mask[None, :]
    rot = offs_d < 2 * half
    first = offs_d < half
    partner = tl.where(first, offs_d + half, offs_d - half)
    p_mask = mask & rot[None, :]
    rows = x_ptr + offs_h[:, None] * stride_h
    x = tl.load(rows + offs_d[None, :], mask=mask, other=0.0)
    dtype = x.dtype
    x = x.to(tl.float32)
    xp = tl.load(rows + partner[None, :], mask=p_mask, other=0.0).to(tl.float32)
    if HAS_NORM:
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / head_dim + eps)
        w = tl.load(w_ptr + offs_d, mask=d_mask, other=0.0)
        wp = tl.load(w_ptr + partner, mask=rot & d_mask, other=0.0)
        x = _norm(x, rstd, w, ZERO_CENTRED)
        xp = _norm(xp, rstd, wp, ZERO_CENTRED)
    freq = tl.load(inv_freq_ptr + tl.where(first, offs_d, offs_d - half), mask=rot, other=0.0)
    angle = pos * freq
    c = tl.cos(angle).to(dtype).to(tl.float32)  # libdevice cosf / sinf on NVIDIA: full range
    s = tl.sin(angle).to(dtype).to(tl.float32)  # reduction, so long-context angles stay exact
    rotated = tl.where(first[None, :], -xp, xp)
    y = ((x * c[None, :]).to(dtype).to(tl.float32)
         + (rotated * s[None, :]).to(dtype).to(tl.float32))
    y = tl.where(rot[None, :], y, x)
    tl.store(out_ptr + offs_h[:, None] * stride_oh + offs_d[None, :], y.to(dtype), mask=mask)


@triton.jit
def _qk_norm_rope_kernel(
    q_out_ptr, k_out_ptr, q_ptr, k_ptr, qw_ptr, kw_ptr, pos_ptr, inv_freq_ptr,
    eps, num_q_heads, num_k_heads, head_dim, half,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_oqt, stride_oqh, stride_okt, stride_okh,
    HAS_NORM: tl.constexpr, ZERO_CENTRED: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.float32)
    _heads(q_ptr + t * stride_qt, q_out_ptr + t * stride_oqt, qw_ptr, inv_freq_ptr, pos, eps,
           num_q_heads, head_dim, half, stride_qh, stride_oqh,
           HAS_NORM, ZERO_CENTRED, BLOCK_HQ, BLOCK_D)
    _heads(k_ptr + t * stride_kt, k_out_ptr + t * stride_okt, kw_ptr, inv_freq_ptr, pos, eps,
           num_k_heads, head_dim, half, stride_kh, stride_okh,
           HAS_NORM, ZERO_CENTRED, BLOCK_HK, BLOCK_D)


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
    """Per-head q/k RMSNorm (optional) and partial rotate-half RoPE.

    The Triton version of kernels.reference.qk_norm_rope: same Semantics, Args and Returns.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    num_k_heads = k.shape[1]
    half = inv_freq.shape[0]
    assert k.shape == (num_tokens, num_k_heads, head_dim), "k must be [T, G, D]"
    assert positions.shape == (num_tokens,), "one position per token"
    assert 0 < 2 * half <= head_dim and inv_freq.dtype == torch.float32, "inv_freq [R/2] fp32"
    assert q.stride(2) == k.stride(2) == 1, "head dims must be contiguous"
    assert q.dtype == k.dtype, "q and k share a dtype"
    has_norm = q_weight is not None
    if has_norm:
        assert q_weight.shape == k_weight.shape == (head_dim,), "per-head norm weights [D]"
        assert q_weight.dtype == k_weight.dtype == q.dtype, "norm weights in the model dtype"
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if num_tokens == 0:
        return q_out, k_out
    block_d = next_power_of_2(head_dim)
    block_hq = next_power_of_2(num_q_heads)
    _qk_norm_rope_kernel[(num_tokens,)](
        q_out, k_out, q, k, q_weight if has_norm else q, k_weight if has_norm else k,
        positions, inv_freq, eps, num_q_heads, num_k_heads, head_dim, half,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
        HAS_NORM=has_norm, ZERO_CENTRED=zero_centred,
        BLOCK_HQ=block_hq, BLOCK_HK=next_power_of_2(num_k_heads), BLOCK_D=block_d,
        num_warps=max(1, min(8, block_hq * block_d // 512)),
    )
    return q_out, k_out
