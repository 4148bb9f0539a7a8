"""Adapters on Qwen3.5 / Qwen3-Next / Qwen3-VL-MoE through the engine: PEFT 3D adapters (the
attention, the 2x-wide gated q_proj, the Gated DeltaNet projections, target_parameters on the
routed experts) equal PEFT's own forward and their merged-weight reference; Megatron-style 2D
exports (gate A copied into up A, one A shared by the GDN input projections, the
language_model prefix) equal their merged-weight reference; and all of them, with base
requests, in one batch with --max-loras 1 (slot swaps while states are live) equal each alone."""

from __future__ import annotations

import functools

import pytest
import torch

from loramux.engine import LLM, LoRARequest, SamplingParams
from loramux.engine.lora.adapter import read_adapter
from loramux.engine.config import ModelConfig
from tests.adapters import (ATTENTION, GDN, MLP, make_2d_adapter, make_peft_3d_adapter,
                            merged_reference, peft_merged, write_megatron_bridge_saved,
                            write_megatron_bridge_stacked)
from tests.engine.conftest import PROMPTS
from tests.tiny import load_reference

GREEDY = SamplingParams(temperature=0, max_tokens=8)
ARCHS = ("qwen3_5_moe", "qwen3_next", "qwen3_vl_moe")


def hf_tokens(model) -> list[list[int]]:
    return [model.generate(torch.tensor([p]), max_new_tokens=GREEDY.max_tokens,
                           do_sample=False)[0, len(p):].tolist() for p in PROMPTS]


def tokens(llm: LLM, lora_request=None) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, lora_request)]


@pytest.fixture(scope="module")
def setups(checkpoint, tmp_path_factory):
    @functools.cache
    def get(arch):
        path = checkpoint(arch)
        hf = load_reference(path)
        root = tmp_path_factory.mktemp(f"hybrid-adapters-{arch}")
        modules = ATTENTION + (GDN if arch != "qwen3_vl_moe" else ())
        a3 = make_peft_3d_adapter(hf, root / "a3d", seed=1, target_modules=modules)
        a2 = make_2d_adapter(hf, root / "a2d", seed=2, megatron=True,
                             target_modules=ATTENTION + MLP + GDN)
        return path, hf, str(a3), str(a2)

    return get


@pytest.mark.parametrize("arch", ARCHS)
def test_adapters_equal_peft_and_merged_references(setups, arch):
    path, hf, a3, a2 = setups(arch)
    llm = LLM(path, max_loras=2, max_lora_rank=8, enable_mixed_moe_lora_format=True)
    got_3d = tokens(llm, LoRARequest("a3d", 1, a3))
    assert got_3d == hf_tokens(peft_merged(hf, a3))
    assert got_3d == hf_tokens(merged_reference(hf, a3))
    got_2d = tokens(llm, LoRARequest("a2d", 2, a2))
    assert got_2d == hf_tokens(merged_reference(hf, a2))
    assert got_2d != got_3d != tokens(llm)  # the adapters really change the output


def test_megatron_shared_gate_up_a_is_stored_once(setups):
    path, _, _, a2 = setups("qwen3_5_moe")
    config = ModelConfig.from_pretrained(path)
    adapter = read_adapter("a2d", a2, config, max_rank=8)
    assert adapter.expert_layout == "2d"
    assert adapter.meta["shared_gate_up_a_layers"] == config.num_layers
    assert "layers.0.mlp.experts.gate_up_proj" in adapter.weights
    assert "layers.0.mlp.experts.gate_proj" not in adapter.weights
    assert "layers.0.linear_attn.in_proj_z" in adapter.weights


def test_megatron_bridge_exports_serve_like_the_peft_adapter(setups, tmp_path):
    """Qwen3.5-MoE with the PEFT 3D adapter re-packed as Megatron-Bridge writes it (stacked by
    its streaming export, and its save_hf_adapter directory): the same continuations."""
    path, hf, a3, _ = setups("qwen3_5_moe")
    llm = LLM(path, max_loras=2, max_lora_rank=8, enable_mixed_moe_lora_format=True)
    want = tokens(llm, LoRARequest("a3d", 1, a3))
    stacked = write_megatron_bridge_stacked(a3, tmp_path / "stacked")
    saved = write_megatron_bridge_saved(a3, tmp_path / "saved")
    assert tokens(llm, LoRARequest("mb-stacked", 2, str(stacked))) == want
    assert tokens(llm, LoRARequest("mb-saved", 3, str(saved))) == want


@pytest.mark.parametrize("arch", ["qwen3_5_moe", "qwen3_next"])
def test_mixed_batch_with_one_slot_equals_each_alone(setups, arch):
    path, _, a3, a2 = setups(arch)
    kwargs = dict(max_loras=1, max_lora_rank=8, enable_mixed_moe_lora_format=True,
                  max_num_batched_tokens=6)
    reqs = {"base": None, "a3d": LoRARequest("a3d", 1, a3), "a2d": LoRARequest("a2d", 2, a2)}
    alone = {name: tokens(LLM(path, **kwargs), req) for name, req in reqs.items()}
    mixed = LLM(path, **kwargs)
    order = [(name, i) for i in range(len(PROMPTS)) for name in reqs]
    outs = mixed.generate([PROMPTS[i] for _, i in order], GREEDY,
                          [reqs[name] for name, _ in order])
    for (name, i), out in zip(order, outs):
        assert out.outputs[0].token_ids == alone[name][i], (name, i)
    assert mixed.core.lora.evictions_total > 0
