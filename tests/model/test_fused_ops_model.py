"""The whole model with the Triton ops (the interpreter on a CPU) against transformers: the
fused norm, q/k norm + RoPE, router and SiLU*mul are wired with the right weights and flags
(per-head and full q/k norms, no q/k norm with a shared expert; the hybrids' partial rotary,
gated attention and zero-centred norms: tests/engine/test_hybrid_engine.py)."""

from __future__ import annotations

import pytest
import torch

from tests.model.helpers import PagedSession, load_model, reference_logits
from tests.model.test_cuda import assert_logits_close
from tests.model.test_lora_slots import PROMPTS
from tests.tiny import load_reference


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe", "olmoe"])
def test_triton_ops_model_equals_transformers(checkpoint, arch):
    path = checkpoint(arch)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter needs the CPU
    model, _ = load_model(path, device=device, backend="triton")
    logits = PagedSession(model).step([(0, PROMPTS[0], -1)])[0]
    expected = reference_logits(load_reference(path), PROMPTS[0])
    assert_logits_close(logits, expected, "triton")
