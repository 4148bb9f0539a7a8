"""The memory plan: how many KV blocks and state slots of each kind fit the device budget.

Model. The model's weights and adapter slot buffers are allocated first; what remains of the
budget (free memory less the unused share on CUDA, kv_cache_memory_gb on CPU) holds the
per-sequence pools. A state slot costs the same whatever a sequence's length, and a running
sequence needs one of every kind, so state pools get max_num_seqs slots (fewer if the budget is
short, but never fewer than one); the rest goes to KV blocks, never more than the running
sequences can use (max_model_len tokens each). A plan that cannot hold one full-length
sequence is refused.

Prefix caching (engine/memory/prefix_cache.py) is on unless turned off, but never for a model
that declares a per-sequence state: a recurrent state sums the whole prefix and cannot be
restored at a block boundary from KV blocks (vLLM's block-aligned state checkpoints would be
the way), so a hybrid model prefills every prompt in full, and says so once at start-up.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from loramux.engine.config import CacheConfig
from loramux.engine.errors import ModelLoadError
from loramux.engine.memory.specs import MemorySpec, PagedKV, StateSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MemoryPlan:
    """Pool sizes, in the units the host pools hand out."""

    block_size: int
    num_blocks: int
    state_slots: dict[str, int] = field(default_factory=dict)  # kind -> slots
    adapter_slots: int = 0
    kv_bytes: int = 0  # device bytes of the KV cache, for the log
    state_bytes: int = 0
    prefix_caching: bool = False

    def describe(self) -> str:
        states = ", ".join(f"{n} {kind} state slots" for kind, n in self.state_slots.items())
        return (f"{self.num_blocks} KV blocks of {self.block_size} tokens "
                f"({self.kv_bytes / 2**30:.2f} GiB)"
                + (f", {states} ({self.state_bytes / 2**30:.2f} GiB)" if states else "")
                + f", {self.adapter_slots} adapter slots, prefix caching "
                + ("on" if self.prefix_caching else "off"))


def device_budget(cache: CacheConfig, device: torch.device) -> float:
    """Bytes the per-sequence pools may use, measured after the weights are allocated."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return free - (1 - cache.gpu_memory_utilization) * total
    return cache.kv_cache_memory_gb * 2**30


def state_kinds(specs: Sequence[MemorySpec]) -> dict[str, int]:
    """kind -> bytes of one slot over every module of that kind."""
    kinds: dict[str, int] = {}
    for spec in specs:
        if isinstance(spec, StateSpec):
            kinds[spec.kind] = kinds.get(spec.kind, 0) + spec.bytes_per_slot()
    return kinds


def plan_memory(specs: Sequence[MemorySpec], cache: CacheConfig, budget: float,
                max_model_len: int, max_num_seqs: int, adapter_slots: int = 0) -> MemoryPlan:
    """Size every pool the declared `specs` need from `budget` bytes (see the module doc)."""
    block_bytes = cache.block_size * sum(s.bytes_per_token() for s in specs
                                         if isinstance(s, PagedKV))
    per_seq_blocks = -(-max_model_len // cache.block_size)
    kinds = state_kinds(specs)
    slot_bytes = sum(kinds.values())
    num_seqs = max_num_seqs
    if slot_bytes:
        room = budget - per_seq_blocks * block_bytes
        num_seqs = max(1, min(max_num_seqs, int(room // slot_bytes)))
    state_bytes = num_seqs * slot_bytes
    if cache.num_blocks is not None:
        blocks = cache.num_blocks
    elif block_bytes == 0:
        blocks = per_seq_blocks * num_seqs
    else:
        blocks = min(int((budget - state_bytes) // block_bytes), per_seq_blocks * num_seqs)
    too_small = blocks < per_seq_blocks and cache.num_blocks is None
    if too_small or budget < state_bytes:
        raise ModelLoadError(
            f"the KV cache budget ({budget / 2**30:.2f} GiB) holds {max(blocks, 0)} blocks of "
            f"{cache.block_size} tokens, fewer than one {max_model_len}-token sequence needs; "
            "lower --max-model-len or give the cache more memory")
    return MemoryPlan(cache.block_size, blocks, {kind: num_seqs for kind in kinds},
                      adapter_slots, blocks * block_bytes, state_bytes,
                      prefix_caching(cache, kinds))


def prefix_caching(cache: CacheConfig, kinds: dict[str, int]) -> bool:
    """On unless turned off, and never with per-sequence states (see the module doc)."""
    if cache.enable_prefix_caching is False:
        return False
    if kinds:
        log = logger.warning if cache.enable_prefix_caching else logger.info
        log("prefix caching is off: this model keeps a per-sequence state (%s) that cached KV "
            "blocks cannot restore, so every prompt is prefilled in full", ", ".join(kinds))
        return False
    return True
