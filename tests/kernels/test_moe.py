"""Fused MoE with MoE-LoRA (kernels.triton_ops.fused_experts) against the torch twin."""

from __future__ import annotations

import pytest
import torch

from loramux.kernels import LoraMeta, moe_lora, reference, triton_ops
from tests.kernels._utils import (
    MIXES,
    assert_close,
    lora_weight,
    random_moe_lora,
    routing,
    token_slots,
)

HIDDEN, INTER, TOP_K, SLOTS, RANK = 32, 24, 2, 4, 16
# mode -> (tokens, experts): "naive" skips the alignment (T*K*4 <= E); the others use it, with
# the LoRA kernel forced to one program per pair ("lora_naive") or per (expert, slot) ("aligned")
MODES = {"naive": (1, 8), "lora_naive": (9, 6), "aligned": (9, 6)}


def _inputs(mode, dtype, device, gen, hidden=HIDDEN, inter=INTER):
    num_tokens, num_experts = MODES[mode]
    x = lora_weight((num_tokens, hidden), 1, gen, dtype, device)
    w_gate_up = lora_weight((num_experts, 2 * inter, hidden), hidden, gen, dtype, device)
    w_down = lora_weight((num_experts, hidden, inter), inter, gen, dtype, device)
    weights, ids = routing(num_tokens, num_experts, TOP_K, gen, dtype, device)
    return x, w_gate_up, w_down, weights, ids


@pytest.fixture
def mode_of(monkeypatch):
    def apply(mode):
        if mode != "naive":
            monkeypatch.setattr(moe_lora, "NAIVE_PAIRS_PER_GROUP", 0 if mode == "aligned" else 1e9)
        return mode
    return apply


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mode", ["naive", "aligned"])
def test_fused_experts_base(mode, dtype, device, gen, poison):
    args = _inputs(mode, dtype, device, gen)
    out = triton_ops.fused_experts(*args, None, None)
    assert out.dtype == dtype
    assert_close(out.float(), reference.fused_experts(*args, None, None).float(), dtype)


@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("mode", list(MODES))
def test_fused_experts_lora(mode, mix, device, gen, poison, mode_of):
    mode_of(mode)
    args = _inputs(mode, torch.float32, device, gen)
    lora = random_moe_lora(SLOTS, args[1].shape[0], HIDDEN, INTER, RANK, gen, torch.float32, device)
    meta = LoraMeta.build(token_slots(mix, args[0].shape[0], SLOTS, gen), SLOTS, device)
    out = triton_ops.fused_experts(*args, lora, meta)
    assert_close(out, reference.fused_experts(*args, lora, meta), torch.float32)


@pytest.mark.parametrize("mode", list(MODES))
def test_fused_experts_lora_multi_tile(mode, device, gen, poison, mode_of):
    """Sizes past one K step (masked tail) and one N tile, so N is split over programs."""
    mode_of(mode)
    hidden, inter = 600, 200
    args = _inputs(mode, torch.float32, device, gen, hidden, inter)
    lora = random_moe_lora(SLOTS, args[1].shape[0], hidden, inter, RANK, gen, torch.float32,
                           device)
    meta = LoraMeta.build(token_slots("with_base", args[0].shape[0], SLOTS, gen), SLOTS, device)
    out = triton_ops.fused_experts(*args, lora, meta)
    assert_close(out, reference.fused_experts(*args, lora, meta), torch.float32)


@pytest.mark.parametrize("mode", ["naive", "aligned"])
def test_fused_experts_lora_fp16(mode, device, gen, poison, mode_of):
    mode_of(mode)
    args = _inputs(mode, torch.float16, device, gen)
    lora = random_moe_lora(SLOTS, args[1].shape[0], HIDDEN, INTER, RANK, gen, torch.float16, device)
    meta = LoraMeta.build(token_slots("with_base", args[0].shape[0], SLOTS, gen), SLOTS, device)
    out = triton_ops.fused_experts(*args, lora, meta)
    assert_close(out.float(), reference.fused_experts(*args, lora, meta).float(), torch.float16)


def test_fused_experts_without_lora_launches_no_lora_kernel(monkeypatch, device, gen):
    args = _inputs("aligned", torch.float32, device, gen)
    lora = random_moe_lora(SLOTS, args[1].shape[0], HIDDEN, INTER, RANK, gen, torch.float32, device)
    base = triton_ops.fused_experts(*args, None, None)
    monkeypatch.setattr(moe_lora, "_moe_lora_kernel", None)  # a launch would raise TypeError
    meta = LoraMeta.build([-1] * args[0].shape[0], SLOTS, device)
    assert torch.equal(triton_ops.fused_experts(*args, lora, meta), base)
