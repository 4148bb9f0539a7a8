"""MoE-LoRA delta of one expert projection, shrink and expand fused, for 2D and 3D slots at once.

Rows are (token, k) pairs p = t*K + k; a pair's slot is its token's, its expert topk_ids[t, k].
A program works on pairs of one (expert, slot) group and one chunk of the output columns:
  naive mode (few pairs): program p takes pair p alone and exits when its token has slot -1;
  aligned mode: program (e, s) walks expert e's rows of the base MoeAlignment and keeps those
  whose token has slot s, so each (slot, expert) pair of A/B matrices is read by one program.
It shrinks its rows through A (gate block 0 and, in the same pass, the up block up_block[s]
only when it differs, so a 3D slot reads its shared A once), keeps h [BLOCK_M, R] in registers
in the weight dtype, and expands through B into an fp32 delta [P, N] that the base GEMM adds
before its epilogue. Rows of tokens without a slot are never written nor read.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from loramux.kernels._utils import (MAX_RANK, cdiv, dot_precision, dot_width, shrink_block_k,
                            split_count)
from loramux.kernels.moe_align import MoeAlignment


@triton.jit
def _shrink(x_ptr, a_ptr, a2_ptr, x_rows, row_mask, k_in, rank, TWO: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
            DOT_PRECISION: tl.constexpr):
    """h = x[x_rows] @ a[:rank].T for a [rank, k_in] block, fp32 [BLOCK_M, BLOCK_R]; with TWO
    also h2 for the block at a2_ptr in the same pass over x (else h2 = h)."""
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    x_ptrs = x_ptr + x_rows[:, None] + offs_k[None, :]
    a_offs = offs_r[:, None] * k_in + offs_k[None, :]
    h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    h2 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k in range(0, k_in, BLOCK_K):
        k_mask = offs_k < k_in - k
        a_mask = (offs_r < rank)[:, None] & k_mask[None, :]
        xt = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        at = tl.load(a_ptr + a_offs, mask=a_mask, other=0.0)
        h += tl.dot(xt, tl.trans(at), input_precision=DOT_PRECISION)
        if TWO:
            a2t = tl.load(a2_ptr + a_offs, mask=a_mask, other=0.0)
            h2 += tl.dot(xt, tl.trans(a2t), input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        a_offs += BLOCK_K
    return h, (h2 if TWO else h)


@triton.jit
def _expand(delta_ptr, b_ptr, h, pairs, row_mask, n_lo, n_hi, rank, width,
            BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """delta[pairs, n_lo:n_hi] = h @ b[n_lo:n_hi, :rank].T (b rows indexed like delta columns)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    for n in range(n_lo, n_hi, BLOCK_N):
        cols = n + offs_n
        n_mask = cols < n_hi
        bt = tl.load(b_ptr + cols[:, None] * rank + offs_r[None, :],
                     mask=n_mask[:, None] & (offs_r < rank)[None, :], other=0.0)
        d = tl.dot(h, tl.trans(bt), input_precision=DOT_PRECISION)
        tl.store(delta_ptr + pairs[:, None] * width + cols[None, :], d,
                 mask=row_mask[:, None] & n_mask[None, :])


