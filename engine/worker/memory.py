"""Allocates what the model's memory modules declare, sized by the memory plan, and binds it."""

from __future__ import annotations

import torch

from loramux.engine.memory import MemoryModule, MemoryPlan, PagedKV


def allocate_memory(modules: list[MemoryModule], plan: MemoryPlan,
                    device: torch.device) -> int:
    """Zeroed tensors for every module (one scratch block / slot past the plan's, for CUDA-graph
    padding rows), bound with module.bind_memory; returns the bytes allocated."""
    total = 0
    for module in modules:
        spec = module.memory_spec()
        if isinstance(spec, PagedKV):
            shape = (plan.num_blocks + 1, plan.block_size, spec.num_kv_heads, spec.head_dim)
            shapes = {"k": (shape, spec.dtype), "v": (shape, spec.dtype)}
        else:
            num_slots = plan.state_slots[spec.kind] + 1
            shapes = {t.name: ((num_slots, *t.shape), t.dtype) for t in spec.tensors}
        tensors = {name: torch.zeros(shape, dtype=dtype, device=device)
                   for name, (shape, dtype) in shapes.items()}
        module.bind_memory(tensors)
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    return total
