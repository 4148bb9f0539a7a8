"""Grouped expert GEMMs of the fused MoE: gate_up with SiLU*up fused, and down with routing weight.

Rows are (token, k) pairs p = t*K + k. In aligned mode a program takes one BLOCK_M block of
MoeAlignment.sorted_ids (all one expert) and one BLOCK_N tile of the output; in naive mode
(few pairs, T*K*4 <= E as in vLLM) block b is the single pair b, which skips the alignment.
The gate_up program keeps two accumulators (gate rows n and up rows I+n of w_gate_up) and writes
silu(gate) * up, so the [P, 2I] intermediate never reaches memory. A MoE-LoRA delta
(kernels.moe_lora, fp32 [P, N]) is added to the accumulators of pairs whose token has a slot.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from loramux.kernels._utils import cdiv, dot_precision, dot_width
from loramux.kernels.moe_align import MoeAlignment


@triton.jit
def _moe_gemm_kernel(
    # pointers
    out_ptr, x_ptr, w_ptr, delta_ptr, topk_weights_ptr, topk_ids_ptr, token_slot_ptr,
    sorted_ids_ptr, expert_ids_ptr, expert_offsets_ptr,
    # sizes
    num_pairs, n_out, k_in, num_experts,
    # strides
    stride_we, stride_xm,
    # meta
    TOP_K: tl.constexpr, X_ROW_DIV: tl.constexpr, GATE_UP: tl.constexpr, NAIVE: tl.constexpr,
    HAS_LORA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    if NAIVE:
        pairs = pid_m + offs_m * 0
        row_mask = offs_m == 0
        expert = tl.load(topk_ids_ptr + pid_m).to(tl.int64)
    else:
        if pid_m * BLOCK_M >= tl.load(expert_offsets_ptr + num_experts):
            return
        pairs = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + offs_m)
        row_mask = pairs < num_pairs
        expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    pairs = tl.where(row_mask, pairs, 0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < n_out
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + (pairs // X_ROW_DIV)[:, None] * stride_xm + offs_k[None, :]
    # w[e] is [N_w, k_in]; read tiles as [BLOCK_K, BLOCK_N]
    w_ptrs = w_ptr + expert * stride_we + offs_n[None, :] * k_in + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, k_in, BLOCK_K):
        k_mask = offs_k < k_in - k
        xt = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        wt = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc += tl.dot(xt, wt, input_precision=DOT_PRECISION)
        if GATE_UP:
            wt_up = tl.load(w_ptrs + n_out * k_in, mask=k_mask[:, None] & n_mask[None, :],
                            other=0.0)
            acc_up += tl.dot(xt, wt_up, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_LORA:
        slots = tl.load(token_slot_ptr + pairs // TOP_K, mask=row_mask, other=-1)
        d_mask = (row_mask & (slots >= 0))[:, None] & n_mask[None, :]
        width = n_out * 2 if GATE_UP else n_out
        d_ptrs = delta_ptr + pairs[:, None] * width + offs_n[None, :]
        acc += tl.load(d_ptrs, mask=d_mask, other=0.0)
        if GATE_UP:
            acc_up += tl.load(d_ptrs + n_out, mask=d_mask, other=0.0)
    if GATE_UP:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up
    else:
        acc *= tl.load(topk_weights_ptr + pairs, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    out_ptrs = out_ptr + pairs[:, None] * n_out + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


def gemm_config(num_tokens: int, n_out: int, k_in: int, dtype: torch.dtype,
                gate_up: bool) -> dict:
    """Block sizes by batch, the best of sweeps (bf16, Qwen3-30B-A3B layer; up to 1024 tokens
    on an H100, prefill sizes on an H200: `bench_kernels.py --sweep-gemm`)."""
    if num_tokens <= 32:
        block_m, block_n, block_k, warps, stages = 16, 32, 256, 4, 4
    elif num_tokens <= 512:
        block_m, block_n, block_k, warps, stages = 32, 64, 128, 4, 3
    elif num_tokens > 1024:  # prefill: 13-21% faster than the tiles below at 2048-8192 tokens
        block_n = 256 if num_tokens > 4096 and not gate_up else 128
        block_m, block_k, warps, stages = 128, 64, 8, 3
    elif gate_up:
        block_m, block_n, block_k, warps, stages = 64, 64, 64, 4, 3
    else:
        block_m, block_n, block_k, warps, stages = 64, 128, 64, 8, 4
    block_k = block_k * 16 // torch.finfo(dtype).bits  # same bytes per stage for fp32
    return dict(BLOCK_M=block_m, BLOCK_N=dot_width(n_out, block_n),
                BLOCK_K=dot_width(k_in, block_k), num_warps=warps, num_stages=stages)


def moe_gemm(
    x: torch.Tensor,
    w: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    routing: MoeAlignment | None,
    delta: torch.Tensor | None,
    token_slot: torch.Tensor | None,
    config: dict,
    gate_up: bool,
) -> torch.Tensor:
    """One grouped expert GEMM over all (token, k) pairs.

    Semantics:
        for p = t*K + k: e = topk_ids[t, k]; xr = x[t] if gate_up else x[p]
            if gate_up: g, u = xr @ w[e, :I].T + dg, xr @ w[e, I:].T + du; out[p] = silu(g) * u
            else:       out[p] = topk_weights[t, k] * (xr @ w[e].T + d)
            (dg, du / d: delta[p] rows when token_slot[t] >= 0, else 0)
    Args:
        x: [T, H] (gate_up) or [T*K, I] (down); w: [E, 2I, H] or [E, H, I], contiguous
        routing: MoeAlignment with block_m == config BLOCK_M, or None for naive mode
        delta: [T*K, 2I] or [T*K, H] fp32 LoRA delta, or None
    Returns:
        [T*K, I] or [T*K, H] in x.dtype
    """
    assert w.is_contiguous() and x.stride(1) == 1, "w contiguous, x rows contiguous"
    num_experts, n_w, k_in = w.shape
    assert x.shape[1] == k_in, "x and w disagree on the reduction size"
    num_pairs, top_k = topk_ids.numel(), topk_ids.shape[1]
    n_out = n_w // 2 if gate_up else n_w
    out = torch.empty(num_pairs, n_out, dtype=x.dtype, device=x.device)
    if routing is None:
        num_blocks = num_pairs
        sorted_ids = expert_ids = offsets = topk_ids
    else:
        assert routing.block_m == config["BLOCK_M"], "alignment block must match BLOCK_M"
        sorted_ids, expert_ids, offsets, _ = routing
        num_blocks = expert_ids.numel()
    grid = (cdiv(n_out, config["BLOCK_N"]), num_blocks)
    _moe_gemm_kernel[grid](
        out, x, w, delta if delta is not None else out, topk_weights, topk_ids,
        token_slot if token_slot is not None else topk_ids,
        sorted_ids, expert_ids, offsets,
        num_pairs, n_out, k_in, num_experts,
        w.stride(0), x.stride(0),
        TOP_K=top_k, X_ROW_DIV=top_k if gate_up else 1, GATE_UP=gate_up,
        NAIVE=routing is None, HAS_LORA=delta is not None,
        DOT_PRECISION=dot_precision(x.dtype), **config,
    )
    return out
