"""GPU checks of the fused elementwise ops: bf16 at Qwen3-30B-A3B shapes against the twins run
on the same bf16 tensors (the model's torch code).

Tolerances (bf16): the residual add is bit-exact; normed and activated values may differ from
the twin by the float32 reduction order (rstd) or exp's last bit, a rounding flip of one bf16
unit in the last place, so |diff| <= 2^-6 |ref| + 2^-6 and at most 2% of the elements differ
at all. Router: picks in
descending order with ties to the lowest id, the same experts as torch.topk (on ties too:
CUDA's fills the k-th place in index order) and weights within 2^-7 relative (one bf16
rounding).
"""

from __future__ import annotations

import pytest
import torch

from loramux.kernels import reference, triton_ops

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

H, E, K, I = 2048, 128, 8, 768
TOKENS = [1, 64, 257, 8192]
ULP_TOL = dict(rtol=2**-6, atol=2**-6)


def _gen(seed):
    return torch.Generator(device="cuda").manual_seed(seed)


def _bf16(gen, *shape, scale=1.0, shift=0.0):
    return (torch.randn(shape, generator=gen, device="cuda") * scale + shift).bfloat16()


def _assert_ulp_close(out, ref):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, **ULP_TOL)
    assert (out != ref).float().mean().item() <= 0.02, "more than 2% of the elements differ"


@pytest.mark.parametrize("zero_centred", [False, True], ids=["plain", "zero_centred"])
@pytest.mark.parametrize("num_tokens", TOKENS)
def test_fused_add_rms_norm_bf16(num_tokens, zero_centred):
    gen = _gen(num_tokens)
    x, residual = _bf16(gen, num_tokens, H, scale=4.0), _bf16(gen, num_tokens, H)
    weight = _bf16(gen, H, scale=0.1, shift=0.0 if zero_centred else 1.0)
    for res in (residual, None):
        out, new_res = triton_ops.fused_add_rms_norm(x, res, weight, 1e-6, zero_centred)
        ref, ref_res = reference.fused_add_rms_norm(x, res, weight, 1e-6, zero_centred)
        assert torch.equal(new_res, ref_res)
        _assert_ulp_close(out, ref)


def _route_case(num_tokens, renormalize, tied):
    logits = _bf16(_gen(num_tokens), num_tokens, E)
    if tied:
        logits = logits.round()  # a few distinct values: ties inside the top-k and at its edge
    weights, ids = triton_ops.route(logits, K, renormalize, torch.bfloat16)
    ref_w, ref_ids = reference.route(logits, K, renormalize, torch.bfloat16)
    assert ids.dtype == torch.int64 and weights.dtype == torch.bfloat16
    stable = torch.sort(logits.float(), dim=-1, descending=True, stable=True).indices[:, :K]
    assert torch.equal(ids, stable), "descending, ties to the lowest expert id"
    ids_sorted, order = ids.sort(dim=-1)
    ref_sorted, ref_order = ref_ids.sort(dim=-1)
    torch.testing.assert_close(weights.gather(1, order), ref_w.gather(1, ref_order),
                               rtol=2**-7, atol=1e-6)
    return ids_sorted, ref_sorted


@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "plain"])
@pytest.mark.parametrize("num_tokens", TOKENS)
def test_route_bf16(num_tokens, renormalize):
    ids_sorted, ref_sorted = _route_case(num_tokens, renormalize, tied=False)
    assert torch.equal(ids_sorted, ref_sorted), "the same experts as torch.topk"


@pytest.mark.parametrize("num_tokens", [64, 8192])
def test_route_ties_pick_cuda_topk_experts(num_tokens):
    """CUDA's torch.topk fills a tie at the k-th place in index order: the same experts."""
    ids_sorted, ref_sorted = _route_case(num_tokens, True, tied=True)
    assert torch.equal(ids_sorted, ref_sorted), "the same experts as torch.topk on ties"


@pytest.mark.parametrize("num_tokens", TOKENS)
def test_silu_and_mul_bf16(num_tokens):
    x = _bf16(_gen(num_tokens), num_tokens, 2 * I, scale=3.0)
    _assert_ulp_close(triton_ops.silu_and_mul(x), reference.silu_and_mul(x))
