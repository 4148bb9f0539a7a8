"""Per-sequence memory: what the model declares (specs), how much fits (plan), the host pools."""

from engine.memory.adapter_slots import AdapterSlots
from engine.memory.id_pool import IdPool
from engine.memory.kv_blocks import BlockAllocator
from engine.memory.plan import MemoryPlan, device_budget, plan_memory
from engine.memory.pools import MemoryPools
from engine.memory.specs import MemoryModule, MemorySpec, PagedKV, StateSpec, StateTensor

__all__ = ["AdapterSlots", "BlockAllocator", "IdPool", "MemoryModule", "MemoryPlan",
           "MemoryPools", "MemorySpec", "PagedKV", "StateSpec", "StateTensor", "device_budget",
           "plan_memory"]
