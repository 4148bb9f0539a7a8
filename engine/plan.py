"""What crosses from the engine to the worker each step, and back: plain host data only.

A StepPlan says everything the device needs for one forward: the flat token ids and positions,
and per sequence (row) its query and context lengths, block table, state slots and sampling.
AdapterOps write or clear an adapter slot from host tensors. The worker executes a plan after
applying the ops that came with it and returns a SampleResult. No Sequence, tokenizer or device
object crosses, so a plan can be recorded, replayed, or broadcast to several workers.

Running example: block_size 4; seq 7 prefills 3 new tokens into an empty cache (blocks [5]),
seq 9 (adapter slot 1) decodes 1 token at position 5 (blocks [2, 6]) and samples.
  token_ids     = [11, 12, 13, 40]    # [T]
  positions     = [0, 1, 2, 5]        # [T]
  adapter_slots = [-1, -1, -1, 1]     # [T] adapter slot of each token, -1 = base model
  query_lens    = [3, 1]              # [B] tokens fed this step
  context_lens  = [3, 6]              # [B] tokens in the cache after this step
  block_tables  = [[5], [2, 6]]       # [B] the KV blocks of each sequence
  state_slots   = {}                  # kind -> [B], for each state kind the model declares
  samples       = [SampleRow(row=1, seq_id=9, params, seed=None)]
If seq 9 followed a grammar (structured outputs), its SampleRow would carry token_mask: the
int32 bitmask [ceil(V / 32)] of the tokens its grammar allows next (bit j of word i: token
32 i + j), filled on the host; the worker masks the row's logits with it before sampling.
A row with penalties, logit_bias, min_tokens, bad_words or allowed_token_ids carries its
request's ProcessorParams (engine/processors.py, made once per request); the worker keeps the
sequence's output tokens for them until the plan's `released` names it.
If seq 7 asked for prompt logprobs, `prompt_logprobs` would hold
PromptLogprobsRow(row=0, offset=0, targets=(12, 13), num_top=k): the logits at its tokens 0
and 1 are scored against the prompt tokens that follow them (token 2's predict the first
output token, which is sampled). Only such rows have more than their last position's logits
computed, and a plan that has any runs eagerly (no decode graph).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from loramux.engine.lora.weights import LoraWeights
from loramux.engine.processors import ProcessorParams
from loramux.engine.request import SamplingParams, TokenLogprob


@dataclass(frozen=True, slots=True)
class SampleRow:
    """A row that samples its next token: its params and the seed of its generator."""

    row: int  # index into the plan's sequences
    seq_id: int  # keys the worker's per-sequence generator
    params: SamplingParams
    seed: int | None  # None for greedy rows
    token_mask: torch.Tensor | None = None  # int32 [ceil(V / 32)], CPU: tokens allowed next
    processors: ProcessorParams | None = None  # None: no logits processors (most rows)


@dataclass(frozen=True, slots=True)
class PromptLogprobsRow:
    """Score a row's prompt tokens: the logits at the row's tokens offset, offset + 1, ... of
    this step predict `targets`, the prompt tokens after them."""

    row: int  # index into the plan's sequences
    offset: int  # first of the row's tokens this step whose logits are scored
    targets: tuple[int, ...]
    num_top: int  # most likely tokens reported at each position besides the target


@dataclass(slots=True)
class StepPlan:
    token_ids: list[int]
    positions: list[int]
    adapter_slots: list[int]
    query_lens: list[int]
    context_lens: list[int]
    block_tables: list[list[int]]
    state_slots: dict[str, list[int]] = field(default_factory=dict)
    samples: list[SampleRow] = field(default_factory=list)
    released: list[int] = field(default_factory=list)  # seq ids done: drop generators, histories
    prompt_logprobs: list[PromptLogprobsRow] = field(default_factory=list)

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def is_decode(self) -> bool:
        """Every row feeds one token to a non-empty context: what a decode graph holds."""
        return all(q == 1 and c > 1 for q, c in zip(self.query_lens, self.context_lens))


@dataclass(frozen=True, slots=True)
class WriteAdapter:
    """Load an adapter into a slot (canonical names, scale folded into B, CPU tensors)."""

    slot: int
    weights: dict[str, LoraWeights]


@dataclass(frozen=True, slots=True)
class ClearAdapter:
    slot: int


AdapterOp = WriteAdapter | ClearAdapter


@dataclass(slots=True)
class SampleResult:
    """The sampled tokens of the plan's sampling rows, in order, with their logprobs, and the
    scored prompt tokens of each of the plan's prompt_logprobs rows."""

    token_ids: list[int]
    logprobs: list[TokenLogprob | None]
    finite: list[bool]  # False: the row's logits hold NaN or Inf and its token means nothing
    prompt_logprobs: list[list[TokenLogprob]] = field(default_factory=list)
