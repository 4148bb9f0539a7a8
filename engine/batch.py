"""What the scheduler decided for one step (Batch), and the StepPlan the worker gets for it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loramux.engine.plan import PromptLogprobsRow, SampleRow, StepPlan
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


def make_plan(batch: Batch, released: list[int],
              token_masks: dict[int, torch.Tensor] | None = None) -> StepPlan:
    """The batch as plain data (copies: later steps do not change a plan once made).

    released: ids of sequences finished since the last plan (the worker drops their state).
    token_masks: seq id -> the bitmask of the tokens its grammar allows next (structured
    outputs), for the sampling rows that have one.
    """
    token_masks = token_masks or {}
    token_ids: list[int] = []
    positions: list[int] = []
    adapter_slots: list[int] = []
    query_lens: list[int] = []
    context_lens: list[int] = []
    tables: list[list[int]] = []
    states: dict[str, list[int]] = {}
    samples: list[SampleRow] = []
    prompt_rows: list[PromptLogprobsRow] = []
    for row, item in enumerate(batch.items):  # per row only appends: 256 rows cost ~1 ms
        seq, n = item.seq, item.num_tokens
        start = seq.num_computed
        stop = start + n
        token_ids += seq.token_range(start, stop)
        positions += range(start, stop)
        adapter_slots += [seq.adapter_slot] * n
        query_lens.append(n)
        context_lens.append(stop)
        tables.append(seq.block_table.copy())
        for kind, slot in seq.state_slots.items():
            states.setdefault(kind, []).append(slot)
        if seq.prompt_logprobs is not None and (scored := _prompt_row(row, seq, start, stop)):
            prompt_rows.append(scored)
        if item.samples:
            samples.append(SampleRow(row, seq.seq_id, seq.params, seq.seed,
                                     token_mask=token_masks.get(seq.seq_id),
                                     processors=seq.processors))
    return StepPlan(token_ids, positions, adapter_slots, query_lens, context_lens, tables,
                    states, samples, released, prompt_rows)


def _prompt_row(row: int, seq: Sequence, start: int, stop: int) -> PromptLogprobsRow | None:
    """The prompt positions of tokens [start, stop) not scored yet (position p predicts prompt
    token p + 1; a recompute after preemption scores nothing twice), or None."""
    first, last = max(start, len(seq.prompt_logprobs)), min(stop, len(seq.prompt) - 1)
    if first >= last:
        return None
    return PromptLogprobsRow(row, first - start, tuple(seq.prompt[first + 1:last + 1]),
                             seq.params.prompt_logprobs)
