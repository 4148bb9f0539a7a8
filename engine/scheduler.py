"""Continuous batching: which sequences run this step, and with how many tokens.

Model. Every step has a token budget (max_num_batched_tokens). Running sequences come first, in
admission order: a decoding sequence takes 1 token, a sequence mid-prefill takes the rest of its
prompt up to the budget (chunked prefill). When the KV cache cannot hold a running sequence's new
tokens, the most recently admitted running sequence is preempted: its blocks are freed and it goes
back to the front of the waiting queue to be recomputed later (outputs are unchanged). Then waiting
sequences are admitted in FIFO order while budget, max_num_seqs and every memory pool allow (KV
blocks, and a state slot of each kind the model declares: MemoryPools). With prefix caching a
waiting sequence first takes the blocks of its longest cached prefix and is charged only for the
tokens past them (at least one). A sequence with an adapter also needs a GPU slot
(LoraManager.try_pin); the slot stays pinned while it runs, so no step ever has more distinct
adapters than slots. Once a request cannot get a slot, later adapter requests are not admitted
either (base requests still are), so the blocked one gets the next slot that frees up and cannot
starve. A request whose adapter is still being read from disk is skipped without blocking anyone.
"""

from __future__ import annotations

import logging
from collections import deque

from loramux.engine.batch import Batch, ScheduledSeq
from loramux.engine.config import SchedulerConfig
from loramux.engine.errors import EngineError
from loramux.engine.memory import MemoryPools
from loramux.engine.sequence import Sequence, SeqStatus

logger = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, config: SchedulerConfig, pools: MemoryPools, lora=None) -> None:
        self.config = config
        self.pools = pools
        self.lora = lora  # engine.lora.manager.LoraManager or None
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[Batch, list[Sequence]]:
        """The step's batch, and sequences that failed to start (adapter errors)."""
        budget = self.config.max_num_batched_tokens
        items: list[ScheduledSeq] = []
        for seq in list(self.running):
            if budget == 0 or seq.status is not SeqStatus.RUNNING:
                continue
            n = min(seq.num_uncomputed, budget)
            if self._make_room(seq, n):
                items.append(self._take(seq, n))
                budget -= n
        failed = self._admit(items, budget)
        return Batch(items), failed

    def _make_room(self, seq: Sequence, n: int) -> bool:
        """Preempt the latest running sequences until `seq` can grow by n tokens."""
        while not self.pools.can_grow(seq, n):
            victim = self.running[-1]
            self.preempt(victim)
            if victim is seq:
                return False
        return True

    def _take(self, seq: Sequence, n: int) -> ScheduledSeq:
        self.pools.grow(seq, n)
        return ScheduledSeq(seq, n, samples=(n == seq.num_uncomputed))

    def _admit(self, items: list[ScheduledSeq], budget: int) -> list[Sequence]:
        failed: list[Sequence] = []
        slot_blocked = False
        for seq in list(self.waiting):
            if budget == 0 or len(self.running) >= self.config.max_num_seqs:
                break
            cached = self.pools.cached_prefix(seq)
            n = min(seq.num_uncomputed - len(cached) * self.pools.blocks.block_size, budget)
            if not self.pools.can_admit(seq, n, cached):
                break  # FIFO on memory: wait for room rather than let later ones pass
            if seq.adapter is not None:
                if slot_blocked:
                    continue
                try:
                    slot = self.lora.try_pin(seq.adapter)
                except EngineError as err:  # the re-read failed (typed): fail this request
                    self.waiting.remove(seq)
                    seq.error = err
                    failed.append(seq)
                    continue
                if slot is None:
                    slot_blocked = slot_blocked or self.lora.is_waiting_for_slot(seq.adapter)
                    continue
                seq.adapter_slot = slot
            self.waiting.remove(seq)
            self.pools.admit(seq, cached)  # its cached tokens count as computed
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            items.append(self._take(seq, n))
            budget -= n
        return failed

    def preempt(self, seq: Sequence) -> None:
        logger.debug("preempting %s (seq %d) for memory", seq.request_id, seq.seq_id)
        self._release(seq)
        seq.num_computed = 0
        seq.preempted = True
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Remove a sequence from either queue and free all the memory it holds."""
        self._release(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SeqStatus.FINISHED

    def _release(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        self.pools.release(seq)
