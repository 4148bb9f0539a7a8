"""Token -> expert alignment for the grouped expert GEMMs, one Triton launch, no host sync.

The T*K (token, k) pairs, flattened as p = t*K + k, are grouped by expert and each group is
padded to a multiple of BLOCK_M, so that every BLOCK_M block of `sorted_ids` belongs to one
expert. Program e histograms all pairs (each program redundantly: T*K is small), takes the
prefix of padded counts to find its group's start, then writes its own pairs in pair order,
the padding sentinel (T*K) and its blocks' expert ids. Buffers have the worst-case size, so the
launch is the same for every routing of a T-token step (CUDA-graph friendly).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from loramux.kernels._utils import cdiv, next_power_of_2


class MoeAlignment(NamedTuple):
    """Pairs grouped by expert, per-expert groups padded to block_m.

    sorted_ids:     [max_padded] int32  pair ids p = t*K + k; padding rows hold T*K
    expert_ids:     [max_padded / block_m] int32  expert of each block (blocks past the end unset)
    expert_offsets: [E + 1] int32  expert e owns sorted_ids[offsets[e]:offsets[e+1]];
                                   offsets[E] is the padded total (later blocks are idle)
    """

    sorted_ids: torch.Tensor
    expert_ids: torch.Tensor
    expert_offsets: torch.Tensor
    block_m: int


@triton.jit
def _moe_align_kernel(
    # pointers
    topk_ids_ptr, sorted_ids_ptr, expert_ids_ptr, expert_offsets_ptr,
    # sizes
    num_pairs, num_experts,
    # meta
    BLOCK_M: tl.constexpr, PAIR_BLOCK: tl.constexpr, E_BLOCK: tl.constexpr,
):
    e = tl.program_id(0)
    offs_p = tl.arange(0, PAIR_BLOCK)
    counts = tl.zeros((E_BLOCK,), dtype=tl.int32)
    for p in range(0, num_pairs, PAIR_BLOCK):
        ids = tl.load(topk_ids_ptr + p + offs_p, mask=p + offs_p < num_pairs, other=num_experts)
        counts += tl.histogram(ids.to(tl.int32), E_BLOCK)
    offs_e = tl.arange(0, E_BLOCK)
    padded = tl.where(offs_e < num_experts, tl.cdiv(counts, BLOCK_M) * BLOCK_M, 0)
    ends = tl.cumsum(padded, axis=0)
    end = tl.sum(tl.where(offs_e == e, ends, 0), axis=0)
    start = end - tl.sum(tl.where(offs_e == e, padded, 0), axis=0)
    tl.store(expert_offsets_ptr + e + 1, end)
    if e == 0:
        tl.store(expert_offsets_ptr, 0)
    # this expert's pairs, in pair order
    cursor = start
    for p in range(0, num_pairs, PAIR_BLOCK):
        ids = tl.load(topk_ids_ptr + p + offs_p, mask=p + offs_p < num_pairs, other=num_experts)
        mine = (ids == e).to(tl.int32)
        rank = tl.cumsum(mine, axis=0) - 1
        tl.store(sorted_ids_ptr + cursor + rank, p + offs_p, mask=mine > 0)
        cursor += tl.sum(mine, axis=0)
    # padding rows, then one expert id per block
    offs_m = tl.arange(0, BLOCK_M)
    tl.store(sorted_ids_ptr + cursor + offs_m, num_pairs, mask=cursor + offs_m < end)
    for blk in range(start // BLOCK_M, end // BLOCK_M, BLOCK_M):
        tl.store(expert_ids_ptr + blk + offs_m, e, mask=blk + offs_m < end // BLOCK_M)


def needs_alignment(num_pairs: int, num_experts: int) -> bool:
    """Below this (T*K*4 <= E, vLLM's rule) one pair per M-block is cheaper than aligning."""
    return num_pairs * 4 > num_experts


def max_padded_rows(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Worst-case padded pair count: every non-empty expert group wastes at most block_m - 1."""
    return num_pairs + min(num_experts, num_pairs) * (block_m - 1)


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> MoeAlignment:
    """Group the (token, k) pairs by expert and pad each group to block_m rows.

    Semantics:
        p = t*K + k for every pair; e = topk_ids[t, k]
        sorted_ids[offsets[e] : offsets[e] + count_e] = pairs of expert e in increasing p
        sorted_ids[offsets[e] + count_e : offsets[e+1]] = T*K      (offsets[e+1] - offsets[e] =
                                                                    roundup(count_e, block_m))
        expert_ids[b] = e for every block b inside [offsets[e], offsets[e+1]) / block_m
    Args:
        topk_ids:    [T, K] int32/int64, contiguous, values in [0, E)
        num_experts: E
        block_m:     block rows of the GEMM that reads the alignment (power of two)
    Returns:
        MoeAlignment
    """
    assert topk_ids.is_contiguous() and topk_ids.dim() == 2, "topk_ids must be [T, K] contiguous"
    assert block_m & (block_m - 1) == 0, "block_m must be a power of two"
    device = topk_ids.device
    num_pairs = topk_ids.numel()
    max_rows = max_padded_rows(num_pairs, num_experts, block_m)
    sorted_ids = torch.empty(max_rows, dtype=torch.int32, device=device)
    expert_ids = torch.empty(cdiv(max_rows, block_m), dtype=torch.int32, device=device)
    offsets = torch.empty(num_experts + 1, dtype=torch.int32, device=device)
    _moe_align_kernel[(num_experts,)](
        topk_ids, sorted_ids, expert_ids, offsets,
        num_pairs, num_experts,
        BLOCK_M=block_m, PAIR_BLOCK=min(4096, max(16, next_power_of_2(num_pairs))),
        E_BLOCK=next_power_of_2(num_experts + 1), num_warps=8 if num_pairs > 1024 else 4,
    )
    return MoeAlignment(sorted_ids, expert_ids, offsets, block_m)
