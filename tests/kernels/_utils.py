"""Inputs and checks shared by the kernel tests: adapter mixes, MoE-LoRA buffers, error norms."""

from __future__ import annotations

import torch

from loramux.kernels import MoeLora

# dtype -> largest allowed ||out - ref|| / ||ref||; on a GPU fp32 dots run in tf32 (seen on an
# H100: up to 3.8e-3 through the LoRA chain), the interpreter computes them in fp32
REL_TOL = {torch.float32: 6e-3 if torch.cuda.is_available() else 1e-5,
           torch.float16: 1e-2, torch.bfloat16: 2e-2}

MIXES = ("one", "distinct", "zipf", "with_base", "none")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    diff = (out.double() - ref.double()).norm()
    return (diff / ref.double().norm().clamp_min(1e-30)).item()


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), "output has NaN/inf (an element was never written?)"
    err = rel_err(out, ref)
    max_abs = (out.double() - ref.double()).abs().max().item()
    assert err <= REL_TOL[dtype], (
        f"rel err {err:.2e} > {REL_TOL[dtype]:.0e} (max abs {max_abs:.2e})")


def capture(step):
    """Run step once on a side stream (compiles outside the capture), then capture it in a
    CUDA graph; returns (graph, the captured call's outputs)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph, out


def token_slots(mix: str, num_tokens: int, num_slots: int, gen: torch.Generator) -> list[int]:
    """Per-token slots, requests in contiguous segments, drawn by an adapter-popularity mix."""
    if mix == "none":
        return [-1] * num_tokens
    if mix == "one":
        return [int(torch.randint(num_slots, (1,), generator=gen))] * num_tokens
    if mix == "distinct":
        first = int(torch.randint(num_slots, (1,), generator=gen))
        return [(first + t) % num_slots for t in range(num_tokens)]
    weights = 1.0 / torch.arange(1, num_slots + 1, dtype=torch.float64) ** 1.5
    if mix == "with_base":  # index num_slots stands for "no adapter"
        weights = torch.cat([weights, weights[:1]])
    cuts = torch.randperm(num_tokens - 1, generator=gen)[: num_tokens // 3] + 1
    bounds = sorted(cuts.tolist())
    slots: list[int] = []
    for lo, hi in zip([0, *bounds], [*bounds, num_tokens]):
        s = int(torch.multinomial(weights, 1, generator=gen))
        slots += [-1 if s == num_slots else s] * (hi - lo)
    return slots


def lora_weight(shape: tuple, fan_in: int, gen: torch.Generator, dtype, device) -> torch.Tensor:
    w = torch.randn(shape, generator=gen, dtype=torch.float64) / fan_in**0.5
    return w.to(dtype=dtype, device=device)


def random_moe_lora(num_slots, num_experts, hidden, inter, rank, gen, dtype, device) -> MoeLora:
    """Random MoE-LoRA buffers: slots alternate 2D (up_block 1) and 3D (0); slot 1 has rank R/2."""
    mk = lambda shape, fan_in: lora_weight(shape, fan_in, gen, dtype, device)  # noqa: E731
    s, e, r = num_slots, num_experts, rank
    lora = MoeLora(
        a_gate_up=mk((s, e, 2 * r, hidden), hidden), b_gate_up=mk((s, e, 2 * inter, r), r),
        up_block=torch.tensor([(i + 1) % 2 for i in range(s)], dtype=torch.int32, device=device),
        a_down=mk((s, e, r, inter), inter), b_down=mk((s, e, hidden, r), r),
    )
    if num_slots > 1:  # a lower-rank adapter, zero-padded to R
        for t in (lora.a_gate_up[1, :, r // 2 : r], lora.a_gate_up[1, :, r + r // 2 :],
                  lora.b_gate_up[1, :, :, r // 2 :], lora.a_down[1, :, r // 2 :],
                  lora.b_down[1, :, :, r // 2 :]):
            t.zero_()
    return lora


def routing(num_tokens, num_experts, top_k, gen, dtype, device):
    """top-k of the softmax of random router logits: (weights [T, K] dtype, ids [T, K] int64)."""
    logits = torch.randn(num_tokens, num_experts, generator=gen, dtype=torch.float64)
    weights, ids = torch.topk(logits.softmax(-1), top_k, dim=-1)
    return weights.to(dtype=dtype, device=device), ids.to(device)
