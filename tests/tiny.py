"""Tiny random MoE checkpoints of every supported architecture, built offline with transformers.

Sizes are chosen so that no two LoRA shapes coincide (H=64, q_out=64 is the one exception
transformers forces for OLMoE; in_proj_b and in_proj_a are both [HV, H]), I=24 is not a power
of two, and greedy output is not a single repeated token (initializer 0.3, router std 0.3 to
avoid top-k near-ties). Hybrids (Qwen3.5, Qwen3-Next) have 3 Gated DeltaNet layers then one
full-attention layer; their norm weights are drawn at random so that x*(1+w) and x*w differ.
ConditionalGeneration archs carry a one-block vision tower the engine skips.
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
_HYBRID = dict(
    head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=24,
    shared_expert_intermediate_size=40, num_hidden_layers=4, linear_num_key_heads=2,
    linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=12,
    linear_conv_kernel_dim=4,
    rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5))
_MROPE = dict(mrope_section=[2, 1, 1], mrope_interleaved=True)
_VISION = dict(depth=1, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64)
_ARCH.update({
    "qwen3_5_moe": ("Qwen3_5MoeConfig", "Qwen3_5MoeForConditionalGeneration", dict(
        _HYBRID, rope_parameters=dict(_HYBRID["rope_parameters"], **_MROPE))),
    "qwen3_5_moe_text": ("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM", _HYBRID),
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM", dict(
        _HYBRID, intermediate_size=40, norm_topk_prob=True)),
    "qwen3_vl_moe": ("Qwen3VLMoeConfig", "Qwen3VLMoeForConditionalGeneration", dict(
        head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=24,
        intermediate_size=40, rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                   mrope_section=[4, 2, 2],
                                                   mrope_interleaved=True))),
})
HYBRID_ARCHS = ("qwen3_5_moe", "qwen3_5_moe_text", "qwen3_next")
_CONDITIONAL = {"qwen3_5_moe": {}, "qwen3_vl_moe": {"deepstack_visual_indexes": []}}


def tiny_config(arch: str, **overrides) -> transformers.PretrainedConfig:
    config_cls, model_cls, extra = _ARCH[arch]
    kwargs = {**_COMMON, **extra, **overrides}
    if arch in _CONDITIONAL:  # the text model under text_config, the tie flag at the root
        tie = kwargs.pop("tie_word_embeddings")
        kwargs = {"text_config": kwargs, "tie_word_embeddings": tie,
                  "vision_config": dict(_VISION, **_CONDITIONAL[arch])}
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
            elif arch in HYBRID_ARCHS and name.endswith("norm.weight"):
                param.normal_(float(name.endswith("linear_attn.norm.weight")), 0.3)
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
    """The transformers model of a checkpoint: the oracle every engine test compares with
    (called with input_ids only: text-only positions)."""
    arch = transformers.AutoConfig.from_pretrained(path).architectures[0]
    return getattr(transformers, arch).from_pretrained(path, dtype=dtype).eval()
