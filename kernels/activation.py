"""silu_and_mul: the SiLU-gated product of a fused gate/up output ([T, 2I] -> [T, I]).

A program owns one row's BLOCK columns: silu(gate) in float32, rounded to the model dtype, times
up, rounded again (the twin's two roundings). Reads 2I and writes I values per row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from loramux.kernels._utils import cdiv, next_power_of_2

BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(out_ptr, x_ptr, inter, stride_x, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + inter + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)
    out = act * up.to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, out.to(gate.dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[:, :I]) * x[:, I:].

    The Triton version of kernels.reference.silu_and_mul: same Semantics, Args and Returns.
    """
    num_tokens, two_inter = x.shape
    assert two_inter % 2 == 0 and x.stride(1) == 1, "x must be [T, 2I] with contiguous rows"
    inter = two_inter // 2
    out = torch.empty(num_tokens, inter, dtype=x.dtype, device=x.device)
    if num_tokens == 0:
        return out
    block = min(BLOCK, next_power_of_2(inter))
    _silu_and_mul_kernel[(num_tokens, cdiv(inter, block))](
        out, x, inter, x.stride(0), out.stride(0), BLOCK=block, num_warps=4)
    return out
