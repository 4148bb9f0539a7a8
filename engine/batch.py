"""What the scheduler decided for one step (Batch), and the StepPlan the worker gets for it."""

from __future__ import annotations

from dataclasses import dataclass

from loramux.engine.plan import SampleRow, StepPlan
from loramux.engine.sequence import Sequence


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # tokens fed to the model this step
    samples: bool  # the step completes the sequence's uncomputed tokens: sample the next one


@dataclass(slots=True)
class Batch:
    items: list[ScheduledSeq]

    @property
    def num_tokens(self) -> int:
        return sum(item.num_tokens for item in self.items)


def make_plan(batch: Batch, released: list[int]) -> StepPlan:
    """The batch as plain data (copies: later steps do not change a plan once made).

    released: ids of sequences finished since the last plan (the worker drops their state).
    """
    plan = StepPlan([], [], [], [], [], [], released=released)
    for row, item in enumerate(batch.items):
        seq, start = item.seq, item.seq.num_computed
        stop = start + item.num_tokens
        plan.token_ids += seq.token_range(start, stop)
        plan.positions += range(start, stop)
        plan.adapter_slots += [seq.adapter_slot] * item.num_tokens
        plan.query_lens.append(item.num_tokens)
        plan.context_lens.append(stop)
        plan.block_tables.append(list(seq.block_table))
        for kind, slot in seq.state_slots.items():
            plan.state_slots.setdefault(kind, []).append(slot)
        if item.samples:
            plan.samples.append(SampleRow(row, seq.seq_id, seq.params, seq.seed))
    return plan
