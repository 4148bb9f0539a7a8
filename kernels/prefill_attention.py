"""Paged variable-length attention: any number of new query tokens per sequence (prefill,
chunked prefill and decode rows in one launch) over each sequence's paged KV cache.

A program owns one sequence, one KV head and BLOCK_Q of that sequence's new tokens. The GROUP
query heads sharing the KV head ride beside each token, so the tile has BLOCK_M = BLOCK_Q *
GROUP rows (row r: token r // GROUP, head r % GROUP) and each K/V row it loads serves all of
them. New token j of a sequence with context length L and q_len new tokens sits at position
L - q_len + j and sees the positions up to it (causal within the new tokens, full over the
cached ones): the program walks the context BLOCK_N positions at a time, only up to its last
token's position, looks each position's block up in the block table, and keeps an online
softmax in fp32. The key tiles before the tile's first position are visible to every row and
run unmasked; on the rest, lanes past a row's limit load zeros and score -inf, so no mask is
materialised and nothing past a sequence's length is read into a result. Memory is O(tile),
whatever L is.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from loramux.kernels._utils import dot_precision, dot_width, next_power_of_2

# Tiles by the longest query run of the launch (swept on an H200 with Qwen3-30B-A3B heads,
# benchmarks/sweep_prefill_attention.py): short runs prefer small tiles, long ones big tiles.
LAUNCH = dict(block_m=128, block_n=32, num_warps=4, num_stages=2)
LAUNCH_LONG = dict(block_m=256, block_n=64, num_warps=8, num_stages=3)
LONG_QUERY = 1024


@triton.jit
def _attend(acc, m, l, q, q_pos, k_ptr, v_ptr, table, start, stop, offs_n, offs_d, d_mask,
            qk_scale, block_size, kv_head, stride_kb, stride_ks, stride_kg, stride_vb,
            stride_vs, stride_vg, MASKED: tl.constexpr, BLOCK_N: tl.constexpr,
            DOT_PRECISION: tl.constexpr):
    """Online-softmax update over key positions [start, stop). MASKED: some lane may lie past
    `stop` or after a row's position (the diagonal tiles); else every lane is visible."""
    for first_key in range(start, stop, BLOCK_N):
        pos = first_key + offs_n
        if MASKED:
            n_mask = pos < stop
            block = tl.load(table + pos // block_size, mask=n_mask, other=0).to(tl.int64)
            nd_mask = n_mask[:, None] & d_mask[None, :]
        else:
            block = tl.load(table + pos // block_size).to(tl.int64)
            nd_mask = d_mask[None, :]
        offset = pos % block_size
        k_rows = k_ptr + block * stride_kb + offset * stride_ks + kv_head * stride_kg
        k = tl.load(k_rows[:, None] + offs_d[None, :], mask=nd_mask, other=0.0)
        # scores in log2 units: qk_scale = scale * log2(e)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        if MASKED:
            s = tl.where(n_mask[None, :] & (pos[None, :] <= q_pos[:, None]), s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))  # finite: position 0 is always visible
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        v_rows = v_ptr + block * stride_vb + offset * stride_vs + kv_head * stride_vg
        v = tl.load(v_rows[:, None] + offs_d[None, :], mask=nd_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m = m_new
    return acc, m, l


@triton.jit
def _paged_prefill_kernel(
    # pointers
    out_ptr, q_ptr, k_ptr, v_ptr, block_tables_ptr, query_start_ptr, seq_lens_ptr,
    # sizes
    qk_scale, head_dim, block_size,
    # strides
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kg, stride_vb, stride_vs, stride_vg, stride_tb,
    # meta
    GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    q_block = tl.program_id(1)
    kv_head = tl.program_id(2)
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    first = q_block * BLOCK_Q  # this program's first new token of the sequence
    if first >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    tok = first + offs_m // GROUP  # new-token index of each row
    heads = kv_head * GROUP + offs_m % GROUP
    row_ok = (offs_m < BLOCK_Q * GROUP) & (tok < q_len)
    d_mask = offs_d < head_dim
    md_mask = row_ok[:, None] & d_mask[None, :]
    rows = (q_start + tok).to(tl.int64)
    q = tl.load(q_ptr + rows[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=md_mask, other=0.0)
    q_pos = seq_len - q_len + tok  # [BLOCK_M] position of each row's token
    end = tl.minimum(seq_len, seq_len - q_len + first + BLOCK_Q)  # past the last row's position
    full = (seq_len - q_len + first) // BLOCK_N * BLOCK_N  # keys before it: visible to all rows
    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    table = block_tables_ptr + seq * stride_tb
    strides = (stride_kb, stride_ks, stride_kg, stride_vb, stride_vs, stride_vg)
    acc, m, l = _attend(acc, m, l, q, q_pos, k_ptr, v_ptr, table, 0, full, offs_n, offs_d,
                        d_mask, qk_scale, block_size, kv_head, *strides, False, BLOCK_N,
                        DOT_PRECISION)
    acc, m, l = _attend(acc, m, l, q, q_pos, k_ptr, v_ptr, table, full, end, offs_n, offs_d,
                        d_mask, qk_scale, block_size, kv_head, *strides, True, BLOCK_N,
                        DOT_PRECISION)
    out = acc / l[:, None]
    out_ptrs = out_ptr + rows[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=md_mask)


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
    """Causal attention of each sequence's new tokens over its cached context.

    The Triton version of kernels.reference.paged_prefill_attention: same Semantics and shapes.
    Here also: the last dims of q and the caches are contiguous. One program per (sequence,
    BLOCK_Q new tokens, KV head), an online softmax in fp32; max_query_len sizes the grid.
    """
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    num_seqs = seq_lens.shape[0]
    assert k_cache.shape == v_cache.shape and k_cache.shape[3] == head_dim, "caches [*, bs, G, D]"
    assert num_heads % num_kv_heads == 0, "query heads must be a multiple of KV heads"
    assert block_tables.shape[0] == num_seqs and query_start.shape[0] == num_seqs + 1
    assert block_tables.dtype == seq_lens.dtype == query_start.dtype == torch.int32
    assert q.stride(2) == k_cache.stride(3) == v_cache.stride(3) == 1, "head dim contiguous"
    assert block_tables.stride(1) == 1, "block table rows must be contiguous"
    assert q.dtype == k_cache.dtype == v_cache.dtype, "q and caches share a dtype"
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    if num_tokens == 0:
        return out
    launch = LAUNCH_LONG if max_query_len >= LONG_QUERY else LAUNCH
    block_m = max(launch["block_m"], next_power_of_2(group))  # at least one token's heads
    block_q = block_m // group
    grid = (num_seqs, triton.cdiv(max_query_len, block_q), num_kv_heads)
    _paged_prefill_kernel[grid](
        out, q, k_cache, v_cache, block_tables, query_start, seq_lens,
        scale * math.log2(math.e), head_dim, block_size,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        *k_cache.stride()[:3], *v_cache.stride()[:3], block_tables.stride(0),
        GROUP=group, BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=launch["block_n"],
        BLOCK_D=dot_width(head_dim, 1024), DOT_PRECISION=dot_precision(q.dtype),
        num_warps=launch["num_warps"], num_stages=launch["num_stages"],
    )
    return out
