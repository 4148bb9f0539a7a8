"""fused_add_rms_norm: residual add and RMSNorm of a row in one pass (vLLM's fused_add_rms_norm).

One program per token row holds the whole row (H <= 32768) in registers: it adds the residual in
the model dtype (so the new residual is what `x + residual` gives), stores it, and normalises
in float32 with the twin's casts (plain: cast, then the weight product in the model dtype;
zero-centred: the product in float32). Reads x, residual and weight once, writes two rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from loramux.kernels._utils import next_power_of_2

MAX_HIDDEN = 32768


@triton.jit
def _add_rms_norm_kernel(
    out_ptr, res_out_ptr, x_ptr, res_ptr, w_ptr,
    eps, hidden, stride_x, stride_r, stride_o, stride_ro,
    HAS_RESIDUAL: tl.constexpr, ZERO_CENTRED: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # the model-dtype add
        tl.store(res_out_ptr + row * stride_ro + offs, x, mask=mask)
    h = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(h * h, axis=0) / hidden + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if ZERO_CENTRED:
        y = (h * rstd) * (1.0 + w)
    else:
        y = (h * rstd).to(x.dtype).to(tl.float32) * w
    tl.store(out_ptr + row * stride_o + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def fused_add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    zero_centred: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add then RMSNorm.

    The Triton version of kernels.reference.fused_add_rms_norm: same Semantics, Args and
    Returns (with residual None the new residual is x itself). Rows need a contiguous last dim.
    """
    num_tokens, hidden = x.shape
    assert hidden <= MAX_HIDDEN and weight.shape == (hidden,), "weight must be [H], H <= 32768"
    assert x.stride(1) == 1 and weight.stride(0) == 1, "rows must be contiguous"
    assert weight.dtype == x.dtype, "weight and x share the model dtype"
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    new_residual = x
    if residual is not None:
        assert residual.shape == x.shape and residual.stride(1) == 1, "residual must match x"
        assert residual.dtype == x.dtype, "residual and x share the model dtype"
        new_residual = torch.empty_like(out)
    if num_tokens == 0:
        return out, new_residual
    block = next_power_of_2(hidden)
    res = residual if residual is not None else x
    _add_rms_norm_kernel[(num_tokens,)](
        out, new_residual, x, res, weight, eps, hidden,
        x.stride(0), res.stride(0), out.stride(0), new_residual.stride(0),
        HAS_RESIDUAL=residual is not None, ZERO_CENTRED=zero_centred, BLOCK=block,
        num_warps=max(1, min(16, block // 256)),
    )
    return out, new_residual
