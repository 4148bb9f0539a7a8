"""read_adapter on every adapter format: merged deltas equal PEFT's merge or the files' own fold."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

from loramux.engine.errors import AdapterLoadError
from loramux.engine.lora.adapter import read_adapter
from tests.adapters import (ATTENTION, MLP, make_2d_adapter, make_peft_3d_adapter,
                            merged_reference, peft_merged, save_as_bin, split_3d_to_2d,
                            write_megatron_bridge_saved, write_megatron_bridge_stacked,
                            write_transposed_vintage)
from tests.lora.helpers import assert_same_weights, fold_adapter, max_weight_diff, tiny
from tests.tiny import ARCHS


def _read(path, config, **kwargs):
    return read_adapter("test", str(path), config, max_rank=16, **kwargs)


def _rewrite_keys(path, rename):
    """Rename (or drop, when rename returns None) tensor keys of an adapter in place."""
    tensors = load_file(path / "adapter_model.safetensors")
    renamed = {rename(k): v for k, v in tensors.items() if rename(k) is not None}
    save_file(renamed, path / "adapter_model.safetensors")


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_3d_adapter_equals_peft_merge_and_unload(arch, tmp_path):
    hf, config = tiny(arch)
    targets = ATTENTION + (MLP if arch == "qwen2_moe" else ())  # shared expert + dense MLP
    path = make_peft_3d_adapter(hf, tmp_path / "a", target_modules=targets)
    adapter = _read(path, config)
    assert adapter.expert_layout == "3d" and adapter.rank == 4
    assert adapter.weights["layers.0.mlp.experts.gate_up_proj"].a.shape == (8, 4, 64)
    assert adapter.weights["layers.0.mlp.experts.gate_up_proj"].b.shape == (8, 48, 4)
    if arch == "qwen2_moe":
        assert {"layers.0.mlp.shared_expert.up_proj", "layers.1.mlp.down_proj"} <= set(
            adapter.weights)
    expected = peft_merged(hf, path)
    assert max_weight_diff(expected, hf) > 0.5
    assert_same_weights(fold_adapter(hf, adapter), expected)


@pytest.mark.parametrize("arch", ARCHS)
def test_2d_adapter_equals_merged_reference(arch, tmp_path):
    hf, config = tiny(arch)
    path = make_2d_adapter(hf, tmp_path / "a", r=4, alpha=16)
    adapter = _read(path, config)
    assert adapter.expert_layout == "2d" and adapter.meta["zero_experts"] == {}
    assert adapter.weights["layers.2.mlp.experts.up_proj"].a.shape == (8, 4, 64)
    assert adapter.weights["layers.2.mlp.experts.down_proj"].b.shape == (8, 64, 4)
    expected = merged_reference(hf, path)
    assert max_weight_diff(expected, hf) > 0.5
    assert_same_weights(fold_adapter(hf, adapter), expected)


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "olmoe"])
def test_merged_reference_agrees_with_peft(arch, tmp_path):
    """The oracle itself: PEFT converts 2D files to 3D on these archs (not on qwen2_moe, where
    it silently drops expert LoRA) and merges 3D files."""
    hf, _ = tiny(arch)
    path_2d = make_2d_adapter(hf, tmp_path / "2d", seed=1)
    path_3d = make_peft_3d_adapter(hf, tmp_path / "3d", seed=2)
    assert_same_weights(merged_reference(hf, path_2d), peft_merged(hf, path_2d))
    assert_same_weights(merged_reference(hf, path_3d), peft_merged(hf, path_3d))


def test_2d_adapter_converted_and_resaved_by_peft_reads_as_3d(tmp_path):
    """PEFT turns a 2D adapter into 3D on load (gate_up rank 2r, alpha 2*alpha through
    rank_pattern / alpha_pattern, target_parameters as bare names) and saves it that way."""
    hf, config = tiny("qwen3_moe")
    path_2d = make_2d_adapter(hf, tmp_path / "2d")
    peft.PeftModel.from_pretrained(copy.deepcopy(hf), path_2d).save_pretrained(tmp_path / "3d")
    adapter = _read(tmp_path / "3d", config)
    assert adapter.expert_layout == "3d"
    assert adapter.weights["layers.0.mlp.experts.gate_up_proj"].rank == 8
    assert_same_weights(fold_adapter(hf, adapter), merged_reference(hf, path_2d))


@pytest.mark.parametrize("arch", ARCHS)
def test_3d_and_its_2d_split_give_equal_expert_deltas(arch, tmp_path):
    hf, config = tiny(arch)
    path_3d = make_peft_3d_adapter(hf, tmp_path / "3d", seed=3)
    path_2d = split_3d_to_2d(path_3d, tmp_path / "2d", mixtral_names=arch == "mixtral")
    fused, split = _read(path_3d, config), _read(path_2d, config)
    assert (fused.expert_layout, split.expert_layout) == ("3d", "2d")
    for layer in filter(config.is_moe_layer, range(config.num_layers)):
        p = f"layers.{layer}."
        gate_up = fused.weights[p + "mlp.experts.gate_up_proj"]
        # the split copies one A into gate and up: read back, it is stored once again
        assert p + "mlp.experts.gate_proj" not in split.weights
        shared = split.weights[p + "mlp.experts.gate_up_proj"]
        torch.testing.assert_close(shared.b @ shared.a, gate_up.b @ gate_up.a)
        for name in ("mlp.experts.down_proj", "self_attn.q_proj"):
            torch.testing.assert_close(split.weights[p + name].b @ split.weights[p + name].a,
                                       fused.weights[p + name].b @ fused.weights[p + name].a)


def test_adapters_move_greedy_tokens(tmp_path):
    hf, _ = tiny("qwen3_moe")
    prompt = torch.tensor([[5, 17, 99, 3, 250, 42]])

    def greedy(model):
        return model.generate(prompt, max_new_tokens=8, do_sample=False)[0, 6:].tolist()

    base = greedy(hf)
    assert greedy(merged_reference(hf, make_peft_3d_adapter(hf, tmp_path / "3d"))) != base
    assert greedy(merged_reference(hf, make_2d_adapter(hf, tmp_path / "2d"))) != base


def test_rank_alpha_patterns_and_rslora_match_peft(tmp_path):
    hf, config = tiny("qwen3_moe")
    path = make_peft_3d_adapter(
        hf, tmp_path / "a", r=4, alpha=8, use_rslora=True,
        # PEFT matches a regex at a dot boundary: "proj" matches nothing, [12] two layers
        rank_pattern={"mlp.experts.down_proj": 2, r"layers\.[12]\.self_attn\.q_proj": 6, "proj": 3},
        alpha_pattern={"layers.1.mlp.experts.gate_up_proj": 3, "o_proj": 5})
    adapter = _read(path, config)
    ranks = {name: w.rank for name, w in adapter.weights.items()}
    assert ranks["layers.0.mlp.experts.down_proj"] == 2 and ranks["layers.2.self_attn.q_proj"] == 6
    assert ranks["layers.0.self_attn.q_proj"] == 4 and adapter.rank == 6
    assert_same_weights(fold_adapter(hf, adapter), peft_merged(hf, path))


def test_2d_per_expert_rank_pattern_is_zero_padded(tmp_path):
    hf, config = tiny("olmoe")
    path = make_2d_adapter(hf, tmp_path / "a", r=4, alpha=8, use_rslora=True,
                           rank_pattern={"experts.3.gate_proj": 2, "down_proj": 3},
                           alpha_pattern={"layers.0.mlp.experts.5.up_proj": 1})
    adapter = _read(path, config)
    gate = adapter.weights["layers.1.mlp.experts.gate_proj"]
    assert gate.rank == 4 and adapter.weights["layers.1.mlp.experts.down_proj"].rank == 3
    assert torch.count_nonzero(gate.a[3, 2:]) == 0 and torch.count_nonzero(gate.a[2, 2:]) > 0
    assert_same_weights(fold_adapter(hf, adapter), merged_reference(hf, path))


def test_experts_missing_from_a_2d_file_get_no_delta(tmp_path):
    hf, config = tiny("mixtral")
    path = make_2d_adapter(hf, tmp_path / "a", experts=[0, 2, 5])
    adapter = _read(path, config)
    assert adapter.meta["zero_experts"]["layers.0.mlp.experts.gate_proj"] == [1, 3, 4, 6, 7]
    down = adapter.weights["layers.1.mlp.experts.down_proj"]
    assert torch.count_nonzero(down.b[[1, 3, 4, 6, 7]]) == 0 and torch.count_nonzero(down.b[5]) > 0
    assert_same_weights(fold_adapter(hf, adapter), merged_reference(hf, path))


@pytest.mark.parametrize("layout", ["2d", "3d"])
def test_bin_file_reads_like_safetensors(layout, tmp_path):
    hf, config = tiny("qwen2_moe")
    make = make_2d_adapter if layout == "2d" else make_peft_3d_adapter
    source = make(hf, tmp_path / "st")
    adapter = _read(save_as_bin(source, tmp_path / "bin"), config)
    assert adapter.meta["format"] == "bin" and adapter.expert_layout == layout
    assert_same_weights(fold_adapter(hf, adapter), fold_adapter(hf, _read(source, config)), 0)


def test_transposed_vintage_reads_like_the_standard_file(tmp_path):
    hf, config = tiny("qwen3_moe")
    standard = make_peft_3d_adapter(hf, tmp_path / "std")
    adapter = _read(write_transposed_vintage(standard, tmp_path / "old"), config)
    assert adapter.meta["orientation"] == "transposed"
    assert adapter.weights["layers.0.mlp.experts.gate_up_proj"].a.shape == (8, 4, 64)
    assert_same_weights(fold_adapter(hf, adapter), peft_merged(hf, standard))


def test_square_gate_up_orientation_is_settled_by_down_proj(tmp_path):
    """hidden 64 == 2 * moe_intermediate 32: gate_up fits both readings, down_proj does not."""
    hf, config = tiny("qwen3_moe", moe_intermediate_size=32)
    standard = make_peft_3d_adapter(hf, tmp_path / "std")
    old = _read(write_transposed_vintage(standard, tmp_path / "old"), config)
    new = _read(standard, config)
    assert (old.meta["orientation"], new.meta["orientation"]) == ("transposed", "standard")
    assert_same_weights(fold_adapter(hf, old), peft_merged(hf, standard))
    assert_same_weights(fold_adapter(hf, new), peft_merged(hf, standard))


def test_square_gate_up_alone_is_read_when_peft_version_settles_it(tmp_path):
    hf, config = tiny("qwen3_moe", moe_intermediate_size=32)
    path = make_peft_3d_adapter(hf, tmp_path / "a", target_parameters=["mlp.experts.gate_up_proj"])
    adapter = _read(path, config)
    assert adapter.meta["orientation"] == "standard"
    assert_same_weights(fold_adapter(hf, adapter), peft_merged(hf, path))


@pytest.mark.parametrize("param", ["gate_up_proj", "down_proj"])
def test_lone_target_parameter_is_named_by_target_parameters(param, tmp_path):
    hf, config = tiny("olmoe")
    path = make_peft_3d_adapter(hf, tmp_path / "a", target_modules=(),
                                target_parameters=[f"mlp.experts.{param}"])
    adapter = _read(path, config)
    assert set(adapter.weights) == {f"layers.{i}.mlp.experts.{param}" for i in range(3)}
    assert_same_weights(fold_adapter(hf, adapter), peft_merged(hf, path))


def test_lone_wrapper_is_named_by_shape_when_both_parameters_are_listed(tmp_path):
    hf, config = tiny("qwen3_moe")
    path = make_peft_3d_adapter(hf, tmp_path / "a")
    full = _read(path, config)
    _rewrite_keys(path, lambda k: None if ".base_layer." in k else k)
    adapter = _read(path, config)
    assert "layers.0.mlp.experts.gate_up_proj" not in adapter.weights
    torch.testing.assert_close(adapter.weights["layers.2.mlp.experts.down_proj"].b,
                               full.weights["layers.2.mlp.experts.down_proj"].b)


def test_megatron_style_fused_names_read_like_peft_positions(tmp_path):
    hf, config = tiny("mixtral")
    path = make_peft_3d_adapter(hf, tmp_path / "a")
    expected = fold_adapter(hf, _read(path, config))
    _rewrite_keys(path, lambda k: k.replace("experts.base_layer.lora", "experts.gate_up_proj.lora")
                  .replace("experts.lora", "experts.down_proj.lora"))
    adapter = _read(path, config)
    assert adapter.expert_layout == "3d"
    assert_same_weights(fold_adapter(hf, adapter), expected, 0)


@pytest.mark.parametrize("names", ["fused", "positional"])
@pytest.mark.parametrize("moe_inter", [16, 32], ids=["plain", "square-gate-up"])
def test_megatron_bridge_stacked_tensors_read_like_the_peft_file(names, moe_inter, tmp_path):
    """[E, r, in] / [E, out, r] (streaming export) and [E, r, in] / [out, r, E] (stack_3d_moe):
    one reading each, also where hidden == 2I would let a folded file be read transposed."""
    hf, config = tiny("qwen3_moe", moe_intermediate_size=moe_inter)
    standard = make_peft_3d_adapter(hf, tmp_path / "std", r=3)
    adapter = _read(write_megatron_bridge_stacked(standard, tmp_path / "mb", names=names),
                    config)
    assert adapter.meta["orientation"] == "standard" and adapter.expert_layout == "3d"
    assert_same_weights(fold_adapter(hf, adapter), peft_merged(hf, standard))


@pytest.mark.parametrize("moe_inter", [16, 32], ids=["plain", "square-gate-up"])
def test_megatron_bridge_saved_adapter_reads_its_expert_major_columns(moe_inter, tmp_path):
    """save_hf_adapter files look like PEFT <= 0.18 transposed ones but pack B expert-major;
    read rank-major (the PEFT convention) they would be garbage for r > 1."""
    hf, config = tiny("qwen3_moe", moe_intermediate_size=moe_inter)
    standard = make_peft_3d_adapter(hf, tmp_path / "std", r=3)
    saved = write_megatron_bridge_saved(standard, tmp_path / "mb")
    adapter = _read(saved, config)
    assert adapter.meta["producer"] == "Megatron-Bridge"
    assert adapter.meta["orientation"] == "transposed"
    assert_same_weights(fold_adapter(hf, adapter), peft_merged(hf, standard))
    # the same tensors under a PEFT config are the PEFT <= 0.18 packing, read rank-major
    config_path = saved / "adapter_config.json"
    peft_config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**peft_config, "peft_version": "0.18.0"}))
    if moe_inter == 16:
        assert max_weight_diff(fold_adapter(hf, _read(saved, config)),
                               peft_merged(hf, standard)) > 1e-2


def test_megatron_bridge_config_with_untransposed_tensors_is_refused(tmp_path):
    hf, config = tiny("qwen3_moe")
    standard = make_peft_3d_adapter(hf, tmp_path / "std", r=3)
    config_path = standard / "adapter_config.json"
    fields = json.loads(config_path.read_text())
    fields.pop("peft_version")
    fields["target_parameters"] = [f"model.layers.{i}.mlp.experts.{p}" for i in range(3)
                                   for p in ("gate_up_proj", "down_proj")]
    config_path.write_text(json.dumps(fields))
    with pytest.raises(AdapterLoadError, match="Megatron-Bridge save_hf_adapter"):
        _read(standard, config)


@pytest.mark.parametrize("b_shape", [(5, 7, 2), (64, 4, 8)], ids=["unrelated", "wrong-rank"])
def test_stacked_tensors_of_unknown_packing_are_refused(b_shape, tmp_path):
    hf, config = tiny("qwen3_moe")
    path = make_peft_3d_adapter(hf, tmp_path / "a", r=3)
    tensors = load_file(path / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("experts.lora_A.weight"))
    tensors[key] = torch.randn(8, 3, 16)
    tensors[key.replace("lora_A", "lora_B")] = torch.randn(b_shape)
    save_file(tensors, path / "adapter_model.safetensors")
    with pytest.raises(AdapterLoadError, match=r"lora_B must be \[E, out, r\] or \[out, r, E\]"):
        _read(path, config)


def test_megatron_bridge_shared_outer_lora_is_refused_by_name(tmp_path):
    """experts_shared_outer_loras: one [1, r, H] gate A for every expert, under a name with no
    expert index."""
    hf, config = tiny("qwen3_moe")
    path = make_2d_adapter(hf, tmp_path / "a", target_modules=("q_proj",))
    tensors = load_file(path / "adapter_model.safetensors")
    name = "base_model.model.model.layers.0.mlp.experts.gate_proj"
    tensors |= {f"{name}.lora_A.weight": torch.randn(4, 64),
                f"{name}.lora_B.weight": torch.randn(16, 4)}
    save_file(tensors, path / "adapter_model.safetensors")
    with pytest.raises(AdapterLoadError, match="experts_shared_outer_loras"):
        _read(path, config)


def test_base_layer_segments_in_2d_module_paths_are_ignored(tmp_path):
    hf, config = tiny("qwen3_moe")
    path = make_2d_adapter(hf, tmp_path / "a")
    expected = fold_adapter(hf, _read(path, config))
    _rewrite_keys(path, lambda k: k.replace(".lora_", ".base_layer.lora_"))
    assert_same_weights(fold_adapter(hf, _read(path, config)), expected, 0)


def test_layout_flags_that_agree_are_accepted_and_meta_is_filled(tmp_path):
    hf, config = tiny("qwen3_moe")
    path = make_peft_3d_adapter(hf, tmp_path / "a")
    adapter = _read(path, config, is_3d_lora_weight=True, native_layout="3d", allow_mixed=False)
    assert adapter.name == "test"
    assert adapter.meta["peft_version"] and adapter.meta["num_targets"] == 18
    assert all(w.a.dtype == torch.float32 and w.a.device.type == "cpu"
               for w in adapter.weights.values())


def test_attention_only_adapter_has_no_expert_layout(tmp_path):
    hf, config = tiny("qwen2_moe")
    path = make_peft_3d_adapter(hf, tmp_path / "a", target_parameters=())
    config_json = json.loads((path / "adapter_config.json").read_text())
    assert config_json["target_parameters"] is None
    adapter = _read(path, config, is_3d_lora_weight=True, native_layout="2d", allow_mixed=False)
    assert adapter.expert_layout is None
    assert_same_weights(fold_adapter(hf, adapter), peft_merged(hf, path))
