"""CUDA graphs of the decode step: one per batch bucket, captured at start-up.

A decode step of a MoE model is hundreds of small kernel launches, so on a GPU the host sets
its pace, not the device. DecodeGraphs records the model forward plus the logits of every row
for each bucket B in 1, 2, 4, ..., max_batch and replays the smallest bucket that holds a
decode-only step (every sequence feeds one token). Invariants the runner keeps:
  - the static inputs are its preallocated device buffers (input ids, positions, KV slots,
    sequence lengths, block tables of the full width ceil(max_model_len / block_size)), so
    their addresses never change; it rewrites them in place before every replay;
  - rows past the step's sequences are padding: token 0 at position 0, seq_len 0 (attention
    writes zeros), K/V written to a scratch slot outside the allocator's blocks, LoRA slot -1;
  - each bucket owns a LoraMeta captured with LoRA on (every LoRA kernel is in the graph and
    its programs of unused slots exit), refreshed with LoraMeta.copy_; LoRA slot buffers are
    rewritten in place, so a replay sees the adapters resident at that moment.
Sampling stays outside the graph.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable

import torch

from engine.scheduler import Batch
from kernels import LoraMeta

logger = logging.getLogger(__name__)


def batch_buckets(max_batch: int) -> list[int]:
    """Powers of two below max_batch, then max_batch itself: [1, 2, 4, ..., max_batch]."""
    buckets = [1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch]
    return buckets + [max_batch]


class DecodeGraphs:
    """The captured graphs, their LoRA metas and their output logits, keyed by bucket."""

    def __init__(self, max_batch: int, device: torch.device) -> None:
        self.buckets = batch_buckets(max_batch)
        self.device = device
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._logits: dict[int, torch.Tensor] = {}
        self._lora: dict[int, LoraMeta | None] = {}
        self._pool = None

    def bucket(self, batch: Batch) -> int | None:
        """The smallest bucket that holds a decode-only step, else None (run it eagerly).

        A one-token prompt's first step also runs eagerly: graphs never see a fresh state row."""
        num_seqs = len(batch.items)
        if not 0 < num_seqs <= self.buckets[-1]:
            return None
        if any(item.num_tokens != 1 or item.seq.num_computed == 0 for item in batch.items):
            return None
        return self.buckets[bisect.bisect_left(self.buckets, num_seqs)]

    def capture(self, bucket: int, forward: Callable[[], torch.Tensor],
                lora: LoraMeta | None) -> None:
        """Record `forward` (reading the static inputs, returning logits [bucket, V]).

        It runs once uncaptured first, so Triton compiles its kernels outside the graph.
        Capture the largest bucket first: the smaller ones then fit in its memory pool.
        """
        forward()
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self._logits[bucket] = forward()
        if self._pool is None:
            self._pool = graph.pool()
        self._graphs[bucket] = graph
        self._lora[bucket] = lora

    def replay(self, bucket: int, lora: LoraMeta | None) -> torch.Tensor:
        """Replay a bucket whose static inputs are written; `lora` covers its `bucket` rows.

        Returns logits [bucket, V] float32, a static buffer the next replay overwrites.
        """
        static = self._lora[bucket]
        if static is not None:
            static.copy_(lora)
        self._graphs[bucket].replay()
        return self._logits[bucket]
