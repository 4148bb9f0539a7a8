"""What per-sequence memory a model needs, as it declares it (plain data, no device tensors).

A module that keeps memory across steps for each sequence has two methods:
    memory_spec() -> PagedKV | StateSpec     what it needs per sequence
    bind_memory(tensors: dict[str, Tensor])  the worker hands it the allocated tensors
The model lists these modules in a fixed order (`MoeForCausalLM.memory_modules`); the memory
plan sizes one pool per kind from the device budget, the worker allocates every module's
tensors and binds them, and the scheduler admits a sequence only when each pool has room.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class PagedKV:
    """K and V of one attention layer in blocks of block_size tokens, bound as
    {"k": [num_blocks + 1, block_size, G, D], "v": the same} (the last block is scratch: CUDA
    graph padding rows write into it). A sequence holds ceil(tokens / block_size) blocks."""

    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    def bytes_per_token(self) -> int:
        return 2 * self.num_kv_heads * self.head_dim * _element_size(self.dtype)


@dataclass(frozen=True)
class StateTensor:
    """One tensor of a per-sequence state: its shape for one sequence, and its dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    def num_bytes(self) -> int:
        return _element_size(self.dtype) * int(torch.Size(self.shape).numel())


@dataclass(frozen=True)
class StateSpec:
    """A fixed-size state per sequence, whatever its length (a recurrent layer's conv window and
    matrix state, say). Every module declaring the same `kind` shares one slot pool: a running
    sequence holds one slot of each kind, at the same index in every such module's tensors.
    Bound as {tensor.name: [num_slots + 1, *tensor.shape] of tensor.dtype}, zeroed; the last slot
    is scratch (CUDA-graph padding rows)."""

    kind: str
    tensors: tuple[StateTensor, ...]

    def __post_init__(self) -> None:
        if self.kind == "kv":
            raise ValueError("state kind 'kv' is reserved for the paged KV cache")

    def bytes_per_slot(self) -> int:
        return sum(t.num_bytes() for t in self.tensors)


MemorySpec = PagedKV | StateSpec


class MemoryModule(Protocol):
    """A module with per-sequence memory (attention's KV cache, a recurrent layer's state)."""

    def memory_spec(self) -> MemorySpec: ...

    def bind_memory(self, tensors: dict[str, torch.Tensor]) -> None: ...
