"""Tiny random MoE checkpoints of every supported architecture, built offline with transformers.

Sizes are chosen so that no two LoRA shapes coincide (H=64, q_out=64 is the one exception
transformers forces for OLMoE), I=24 is not a power of two, and greedy output is not a single
repeated token (initializer 0.3, router std 0.3 to avoid top-k near-ties).
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

ARCHS = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe")

_COMMON = dict(
    vocab_size=512, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.3,
    rms_norm_eps=1e-6, tie_word_embeddings=False, eos_token_id=1, bos_token_id=0,
    pad_token_id=0,
)

_ARCH = {
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=24,
        intermediate_size=40, norm_topk_prob=True)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=24, intermediate_size=40,
        shared_expert_intermediate_size=56, mlp_only_layers=[1], decoder_sparse_step=1,
        norm_topk_prob=False)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
        head_dim=16, num_local_experts=8, num_experts_per_tok=2, intermediate_size=24)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(
        num_experts=8, num_experts_per_tok=2, intermediate_size=24, norm_topk_prob=False)),
}


def tiny_config(arch: str, **overrides) -> transformers.PretrainedConfig:
    config_cls, model_cls, extra = _ARCH[arch]
    kwargs = {**_COMMON, **extra, **overrides}
    config = getattr(transformers, config_cls)(**kwargs)
    config.architectures = [model_cls]
    return config


def tiny_model(arch: str, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """A random model in float32 whose router weights are spread enough to avoid ties."""
    config = tiny_config(arch, **overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, config.architectures[0])(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight")):
                param.normal_(0.0, 0.3)
    return model


def save_tiny_checkpoint(arch: str, path: str | Path, *, fused: bool = False,
                         dtype: torch.dtype = torch.float32, seed: int = 0,
                         **overrides) -> Path:
    """Write config.json + safetensors; `fused` writes experts as gate_up_proj / down_proj."""
    path = Path(path)
    model = tiny_model(arch, seed, **overrides).to(dtype)
    model.save_pretrained(path, save_original_format=not fused)
    return path


def load_reference(path: str | Path, dtype: torch.dtype = torch.float32):
    """The transformers model of a checkpoint: the oracle every engine test compares with."""
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
