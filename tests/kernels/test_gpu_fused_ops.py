"""GPU checks of the fused elementwise ops: bf16 at Qwen3-30B-A3B shapes against the twins run
on the same bf16 tensors (the model's torch code), and one CUDA graph holding all four.

Tolerances (bf16). The residual add is bit-exact (one rounding of the same float32 sum on
both paths). Normed, rotated and activated values are held to the float32 result (the twin run
on the inputs upcast to float32): the fused op rounds fewer intermediates than the twin's
chain of bf16 tensor ops, so its error must be no larger than the twin's own, with a margin for
reduction order (max error <= 1.5 x the twin's + 2^-9 of the largest value, mean error <=
1.25 x the twin's). An indexing or masking bug errs by whole values and fails both. (The first
H200 run held outputs to the twin's bf16 values with at most 2% of elements differing: 12 of
the norm and RoPE cases failed that count, while the same kernels at these shapes matched the
twin to 2e-7 in float32 under the interpreter.) Router: picks in descending order with ties to
the lowest id, the same experts as torch.topk (on ties too: CUDA's fills the k-th place in
index order) and weights within 2^-7 relative (one bf16 rounding).
"""

from __future__ import annotations

import pytest
import torch

from loramux.kernels import reference, triton_ops
from tests.kernels._utils import capture

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

H, N, G, D, E, K, I = 2048, 32, 4, 128, 128, 8, 768
TOKENS = [1, 64, 257, 8192]


def _gen(seed):
    return torch.Generator(device="cuda").manual_seed(seed)


def _bf16(gen, *shape, scale=1.0, shift=0.0):
    return (torch.randn(shape, generator=gen, device="cuda") * scale + shift).bfloat16()


def _f32(args):
    return tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                 for a in args)


def _assert_as_accurate(out, ref, exact):
    """out (fused) is as close to the float32 result `exact` as the twin's `ref` is."""
    assert out.dtype == ref.dtype and out.shape == ref.shape == exact.shape
    assert torch.isfinite(out).all()
    err, twin_err = (out.float() - exact).abs(), (ref.float() - exact).abs()
    assert err.max() <= 1.5 * twin_err.max() + 2**-9 * exact.abs().max(), \
        f"max error {err.max():.3g} against the twin's {twin_err.max():.3g}"
    assert err.mean() <= 1.25 * twin_err.mean(), \
        f"mean error {err.mean():.3g} against the twin's {twin_err.mean():.3g}"


@pytest.mark.parametrize("zero_centred", [False, True], ids=["plain", "zero_centred"])
@pytest.mark.parametrize("num_tokens", TOKENS)
def test_fused_add_rms_norm_bf16(num_tokens, zero_centred):
    gen = _gen(num_tokens)
    x, residual = _bf16(gen, num_tokens, H, scale=4.0), _bf16(gen, num_tokens, H)
    weight = _bf16(gen, H, scale=0.1, shift=0.0 if zero_centred else 1.0)
    for res in (residual, None):
        args = (x, res, weight, 1e-6, zero_centred)
        out, new_res = triton_ops.fused_add_rms_norm(*args)
        ref, ref_res = reference.fused_add_rms_norm(*args)
        assert torch.equal(new_res, ref_res)
        exact = reference.fused_add_rms_norm(ref_res.float(), None, weight.float(), 1e-6,
                                             zero_centred)[0]  # the same bf16 sum, then float32
        _assert_as_accurate(out, ref, exact)


@pytest.mark.parametrize("rotary_dim,norm", [(D, "per_head"), (D, "none"), (32, "zero_centred")],
                         ids=["qwen3", "no_norm", "partial_zero_centred"])
@pytest.mark.parametrize("num_tokens", TOKENS)
def test_qk_norm_rope_bf16(num_tokens, rotary_dim, norm):
    gen = _gen(num_tokens + rotary_dim)
    qkv = _bf16(gen, num_tokens, (N + 2 * G) * D, scale=2.0)  # q, k as views, like the model's
    q = qkv[:, :N * D].view(num_tokens, N, D)
    k = qkv[:, N * D:(N + G) * D].view(num_tokens, G, D)
    positions = torch.randint(0, 32768, (num_tokens,), generator=gen, device="cuda")
    inv_freq = 1.0 / 1e6 ** (torch.arange(0, rotary_dim, 2, device="cuda") / rotary_dim)
    weights = (None, None)
    if norm != "none":
        shift = 0.0 if norm == "zero_centred" else 1.0
        weights = (_bf16(gen, D, scale=0.1, shift=shift), _bf16(gen, D, scale=0.1, shift=shift))
    args = (q, k, positions, inv_freq.float(), *weights, 1e-6, norm == "zero_centred")
    exact = reference.qk_norm_rope(*_f32(args))
    for out, ref, want in zip(triton_ops.qk_norm_rope(*args), reference.qk_norm_rope(*args), exact):
        _assert_as_accurate(out, ref, want)


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
    _assert_as_accurate(triton_ops.silu_and_mul(x), reference.silu_and_mul(x),
                        reference.silu_and_mul(x.float()))


def test_fused_ops_replay_in_a_cuda_graph():
    gen = _gen(5)
    num_tokens = 16
    x, residual, weight = _bf16(gen, num_tokens, H), _bf16(gen, num_tokens, H), _bf16(gen, H)
    q, k = _bf16(gen, num_tokens, N, D), _bf16(gen, num_tokens, G, D)
    qw, kw = _bf16(gen, D, shift=1.0), _bf16(gen, D, shift=1.0)
    positions = torch.arange(num_tokens, device="cuda")
    inv_freq = 1.0 / 1e6 ** (torch.arange(0, D, 2, device="cuda").float() / D)
    logits, gate_up = _bf16(gen, num_tokens, E), _bf16(gen, num_tokens, 2 * I)

    def step():
        return (*triton_ops.fused_add_rms_norm(x, residual, weight, 1e-6, False),
                *triton_ops.qk_norm_rope(q, k, positions, inv_freq, qw, kw, 1e-6, False),
                *triton_ops.route(logits, K, True, torch.bfloat16),
                triton_ops.silu_and_mul(gate_up))

    graph, outs = capture(step)
    for t in (x, residual, q, k, logits, gate_up):
        t.copy_(torch.randn(t.shape, generator=gen, device="cuda"))
    positions.add_(1000)
    graph.replay()
    torch.cuda.synchronize()
    for out, eager in zip(outs, step()):
        assert torch.equal(out, eager)
