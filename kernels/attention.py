"""Paged decode attention: one query token per sequence over its paged KV cache.

A program owns one sequence and one KV head. The N/G query heads that share the KV head ride
as the rows of one tile (padded to 16 for tl.dot), so each cached K/V row is read once for all
of them. The program walks the context BLOCK_N positions at a time, looks each position's block
up in the block table, and keeps an online softmax (running max m, running sum l, fp32
accumulator), so it reads only the seq_len cached rows and never the blocks past them: lanes
past seq_len load zeros (other=0) and score -inf, so whatever the cache holds there (table
padding, stale rows of freed blocks, another sequence's blocks, NaN or Inf) adds exactly zero.
A sequence of length 0 (a CUDA-graph padding row) runs no iteration and writes zeros.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from loramux.kernels._utils import dot_precision, dot_width

LAUNCH = dict(block_n=64, num_warps=4, num_stages=2)


@triton.jit
def _paged_decode_kernel(
    # pointers
    out_ptr, q_ptr, k_ptr, v_ptr, block_tables_ptr, seq_lens_ptr,
    # sizes
    qk_scale, group, head_dim, block_size,
    # strides
    stride_qb, stride_qh, stride_ob, stride_oh,
    stride_kb, stride_ks, stride_kg, stride_vb, stride_vs, stride_vg, stride_tb,
    # meta
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq)
    offs_h = tl.arange(0, BLOCK_H)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    hd_mask = (offs_h < group)[:, None] & d_mask[None, :]
    heads = kv_head * group + offs_h
    q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=hd_mask, other=0.0)
    m = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_D), dtype=tl.float32)
    table = block_tables_ptr + seq * stride_tb
    for start in range(0, seq_len, BLOCK_N):
        pos = start + offs_n
        n_mask = pos < seq_len
        block = tl.load(table + pos // block_size, mask=n_mask, other=0).to(tl.int64)
        offset = pos % block_size
        nd_mask = n_mask[:, None] & d_mask[None, :]
        k_rows = k_ptr + block * stride_kb + offset * stride_ks + kv_head * stride_kg
        k = tl.load(k_rows[:, None] + offs_d[None, :], mask=nd_mask, other=0.0)
        # scores in log2 units: qk_scale = scale * log2(e)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_H, BLOCK_N]
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        v_rows = v_ptr + block * stride_vb + offset * stride_vs + kv_head * stride_vg
        v = tl.load(v_rows[:, None] + offs_d[None, :], mask=nd_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m = m_new
    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    out_ptrs = out_ptr + seq * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=hd_mask)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention of one query token per sequence over its first seq_len cached positions.

    The Triton version of kernels.reference.paged_decode_attention: same Semantics and shapes.
    Here also: the last dims of q and the caches are contiguous; block-table entries past a
    sequence's blocks are never read. One program per (sequence, KV head) walks the blocks with
    an online softmax in fp32.
    """
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    assert k_cache.shape == v_cache.shape and k_cache.shape[3] == head_dim, "caches [*, bs, G, D]"
    assert num_heads % num_kv_heads == 0, "query heads must be a multiple of KV heads"
    assert block_tables.shape[0] == seq_lens.shape[0] == num_seqs, "one table and length per seq"
    assert block_tables.dtype == seq_lens.dtype == torch.int32, "tables and lengths are int32"
    assert q.stride(2) == k_cache.stride(3) == v_cache.stride(3) == 1, "head dim contiguous"
    assert block_tables.stride(1) == 1, "block table rows must be contiguous"
    assert q.dtype == k_cache.dtype == v_cache.dtype, "q and caches share a dtype"
    group = num_heads // num_kv_heads
    out = torch.empty(num_seqs, num_heads, head_dim, dtype=q.dtype, device=q.device)
    if num_seqs == 0:
        return out
    context = block_tables.shape[1] * block_size  # most positions any sequence can have
    _paged_decode_kernel[(num_seqs, num_kv_heads)](
        out, q, k_cache, v_cache, block_tables, seq_lens,
        scale * math.log2(math.e), group, head_dim, block_size,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        *k_cache.stride()[:3], *v_cache.stride()[:3], block_tables.stride(0),
        BLOCK_H=dot_width(group, 128), BLOCK_N=dot_width(context, LAUNCH["block_n"]),
        BLOCK_D=dot_width(head_dim, 1024), DOT_PRECISION=dot_precision(q.dtype),
        num_warps=LAUNCH["num_warps"], num_stages=LAUNCH["num_stages"],
    )
    return out
