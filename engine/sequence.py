"""A sequence is one sample of a request: the unit the scheduler works on (host state only)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from loramux.engine.detokenizer import IncrementalDetokenizer
from loramux.engine.processors import ProcessorParams
from loramux.engine.request import SamplingParams, TokenLogprob


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """Tokens, memory held (KV blocks, state slots, adapter slot) and progress of one sample.

    `num_computed` tokens of `prompt + output` have their K/V in the cache; the next plan feeds the
    rest. After preemption (recompute) num_computed drops to 0 and the whole history is
    prefilled again (less what the prefix cache still holds), so outputs are unchanged.
    `block_keys` are the prefix-cache keys of its first full blocks (engine/memory/prefix_cache.py),
    computed once as they are needed.
    """

    seq_id: int
    request_id: str
    index: int  # which of the request's n samples
    prompt: list[int]
    params: SamplingParams
    adapter: object | None  # engine.lora.manager.AdapterHandle
    detok: IncrementalDetokenizer
    max_tokens: int
    seed: int | None = None  # of the sampling generator (None: greedy)
    output: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    num_computed: int = 0
    block_table: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    adapter_slot: int = -1  # adapter slot pinned while running; -1 = none
    state_slots: dict[str, int] = field(default_factory=dict)  # kind -> slot, while running
    error: Exception | None = None  # why the sequence could not run (adapter re-read failed)
    constraint: object | None = None  # engine.structured.Constraint: its grammar, if any
    processors: ProcessorParams | None = None  # its request's logits processors, if any
    # prompt logprobs scored so far (entry p: prompt token p + 1), on the request's first
    # sequence when it asks for them, else None
    prompt_logprobs: list[TokenLogprob] | None = None
    block_keys: list[bytes] = field(default_factory=list)
    preempted: bool = False  # once preempted, its prefix-cache lookups are not counted

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    def token_range(self, start: int, stop: int) -> list[int]:
        """Tokens [start, stop) of prompt + output, without copying either whole."""
        prompt_len = len(self.prompt)
        if stop <= prompt_len:
            return self.prompt[start:stop]
        if start >= prompt_len:
            return self.output[start - prompt_len:stop - prompt_len]
        return self.prompt[start:] + self.output[:stop - prompt_len]

    @property
    def adapter_name(self) -> str | None:
        return None if self.adapter is None else self.adapter.name
