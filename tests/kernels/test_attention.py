"""Paged decode attention (kernels.attention) against the torch twin."""

from __future__ import annotations

import pytest
import torch

from loramux.kernels import attention, reference
from tests.kernels._utils import assert_close, rel_err
from tests.poison import stale_caches


def _case(seq_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, device, gen):
    """Random q, caches whose rows past every length (and unused blocks) are NaN, tables of
    shuffled blocks; returns the inputs and a NaN-free copy of the caches for the twin."""
    width = max(1, max(-(-n // block_size) for n in seq_lens)) + 1  # one spare column
    num_blocks = len(seq_lens) * width + 1
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen)
    v_cache = torch.randn(shape, generator=gen)
    q = torch.randn(len(seq_lens), num_heads, head_dim, generator=gen)
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    used = torch.zeros(num_blocks * block_size, dtype=torch.bool)
    for b, n in enumerate(seq_lens):
        blocks = [order.pop() for _ in range(width)]  # spare entries point at untouched blocks
        tables[b] = torch.tensor(blocks, dtype=torch.int32)
        for j in range(n):
            used[blocks[j // block_size] * block_size + j % block_size] = True
    used = used.view(num_blocks, block_size, 1, 1)
    poisoned = [c.masked_fill(~used, float("nan")) for c in (k_cache, v_cache)]
    to = dict(dtype=dtype, device=device)
    args = (q.to(**to), *(c.to(**to) for c in poisoned), tables.to(device),
            torch.tensor(seq_lens, dtype=torch.int32, device=device), head_dim ** -0.5)
    clean = tuple(c.masked_fill(~used, 0.0).to(**to) for c in (k_cache, v_cache))
    return args, clean


def _check(seq_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, device, gen):
    args, clean = _case(seq_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, device,
                        gen)
    q, _, _, tables, lens, scale = args
    out = attention.paged_decode_attention(*args)
    as_fp32 = [t.float() for t in (q, *clean)]
    ref = reference.paged_decode_attention(*as_fp32[:1], *as_fp32[1:], tables, lens, scale)
    assert out.dtype == dtype and out.shape == q.shape
    padding = torch.tensor(seq_lens, device=device) == 0
    assert torch.equal(out[padding], torch.zeros_like(out[padding])), "seq_len 0 rows are zeros"
    assert_close(out.float(), ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads", [(8, 2), (6, 2), (4, 4)], ids=["gqa4", "gqa3", "mha"])
def test_paged_decode_attention_matches_reference(heads, dtype, device, gen, poison):
    _check([17, 1, 0, 40, 16], *heads, 32, 16, dtype, device, gen)


@pytest.mark.parametrize("block_size", [4, 16])
def test_paged_decode_attention_block_sizes_and_odd_head_dim(block_size, device, gen, poison):
    _check([9, 33, 2], 4, 2, 24, block_size, torch.float32, device, gen)


def test_reference_matches_per_head_loop(gen):
    """The twin against its Semantics block, written out with explicit loops."""
    args, clean = _case([5, 0, 12], 4, 2, 16, 4, torch.float32, torch.device("cpu"), gen)
    q, _, _, tables, lens, scale = args
    out = reference.paged_decode_attention(q, *clean, tables, lens, scale)
    for b, n in enumerate(lens.tolist()):
        for h in range(4):
            rows = [tables[b, j // 4] * 4 + j % 4 for j in range(n)]
            k = clean[0].flatten(0, 1)[rows, h // 2]  # [L, D]
            v = clean[1].flatten(0, 1)[rows, h // 2]
            want = torch.softmax(scale * k @ q[b, h], 0) @ v if n else torch.zeros(16)
            torch.testing.assert_close(out[b, h], want, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_paged_decode_attention_bf16_qwen3_shape(gen):
    """Qwen3-30B-A3B heads (32 query / 4 KV of 128) in bf16 against the fp32 twin."""
    seq_lens = [1, 0, 130, 300, 16, 257, 64, 999]
    device = torch.device("cuda")
    args, clean = _case(seq_lens, 32, 4, 128, 16, torch.bfloat16, device, gen)
    q, _, _, tables, lens, scale = args
    out = attention.paged_decode_attention(*args)
    ref = reference.paged_decode_attention(q.float(), clean[0].float(), clean[1].float(),
                                           tables, lens, scale)
    assert torch.isfinite(out).all() and rel_err(out, ref) <= 2e-2


def _isolation_case(fill: float, device, gen):
    """Block size 4. Sequence 0 owns block 0 (the worker pads every table with block 0) and is
    poisoned; 1 and 2 are healthy; 3 is a padding row (length 0). Blocks 6, 8, 9 are free.
    Returns q, the clean caches, the caches with `fill` in sequence 0's blocks, in the free blocks
    and in the rows past each length, the tables and the lengths."""
    lens = [5, 13, 1, 0]
    tables = torch.tensor([[0, 5, 0, 0], [3, 1, 7, 2], [4, 0, 0, 0], [0, 0, 0, 0]],
                          dtype=torch.int32)
    clean, poisoned = stale_caches(lens, tables, fill, gen)
    q = torch.randn(len(lens), 4, 16, generator=gen)
    to = dict(device=device)
    return (q.to(**to), [c.to(**to) for c in clean], [c.to(**to) for c in poisoned],
            tables.to(**to), torch.tensor(lens, dtype=torch.int32, device=device))


@pytest.mark.parametrize("fill", [float("nan"), float("inf"), float("-inf")],
                         ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("op", [attention.paged_decode_attention,
                                reference.paged_decode_attention], ids=["triton", "twin"])
def test_decode_reads_nothing_of_other_sequences_or_free_blocks(op, fill, device, gen):
    """NaN / Inf in another sequence's blocks (also behind the block-0 padding of the tables), in
    free blocks and past each length: every other sequence's output is bit-for-bit the same."""
    q, clean, poisoned, tables, lens = _isolation_case(fill, device, gen)
    want = op(q, *clean, tables, lens, 0.25)
    got = op(q, *poisoned, tables, lens, 0.25)
    assert torch.isfinite(want).all()
    assert torch.equal(got[1:], want[1:])
