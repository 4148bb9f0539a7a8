"""The fused elementwise ops against their torch twins.

Tiny fp32 / fp16 shapes in the Triton interpreter on a CPU: non-power-of-two widths, one
token. The residual add and every cast follow the twin's rounding, so fp16 mostly agrees to
the bit; what differs is the float32 reduction order (a unit in the last place at most).
"""

from __future__ import annotations

import pytest
import torch

from loramux.kernels import norm, reference

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3)}
DTYPES = [torch.float32, torch.float16]


def _randn(gen, *shape, dtype, scale=1.0, shift=0.0):
    return (torch.randn(shape, generator=gen) * scale + shift).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("zero_centred", [False, True], ids=["plain", "zero_centred"])
@pytest.mark.parametrize("num_tokens,hidden", [(1, 40), (5, 96)])
def test_fused_add_rms_norm(num_tokens, hidden, zero_centred, dtype, gen, poison):
    x = _randn(gen, num_tokens, hidden, dtype=dtype, scale=3.0)
    residual = _randn(gen, num_tokens, hidden, dtype=dtype)
    weight = _randn(gen, hidden, dtype=dtype, scale=0.1, shift=0.0 if zero_centred else 1.0)
    for res in (residual, None):
        out, new_res = norm.fused_add_rms_norm(x, res, weight, 1e-6, zero_centred)
        ref, ref_res = reference.fused_add_rms_norm(x, res, weight, 1e-6, zero_centred)
        assert out.dtype == dtype and torch.equal(new_res, ref_res), "the add is the twin's"
        torch.testing.assert_close(out, ref, **TOL[dtype])
