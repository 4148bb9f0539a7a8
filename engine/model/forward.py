"""What the model reads each step: positions, attention, state and LoRA indexing (built by the
worker from a StepPlan, engine/worker/inputs.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from loramux.kernels import LoraMeta


@dataclass(slots=True)
class AttentionMeta:
    """Paged-attention indexing for one step of B sequences and T tokens.

    Running example: block_size 4; seq 0 prefills 3 new tokens into an empty cache (blocks [7]),
    seq 1 decodes 1 token at position 5 (blocks [2, 9]).
      slot_mapping = [28, 29, 30, 37]   # [T] int64: block * block_size + offset of each new token
      query_start  = [0, 3, 4]          # [B + 1] int32 offsets of each sequence's tokens
      seq_lens     = [3, 6]             # [B] int32 context length including this step's tokens
      block_tables = [[7, 0], [2, 9]]   # [B, max_blocks] int32, padded with 0
      query_lens_host, seq_lens_host    # the same as Python lists (the torch path loops on host)
    A CUDA-graph step pads B to its bucket with rows of seq_len 0 whose token writes its K/V to
    a scratch slot; block_tables is then [B, ceil(max_model_len / block_size)].
    """

    slot_mapping: torch.Tensor
    query_start: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    query_lens_host: list[int]
    seq_lens_host: list[int]

    @property
    def is_decode(self) -> bool:
        """One query token per sequence: the batched decode kernel applies."""
        return max(self.query_lens_host) == 1


@dataclass(slots=True)
class StateMeta:
    """Where each of the step's B sequences keeps its state of one kind (engine/memory/specs.py).

    Row i of a module's state tensor [num_slots + 1, ...] is read at slots[i]. A fresh row (its
    sequence starts at position 0: new, or recomputed after preemption) must start from a zero
    state, not read the slot. Padding rows of a CUDA-graph step use the scratch slot
    (num_slots); a graph step never has fresh rows, so a captured forward need not test them.
    """

    slots: torch.Tensor  # [B] int32 on the device
    slots_host: list[int]
    fresh_host: list[bool]


@dataclass(slots=True)
class ForwardContext:
    """Built once per step by the worker (StepInputs.prepare); every layer only reads it."""

    positions: torch.Tensor  # [T] int64
    attn: AttentionMeta
    lora: LoraMeta | None  # None when LoRA is disabled
    states: dict[str, StateMeta] = field(default_factory=dict)  # state kind -> its slots