@triton.jit
def _lora_rows(delta_ptr, x_ptr, a_ptr, b_ptr, pairs, row_mask, up_block, n_lo, n_hi,
               k_in, n_half, rank, stride_xm,
               X_ROW_DIV: tl.constexpr, GATE_UP: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
               DOT_PRECISION: tl.constexpr):
    """Shrink + expand of rows `pairs` of one (slot, expert); a_ptr/b_ptr point at [s, e]."""
    x_rows = (pairs // X_ROW_DIV) * stride_xm
    dtype = b_ptr.dtype.element_ty
    if GATE_UP:
        if up_block != 0:  # 2D: gate and up have their own A blocks, read in one pass
            h, h_up = _shrink(x_ptr, a_ptr, a_ptr + up_block * rank * k_in, x_rows, row_mask,
                              k_in, rank, True, BLOCK_M, BLOCK_K, BLOCK_R, DOT_PRECISION)
        else:  # 3D: one shared A, read once
            h, h_up = _shrink(x_ptr, a_ptr, a_ptr, x_rows, row_mask, k_in, rank, False,
                              BLOCK_M, BLOCK_K, BLOCK_R, DOT_PRECISION)
        _expand(delta_ptr, b_ptr, h.to(dtype), pairs, row_mask, n_lo, n_hi, rank, 2 * n_half,
                BLOCK_N, BLOCK_R, DOT_PRECISION)
        _expand(delta_ptr + n_half, b_ptr + n_half * rank, h_up.to(dtype), pairs, row_mask,
                n_lo, n_hi, rank, 2 * n_half, BLOCK_N, BLOCK_R, DOT_PRECISION)
    else:
        h, _ = _shrink(x_ptr, a_ptr, a_ptr, x_rows, row_mask, k_in, rank, False,
                       BLOCK_M, BLOCK_K, BLOCK_R, DOT_PRECISION)
        _expand(delta_ptr, b_ptr, h.to(dtype), pairs, row_mask, n_lo, n_hi, rank, n_half,
                BLOCK_N, BLOCK_R, DOT_PRECISION)


@triton.jit
def _moe_lora_kernel(
    # pointers
    delta_ptr, x_ptr, a_ptr, b_ptr, up_block_ptr, topk_ids_ptr, token_slot_ptr,
    sorted_ids_ptr, expert_offsets_ptr,
    # sizes
    num_pairs, k_in, n_half, rank,
    # strides
    stride_as, stride_ae, stride_bs, stride_be, stride_xm,
    # meta
    TOP_K: tl.constexpr, X_ROW_DIV: tl.constexpr, GATE_UP: tl.constexpr, NAIVE: tl.constexpr,
    N_SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_z = tl.program_id(0)
    chunk = tl.cdiv(tl.cdiv(n_half, N_SPLIT), BLOCK_N) * BLOCK_N
    n_lo = pid_z * chunk
    n_hi = tl.minimum(n_lo + chunk, n_half)
    offs_m = tl.arange(0, BLOCK_M)
    if NAIVE:
        pair = tl.program_id(1)
        slot = tl.load(token_slot_ptr + pair // TOP_K).to(tl.int64)
        if (slot < 0) | (n_lo >= n_hi):
            return
        expert = tl.load(topk_ids_ptr + pair).to(tl.int64)
        up_block = tl.load(up_block_ptr + slot) if GATE_UP else 0
        _lora_rows(delta_ptr, x_ptr, a_ptr + slot * stride_as + expert * stride_ae,
                   b_ptr + slot * stride_bs + expert * stride_be,
                   (pair + offs_m * 0).to(tl.int64), offs_m == 0, up_block, n_lo, n_hi,
                   k_in, n_half, rank, stride_xm,
                   X_ROW_DIV, GATE_UP, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R, DOT_PRECISION)
    else:
        expert = tl.program_id(1).to(tl.int64)
        slot = tl.program_id(2).to(tl.int64)
        lo = tl.load(expert_offsets_ptr + expert)
        hi = tl.load(expert_offsets_ptr + expert + 1)
        up_block = tl.load(up_block_ptr + slot) if GATE_UP else 0
        for r in range(lo, hi, BLOCK_M):
            pairs = tl.load(sorted_ids_ptr + r + offs_m, mask=r + offs_m < hi, other=num_pairs)
            valid = pairs < num_pairs
            pairs = tl.where(valid, pairs, 0).to(tl.int64)
            slots = tl.load(token_slot_ptr + pairs // TOP_K, mask=valid, other=-1)
            row_mask = valid & (slots == slot)
            if (tl.max(row_mask.to(tl.int32), axis=0) > 0) & (n_lo < n_hi):
                _lora_rows(delta_ptr, x_ptr, a_ptr + slot * stride_as + expert * stride_ae,
                           b_ptr + slot * stride_bs + expert * stride_be,
                           pairs, row_mask, up_block, n_lo, n_hi,
                           k_in, n_half, rank, stride_xm,
                           X_ROW_DIV, GATE_UP, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R, DOT_PRECISION)


# one program per pair while pairs <= NAIVE_PAIRS_PER_GROUP * active slots * E, else one per
# (expert, slot): H100 sweep (bench --sweep), 16 adapters: naive wins at 1024 and 2048 pairs,
# loses at 8192 (682 vs 464 us); 64 adapters x 8192 pairs: naive wins (748 vs 1108 us).
# Thresholds 1 and 2 both fit these four points.
NAIVE_PAIRS_PER_GROUP = 2
MAX_GRID_Y = 65535  # naive mode puts the pairs on grid axis 1 (splits of a pair run together)
LAUNCH = dict(per_sm=4, block_n=128, num_warps=4, num_stages=3)  # H100 sweep: bench --sweep


def lora_config(x: torch.Tensor, b: torch.Tensor, num_pairs: int, n_half: int, naive: bool,
                gate_up: bool) -> dict:
    """Launch shape. A program is one dependent chain (shrink loop, then expand loop), so wide
    K steps keep it short; N is split so the busy programs (pairs, or (slot, expert) groups)
    reach LAUNCH["per_sm"] per multiprocessor, each split redoing the shrink from L2."""
    num_slots, num_experts, _, rank = b.shape
    block_m, block_r = 16 if naive or num_pairs <= 2048 else 32, dot_width(rank, MAX_RANK)
    block_n = dot_width(n_half, LAUNCH["block_n"])
    busy = num_pairs if naive else min(num_pairs, num_slots * num_experts)
    a_rows = block_m + (2 if gate_up else 1) * block_r
    return dict(NAIVE=naive, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r,
                BLOCK_K=shrink_block_k(a_rows, x.element_size(), x.shape[1]),
                N_SPLIT=split_count(busy, cdiv(n_half, block_n), x.device, LAUNCH["per_sm"]),
                num_warps=LAUNCH["num_warps"], num_stages=LAUNCH["num_stages"])


def moe_lora_delta(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    up_block: torch.Tensor | None,
    topk_ids: torch.Tensor,
    token_slot: torch.Tensor,
    routing: MoeAlignment | None,
    active_slots: int,
    config: dict | None = None,
) -> torch.Tensor:
    """LoRA delta of every (token, k) pair whose token has a slot, for one expert projection.

    Semantics:
        for p = t*K + k with s = token_slot[t] >= 0: e = topk_ids[t, k]
            gate_up (up_block given, x [T, H], n = 2): xr = x[t]; u = up_block[s]
                delta[p, :I] = (xr @ a[s, e, 0:R].T) @ b[s, e, :I].T
                delta[p, I:] = (xr @ a[s, e, u*R:(u+1)*R].T) @ b[s, e, I:].T
            down (up_block None, x [T*K, I], n = 1): delta[p] = (x[p] @ a[s, e].T) @ b[s, e].T
        rows of pairs whose token has slot -1 are left unwritten
    Args:
        x: activations, rows contiguous; a: [S, E, n*R, D_in]; b: [S, E, D_out, R] contiguous
        routing: the base MoeAlignment (aligned mode possible) or None (naive mode)
        active_slots: how many distinct slots the step's tokens use (host-side; picks the mode)
        config: launch shape override (benchmarks); default lora_config(...)
    Returns:
        [T*K, D_out] fp32
    """
    num_slots, num_experts, a_rows, k_in = a.shape
    rank = b.shape[3]
    gate_up = up_block is not None
    assert a.is_contiguous() and b.is_contiguous() and x.stride(1) == 1, "contiguous operands"
    assert a_rows == (2 if gate_up else 1) * rank and x.shape[1] == k_in, "a must be [S,E,n*R,D_in]"
    assert rank <= MAX_RANK, f"rank {rank} > {MAX_RANK}"
    num_pairs, top_k = topk_ids.numel(), topk_ids.shape[1]
    n_half = b.shape[2] // 2 if gate_up else b.shape[2]
    delta = torch.empty(num_pairs, b.shape[2], dtype=torch.float32, device=x.device)
    if config is None:
        dense_groups = num_pairs > NAIVE_PAIRS_PER_GROUP * max(1, active_slots) * num_experts
        naive = routing is None or not (dense_groups or num_pairs > MAX_GRID_Y)
        config = lora_config(x, b, num_pairs, n_half, naive, gate_up)
    assert config["NAIVE"] or routing is not None, "aligned mode needs the base alignment"
    if config["NAIVE"]:
        grid = (config["N_SPLIT"], num_pairs)
        sorted_ids = offsets = topk_ids
    else:
        grid = (config["N_SPLIT"], num_experts, num_slots)
        sorted_ids, offsets = routing.sorted_ids, routing.expert_offsets
    _moe_lora_kernel[grid](
        delta, x, a, b, up_block if gate_up else topk_ids, topk_ids, token_slot,
        sorted_ids, offsets,
        num_pairs, k_in, n_half, rank,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), x.stride(0),
        TOP_K=top_k, X_ROW_DIV=top_k if gate_up else 1, GATE_UP=gate_up,
        DOT_PRECISION=dot_precision(x.dtype), **config,
    )
    return delta
