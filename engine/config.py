"""Engine configuration: the model's shape (from config.json) and the engine's knobs."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loramux.engine.architectures import (ARCHITECTURES, LINEAR_ATTENTION, LinearAttention, layer_types,
                                  linear_attention, rotary_dim, text_fields)
from loramux.engine.errors import ModelLoadError

SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    aliases = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16",
               "half": "float16"}
    key = aliases.get(name, name)
    if key not in _DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; choose float32, bfloat16 or float16")
    return _DTYPES[key]


def _refuse_unsupported(raw: dict, rope: dict) -> None:
    """Features our attention does not implement: refuse rather than serve wrong outputs."""
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type != "default":
        raise ModelLoadError(f"rope_type {rope_type!r} is not supported (only 'default')")
    window = raw.get("sliding_window")
    uses_window = raw.get("use_sliding_window", raw.get("model_type") == "mixtral")
    if window and uses_window:
        raise ModelLoadError(f"sliding-window attention (sliding_window={window}) is not "
                             "supported; set sliding_window to null to serve full attention")


@dataclass(frozen=True)
class ModelConfig:
    """Everything the engine needs from a Hugging Face config.json, both spellings accepted
    (engine.architectures says how each architecture's file is read)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    norm_topk_prob: bool
    intermediate_size: int  # dense MLP layers (Qwen2-MoE mlp_only_layers / sparse step)
    shared_expert_intermediate_size: int  # 0 = no shared expert
    decoder_sparse_step: int
    mlp_only_layers: tuple[int, ...]
    attention_bias: bool
    qk_norm: str  # "none", "per_head" (Qwen3-MoE) or "full" (OLMoE, over all heads)
    clip_qkv: float | None
    eos_token_ids: tuple[int, ...]
    torch_dtype: str | None
    layer_types: tuple[str, ...]  # "full_attention" or "linear_attention" (Gated DeltaNet)
    rotary_dim: int  # the first rotary_dim dims of each head turn (head_dim unless partial)
    hybrid: bool  # Qwen3.5 / Qwen3-Next: zero-centred norms, gated q_proj, GDN layers
    linear_attention: LinearAttention | None
    transformers_version: str | None  # which writer made the file (fused expert orientation)

    @classmethod
    def from_dict(cls, raw: dict) -> ModelConfig:
        archs = raw.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ModelLoadError(
                f"unsupported architecture {archs or raw.get('model_type')!r}; "
                f"loramux supports {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        rules, f = ARCHITECTURES[arch], text_fields(raw, arch)
        rope = f.get("rope_parameters", "rope_scaling", default={})
        _refuse_unsupported(f.values, rope)
        heads, hidden = f.positive_int("num_attention_heads"), f.positive_int("hidden_size")
        num_layers = f.positive_int("num_hidden_layers")
        head_dim = f.need("head_dim") if rules.hybrid else f.get("head_dim",
                                                                    default=hidden // heads)
        eos = f.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        bias = arch == "Qwen2MoeForCausalLM" and f.get("qkv_bias", default=True)
        norm_topk = rules.norm_topk_always or bool(f.get("norm_topk_prob",
                                                           default=rules.norm_topk_default))
        return cls(
            architecture=arch,
            vocab_size=f.positive_int("vocab_size"),
            hidden_size=hidden,
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=f.get("num_key_value_heads", default=heads),
            head_dim=head_dim,
            rms_norm_eps=f.get("rms_norm_eps", default=1e-6),
            rope_theta=float(rope.get("rope_theta") or f.get("rope_theta", default=10000.0)),
            max_position_embeddings=f.get("max_position_embeddings", default=4096),
            tie_word_embeddings=bool(f.get("tie_word_embeddings", default=False)),
            num_experts=f.need("num_experts", "num_local_experts"),
            top_k=f.need("num_experts_per_tok"),
            moe_intermediate_size=f.need("moe_intermediate_size", "intermediate_size"),
            norm_topk_prob=norm_topk,
            intermediate_size=f.get("intermediate_size", default=0),
            shared_expert_intermediate_size=f.get("shared_expert_intermediate_size", default=0),
            decoder_sparse_step=1 if rules.all_moe else f.get("decoder_sparse_step", default=1),
            mlp_only_layers=() if rules.all_moe else tuple(f.get("mlp_only_layers", default=())),
            attention_bias=bool(bias or f.get("attention_bias", default=False)),
            qk_norm=rules.qk_norm,
            clip_qkv=f.get("clip_qkv"),
            eos_token_ids=eos_ids,
            torch_dtype=f.get("dtype", "torch_dtype"),
            layer_types=layer_types(f, arch, num_layers),
            rotary_dim=rotary_dim(f, rope, arch, head_dim),
            hybrid=rules.hybrid,
            linear_attention=linear_attention(f, arch),
            transformers_version=raw.get("transformers_version"),
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelConfig:
        config_file = Path(path) / "config.json"
        if not config_file.is_file():
            raise ModelLoadError(f"{path} has no config.json; expected a Hugging Face checkpoint")
        return cls.from_dict(json.loads(config_file.read_text()))

    def is_moe_layer(self, layer: int) -> bool:
        """Qwen2-MoE's rule: sparse unless listed in mlp_only_layers or off the sparse step."""
        if layer in self.mlp_only_layers or self.num_experts == 0:
            return False
        return (layer + 1) % self.decoder_sparse_step == 0

    def is_linear_attention(self, layer: int) -> bool:
        return self.layer_types[layer] == LINEAR_ATTENTION

    def lora_module_shapes(self) -> dict[str, tuple[int, int, int]]:
        """Canonical LoRA target name -> (D_in, D_out, num_experts; 0 for a dense module).

        Names are those of engine.lora.weights (layer-prefixed, Mixtral spellings normalized).
        """
        H, E, I = self.hidden_size, self.num_experts, self.moe_intermediate_size
        shapes: dict[str, tuple[int, int, int]] = {}
        for layer in range(self.num_layers):
            p = f"layers.{layer}."
            if self.is_linear_attention(layer):
                shapes.update(self._linear_attention_shapes(p + "linear_attn."))
            else:
                shapes.update(self._attention_shapes(p + "self_attn."))
            if not self.is_moe_layer(layer):
                Id = self.intermediate_size
                shapes.update({p + "mlp.gate_proj": (H, Id, 0), p + "mlp.up_proj": (H, Id, 0),
                               p + "mlp.down_proj": (Id, H, 0)})
                continue
            shapes.update({
                p + "mlp.experts.gate_proj": (H, I, E), p + "mlp.experts.up_proj": (H, I, E),
                p + "mlp.experts.down_proj": (I, H, E), p + "mlp.experts.gate_up_proj": (H, 2 * I, E),
            })
            S = self.shared_expert_intermediate_size
            if S:
                shapes.update({p + "mlp.shared_expert.gate_proj": (H, S, 0),
                               p + "mlp.shared_expert.up_proj": (H, S, 0),
                               p + "mlp.shared_expert.down_proj": (S, H, 0)})
        return shapes

    def _attention_shapes(self, p: str) -> dict[str, tuple[int, int, int]]:
        """q_proj is twice as wide on hybrids: per head, the query then its output gate."""
        H, q_out = self.hidden_size, self.num_heads * self.head_dim
        kv_out = self.num_kv_heads * self.head_dim
        return {p + "q_proj": (H, q_out * (2 if self.hybrid else 1), 0),
                p + "k_proj": (H, kv_out, 0), p + "v_proj": (H, kv_out, 0),
                p + "o_proj": (q_out, H, 0)}

    def _linear_attention_shapes(self, p: str) -> dict[str, tuple[int, int, int]]:
        la, H = self.linear_attention, self.hidden_size
        HV, Vd = la.num_value_heads, la.value_dim
        if la.projection == "grouped":
            inputs = {"in_proj_qkvz": la.conv_dim + Vd, "in_proj_ba": 2 * HV}
        else:
            inputs = {"in_proj_qkv": la.conv_dim, "in_proj_z": Vd, "in_proj_b": HV,
                      "in_proj_a": HV}
        shapes = {p + name: (H, width, 0) for name, width in inputs.items()}
        shapes[p + "out_proj"] = (Vd, H, 0)
        return shapes


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    # None: size the KV cache from free memory (CUDA) or kv_cache_memory_gb (CPU)
    num_blocks: int | None = None
    kv_cache_memory_gb: float = 1.0  # CPU budget; CUDA uses gpu_memory_utilization instead
    gpu_memory_utilization: float = 0.9
    # None: on where it is exact (models without per-sequence recurrent state), as vLLM's default
    enable_prefix_caching: bool | None = None


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048  # per step; longer prompts are prefilled in chunks
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    max_waiting: int = 4096  # queued requests beyond this are refused (EngineOverloaded)


@dataclass(frozen=True)
class LoraConfig:
    enabled: bool = False
    max_loras: int = 4  # GPU slots: most distinct adapters in one step
    max_lora_rank: int = 16  # slot buffers are sized for this; larger adapters are refused
    max_cpu_loras: int | None = None  # CPU LRU cache of loaded adapters; None = max_loras
    enable_mixed_moe_lora_format: bool = False

    @property
    def num_slots(self) -> int:
        """S, the adapter slots the engine allocates: max_loras, or none with LoRA off."""
        return self.max_loras if self.enabled else 0

    @property
    def cpu_capacity(self) -> int:
        return self.max_cpu_loras or self.max_loras

    def __post_init__(self) -> None:
        if self.max_loras < 1:
            raise ValueError(f"max_loras must be >= 1, got {self.max_loras}")
        if self.max_lora_rank < 1:
            raise ValueError(f"max_lora_rank must be >= 1, got {self.max_lora_rank}")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(
                f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})")


@dataclass(frozen=True)
class ParallelConfig:
    """vLLM's -tp N and --enable-expert-parallel (engine/model/parallel.py)."""

    tensor_parallel_size: int = 1  # ranks, one worker process each (the engine's is rank 0)
    enable_expert_parallel: bool = False  # routed experts split by expert id, not by I

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got "
                             f"{self.tensor_parallel_size}")


@dataclass(frozen=True)
class EngineConfig:
    model: str
    dtype: str = "auto"  # auto: the checkpoint's dtype on CUDA, float32 on CPU
    device: str = "auto"
    load_format: str = "auto"  # "dummy": random weights of the real architecture
    seed: int = 0
    kernel_backend: str = "auto"
    # True: never capture CUDA graphs. False: on CUDA with the Triton backend, decode-only
    # steps replay one graph per batch bucket (a decode step is otherwise launch-bound)
    enforce_eager: bool = False
    tokenizer: str | None = None
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


_SECTIONS = {"cache": CacheConfig, "scheduler": SchedulerConfig, "lora": LoraConfig,
             "parallel": ParallelConfig}


def make_config(model: str, **kwargs) -> EngineConfig:
    """An EngineConfig from flat keyword arguments (max_loras=4, block_size=8, ...): the one
    flat-to-nested mapper (LLM and the server's Settings). A section field's name goes to its
    section; max_loras or max_lora_rank (or enable_lora=True) turn LoRA on unless enabled is
    given."""
    sections: dict[str, dict] = {name: {} for name in _SECTIONS}
    top: dict = {}
    for key, value in kwargs.items():
        owner = next((name for name, cls in _SECTIONS.items()
                      if key in {f.name for f in dataclasses.fields(cls)}), None)
        (sections[owner] if owner else top)[key] = value
    if "max_loras" in sections["lora"] or "max_lora_rank" in sections["lora"]:
        sections["lora"].setdefault("enabled", True)
    if top.pop("enable_lora", False):
        sections["lora"]["enabled"] = True
    built = {name: cls(**sections[name]) for name, cls in _SECTIONS.items()}
    return EngineConfig(model=model, **top, **built)
