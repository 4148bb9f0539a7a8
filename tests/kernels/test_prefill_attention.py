"""Paged variable-length attention (kernels.prefill_attention) against the torch twin, and the
twin against its Semantics written out as loops."""

from __future__ import annotations

import pytest
import torch

from loramux.kernels import prefill_attention, reference
from tests.kernels._utils import assert_close, rel_err
from tests.kernels.test_attention import _case

# (q_len, seq_len) per sequence: a whole prompt, a later chunk of one, decode rows, a chunk
# longer than a tile of queries and a context longer than a tile of keys
MIXED = [(7, 7), (5, 23), (1, 40), (1, 1), (33, 70), (19, 19)]


def _varlen_case(shape, num_heads, num_kv_heads, head_dim, block_size, dtype, device, gen):
    q_lens, lens = zip(*shape)
    (_, k_cache, v_cache, tables, seq_lens, scale), clean = _case(
        list(lens), num_heads, num_kv_heads, head_dim, block_size, dtype, device, gen)
    q = torch.randn(sum(q_lens), num_heads, head_dim, generator=gen).to(dtype=dtype,
                                                                          device=device)
    starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32,
                          device=device)
    return (q, k_cache, v_cache, tables, starts, seq_lens, max(q_lens), scale), clean


@pytest.fixture(params=[None, dict(block_m=16, block_n=16)], ids=["default", "small-tiles"])
def launch(request, monkeypatch):
    """The default tiles, and tiles small enough that the mixed case spans several of each."""
    if request.param:
        monkeypatch.setattr(prefill_attention, "LAUNCH", {**prefill_attention.LAUNCH,
                                                          **request.param})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads", [(8, 2), (6, 2), (4, 4)], ids=["gqa4", "gqa3", "mha"])
def test_paged_prefill_attention_matches_reference(heads, dtype, launch, device, gen, poison):
    """Caches hold NaN past every length and in unused blocks; the output must not see it."""
    args, clean = _varlen_case(MIXED, *heads, 32, 16, dtype, device, gen)
    out = prefill_attention.paged_prefill_attention(*args)
    q, _, _, tables, starts, lens, max_q, scale = args
    ref = reference.paged_prefill_attention(q.float(), clean[0].float(), clean[1].float(),
                                            tables, starts, lens, max_q, scale)
    assert out.dtype == dtype
    assert_close(out.float(), ref, dtype)


def test_paged_prefill_attention_block_size_4_odd_head_dim(device, gen):
    args, clean = _varlen_case([(9, 9), (3, 14), (1, 6)], 4, 2, 24, 4, torch.float32, device,
                               gen)
    out = prefill_attention.paged_prefill_attention(*args)
    q, _, _, tables, starts, lens, max_q, scale = args
    ref = reference.paged_prefill_attention(q, *clean, tables, starts, lens, max_q, scale)
    assert_close(out, ref, torch.float32)


def test_reference_matches_causal_loop(gen):
    """The twin against its Semantics block: new token j of a sequence sees positions
    <= L - q_len + j of its own blocks."""
    shape = [(3, 3), (2, 7), (1, 5)]
    args, clean = _varlen_case(shape, 4, 2, 16, 4, torch.float32, torch.device("cpu"), gen)
    q, _, _, tables, starts, lens, max_q, scale = args
    out = reference.paged_prefill_attention(q, *clean, tables, starts, lens, max_q, scale)
    row = 0
    for b, (q_len, n) in enumerate(shape):
        rows = [tables[b, j // 4] * 4 + j % 4 for j in range(n)]
        for j in range(q_len):
            visible = rows[: n - q_len + j + 1]
            for h in range(4):
                k = clean[0].flatten(0, 1)[visible, h // 2]
                v = clean[1].flatten(0, 1)[visible, h // 2]
                want = torch.softmax(scale * k @ q[row, h], 0) @ v
                torch.testing.assert_close(out[row, h], want, atol=1e-5, rtol=1e-5)
            row += 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_paged_prefill_attention_bf16_qwen3_shape(gen):
    """Qwen3-30B-A3B heads (32 query / 4 KV of 128) in bf16 against the fp32 twin: whole
    prompts, chunks behind a cached context and decode rows in one launch."""
    shape = [(512, 512), (300, 1324), (1, 999), (1, 1), (77, 77), (1000, 1000)]
    args, clean = _varlen_case(shape, 32, 4, 128, 16, torch.bfloat16, torch.device("cuda"), gen)
    out = prefill_attention.paged_prefill_attention(*args)
    q, _, _, tables, starts, lens, max_q, scale = args
    ref = reference.paged_prefill_attention(q.float(), clean[0].float(), clean[1].float(),
                                            tables, starts, lens, max_q, scale)
    assert torch.isfinite(out).all() and rel_err(out, ref) <= 2e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_paged_prefill_attention_long_prompt_needs_no_score_matrix():
    """A 32k-token prompt (Qwen3-30B heads): the kernel allocates its output only, where a dense
    causal mask and scores would need [N, T, T] (64 GiB in fp32)."""
    n, block_size = 32768, 16
    device = torch.device("cuda")
    k_cache = torch.randn(n // block_size, block_size, 4, 128, dtype=torch.bfloat16,
                          device=device)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(n, 32, 128, dtype=torch.bfloat16, device=device)
    tables = torch.arange(n // block_size, dtype=torch.int32, device=device)[None]
    starts = torch.tensor([0, n], dtype=torch.int32, device=device)
    lens = torch.tensor([n], dtype=torch.int32, device=device)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = prefill_attention.paged_prefill_attention(q, k_cache, v_cache, tables, starts, lens,
                                                    n, 128 ** -0.5)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before <= 2 * q.numel() * q.element_size()
    # the last token's row against a direct softmax over the whole context
    k = k_cache.flatten(0, 1)[:, 0].float()
    v = v_cache.flatten(0, 1)[:, 0].float()
    want = torch.softmax(128 ** -0.5 * k @ q[-1, 0].float(), 0) @ v
    assert rel_err(out[-1, 0], want) <= 2e-2
