"""config.json of the Qwen3.5 / Qwen3-Next / Qwen3-VL-MoE families: every spelling transformers
and the released checkpoints use, and clear errors that name the bad field."""

from __future__ import annotations

import copy

import pytest

from loramux.engine.config import ModelConfig
from loramux.engine.errors import ModelLoadError
from tests.tiny import tiny_config

L, F = "linear_attention", "full_attention"


def _raw(arch: str, **overrides) -> dict:
    return tiny_config(arch, **overrides).to_dict()


@pytest.mark.parametrize("arch,architecture", [
    ("qwen3_5_moe", "Qwen3_5MoeForConditionalGeneration"),
    ("qwen3_5_moe_text", "Qwen3_5MoeForCausalLM"),
    ("qwen3_next", "Qwen3NextForCausalLM"),
])
def test_hybrid_configs(arch, architecture):
    config = ModelConfig.from_dict(_raw(arch))
    assert config.architecture == architecture and config.hybrid
    assert config.layer_types == (L, L, L, F)
    assert config.rotary_dim == 8  # partial_rotary_factor 0.5 of head_dim 16
    la = config.linear_attention
    assert (la.num_key_heads, la.num_value_heads, la.key_dim, la.value_dim, la.conv_dim) == \
        (2, 4, 16, 48, 80)
    assert la.state_dtype == "float32" and config.norm_topk_prob
    shapes = config.lora_module_shapes()
    assert shapes["layers.3.self_attn.q_proj"] == (64, 2 * 4 * 16, 0)  # query + gate
    assert "layers.0.self_attn.q_proj" not in shapes
    grouped = arch == "qwen3_next"
    assert la.projection == ("grouped" if grouped else "split")
    if grouped:
        assert shapes["layers.0.linear_attn.in_proj_qkvz"] == (64, 80 + 48, 0)
        assert shapes["layers.0.linear_attn.in_proj_ba"] == (64, 8, 0)
    else:
        assert shapes["layers.0.linear_attn.in_proj_qkv"] == (64, 80, 0)
        assert shapes["layers.0.linear_attn.in_proj_b"] == (64, 4, 0)
    assert shapes["layers.0.linear_attn.out_proj"] == (48, 64, 0)


def test_conditional_generation_reads_text_config_and_root_tie_flag():
    raw = _raw("qwen3_vl_moe")
    raw["text_config"]["tie_word_embeddings"] = True  # the text class default; the root decides
    config = ModelConfig.from_dict(raw)
    assert config.architecture == "Qwen3VLMoeForConditionalGeneration"
    assert not config.hybrid and config.layer_types == (F,) * 3 and config.rotary_dim == 16
    assert config.num_experts == 8 and config.norm_topk_prob and not config.tie_word_embeddings
    raw["tie_word_embeddings"] = True
    assert ModelConfig.from_dict(raw).tie_word_embeddings


def test_hub_qwen36_spelling():
    """What Qwen3.6-35B-A3B's config.json gives (shrunk): full_attention_interval instead of
    layer_types in older files, mamba_ssm_dtype, mRoPE fields, no norm_topk_prob."""
    raw = _raw("qwen3_5_moe")
    text = raw["text_config"]
    del text["layer_types"]
    text.update(num_hidden_layers=8, full_attention_interval=4, mamba_ssm_dtype="float32",
                attn_output_gate=True, mtp_num_hidden_layers=1)
    config = ModelConfig.from_dict(raw)
    assert config.layer_types == (L, L, L, F) * 2 and config.norm_topk_prob


@pytest.mark.parametrize("edit,message", [
    (lambda t: t["layer_types"].__setitem__(2, "sliding_attention"),
     "text_config.layer_types[2] is 'sliding_attention'"),
    (lambda t: t["layer_types"].pop(), "text_config.layer_types has 3 entries, "
                                       "num_hidden_layers is 4"),
    (lambda t: t.pop("hidden_size"), "text_config.hidden_size is missing"),
    (lambda t: t.pop("linear_num_value_heads"), "text_config.linear_num_value_heads is missing"),
    (lambda t: t.pop("head_dim"), "text_config.head_dim is missing"),
    (lambda t: t.update(linear_num_value_heads=3), "must be a multiple of linear_num_key_heads"),
    (lambda t: t.update(mamba_ssm_dtype="float8"), "text_config.mamba_ssm_dtype is 'float8'"),
    (lambda t: t.update(layer_types=None, full_attention_interval=0),
     "text_config.full_attention_interval must be a positive integer"),
])
def test_bad_text_config_names_the_field(edit, message):
    raw = _raw("qwen3_5_moe")
    edit(raw["text_config"])
    with pytest.raises(ModelLoadError, match=message.replace("[", r"\[").replace("]", r"\]")):
        ModelConfig.from_dict(raw)


def test_missing_text_config_is_named():
    raw = _raw("qwen3_vl_moe")
    del raw["text_config"]
    with pytest.raises(ModelLoadError, match="needs a text_config object"):
        ModelConfig.from_dict(raw)


def test_flat_config_missing_field_is_named():
    raw = copy.deepcopy(_raw("qwen3_next"))
    del raw["num_experts_per_tok"]
    with pytest.raises(ModelLoadError, match="config.json: num_experts_per_tok is missing"):
        ModelConfig.from_dict(raw)

