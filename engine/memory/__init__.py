"""Per-sequence memory: what the model declares (specs), how much fits (plan), the host pools."""

from loramux.engine.memory.adapter_slots import AdapterSlots
from loramux.engine.memory.id_pool import IdPool
from loramux.engine.memory.kv_blocks import BlockAllocator
from loramux.engine.memory.plan import MemoryPlan, device_budget, plan_memory
from loramux.engine.memory.pools import MemoryPools
from loramux.engine.memory.specs import MemoryModule, MemorySpec, PagedKV, StateSpec, StateTensor

__all__ = ["AdapterSlots", "BlockAllocator", "IdPool", "MemoryModule", "MemoryPlan",
           "MemoryPools", "MemorySpec", "PagedKV", "StateSpec", "StateTensor", "device_budget",
           "plan_memory"]
