"""The prefill attention op (Triton and its torch twin) reads each sequence's own cached rows
only: NaN / Inf anywhere else in the cache changes no output bit."""

from __future__ import annotations

import pytest
import torch

from loramux.kernels import prefill_attention, reference
from tests.poison import stale_caches


@pytest.mark.parametrize("op", [prefill_attention.paged_prefill_attention,
                                reference.paged_prefill_attention], ids=["triton", "twin"])
@pytest.mark.parametrize("fill", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_prefill_reads_nothing_of_other_sequences_or_free_blocks(fill, op):
    """Block size 4. Sequence 0 (blocks 0, 5; block 0 is also every table's padding) is
    poisoned, 1 prefills a 4-token chunk at positions 9..12, 2 prefills 3 tokens, 3 decodes its
    first token (block 6); blocks 8, 9 are free and rows past each length are stale."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator().manual_seed(0)
    q_lens, lens = [5, 4, 3, 1], [5, 13, 3, 1]
    tables = torch.tensor([[0, 5, 0, 0], [3, 1, 7, 2], [4, 0, 0, 0], [6, 0, 0, 0]],
                          dtype=torch.int32)
    clean, poisoned = stale_caches(lens, tables, fill, gen)
    q = torch.randn(sum(q_lens), 4, 16, generator=gen)
    starts = torch.tensor([0, 5, 9, 12, 13], dtype=torch.int32)
    meta = [t.to(device) for t in (tables, starts, torch.tensor(lens, dtype=torch.int32))]
    want = op(q.to(device), *(c.to(device) for c in clean), *meta, max(q_lens), 0.25)
    got = op(q.to(device), *(c.to(device) for c in poisoned), *meta, max(q_lens), 0.25)
    assert torch.isfinite(want).all() and not torch.isfinite(got[:5]).all()
    assert torch.equal(got[5:], want[5:])
