"""route: the MoE router's softmax, top-k and renormalisation in one kernel.

A program holds BLOCK_T token rows of E logits: float32 softmax, then K rounds of (max,
lowest index holding it), each removing its pick. Tie rule: among equal probabilities the
lowest expert id goes first, so the k picks are sorted by descending probability, ties by
ascending id (the set CUDA's torch.topk returns; torch.topk on a CPU may pick another member of
a tie at the k-th place). Renormalising divides by the float32 sum of the k picks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from loramux.kernels._utils import cdiv, next_power_of_2

MAX_EXPERTS = 4096


@triton.jit
def _route_kernel(
    weights_ptr, ids_ptr, logits_ptr, num_tokens, num_experts, stride_t,
    TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_e = tl.arange(0, BLOCK_E)
    offs_k = tl.arange(0, BLOCK_K)
    t_mask = rows < num_tokens
    e_mask = offs_e < num_experts
    logits = tl.load(logits_ptr + rows.to(tl.int64)[:, None] * stride_t + offs_e[None, :],
                     mask=t_mask[:, None] & e_mask[None, :], other=0.0)
    logits = tl.where(e_mask[None, :], logits.to(tl.float32), float("-inf"))
    num = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    probs = num / tl.sum(num, axis=1)[:, None]
    probs = tl.where(e_mask[None, :], probs, -1.0)  # padding columns are never picked
    weights = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    ids = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int64)
    for k in tl.static_range(TOP_K):
        best = tl.max(probs, axis=1)
        pick = tl.min(tl.where(probs == best[:, None], offs_e[None, :], BLOCK_E), axis=1)
        weights = tl.where(offs_k[None, :] == k, best[:, None], weights)
        ids = tl.where(offs_k[None, :] == k, pick.to(tl.int64)[:, None], ids)
        probs = tl.where(offs_e[None, :] == pick[:, None], -2.0, probs)
    if RENORMALIZE:
        weights = weights / tl.sum(weights, axis=1)[:, None]
    out = rows.to(tl.int64)[:, None] * TOP_K + offs_k[None, :]
    mask = t_mask[:, None] & (offs_k < TOP_K)[None, :]
    tl.store(weights_ptr + out, weights.to(weights_ptr.dtype.element_ty), mask=mask)
    tl.store(ids_ptr + out, ids, mask=mask)


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool,
          dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax (float32), top-k, optional renormalisation.

    The Triton version of kernels.reference.route: same Semantics, Args and Returns; ties go to
    the lowest expert id (module docstring).
    """
    num_tokens, num_experts = router_logits.shape
    assert 0 < top_k <= num_experts <= MAX_EXPERTS, "need 0 < K <= E <= 4096"
    assert router_logits.stride(1) == 1, "logit rows must be contiguous"
    device = router_logits.device
    weights = torch.empty(num_tokens, top_k, dtype=dtype, device=device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int64, device=device)
    if num_tokens == 0:
        return weights, ids
    block_e = next_power_of_2(num_experts)
    block_t = max(1, min(16, 2048 // block_e))
    _route_kernel[(cdiv(num_tokens, block_t),)](
        weights, ids, router_logits, num_tokens, num_experts, router_logits.stride(0),
        TOP_K=top_k, RENORMALIZE=renormalize, BLOCK_T=block_t, BLOCK_E=block_e,
        BLOCK_K=next_power_of_2(top_k), num_warps=4,
    )
    return weights, ids
