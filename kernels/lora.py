"""Dense multi-LoRA delta (punica SGMV), shrink and expand fused in one Triton launch.

A program owns up to BLOCK_M tokens of one slot (a LoraMeta.sorted_tokens segment) and one
chunk of one output slice. It shrinks those rows through the slice's R-block of A into registers
(`h` [BLOCK_M, R], rounded to the weight dtype as punica does), then expands `h` through its
chunk of B and adds into y. Chunks split the output so that a small batch still fills the
device; each chunk redoes the shrink and reads A from L2. Programs of empty slots exit at once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from loramux.kernels._utils import (MAX_RANK, cdiv, dot_precision, dot_width, shrink_block_k,
                            split_count)
from loramux.kernels.meta import LoraMeta

MAX_SLICES = 4


@triton.jit
def _lora_delta_kernel(
    # pointers
    y_ptr, x_ptr, a_ptr, b_ptr, sorted_tokens_ptr, slot_start_ptr,
    # sizes
    d_in, rank, end1, end2, end3, end4,
    # strides
    stride_ym, stride_xm, stride_as, stride_bs,
    # meta
    N_SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    slot = tl.program_id(1)
    pid_z = tl.program_id(2)
    seg_end = tl.load(slot_start_ptr + slot + 1)
    first = tl.load(slot_start_ptr + slot) + pid_m * BLOCK_M
    if first >= seg_end:
        return
    # output columns: chunk `pid_z % N_SPLIT` of slice j = pid_z // N_SPLIT
    j = pid_z // N_SPLIT
    n_start = tl.where(j == 0, 0, tl.where(j == 1, end1, tl.where(j == 2, end2, end3)))
    n_end = tl.where(j == 0, end1, tl.where(j == 1, end2, tl.where(j == 2, end3, end4)))
    chunk = tl.cdiv(tl.cdiv(n_end - n_start, N_SPLIT), BLOCK_N) * BLOCK_N
    n_lo = n_start + (pid_z % N_SPLIT) * chunk
    n_hi = tl.minimum(n_lo + chunk, n_end)
    if n_lo >= n_hi:
        return

    offs_m = first + tl.arange(0, BLOCK_M)
    row_mask = offs_m < seg_end
    rows = tl.load(sorted_tokens_ptr + offs_m, mask=row_mask, other=0).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    # shrink: h = x[rows] @ a[slot, j*R:(j+1)*R].T
    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :]
    a_ptrs = (a_ptr + slot.to(tl.int64) * stride_as
              + (j * rank + offs_r)[:, None] * d_in + offs_k[None, :])
    h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k in range(0, d_in, BLOCK_K):
        k_mask = offs_k < d_in - k
        xt = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        at = tl.load(a_ptrs, mask=(offs_r < rank)[:, None] & k_mask[None, :], other=0.0)
        h += tl.dot(xt, tl.trans(at), input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        a_ptrs += BLOCK_K
    h = h.to(b_ptr.dtype.element_ty)
    # expand: y[rows, n_lo:n_hi] += h @ b[slot, n_lo:n_hi].T
    offs_n = tl.arange(0, BLOCK_N)
    for n in range(n_lo, n_hi, BLOCK_N):
        cols = n + offs_n
        n_mask = cols < n_hi
        b_ptrs = b_ptr + slot.to(tl.int64) * stride_bs + cols[:, None] * rank + offs_r[None, :]
        bt = tl.load(b_ptrs, mask=n_mask[:, None] & (offs_r < rank)[None, :], other=0.0)
        delta = tl.dot(h, tl.trans(bt), input_precision=DOT_PRECISION)
        y_ptrs = y_ptr + rows[:, None] * stride_ym + cols[None, :]
        y_mask = row_mask[:, None] & n_mask[None, :]
        y = tl.load(y_ptrs, mask=y_mask, other=0.0)
        tl.store(y_ptrs, (y.to(tl.float32) + delta).to(y.dtype), mask=y_mask)


LAUNCH = dict(per_sm=2, block_n=128, num_warps=4, num_stages=3)  # H100 sweep: bench --sweep


def delta_config(x: torch.Tensor, b: torch.Tensor, out_splits: tuple[int, ...]) -> dict:
    """Launch shape: wide K steps keep each program's shrink chain short; N chunks split so the
    busy programs (about one per slot segment block) reach LAUNCH["per_sm"] per SM."""
    num_tokens, d_in = x.shape
    num_slots, _, rank = b.shape
    block_m, block_r = (16 if num_tokens <= 256 else 32), dot_width(rank, MAX_RANK)
    block_n = dot_width(max(out_splits), LAUNCH["block_n"])
    busy = (min(num_slots, num_tokens) + num_tokens // block_m) * len(out_splits)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r,
                BLOCK_K=shrink_block_k(block_m + block_r, x.element_size(), d_in),
                N_SPLIT=split_count(busy, cdiv(max(out_splits), block_n), x.device,
                                    LAUNCH["per_sm"]),
                num_warps=LAUNCH["num_warps"], num_stages=LAUNCH["num_stages"])


def lora_delta(
    y: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    meta: LoraMeta,
    out_splits: tuple[int, ...],
) -> None:
    """Add the LoRA delta of every token's adapter slot to a (possibly multi-slice) linear.

    The Triton version of kernels.reference.lora_delta: same Semantics and shapes. Here also:
    the last dims of x and y, and a and b, are contiguous; x, a and b share a dtype; at most 4
    output slices; meta.sorted_tokens / slot_start group the tokens by slot.
    """
    if meta.has_lora:
        launch_lora_delta(y, x, a, b, meta, out_splits, delta_config(x, b, out_splits))


def launch_lora_delta(y, x, a, b, meta: LoraMeta, out_splits: tuple[int, ...], config: dict):
    """lora_delta with an explicit launch shape (delta_config's keys); benchmarks sweep it."""
    num_tokens, d_in = x.shape
    num_slots, d_out, rank = b.shape
    num_slices = len(out_splits)
    assert 1 <= num_slices <= MAX_SLICES, f"1 to {MAX_SLICES} output slices supported"
    assert sum(out_splits) == d_out == y.shape[1], "out_splits must sum to D_out"
    assert a.shape == (num_slots, num_slices * rank, d_in), "a must be [S, n*R, D_in]"
    assert y.shape[0] == num_tokens == meta.token_slot.numel(), "one slot per token"
    assert meta.num_slots == num_slots, "meta.num_slots must match the slot buffers"
    assert a.is_contiguous() and b.is_contiguous(), "a and b must be contiguous"
    assert x.stride(1) == 1 and y.stride(1) == 1, "x and y rows must be contiguous"
    assert x.dtype == a.dtype == b.dtype, "x, a and b must share a dtype"
    assert rank <= MAX_RANK, f"rank {rank} > {MAX_RANK}"
    ends = [sum(out_splits[: j + 1]) for j in range(num_slices)]
    ends += [d_out] * (MAX_SLICES - num_slices)
    grid = (cdiv(num_tokens, config["BLOCK_M"]), num_slots, num_slices * config["N_SPLIT"])
    _lora_delta_kernel[grid](
        y, x, a, b, meta.sorted_tokens, meta.slot_start,
        d_in, rank, *ends,
        y.stride(0), x.stride(0), a.stride(0), b.stride(0),
        DOT_PRECISION=dot_precision(x.dtype), **config,
    )
