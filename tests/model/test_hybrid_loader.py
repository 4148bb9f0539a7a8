"""Loading Qwen3.5 / Qwen3-Next / Qwen3-VL-MoE checkpoints in every form they exist in: experts
per expert (transformers' save_pretrained, quantized derivatives) or fused (the official BF16
files), Qwen3-VL-MoE's transposed fused hub form, MTP heads and the vision tower beside the text
model, and names from a PEFT-wrapped model. Each form loads bit-identically to the plain one."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from loramux.engine.errors import ModelLoadError
from tests.model.helpers import load_model
from tests.tiny import save_tiny_checkpoint


def _params(path) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in load_model(path)[0].named_parameters()}


def _rewrite(src, dst, edit, config_edit=None):
    """Copy a checkpoint with its tensors passed through edit(dict) (and config.json)."""
    dst.mkdir()
    tensors = edit(load_file(src / "model.safetensors"))
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    if config_edit:
        config_edit(config)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("arch", ["qwen3_5_moe", "qwen3_5_moe_text", "qwen3_next"])
def test_fused_and_per_expert_files_load_the_same(tmp_path, arch):
    per_expert = save_tiny_checkpoint(arch, tmp_path / "2d")
    fused = save_tiny_checkpoint(arch, tmp_path / "3d", fused=True)
    assert load_model(per_expert)[1] == "2d" and load_model(fused)[1] == "3d"
    _assert_same(_params(per_expert), _params(fused))


def _transpose_experts(tensors: dict) -> dict:
    return {k: v.transpose(1, 2).contiguous() if k.endswith(("experts.gate_up_proj",
                                                             "experts.down_proj")) else v
            for k, v in tensors.items()}


@pytest.mark.parametrize("hidden", [64, 48])  # 48 = 2I: gate_up is square, [E, H, 2I] == [E, 2I, H]
def test_qwen3_vl_moe_hub_transposed_experts(tmp_path, hidden):
    fused = save_tiny_checkpoint("qwen3_vl_moe", tmp_path / "saved", fused=True,
                                 hidden_size=hidden)
    expected = _params(fused)  # transformers 5 writes [E, 2I, H]

    def hub_version(config):
        config["transformers_version"] = "4.57.0.dev0"

    hub = _rewrite(fused, tmp_path / "hub", _transpose_experts, hub_version)
    _assert_same(_params(hub), expected)


def test_mtp_and_vision_tensors_are_skipped_with_one_line_each(tmp_path, caplog):
    fused = save_tiny_checkpoint("qwen3_5_moe", tmp_path / "fused", fused=True)

    def add_mtp(tensors):  # the official layout: main layers fused, the MTP layer per expert
        extra = {f"mtp.layers.0.mlp.experts.{e}.{p}.weight": torch.zeros(24, 64)
                 for e in range(8) for p in ("gate_proj", "up_proj")}
        return {**tensors, **extra, "mtp.fc.weight": torch.zeros(64, 128)}

    with_mtp = _rewrite(fused, tmp_path / "mtp", add_mtp)
    with caplog.at_level(logging.INFO, logger="loramux.engine.model.loader"):
        params, layout = load_model(with_mtp)
    assert layout == "3d"
    _assert_same({n: p.detach() for n, p in params.named_parameters()}, _params(fused))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped")]
    assert len(lines) == 2, lines
    assert any("skipped 17 tensors (not used by the served model)" in line for line in lines)
    assert any("vision tower" in line and "model.visual." in line for line in lines)


def test_peft_wrapped_names_load_and_unmerged_lora_is_refused(tmp_path):
    fused = save_tiny_checkpoint("qwen3_5_moe", tmp_path / "fused", fused=True)

    def wrap(tensors):  # names of an unmerged PEFT model's base weights (transformers 5)
        out = {}
        for key, value in tensors.items():
            key = key.replace("experts.gate_up_proj", "experts.base_layer.base_layer.gate_up_proj")
            key = key.replace("experts.down_proj", "experts.base_layer.down_proj")
            key = key.replace("q_proj.weight", "q_proj.base_layer.weight")
            out[key.replace("in_proj_z.weight", "in_proj_z.base_layer.weight")] = value
        return out

    wrapped = _rewrite(fused, tmp_path / "wrapped", wrap)
    _assert_same(_params(wrapped), _params(fused))

    def with_lora(tensors):
        key = "model.language_model.layers.3.self_attn.q_proj.lora_A.default.weight"
        return {**wrap(tensors), key: torch.zeros(4, 64)}

    unmerged = _rewrite(fused, tmp_path / "unmerged", with_lora)
    with pytest.raises(ModelLoadError, match="unmerged PEFT model"):
        load_model(unmerged)
