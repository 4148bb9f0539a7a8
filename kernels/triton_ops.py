"""Triton backend of the loramux ops, with exactly the signatures of the torch twins.

Besides attention, LoRA and the experts: the fused elementwise ops of every layer
(fused_add_rms_norm, qk_norm_rope, route, silu_and_mul), one launch each.

fused_experts runs, per MoE layer: moe_align (skipped in naive mode) -> [LoRA gate_up delta] ->
gate_up GEMM with SiLU*up -> [LoRA down delta] -> down GEMM with routing weight -> sum over K.
The LoRA launches are skipped when no token of the step has a slot (meta.has_lora is False).
"""

from __future__ import annotations

import torch

from loramux.kernels.activation import silu_and_mul
from loramux.kernels.attention import paged_decode_attention
# Gated DeltaNet: the torch twins on CUDA too (tensor ops only, so CUDA graphs can hold a decode
# step); fla-core's chunked and recurrent kernels are the faster path still to come.
from loramux.kernels.gated_delta import causal_conv1d, gated_delta_rule
from loramux.kernels.lora import lora_delta
from loramux.kernels.meta import LoraMeta
from loramux.kernels.moe import gemm_config, moe_gemm
from loramux.kernels.moe_align import moe_align, needs_alignment
from loramux.kernels.moe_lora import moe_lora_delta
from loramux.kernels.norm import fused_add_rms_norm
from loramux.kernels.prefill_attention import paged_prefill_attention
from loramux.kernels.reference import MoeLora
from loramux.kernels.rope import qk_norm_rope
from loramux.kernels.router import route

__all__ = ["causal_conv1d", "fused_add_rms_norm", "fused_experts", "gated_delta_rule",
           "lora_delta", "paged_decode_attention", "paged_prefill_attention", "qk_norm_rope",
           "route", "silu_and_mul"]

# Every op launches a fixed grid and reads no device value on the host: CUDA graphs may hold them.
CUDA_GRAPH_SAFE = True


def fused_experts(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    lora: MoeLora | None,
    meta: LoraMeta | None,
) -> torch.Tensor:
    """Routed SiLU-gated experts with per-token MoE-LoRA, summed over top-k.

    The Triton version of kernels.reference.fused_experts: same Semantics, Args and Returns,
    except that topk_ids must all be in [0, E): pairs left out (-1, expert parallelism) are the
    twin's only, and the engine refuses expert parallelism with these ops.
    Pairs (token, k) are aligned by expert (or one per block at small T), the gate_up GEMM adds
    the MoE-LoRA delta before SiLU*up, the down GEMM adds its delta and the routing weight.
    """
    num_tokens, hidden = x.shape
    num_experts, two_inter, _ = w_gate_up.shape
    top_k = topk_ids.shape[1]
    assert w_down.shape == (num_experts, hidden, two_inter // 2), "w_down must be [E, H, I]"
    assert topk_weights.shape == topk_ids.shape == (num_tokens, top_k), "routing must be [T, K]"
    assert x.dtype == w_gate_up.dtype == w_down.dtype, "x and expert weights share a dtype"
    topk_ids, topk_weights = topk_ids.contiguous(), topk_weights.contiguous()
    config = gemm_config(num_tokens, two_inter // 2, hidden, x.dtype, gate_up=True)
    routing = None
    if needs_alignment(topk_ids.numel(), num_experts):
        routing = moe_align(topk_ids, num_experts, config["BLOCK_M"])
    use_lora = lora is not None and meta is not None and meta.has_lora
    slots = meta.token_slot if use_lora else None
    delta = None
    if use_lora:
        delta = moe_lora_delta(x, lora.a_gate_up, lora.b_gate_up, lora.up_block,
                               topk_ids, slots, routing, meta.num_active)
    act = moe_gemm(x, w_gate_up, topk_ids, topk_weights, routing, delta, slots, config, True)
    if use_lora:
        delta = moe_lora_delta(act, lora.a_down, lora.b_down, None, topk_ids, slots, routing,
                               meta.num_active)
    config = gemm_config(num_tokens, hidden, two_inter // 2, x.dtype, gate_up=False)
    out = moe_gemm(act, w_down, topk_ids, topk_weights, routing, delta, slots, config, False)
    return out.view(num_tokens, top_k, hidden).sum(dim=1)
