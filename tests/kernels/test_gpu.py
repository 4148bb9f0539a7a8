"""GPU checks of the Triton ops: bf16 on real MoE shapes against an fp32 twin, CUDA graphs."""

from __future__ import annotations

import pytest
import torch

from loramux.kernels import LoraMeta, LoraMetaBuffers, MoeLora, reference, triton_ops
from tests.kernels._utils import capture, rel_err, token_slots

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

BF16_TOL = 2e-2


def _randn(gen, *shape, fan_in=1):
    return torch.randn(shape, generator=gen, device="cuda") / fan_in**0.5


def _moe(gen, num_tokens, hidden, experts, top_k, inter, slots, rank):
    x = _randn(gen, num_tokens, hidden)
    w_gate_up = _randn(gen, experts, 2 * inter, hidden, fan_in=hidden)
    w_down = _randn(gen, experts, hidden, inter, fan_in=inter)
    logits = _randn(gen, num_tokens, experts)
    weights, ids = torch.topk(logits.softmax(-1), top_k, dim=-1)
    lora = MoeLora(_randn(gen, slots, experts, 2 * rank, hidden, fan_in=hidden),
                   _randn(gen, slots, experts, 2 * inter, rank, fan_in=rank),
                   torch.arange(slots, dtype=torch.int32, device="cuda") % 2,
                   _randn(gen, slots, experts, rank, inter, fan_in=inter),
                   _randn(gen, slots, experts, hidden, rank, fan_in=rank))
    return (x, w_gate_up, w_down, weights, ids), lora


def _bf16(args, lora):
    cast = lambda t: t.bfloat16() if t.is_floating_point() else t  # noqa: E731
    return tuple(map(cast, args)), MoeLora(*map(cast, lora))


@pytest.mark.parametrize("num_tokens", [1, 16, 64, 300])
@pytest.mark.parametrize("rank", [8, 16, 64])
def test_fused_experts_bf16(rank, num_tokens, gen):
    cuda_gen = torch.Generator(device="cuda").manual_seed(rank * 1000 + num_tokens)
    args, lora = _moe(cuda_gen, num_tokens, 1024, 32, 8, 384, 8, rank)
    meta = LoraMeta.build(token_slots("with_base", num_tokens, 8, gen), 8, torch.device("cuda"))
    ref = reference.fused_experts(*args, lora, meta)
    bf16_args, bf16_lora = _bf16(args, lora)
    out = triton_ops.fused_experts(*bf16_args, bf16_lora, meta)
    assert torch.isfinite(out).all() and rel_err(out, ref) <= BF16_TOL


@pytest.mark.parametrize("num_tokens", [1, 64, 257, 2048, 5000])  # the last two: prefill tiles
def test_fused_experts_qwen3_30b_shape(num_tokens, gen):
    cuda_gen = torch.Generator(device="cuda").manual_seed(7 + num_tokens)
    args, lora = _moe(cuda_gen, num_tokens, 2048, 128, 8, 768, 16, 16)
    meta = LoraMeta.build(token_slots("zipf", num_tokens, 16, gen), 16, torch.device("cuda"))
    ref = reference.fused_experts(*args, lora, meta)
    bf16_args, bf16_lora = _bf16(args, lora)
    out = triton_ops.fused_experts(*bf16_args, bf16_lora, meta)
    assert torch.isfinite(out).all() and rel_err(out, ref) <= BF16_TOL


@pytest.mark.parametrize("num_tokens", [1, 16, 256])
@pytest.mark.parametrize("rank", [8, 16, 64])
def test_lora_delta_bf16(rank, num_tokens, gen):
    cuda_gen = torch.Generator(device="cuda").manual_seed(rank * 1000 + num_tokens)
    splits = (2048, 512, 512)
    x = _randn(cuda_gen, num_tokens, 2048)
    a = _randn(cuda_gen, 16, 3 * rank, 2048, fan_in=2048)
    b = _randn(cuda_gen, 16, sum(splits), rank, fan_in=rank)
    y0 = _randn(cuda_gen, num_tokens, sum(splits))
    meta = LoraMeta.build(token_slots("zipf", num_tokens, 16, gen), 16, torch.device("cuda"))
    ref = y0.clone()
    reference.lora_delta(ref, x, a, b, meta, splits)
    y = y0.bfloat16()
    triton_ops.lora_delta(y, x.bfloat16(), a.bfloat16(), b.bfloat16(), meta, splits)
    assert rel_err(y.float() - y0, ref - y0) <= BF16_TOL


def test_cuda_graph_replays_a_new_adapter_mix(gen):
    num_tokens, slots, splits = 32, 8, (1024,)
    cuda_gen = torch.Generator(device="cuda").manual_seed(3)
    args, lora = _bf16(*_moe(cuda_gen, num_tokens, 1024, 32, 8, 384, slots, 16))
    a = _randn(cuda_gen, slots, 16, 1024, fan_in=1024).bfloat16()
    b = _randn(cuda_gen, slots, 1024, 16, fan_in=16).bfloat16()
    y0 = _randn(cuda_gen, num_tokens, 1024).bfloat16()
    cuda = torch.device("cuda")
    buffers = LoraMetaBuffers(num_tokens, slots, cuda)
    meta = buffers.fill(token_slots("distinct", num_tokens, slots, gen))
    y = y0.clone()

    def step():
        y.copy_(y0)
        triton_ops.lora_delta(y, args[0], a, b, meta, splits)
        return triton_ops.fused_experts(*args, lora, meta)

    graph, out = capture(step)
    meta = buffers.fill(token_slots("with_base", num_tokens, slots, gen))  # same addresses
    logits = _randn(cuda_gen, num_tokens, 32)
    new_weights, new_ids = torch.topk(logits.softmax(-1), 8, dim=-1)
    args[3].copy_(new_weights)
    args[4].copy_(new_ids)
    graph.replay()
    torch.cuda.synchronize()
    y_graph, out_graph = y.clone(), out.clone()
    assert torch.equal(out_graph, step()) and torch.equal(y_graph, y)
