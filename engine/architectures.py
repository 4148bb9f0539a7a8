"""How config.json is read for each supported architecture.

Two shapes of config exist:
- flat: every field at the root (Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE, Qwen3-Next and the
  text-only Qwen3_5MoeForCausalLM);
- ConditionalGeneration (Qwen3.5/3.6-MoE and Qwen3-VL-MoE as released): the text model's fields
  sit under `text_config`, its tensors under `model.language_model.`; the root holds
  `architectures`, `tie_word_embeddings` (default false; it decides, as in transformers) and the
  vision tower, which loramux does not serve (text-only requests: mRoPE is then plain RoPE).
Hybrid architectures (Qwen3.5-MoE, Qwen3-Next) mix Gated DeltaNet layers ("linear_attention")
with gated full attention ("full_attention"), listed in `layer_types` or, in older files, every
`full_attention_interval`-th layer (default 4) being full attention. Their norms are
zero-centred (x_hat * (1 + w)), their q_proj is twice as wide (query and sigmoid gate per head)
and RoPE turns only the first partial_rotary_factor (default 0.25) of each head.
"""

from __future__ import annotations

from dataclasses import dataclass

from loramux.engine.errors import ModelLoadError

FULL_ATTENTION, LINEAR_ATTENTION = "full_attention", "linear_attention"
LAYER_TYPES = (FULL_ATTENTION, LINEAR_ATTENTION)
_STATE_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ArchRules:
    """What sets one architecture apart, beyond the fields its config.json gives."""

    qk_norm: str = "none"  # "none", "per_head" (over D) or "full" (over all heads, OLMoE)
    norm_topk_default: bool = False  # norm_topk_prob when the file does not say
    norm_topk_always: bool = False  # the router always renormalizes (the field is not read)
    text_config: bool = False  # ConditionalGeneration: text fields under text_config
    gdn_projection: str | None = None  # hybrid: "split" (Qwen3.5) or "grouped" (Qwen3-Next)
    all_moe: bool = False  # every layer sparse (mlp_only_layers / decoder_sparse_step unread)
    fused_experts_transposed: bool = False  # hub files store fused experts [E, H, 2I], [E, I, H]

    @property
    def hybrid(self) -> bool:
        return self.gdn_projection is not None


_QWEN35 = dict(qk_norm="per_head", norm_topk_always=True, gdn_projection="split", all_moe=True)
ARCHITECTURES = {
    "Qwen3MoeForCausalLM": ArchRules(qk_norm="per_head"),
    "Qwen2MoeForCausalLM": ArchRules(),
    "MixtralForCausalLM": ArchRules(norm_topk_default=True),
    "OlmoeForCausalLM": ArchRules(qk_norm="full"),
    "Qwen3_5MoeForConditionalGeneration": ArchRules(text_config=True, **_QWEN35),
    "Qwen3_5MoeForCausalLM": ArchRules(**_QWEN35),
    "Qwen3NextForCausalLM": ArchRules(qk_norm="per_head", norm_topk_default=True,
                                      gdn_projection="grouped"),
    "Qwen3VLMoeForConditionalGeneration": ArchRules(qk_norm="per_head", norm_topk_always=True,
                                                    text_config=True,
                                                    fused_experts_transposed=True),
}


@dataclass(frozen=True)
class LinearAttention:
    """Gated DeltaNet geometry: HK key heads of Dk, HV value heads of Dv (HV a multiple of HK),
    a depthwise causal conv of `conv_kernel` taps over q, k and v, and the recurrent state
    [HV, Dk, Dv] kept in `state_dtype` (mamba_ssm_dtype)."""

    num_key_heads: int
    num_value_heads: int
    key_head_dim: int
    value_head_dim: int
    conv_kernel: int
    projection: str  # "split": in_proj_{qkv,z,b,a}; "grouped": in_proj_{qkvz,ba} per key head
    state_dtype: str

    @property
    def key_dim(self) -> int:
        return self.num_key_heads * self.key_head_dim

    @property
    def value_dim(self) -> int:
        return self.num_value_heads * self.value_head_dim

    @property
    def conv_dim(self) -> int:
        """Channels of the causal conv: q, k and v."""
        return 2 * self.key_dim + self.value_dim


