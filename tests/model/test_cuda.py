"""The model on CUDA, with the torch twins and with the Triton ops, against transformers on CPU."""

from __future__ import annotations

import pytest
import torch

from tests.model.helpers import PagedSession, load_model, reference_logits
from tests.model.test_lora_slots import DECODE, PROMPTS, merged_reference, random_adapter, run_batch
from tests.tiny import load_reference

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
# Triton's fp32 tl.dot runs in TF32 (about 1e-3 relative per product): logits of size ~10
# drift by a few 1e-2; an indexing bug moves them by O(1). The torch path is fp32-exact.
TOLERANCE = {"torch": 1e-4, "triton": 5e-2}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("arch", ["qwen2_moe", "olmoe"])
def test_prefill_and_decode_on_cuda(checkpoint, arch, backend):
    path = checkpoint(arch, fused=True)
    model, _ = load_model(path, device="cuda", backend=backend)
    session = PagedSession(model, block_size=16)
    logits = [session.step([(0, PROMPTS[0], -1)])[0]]
    logits += [session.step([(0, [token], -1)])[0] for token in DECODE]
    expected = reference_logits(load_reference(path), PROMPTS[0] + list(DECODE))
    tol = TOLERANCE[backend]
    torch.testing.assert_close(torch.cat(logits).cpu(), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_mixed_lora_batch_on_cuda(checkpoint, backend):
    path = checkpoint("qwen2_moe")
    model, _ = load_model(path, max_loras=2, max_lora_rank=8, device="cuda", backend=backend)
    adapters = [random_adapter(model.config, "2d", 2, seed=1),
                random_adapter(model.config, "3d", 4, seed=2)]
    for slot, adapter in enumerate(adapters):
        model.write_lora_slot(slot, adapter)
    ours = run_batch(PagedSession(model, block_size=16), slots=(0, 1, -1))
    refs = [merged_reference(path, a, model.config) for a in adapters] + [load_reference(path)]
    tol = TOLERANCE[backend]
    for prompt, logits, ref in zip(PROMPTS, ours, refs):
        expected = reference_logits(ref, prompt + list(DECODE))
        torch.testing.assert_close(logits.cpu(), expected, atol=tol, rtol=tol)
