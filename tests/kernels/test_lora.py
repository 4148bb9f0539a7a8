"""Dense LoRA delta (kernels.lora) and LoraMeta against the torch twin."""

from __future__ import annotations

import pytest
import torch

from loramux.kernels import LoraMeta, LoraMetaBuffers, lora, reference
from tests.kernels._utils import MIXES, assert_close, lora_weight, token_slots


def _run(splits, rank, mix, dtype, device, gen, num_tokens=11, num_slots=4, d_in=48):
    slots = token_slots(mix, num_tokens, num_slots, gen)
    meta = LoraMeta.build(slots, num_slots, device)
    x = lora_weight((num_tokens, d_in), 1, gen, dtype, device)
    a = lora_weight((num_slots, len(splits) * rank, d_in), d_in, gen, dtype, device)
    b = lora_weight((num_slots, sum(splits), rank), rank, gen, dtype, device)
    a[1, :, rank // 2 :] = 0  # slot 1: an adapter of rank R/2, zero-padded
    b[1, :, rank // 2 :] = 0
    y0 = lora_weight((num_tokens, sum(splits)), 1, gen, dtype, device)
    y, y_ref = y0.clone(), y0.clone()
    lora.lora_delta(y, x, a, b, meta, splits)
    reference.lora_delta(y_ref, x, a, b, meta, splits)
    base_rows = torch.tensor(slots, device=device) < 0
    assert torch.equal(y[base_rows], y0[base_rows]), "rows without an adapter must not change"
    if not base_rows.all():
        assert_close(y.float() - y0.float(), y_ref.float() - y0.float(), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mix", MIXES)
def test_lora_delta_matches_reference(mix, dtype, device, gen):
    _run((40, 24), 16, mix, dtype, device, gen)


@pytest.mark.parametrize("splits", [(32,), (32, 16, 16), (16, 24, 8, 40)])
@pytest.mark.parametrize("rank", [16, 24])
def test_lora_delta_slices_and_ranks(splits, rank, device, gen):
    _run(splits, rank, "zipf", torch.float32, device, gen, num_tokens=19, num_slots=3)


@pytest.mark.parametrize("num_tokens", [1, 19])
@pytest.mark.parametrize("splits", [(600,), (200, 72, 72)])
def test_lora_delta_multi_tile(splits, num_tokens, device, gen):
    """D_in past one K step (masked tail), D_out over several N tiles split over programs."""
    _run(splits, 16, "with_base", torch.float32, device, gen, num_tokens, 3, d_in=600)


def test_lora_delta_without_lora_launches_nothing(monkeypatch, device):
    monkeypatch.setattr(lora, "_lora_delta_kernel", None)  # a launch would raise TypeError
    meta = LoraMeta.build([-1, -1], 2, device)
    y = torch.ones(2, 16, device=device)
    x = torch.ones(2, 16, device=device)
    lora.lora_delta(y, x, torch.ones(2, 16, 16, device=device),
                    torch.ones(2, 16, 16, device=device), meta, (16,))
    assert meta.has_lora is False and torch.equal(y, torch.ones_like(y))


def test_meta_groups_tokens_by_slot_in_preallocated_buffers(device):
    buffers = LoraMetaBuffers(max_tokens=8, num_slots=4, device=device)
    meta = buffers.fill([1, 1, -1, 3, 1])
    assert meta.token_slot.tolist() == [1, 1, -1, 3, 1]
    assert meta.sorted_tokens.tolist() == [0, 1, 4, 3, 2]
    assert meta.slot_start.tolist() == [0, 0, 3, 3, 4]
    assert (meta.has_lora, meta.num_active) == (True, 2)
    other = buffers.fill([-1, 0, 0, 2, -1])
    # the same token count gives the same addresses (what a captured CUDA graph reads)
    for name in ("token_slot", "sorted_tokens", "slot_start"):
        assert getattr(other, name).data_ptr() == getattr(meta, name).data_ptr()
    assert meta.sorted_tokens.tolist() == [1, 2, 3, 0, 4]
    assert meta.slot_start.tolist() == [0, 2, 2, 3, 3]
    with pytest.raises(AssertionError):
        buffers.fill([4])
