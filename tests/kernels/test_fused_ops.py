"""The fused elementwise ops (norm, rope, router, activation) against their torch twins.

Tiny fp32 / fp16 shapes (in the Triton interpreter on a CPU, compiled on a GPU):
non-power-of-two widths, one token, partial rotary, strided q/k views (as the fused qkv
projection gives them), ties in the router. The residual add and every cast follow the
twin's rounding, so fp16 mostly agrees to the bit; what differs is the float32 reduction order
(a unit in the last place at most).
"""

from __future__ import annotations

import pytest
import torch

from loramux.kernels import activation, norm, reference, rope, router

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3)}
DTYPES = [torch.float32, torch.float16]


def _randn(gen, *shape, dtype, device, scale=1.0, shift=0.0):
    return (torch.randn(shape, generator=gen) * scale + shift).to(dtype=dtype, device=device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("zero_centred", [False, True], ids=["plain", "zero_centred"])
@pytest.mark.parametrize("num_tokens,hidden", [(1, 40), (5, 96)])
def test_fused_add_rms_norm(num_tokens, hidden, zero_centred, dtype, device, gen, poison):
    to = dict(dtype=dtype, device=device)
    x = _randn(gen, num_tokens, hidden, **to, scale=3.0)
    residual = _randn(gen, num_tokens, hidden, **to)
    weight = _randn(gen, hidden, **to, scale=0.1, shift=0.0 if zero_centred else 1.0)
    for res in (residual, None):
        out, new_res = norm.fused_add_rms_norm(x, res, weight, 1e-6, zero_centred)
        ref, ref_res = reference.fused_add_rms_norm(x, res, weight, 1e-6, zero_centred)
        assert out.dtype == dtype and torch.equal(new_res, ref_res), "the add is the twin's"
        torch.testing.assert_close(out, ref, **TOL[dtype])


def _qk(gen, num_tokens, heads, kv_heads, head_dim, dtype, device, gated):
    """q [T, N, D] and k [T, G, D] as views of one projection output (gated: q heads
    interleaved with their output gates, so q's head stride is 2D)."""
    q_width = heads * head_dim * (2 if gated else 1)
    qkv = _randn(gen, num_tokens, q_width + 2 * kv_heads * head_dim, dtype=dtype, device=device,
                 scale=2.0)
    q, k, _ = qkv.split((q_width, kv_heads * head_dim, kv_heads * head_dim), dim=-1)
    q = q.view(num_tokens, heads, -1)[..., :head_dim]
    return q, k.view(num_tokens, kv_heads, head_dim)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_kind", ["per_head", "zero_centred", "none"])
@pytest.mark.parametrize("num_tokens,rotary_dim,gated",
                         [(1, 24, False), (3, 8, False), (2, 12, True)],
                         ids=["t1_full", "partial", "gated_partial"])
def test_qk_norm_rope(num_tokens, rotary_dim, gated, norm_kind, dtype, device, gen, poison):
    heads, kv_heads, head_dim = 6, 3, 24
    q, k = _qk(gen, num_tokens, heads, kv_heads, head_dim, dtype, device, gated)
    positions = torch.tensor([0, 7, 40000][:num_tokens] if num_tokens > 1 else [40000],
                             device=device)
    exponent = torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=device) / rotary_dim
    inv_freq = 1.0 / 1e6 ** exponent
    weights = (None, None)
    if norm_kind != "none":
        shift = 0.0 if norm_kind == "zero_centred" else 1.0
        weights = tuple(_randn(gen, head_dim, dtype=dtype, device=device, scale=0.1, shift=shift)
                        for _ in range(2))
    args = (q, k, positions, inv_freq, *weights, 1e-6, norm_kind == "zero_centred")
    out = rope.qk_norm_rope(*args)
    ref = reference.qk_norm_rope(*args)
    for o, r in zip(out, ref):
        assert o.dtype == dtype and o.is_contiguous()
        torch.testing.assert_close(o, r, **TOL[dtype])
    if rotary_dim < head_dim and norm_kind == "none":  # the dims past R pass through untouched
        assert torch.equal(out[0][..., rotary_dim:], q[..., rotary_dim:])


def _check_route(logits, top_k, renormalize, dtype):
    weights, ids = router.route(logits, top_k, renormalize, dtype)
    ref_w, ref_ids = reference.route(logits, top_k, renormalize, dtype)
    assert ids.dtype == ref_ids.dtype == torch.int64 and weights.dtype == dtype
    return weights, ids, ref_w, ref_ids


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("renormalize", [False, True], ids=["plain", "renorm"])
@pytest.mark.parametrize("num_tokens,experts,top_k", [(1, 12, 3), (20, 40, 8), (3, 7, 7)])
def test_route_matches_topk(num_tokens, experts, top_k, renormalize, dtype, device, gen,
                            poison):
    logits = _randn(gen, num_tokens, experts, dtype=dtype, device=device, scale=2.0)
    weights, ids, ref_w, ref_ids = _check_route(logits, top_k, renormalize, dtype)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_w, **TOL[dtype])


@pytest.mark.parametrize("renormalize", [False, True], ids=["plain", "renorm"])
def test_route_ties(renormalize, device, gen, poison):
    """Rows of few distinct logits: equal probabilities inside the top-k and at the k-th place.
    The picks are the stable descending order (ties to the lowest expert id); inside the top-k
    they are torch.topk's experts, and the weights are torch.topk's values."""
    experts, top_k = 12, 4
    logits = torch.randint(0, 3, (16, experts), generator=gen).float().to(device)
    weights, ids, ref_w, ref_ids = _check_route(logits, top_k, renormalize, torch.float32)
    order = torch.sort(logits, dim=-1, descending=True, stable=True).indices[:, :top_k]
    assert torch.equal(ids, order)
    torch.testing.assert_close(weights, ref_w, rtol=1e-6, atol=1e-7)
    kth = logits.gather(1, order[:, -1:])
    decided = (logits == kth).sum(-1) == (logits.gather(1, order) == kth).sum(-1)
    assert decided.any() and (~decided).any(), "the case holds both kinds of rows"
    assert torch.equal(ids[decided].sort(-1).values, ref_ids[decided].sort(-1).values)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,inter", [(1, 37), (4, 64)])
def test_silu_and_mul(num_tokens, inter, dtype, device, gen, poison):
    x = _randn(gen, num_tokens, 2 * inter, dtype=dtype, device=device, scale=3.0)
    out = activation.silu_and_mul(x)
    assert out.dtype == dtype
    torch.testing.assert_close(out, reference.silu_and_mul(x), **TOL[dtype])
