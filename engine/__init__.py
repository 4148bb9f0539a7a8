"""loramux engine: continuous batching over a paged KV cache, with 2D and 3D MoE LoRA slots."""

from loramux.engine.config import CacheConfig, EngineConfig, LoraConfig, SchedulerConfig
from loramux.engine.engine import Engine
from loramux.engine.llm import LLM
from loramux.engine.request import LoRARequest, RequestOutput, SamplingParams
from loramux.engine.stats import EngineStats

__all__ = ["CacheConfig", "Engine", "EngineConfig", "EngineStats", "LLM", "LoRARequest",
           "LoraConfig", "RequestOutput", "SamplingParams", "SchedulerConfig"]
