"""Scheduler and block allocator on their own: admission, slot fairness, preemption."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from loramux.engine.config import SchedulerConfig
from loramux.engine.detokenizer import IncrementalDetokenizer
from loramux.engine.memory import AdapterSlots, BlockAllocator, MemoryPlan, MemoryPools
from loramux.engine.request import SamplingParams
from loramux.engine.scheduler import Scheduler
from loramux.engine.sequence import Sequence, SeqStatus


@dataclass(frozen=True)
class Handle:
    name: str

    @property
    def key(self):
        return (self.name, 0)


def pools(num_blocks: int, block_size: int = 4, adapter_slots: int = 0, **states) -> MemoryPools:
    return MemoryPools(MemoryPlan(block_size, num_blocks, states, adapter_slots))


class FakeLora:
    """try_pin over the pools' real AdapterSlots, without a model."""

    def __init__(self, slots: AdapterSlots) -> None:
        self.slots = slots
        self.blocked: set = set()

    def try_pin(self, handle):
        slot = self.slots.lookup(handle.key)
        if slot is None:
            taken = self.slots.take()
            if taken is None:
                self.blocked.add(handle.key)
                return None
            slot = taken[0]
            self.slots.assign(slot, handle.key)
        self.slots.pin(slot)
        return slot

    def is_waiting_for_slot(self, handle):
        return handle.key in self.blocked


def seq(i: int, prompt_len: int = 4, adapter: str | None = None) -> Sequence:
    prompt = list(range(1, prompt_len + 1))
    return Sequence(i, f"r{i}", 0, prompt, SamplingParams(), None if adapter is None else
                    Handle(adapter), IncrementalDetokenizer(None, prompt, ()), max_tokens=8)


def test_allocator_grows_and_frees():
    alloc = BlockAllocator(num_blocks=4, block_size=4)
    table: list[int] = []
    alloc.grow(table, 5)
    assert len(table) == 2 and alloc.num_free == 2 and alloc.usage == 0.5
    assert not alloc.can_grow(table, 17)
    with pytest.raises(RuntimeError, match="exhausted"):
        alloc.grow(table, 17)
    alloc.free(table)
    assert table == [] and alloc.num_free == 4


def test_slot_blocked_adapter_is_not_starved_by_resident_adapters():
    memory = pools(64, adapter_slots=1)
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64), memory,
                      FakeLora(memory.adapters))
    a, b, c, d = seq(0, adapter="x"), seq(1, adapter="y"), seq(2, adapter="x"), seq(3)
    for s in (a, b, c, d):
        sched.add(s)
    batch, _ = sched.schedule()
    # a takes the only slot; b waits for one; c (same adapter as a) must not jump ahead of b;
    # d needs no slot and runs.
    assert [item.seq for item in batch.items] == [a, d]
    assert b.status is SeqStatus.WAITING and c.status is SeqStatus.WAITING
    sched.finish(a)
    batch, _ = sched.schedule()
    assert b.status is SeqStatus.RUNNING and b.adapter_slot == 0
    assert c.status is SeqStatus.WAITING


def test_preemption_frees_blocks_of_the_newest_sequence():
    memory = pools(3)
    alloc = memory.blocks
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64), memory)
    first, second = seq(0, prompt_len=4), seq(1, prompt_len=4)
    sched.add(first)
    sched.add(second)
    batch, _ = sched.schedule()
    assert len(batch.items) == 2 and alloc.num_free == 1
    for s in (first, second):  # both finish their prompt and grow by 4 tokens
        s.num_computed = 4
        s.output += [7, 7, 7, 7]
    batch, _ = sched.schedule()
    assert [item.seq for item in batch.items] == [first]
    assert second.status is SeqStatus.WAITING and second.num_computed == 0
    assert sched.waiting[0] is second and sched.num_preemptions == 1


def test_chunked_prefill_respects_the_token_budget():
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=6), pools(64))
    long, short = seq(0, prompt_len=10), seq(1, prompt_len=3)
    sched.add(long)
    sched.add(short)
    batch, _ = sched.schedule()
    assert [(i.seq, i.num_tokens, i.samples) for i in batch.items] == [(long, 6, False)]
    long.num_computed = 6
    batch, _ = sched.schedule()
    assert [(i.seq, i.num_tokens, i.samples) for i in batch.items] == [(long, 4, True),
                                                                          (short, 2, False)]
