"""Our paged decoder against transformers on tiny checkpoints of the four architectures."""

from __future__ import annotations

import pytest
import torch

from tests.model.helpers import PagedSession, load_model, reference_logits
from tests.tiny import ARCHS, load_reference, save_tiny_checkpoint

PROMPT = [5, 17, 300, 42, 8, 99, 123, 7, 64]  # 9 tokens
DECODE = [11, 250, 3]


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fused", [False, True], ids=["2d", "3d"])
@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_then_decode_matches_transformers(checkpoint, arch, fused):
    path = checkpoint(arch, fused)
    model, layout = load_model(path)
    assert layout == ("3d" if fused else "2d")
    ref = reference_logits(load_reference(path), PROMPT + DECODE)
    session = PagedSession(model)
    assert_logits_close(session.step([(0, PROMPT, -1)])[0], ref[:len(PROMPT)])
    for i, token in enumerate(DECODE):
        logits = session.step([(0, [token], -1)])[0]
        assert_logits_close(logits, ref[len(PROMPT) + i:len(PROMPT) + i + 1])


@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_prefill_matches_transformers(checkpoint, arch):
    path = checkpoint(arch)
    model, _ = load_model(path)
    ref = reference_logits(load_reference(path), PROMPT)
    session = PagedSession(model, block_size=2)
    first = session.step([(0, PROMPT[:5], -1)])[0]
    second = session.step([(0, PROMPT[5:], -1)])[0]
    assert_logits_close(torch.cat([first, second]), ref)


@pytest.mark.parametrize("arch", ARCHS)
def test_batch_of_two_sequences_matches_each_alone(checkpoint, arch):
    path = checkpoint(arch)
    model, _ = load_model(path)
    other = [400, 2, 77, 31, 6, 250]
    reference = load_reference(path)
    ref_a = reference_logits(reference, PROMPT + [9])
    ref_b = reference_logits(reference, other + [10])
    session = PagedSession(model)
    prefill_a, prefill_b = session.step([(0, PROMPT, -1), (1, other, -1)])
    assert_logits_close(prefill_a, ref_a[:-1])
    assert_logits_close(prefill_b, ref_b[:-1])
    decode_a, decode_b = session.step([(0, [9], -1), (1, [10], -1)])
    assert_logits_close(decode_a, ref_a[-1:])
    assert_logits_close(decode_b, ref_b[-1:])


def test_mixed_prefill_and_decode_in_one_step(checkpoint):
    """One sequence decodes while another prefills a chunk in the same step."""
    path = checkpoint("qwen3_moe")
    model, _ = load_model(path)
    reference = load_reference(path)
    session = PagedSession(model, block_size=4)
    session.step([(0, PROMPT, -1)])
    decode, prefill = session.step([(0, [9], -1), (1, PROMPT[:6], -1)])
    assert_logits_close(decode, reference_logits(reference, PROMPT + [9])[-1:])
    assert_logits_close(prefill, reference_logits(reference, PROMPT[:6]))


@pytest.mark.parametrize("arch,overrides", [
    ("olmoe", {"clip_qkv": 0.5}),
    ("qwen3_moe", {"decoder_sparse_step": 2, "attention_bias": True}),
    ("qwen2_moe", {"norm_topk_prob": True, "qkv_bias": False, "tie_word_embeddings": True}),
    ("mixtral", {"num_experts_per_tok": 3, "rope_theta": 5000.0}),
], ids=["olmoe-clip", "qwen3-dense-bias", "qwen2-renorm-tied", "mixtral-top3"])
def test_config_variants_match_transformers(tmp_path, arch, overrides):
    path = save_tiny_checkpoint(arch, tmp_path, **overrides)
    model, _ = load_model(path)
    session = PagedSession(model)
    logits = torch.cat([session.step([(0, PROMPT, -1)])[0], session.step([(0, [9], -1)])[0]])
    assert_logits_close(logits, reference_logits(load_reference(path), PROMPT + [9]))
