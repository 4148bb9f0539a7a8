"""MemoryPools: every host-side pool of per-sequence memory, in one place.

The scheduler asks `can_admit` / `can_grow` before it schedules a sequence's tokens, `admit`
and `grow` take what they need, and `release` (finish or preemption) gives all of it back: the
KV blocks, one state slot of each kind the model declares, and the adapter slot pin. Only host
integers live here; the worker owns the device tensors these ids index.
"""

from __future__ import annotations

from loramux.engine.memory.adapter_slots import AdapterSlots
from loramux.engine.memory.id_pool import IdPool
from loramux.engine.memory.kv_blocks import BlockAllocator
from loramux.engine.memory.plan import MemoryPlan
from loramux.engine.sequence import Sequence


class MemoryPools:
    def __init__(self, plan: MemoryPlan) -> None:
        self.plan = plan
        self.blocks = BlockAllocator(plan.num_blocks, plan.block_size)
        self.states = {kind: IdPool(f"{kind} state slot", n)
                       for kind, n in plan.state_slots.items()}
        self.adapters = AdapterSlots(plan.adapter_slots)

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether a running sequence's KV can grow by num_tokens uncomputed tokens."""
        return self.blocks.can_grow(seq.block_table, seq.num_computed + num_tokens)

    def can_admit(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether a waiting sequence fits: its first num_tokens tokens and its states."""
        return self.can_grow(seq, num_tokens) and all(
            pool.num_free > 0 for pool in self.states.values())

    def admit(self, seq: Sequence) -> None:
        assert not seq.state_slots, f"seq {seq.seq_id} already holds state slots"
        seq.state_slots = {kind: pool.allocate()[0] for kind, pool in self.states.items()}

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        self.blocks.grow(seq.block_table, seq.num_computed + num_tokens)

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
