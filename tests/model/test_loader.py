"""Checkpoint loading: layouts, shards, tied embeddings, dtypes on disk, and clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from loramux import kernels
from loramux.engine.config import ModelConfig
from loramux.engine.errors import ModelLoadError
from loramux.engine.model import build_model, load_weights
from tests.model.helpers import PagedSession, load_model, reference_logits
from tests.tiny import load_reference, tiny_model

PROMPT = [5, 17, 300, 42, 8, 99, 123, 7, 64]


def edited_checkpoint(src, dst, edit):
    """A copy of the single-file checkpoint `src` whose tensors went through `edit(dict)`."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def assert_matches_reference(path, **model_kw) -> None:
    model, _ = load_model(path, **model_kw)
    logits = PagedSession(model).step([(0, PROMPT, -1)])[0]
    expected = reference_logits(load_reference(path), PROMPT)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fused", [False, True], ids=["2d", "3d"])
def test_sharded_tied_bf16_checkpoint_loads(tmp_path, fused):
    model = tiny_model("qwen2_moe", tie_word_embeddings=True).to(torch.bfloat16)
    model.save_pretrained(tmp_path, max_shard_size="100KB", save_original_format=not fused)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert "lm_head.weight" not in index["weight_map"]
    assert_matches_reference(tmp_path)
    ours, layout = load_model(tmp_path)
    assert layout == ("3d" if fused else "2d")
    assert ours.lm_head.weight is ours.model.embed_tokens.weight


def test_weights_load_identically_with_and_without_lora_slots(checkpoint):
    path = checkpoint("mixtral")
    plain, _ = load_model(path)
    with_slots, _ = load_model(path, max_loras=3, max_lora_rank=8)
    plain_params = dict(plain.named_parameters())
    slot_params = dict(with_slots.named_parameters())
    assert plain_params.keys() == slot_params.keys()
    for name, param in plain_params.items():
        assert torch.equal(param, slot_params[name]), name


def test_mtp_extras_are_skipped(checkpoint, tmp_path):
    def add_mtp(tensors):
        tensors["mtp.layers.0.eh_proj.weight"] = torch.ones(4, 4)
    assert_matches_reference(edited_checkpoint(checkpoint("qwen3_moe"), tmp_path / "c", add_mtp))


@pytest.mark.parametrize("key", ["model.layers.2.mlp.experts.5.up_proj.weight",
                                 "model.layers.0.self_attn.k_proj.weight", "lm_head.weight"])
def test_missing_tensor_is_named(checkpoint, tmp_path, key):
    path = edited_checkpoint(checkpoint("qwen3_moe"), tmp_path / "c", lambda t: t.pop(key))
    with pytest.raises(ModelLoadError, match=f"tensor {key} missing"):
        load_model(path)


def test_unexpected_tensor_is_named(checkpoint, tmp_path):
    key = "model.layers.0.mlp.experts.0.extra_proj.weight"
    path = edited_checkpoint(checkpoint("olmoe"), tmp_path / "c",
                             lambda t: t.__setitem__(key, torch.zeros(2)))
    with pytest.raises(ModelLoadError, match=f"unexpected tensor {key}"):
        load_model(path)


def test_expert_layouts_mixed_in_one_checkpoint_are_refused(checkpoint, tmp_path):
    def add_fused(tensors):
        tensors["model.layers.0.mlp.experts.down_proj"] = torch.zeros(8, 64, 24)
    path = edited_checkpoint(checkpoint("qwen3_moe"), tmp_path / "c", add_fused)
    with pytest.raises(ModelLoadError, match="unexpected tensor model.layers.0.mlp.experts.0"):
        load_model(path)


def test_wrong_shape_is_named(checkpoint, tmp_path):
    key = "model.layers.1.mlp.experts.gate_up_proj"
    path = edited_checkpoint(checkpoint("mixtral", fused=True), tmp_path / "c",
                             lambda t: t.__setitem__(key, torch.zeros(8, 24, 64)))
    with pytest.raises(ModelLoadError, match=rf"{key} has shape \(8, 24, 64\), expected "
                                             r"\(8, 48, 64\)"):
        load_model(path)


def test_duplicate_spellings_of_one_tensor_are_refused(checkpoint, tmp_path):
    def duplicate(tensors):
        key = "model.layers.0.block_sparse_moe.experts.3.w1.weight"
        tensors["model.layers.0.mlp.experts.3.gate_proj.weight"] = tensors[key].clone()
    path = edited_checkpoint(checkpoint("mixtral"), tmp_path / "c", duplicate)
    with pytest.raises(ModelLoadError, match="appears twice"):
        load_model(path)


def test_missing_files_are_reported(checkpoint, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(checkpoint("olmoe") / "config.json", empty / "config.json")
    with pytest.raises(ModelLoadError, match="neither model.safetensors"):
        load_model(empty)
    sharded = tmp_path / "sharded"
    tiny_model("olmoe").save_pretrained(sharded, max_shard_size="100KB")
    next(sharded.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(ModelLoadError, match="model-00002-.* is missing"):
        load_model(sharded)


def test_dummy_weights_read_no_files(checkpoint, tmp_path):
    config = ModelConfig.from_pretrained(checkpoint("qwen2_moe"))
    device = torch.device("cpu")
    model = build_model(config, torch.float32, device, kernels.select_ops(device))
    assert load_weights(model, tmp_path / "nothing here", load_format="dummy") == "2d"
    layer = model.model.layers[0]
    assert torch.equal(layer.input_layernorm.weight, torch.ones(config.hidden_size))
    bias = layer.self_attn.qkv_proj.bias
    assert torch.equal(bias, torch.zeros_like(bias))
    assert 0.015 < layer.mlp.experts.w_gate_up.std() < 0.025
    assert layer.mlp.gate.weight.std() > 0.1
    logits = PagedSession(model).step([(0, PROMPT, -1)])[0]
    assert torch.isfinite(logits).all()


def test_unknown_load_format_is_refused(checkpoint):
    config = ModelConfig.from_pretrained(checkpoint("olmoe"))
    model = build_model(config, torch.float32, torch.device("cpu"),
                        kernels.select_ops(torch.device("cpu")))
    with pytest.raises(ModelLoadError, match="unknown load_format 'pt'"):
        load_weights(model, checkpoint("olmoe"), load_format="pt")
