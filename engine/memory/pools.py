"""MemoryPools: every host-side pool of per-sequence memory, in one place.

The scheduler asks `can_admit` / `can_grow` before it schedules a sequence's tokens, `admit`
and `grow` take what they need, and `release` (finish or preemption) gives all of it back: the
KV blocks, one state slot of each kind the model declares, and the adapter slot pin. With
prefix caching (the plan says) a waiting sequence first looks up its cached prefix
(`cached_prefix`): `admit` shares those blocks and counts them as computed, and `grow` keys the
blocks each step fills; released blocks stay cached until the pool needs them. Only host
integers live here; the worker owns the device tensors these ids index.
"""

from __future__ import annotations

from loramux.engine.memory.adapter_slots import AdapterSlots
from loramux.engine.memory.id_pool import IdPool
from loramux.engine.memory.kv_blocks import BlockAllocator
from loramux.engine.memory.plan import MemoryPlan
from loramux.engine.memory.prefix_cache import PrefixCache
from loramux.engine.sequence import Sequence


class MemoryPools:
    def __init__(self, plan: MemoryPlan) -> None:
        self.plan = plan
        self.blocks = BlockAllocator(plan.num_blocks, plan.block_size)
        self.prefix = PrefixCache(self.blocks) if plan.prefix_caching else None
        self.states = {kind: IdPool(f"{kind} state slot", n)
                       for kind, n in plan.state_slots.items()}
        self.adapters = AdapterSlots(plan.adapter_slots)

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """The KV blocks of a waiting sequence's longest cached prefix ([] without caching)."""
        return [] if self.prefix is None else self.prefix.lookup(seq)

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether a running sequence's KV can grow by num_tokens uncomputed tokens."""
        return self.blocks.can_grow(seq.block_table, seq.num_computed + num_tokens)

    def can_admit(self, seq: Sequence, num_tokens: int, cached: list[int]) -> bool:
        """Whether a waiting sequence fits: its `cached` blocks, num_tokens tokens past them,
        and its states."""
        num_cached = len(cached) * self.blocks.block_size
        return self.blocks.can_share(cached, num_cached + num_tokens) and all(
            pool.num_free > 0 for pool in self.states.values())

    def admit(self, seq: Sequence, cached: list[int]) -> None:
        """Take the states and the `cached` blocks: their tokens count as computed."""
        assert not seq.state_slots, f"seq {seq.seq_id} already holds state slots"
        assert not seq.block_table and seq.num_computed == 0, f"seq {seq.seq_id} holds KV"
        seq.state_slots = {kind: pool.allocate()[0] for kind, pool in self.states.items()}
        self.blocks.share(seq.block_table, cached)
        seq.num_computed = len(cached) * self.blocks.block_size
        if self.prefix is not None:
            self.prefix.count(seq, cached)

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        self.blocks.grow(seq.block_table, seq.num_computed + num_tokens)
        if self.prefix is not None:
            self.prefix.register(seq, seq.num_computed + num_tokens)

    def release(self, seq: Sequence) -> None:
        """Give back everything `seq` holds (idempotent)."""
        self.blocks.free(seq.block_table)
        for kind, slot in seq.state_slots.items():
            self.states[kind].free([slot])
        seq.state_slots = {}
        if seq.adapter_slot >= 0:
            self.adapters.unpin(seq.adapter_slot)
            seq.adapter_slot = -1

    def usage(self) -> dict[str, float]:
        """Fraction in use of each pool: "kv" and every state kind."""
        return {"kv": self.blocks.usage} | {kind: pool.usage for kind, pool in self.states.items()}
