"""Every way an adapter can be wrong is refused with a typed error whose message says why."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from loramux.engine.errors import AdapterLoadError, AdapterNotFound
from loramux.engine.lora.adapter import read_adapter
from tests.adapters import make_2d_adapter, make_peft_3d_adapter, write_transposed_vintage
from tests.bad_adapters import BAD_KINDS, write_bad_adapter
from tests.lora.helpers import tiny

KEY = r"base_model\.model\.model\.layers\.0\."
EXPECTED = {  # kind -> what the message must say, for both the 2D and the 3D good adapter
    "not_an_adapter": r"no adapter_config\.json",
    "invalid_json": r"adapter_config\.json .* is not valid JSON",
    "no_weights": r"no adapter_model\.safetensors or adapter_model\.bin",
    "truncated_safetensors": r"adapter_model\.safetensors is corrupt or truncated",
    "corrupt_safetensors": r"adapter_model\.safetensors is corrupt or truncated",
    "nan_weights": KEY + r"mlp\.experts\.\S+lora_B\.weight contains NaN or Inf",
    "inf_weights": KEY + r"mlp\.experts\.\S+lora_B\.weight contains NaN or Inf",
    "use_dora": r"DoRA \(use_dora\) is not supported",
    "modules_to_save": r"modules_to_save \['lm_head'\] .*LoRA deltas only",
    "bias": r"bias='all' .*must be 'none'",
    "missing_lora_b": KEY + r"mlp\.experts\.\S+lora_A\.weight has no lora_B partner",
    "unknown_module": r"layers\.99\.self_attn\.q_proj\.lora_A\.weight: the model .*3 layers.* "
                      r"has no LoRA target layers\.99\.self_attn\.q_proj",
    "non_lora_key": r"'base_model\.model\.model\.embed_tokens\.lora_embedding_A' is not a LoRA",
    "unsupported_target_parameter": r"target_parameters entry 'mlp\.gate\.weight' is not "
                                    r"supported",
    "wrong_hidden_size": KEY + r"self_attn\.q_proj\.lora_A\.weight: shape \[4, 72\] .*expected "
                               r"hidden_size = 64, found 72",
    "wrong_num_experts": KEY + r"mlp\.experts\.\S+: .*the model has 8 experts \(num_experts\)",
    "wrong_intermediate_size": r"down_proj.*moe_intermediate_size|moe_intermediate_size.* 24, "
                               r"found 28",
    "rank_mismatch": KEY + r"self_attn\.\w+\.lora_A\.weight: rank 4 differs from the rank 8",
    "rank_too_high": r"layers\.0\.self_attn\.\w+ has LoRA rank 64, above the server's limit 16 "
                     r"\(--max-lora-rank\)",
    "nan_alpha": r"lora_alpha a finite number, found r=4, lora_alpha=nan",
    "huge_alpha": r"lora_alpha 1e\+300 with rank 4 gives model\.layers\.\S+ a LoRA scale of "
                  r"2\.5e\+299, beyond loramux's limit of 10000",
    "huge_alpha_pattern": r"lora_alpha 1e\+09 with rank 4 gives model\.layers\.0\.self_attn\."
                          r"q_proj a LoRA scale of 2\.5e\+08.*alpha_pattern",
    "bool_rank": r"r must be a positive integer .*found r=True",
    "bool_rank_pattern": r"rank_pattern must map regexes to positive integers, found 'q_proj': "
                         r"True",
    "overflowing_delta": r"layers\.0\.\S+: its LoRA delta \(scale x lora_B @ lora_A\) has an "
                         r"entry of magnitude \d\S*e\+60, beyond loramux's limit of 1000",
    "huge_delta": r"layers\.0\.\S+: its LoRA delta .* magnitude \d\S*e\+0[4-7], beyond",
}


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    hf, config = tiny("qwen3_moe")
    root = tmp_path_factory.mktemp("good")
    dirs = {"2d": make_2d_adapter(hf, root / "2d"), "3d": make_peft_3d_adapter(hf, root / "3d")}
    return config, dirs


def _refused(path, config, error=AdapterLoadError, **kwargs) -> str:
    with pytest.raises(error) as info:
        read_adapter("bad", str(path), config, max_rank=16, **kwargs)
    return str(info.value)


def test_every_bad_kind_has_an_expected_message():
    assert set(EXPECTED) == set(BAD_KINDS)


@pytest.mark.parametrize("layout", ["2d", "3d"])
@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_adapter_is_refused_with_its_reason(kind, layout, good, tmp_path):
    config, dirs = good
    read_adapter("good", str(dirs[layout]), config, max_rank=16)  # the source itself is fine
    message = _refused(write_bad_adapter(kind, dirs[layout], tmp_path / kind), config)
    assert re.search(EXPECTED[kind], message), message


def test_missing_path_is_not_found_and_a_file_is_not_an_adapter(good, tmp_path):
    config, dirs = good
    assert "does not exist" in _refused(tmp_path / "nowhere", config, AdapterNotFound)
    file = dirs["2d"] / "adapter_config.json"
    assert "is not a directory" in _refused(file, config)


@pytest.mark.parametrize("layout, flag", [("2d", True), ("3d", False)])
def test_layout_flag_contradicting_the_files_is_refused(layout, flag, good):
    config, dirs = good
    message = _refused(dirs[layout], config, is_3d_lora_weight=flag)
    assert f"is_3d_lora_weight={flag} contradicts" in message
    assert f"hold {layout.upper()} expert LoRA" in message


@pytest.mark.parametrize("layout, native", [("2d", "3d"), ("3d", "2d")])
def test_other_expert_layout_needs_mixed_format_flag(layout, native, good):
    config, dirs = good
    message = _refused(dirs[layout], config, native_layout=native, allow_mixed=False)
    assert "--enable-mixed-moe-lora-format" in message
    read_adapter("ok", str(dirs[layout]), config, 16, native_layout=native, allow_mixed=True)


def test_adapter_mixing_2d_and_3d_expert_keys_is_refused(good, tmp_path):
    config, dirs = good
    tensors = {**load_file(dirs["2d"] / "adapter_model.safetensors"),
               **load_file(dirs["3d"] / "adapter_model.safetensors")}
    _write(tmp_path, json.loads((dirs["3d"] / "adapter_config.json").read_text()), tensors)
    assert "mixes 2D per-expert LoRA" in _refused(tmp_path, config)


@pytest.mark.parametrize("option, value, expected", [
    ("lora_bias", True, r"LoRA bias terms"),
    ("layer_replication", [[0, 2]], r"layer_replication"),
    ("peft_type", "IA3", r"peft_type 'IA3'"),
    ("rank_pattern", {"q_proj": 0}, r"positive integers"),
    ("lora_alpha", "eight", r"lora_alpha a finite number, found r=4, lora_alpha='eight'"),
    ("alpha_pattern", {"(": 2}, r"alpha_pattern key is not a regex"),
    ("alpha_pattern", {"q_proj": float("nan")}, r"alpha_pattern must map regexes to finite "
                                                r"numbers, found 'q_proj': nan"),
    ("alpha_pattern", {"q_proj": 10 ** 400}, r"finite numbers, found 'q_proj': 1000000"),
])
def test_config_options_beyond_plain_lora_are_refused(option, value, expected, good, tmp_path):
    config, dirs = good
    _write(tmp_path, {**_config(dirs["3d"]), option: value}, _tensors(dirs["3d"]))
    assert re.search(expected, _refused(tmp_path, config))


def test_expert_lora_on_a_dense_layer_is_refused(tmp_path):
    hf, config = tiny("qwen2_moe")  # layer 1 is a dense MLP layer (mlp_only_layers)
    path = make_2d_adapter(hf, tmp_path / "a")
    tensors = _tensors(path)
    for key in [k for k in tensors if ".layers.0.mlp.experts.2." in k]:
        tensors[key.replace("layers.0.", "layers.1.")] = tensors[key]
    _write(path, _config(path), tensors)
    assert "has no LoRA target layers.1.mlp.experts" in _refused(path, config)


def test_three_nested_3d_wrappers_are_refused(good, tmp_path):
    config, dirs = good
    tensors = _tensors(dirs["3d"])
    for part in "AB":
        key = f"base_model.model.model.layers.0.mlp.experts.base_layer.lora_{part}.weight"
        tensors[key.replace("base_layer", "base_layer.base_layer")] = tensors[key]
    _write(tmp_path, _config(dirs["3d"]), tensors)
    assert "nesting depths [0, 1, 2]" in _refused(tmp_path, config)


def test_two_keys_for_one_weight_and_integer_tensors_are_refused(good, tmp_path):
    config, dirs = good
    tensors = _tensors(dirs["2d"])
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    _write(tmp_path / "dup", _config(dirs["2d"]),
           {**tensors, key.replace(".lora_A", ".base_layer.lora_A"): tensors[key]})
    assert "map to the same weight" in _refused(tmp_path / "dup", config)
    _write(tmp_path / "int", _config(dirs["2d"]), {**tensors, key: tensors[key].to(torch.int32)})
    assert "has dtype torch.int32" in _refused(tmp_path / "int", config)


def test_square_gate_up_alone_is_refused_when_nothing_settles_the_orientation(tmp_path):
    hf, config = tiny("qwen3_moe", moe_intermediate_size=32)  # 2 * 32 == hidden 64
    path = make_peft_3d_adapter(hf, tmp_path / "a", target_parameters=["mlp.experts.gate_up_proj"])
    message = _refused(write_transposed_vintage(path, tmp_path / "old", "0.18.0"), config)
    assert "cannot tell whether the 3D expert LoRA is stored transposed" in message
    assert "hidden_size 64, moe_intermediate_size 32" in message and "'0.18.0'" in message


def test_3d_tensors_disagreeing_on_orientation_are_refused(good, tmp_path):
    config, dirs = good
    old = write_transposed_vintage(dirs["3d"], tmp_path / "old")
    tensors = _tensors(old)  # gate_up transposed, down_proj as PEFT >= 0.19.1 writes it
    tensors.update({k: v for k, v in _tensors(dirs["3d"]).items() if "experts.lora_" in k})
    _write(old, _config(old), tensors)
    assert "its tensors disagree" in _refused(old, config)


def _config(path) -> dict:
    return json.loads((path / "adapter_config.json").read_text())


def _tensors(path) -> dict[str, torch.Tensor]:
    return load_file(path / "adapter_model.safetensors")


def _write(path, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(config))
    save_file({k: v.clone() for k, v in tensors.items()}, path / "adapter_model.safetensors")


def test_adapter_of_another_base_model_loads_with_a_warning(good, tmp_path, caplog):
    config, dirs = good
    for trained_on, warned in (("Org/Other-MoE", True), ("org/TINY-base", False), (None, False)):
        _write(tmp_path, {**_config(dirs["2d"]), "base_model_name_or_path": trained_on},
               _tensors(dirs["2d"]))
        caplog.clear()
        read_adapter("other", str(tmp_path), config, 16, base_model="/models/tiny-base/")
        said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert bool(said) == warned, said
        assert not warned or "'Org/Other-MoE'" in said[0] and "'tiny-base'" in said[0]
