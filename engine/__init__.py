"""loramux engine: continuous batching over a paged KV cache, with 2D and 3D MoE LoRA slots."""

from engine.config import CacheConfig, EngineConfig, LoraConfig, SchedulerConfig
from engine.engine import Engine
from engine.llm import LLM
from engine.request import LoRARequest, RequestOutput, SamplingParams
from engine.stats import EngineStats

__all__ = ["CacheConfig", "Engine", "EngineConfig", "EngineStats", "LLM", "LoRARequest",
           "LoraConfig", "RequestOutput", "SamplingParams", "SchedulerConfig"]
