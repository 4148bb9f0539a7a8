"""Token -> expert alignment (kernels.moe_align): the invariants the grouped GEMMs rely on."""

from __future__ import annotations

import pytest
import torch

from loramux.kernels.moe_align import moe_align
from tests.kernels._utils import routing


@pytest.mark.parametrize("num_tokens,top_k,num_experts,block_m",
                         [(1, 2, 8, 16), (9, 2, 6, 4), (37, 3, 5, 16), (300, 4, 16, 32)])
def test_alignment_groups_pairs_by_expert(num_tokens, top_k, num_experts, block_m, device, gen,
                                          poison):
    _, ids = routing(num_tokens, num_experts, top_k, gen, torch.float32, device)
    al = moe_align(ids, num_experts, block_m)
    flat, num_pairs = ids.flatten().cpu(), ids.numel()
    offsets, sorted_ids = al.expert_offsets.cpu(), al.sorted_ids.cpu()
    expert_ids = al.expert_ids.cpu()
    assert offsets[0] == 0
    for e in range(num_experts):
        lo, hi = offsets[e].item(), offsets[e + 1].item()
        mine = (flat == e).nonzero().squeeze(1)
        assert hi - lo == -(-mine.numel() // block_m) * block_m, f"expert {e} padded wrongly"
        assert sorted_ids[lo : lo + mine.numel()].tolist() == mine.tolist()
        assert (sorted_ids[lo + mine.numel() : hi] == num_pairs).all(), "padding must be T*K"
        assert (expert_ids[lo // block_m : hi // block_m] == e).all()
