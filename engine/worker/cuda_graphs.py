"""CUDA graphs of the decode step: one per batch bucket, captured at start-up.

A decode step of a MoE model is hundreds of small kernel launches, so on a GPU the host sets
its pace, not the device. DecodeGraphs records the model forward plus the logits of every row
for each bucket B in 1, 2, 4, ..., max_batch and replays the smallest bucket that holds a
decode-only step (every sequence feeds one token to a non-empty context: a graph never sees a
fresh state row). Invariants the worker keeps:
  - the static inputs are the StepInputs buffers (input ids, positions, KV slots, sequence
    lengths, block tables of the full width ceil(max_model_len / block_size), state slots,
    the LoraMeta buffers), so their addresses never change; a step rewrites them in place
    before every replay;
  - rows past the step's sequences are padding: token 0 at position 0, seq_len 0 (attention
    writes zeros), K/V written to a scratch slot outside the pool's blocks, state rows at the
    scratch slot, LoRA slot -1;
  - each bucket is captured with LoRA on (every LoRA kernel is in the graph and its programs
    of unused slots exit); the LoraMeta of a step with the bucket's token count has the
    captured addresses, and LoRA slot buffers are rewritten in place, so a replay sees the
    adapters resident at that moment.
Sampling stays outside the graph.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable

import torch

from loramux.engine.plan import StepPlan

logger = logging.getLogger(__name__)


def batch_buckets(max_batch: int) -> list[int]:
    """Powers of two below max_batch, then max_batch itself: [1, 2, 4, ..., max_batch]."""
    buckets = [1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch]
    return buckets + [max_batch]


class DecodeGraphs:
    """The captured graphs and their output logits, keyed by bucket."""

    def __init__(self, max_batch: int, device: torch.device) -> None:
        self.buckets = batch_buckets(max_batch)
        self.device = device
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._logits: dict[int, torch.Tensor] = {}
        self._pool = None

    def bucket(self, plan: StepPlan) -> int | None:
        """The smallest bucket that holds a decode-only step, else None (run it eagerly)."""
        if not 0 < plan.num_seqs <= self.buckets[-1] or not plan.is_decode:
            return None
        return self.buckets[bisect.bisect_left(self.buckets, plan.num_seqs)]

    def capture(self, bucket: int, forward: Callable[[], torch.Tensor]) -> None:
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

    def replay(self, bucket: int) -> torch.Tensor:
        """Replay a bucket whose static inputs are written.

        Returns logits [bucket, V] float32, a static buffer the next replay overwrites.
        """
        self._graphs[bucket].replay()
        return self._logits[bucket]
