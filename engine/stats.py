"""EngineStats: a plain snapshot of the engine's queues, memory pools and adapter counters."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    kv_blocks_total: int = 0
    block_size: int = 0
    running_lora_adapters: list[str] = field(default_factory=list)
    waiting_lora_adapters: list[str] = field(default_factory=list)
    max_loras: int = 0
    slots_used: int = 0
    adapter_residency: dict[str, str] = field(default_factory=dict)
    adapter_loads_total: int = 0
    adapter_evictions_total: int = 0
    adapter_reads_total: int = 0  # reads of adapter files from disk (loads and re-reads)
    preemptions_total: int = 0
    steps_total: int = 0  # steps that ran the model
    prefix_caching: bool = False
    prefix_cache_queries_total: int = 0  # tokens of admitted sequences looked up in the cache
    prefix_cache_hits_total: int = 0  # tokens of those found cached
    is_alive: bool = True