class Fields:
    """The text model's config fields, with errors that name the missing or bad field."""

    def __init__(self, values: dict, where: str) -> None:
        self.values, self.where = values, where  # where: "" or "text_config."

    def get(self, *names: str, default=None):
        for name in names:
            if self.values.get(name) is not None:
                return self.values[name]
        return default

    def need(self, *names: str):
        value = self.get(*names)
        if value is None:
            raise ModelLoadError(f"config.json: {self.where}{names[0]} is missing")
        return value

    def positive_int(self, name: str) -> int:
        value = self.need(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ModelLoadError(f"config.json: {self.where}{name} must be a positive integer, "
                                 f"found {value!r}")
        return value


def text_fields(raw: dict, arch: str) -> Fields:
    """The fields of the text model: the root, or text_config with the root's tie flag."""
    if not ARCHITECTURES[arch].text_config:
        return Fields(raw, "")
    text = raw.get("text_config")
    if not isinstance(text, dict):
        raise ModelLoadError(f"config.json: {arch} needs a text_config object (the text model's "
                             "fields), found none")
    values = dict(text, tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)))
    for name in ("eos_token_id", "dtype", "torch_dtype"):
        if values.get(name) is None and raw.get(name) is not None:
            values[name] = raw[name]
    return Fields(values, "text_config.")


def layer_types(fields: Fields, arch: str, num_layers: int) -> tuple[str, ...]:
    """Each layer's kind; all full attention unless the architecture is hybrid."""
    if not ARCHITECTURES[arch].hybrid:
        return (FULL_ATTENTION,) * num_layers
    types = fields.get("layer_types")
    if types is None:
        interval = fields.get("full_attention_interval", default=4)
        if not isinstance(interval, int) or interval < 1:
            raise ModelLoadError(f"config.json: {fields.where}full_attention_interval must be a "
                                 f"positive integer, found {interval!r}")
        return tuple(FULL_ATTENTION if (i + 1) % interval == 0 else LINEAR_ATTENTION
                     for i in range(num_layers))
    if not isinstance(types, list) or len(types) != num_layers:
        found = len(types) if isinstance(types, list) else repr(types)
        raise ModelLoadError(f"config.json: {fields.where}layer_types has {found} entries, "
                             f"num_hidden_layers is {num_layers}")
    for i, kind in enumerate(types):
        if kind not in LAYER_TYPES:
            raise ModelLoadError(f"config.json: {fields.where}layer_types[{i}] is {kind!r}, not "
                                 f"a layer type loramux serves ({', '.join(LAYER_TYPES)})")
    return tuple(types)


def linear_attention(fields: Fields, arch: str) -> LinearAttention | None:
    """The Gated DeltaNet geometry of a hybrid architecture, else None."""
    projection = ARCHITECTURES[arch].gdn_projection
    if projection is None:
        return None
    state_dtype = fields.get("mamba_ssm_dtype", default="float32")
    if state_dtype not in _STATE_DTYPES:
        raise ModelLoadError(f"config.json: {fields.where}mamba_ssm_dtype is {state_dtype!r}; "
                             f"choose one of {', '.join(_STATE_DTYPES)}")
    geometry = LinearAttention(
        num_key_heads=fields.positive_int("linear_num_key_heads"),
        num_value_heads=fields.positive_int("linear_num_value_heads"),
        key_head_dim=fields.positive_int("linear_key_head_dim"),
        value_head_dim=fields.positive_int("linear_value_head_dim"),
        conv_kernel=fields.positive_int("linear_conv_kernel_dim"),
        projection=projection, state_dtype=state_dtype)
    if geometry.num_value_heads % geometry.num_key_heads:
        raise ModelLoadError(
            f"config.json: {fields.where}linear_num_value_heads ({geometry.num_value_heads}) must "
            f"be a multiple of linear_num_key_heads ({geometry.num_key_heads})")
    return geometry


def rotary_dim(fields: Fields, rope: dict, arch: str, head_dim: int) -> int:
    """Dims of each head that RoPE turns: all, or the first partial_rotary_factor (hybrids)."""
    if not ARCHITECTURES[arch].hybrid:
        return head_dim
    factor = rope.get("partial_rotary_factor", fields.get("partial_rotary_factor", default=0.25))
    dim = int(head_dim * factor)
    if not 0 < dim <= head_dim or dim % 2:
        raise ModelLoadError(f"config.json: partial_rotary_factor {factor} gives {dim} rotary "
                             f"dims of a {head_dim}-dim head; it must give an even number > 0")
    return dim
