"""LoRA slots: a batch mixing a 2D-expert adapter, a 3D-expert adapter and base-model tokens
matches, per sequence, transformers with that adapter's deltas merged into its weights."""

from __future__ import annotations

import pytest
import torch

from loramux.engine.config import ModelConfig
from loramux.engine.lora.weights import LoraWeights
from tests.model.helpers import PagedSession, load_model, reference_logits
from tests.tiny import ARCHS, load_reference

MAX_RANK = 8
PROMPTS = ([5, 17, 300, 42, 8, 99, 123, 7, 64], [400, 2, 77, 31, 6, 250], [9, 8, 7, 6, 5])
DECODE = (11, 250, 3)
_2D_ONLY, _3D_ONLY = ("experts.gate_proj", "experts.up_proj"), ("experts.gate_up_proj",)


def random_adapter(config: ModelConfig, layout: str, rank: int, seed: int,
                   only: str = "") -> dict[str, LoraWeights]:
    """Random LoRA on every module of `layout` ("2d" or "3d") whose name contains `only`."""
    gen = torch.Generator().manual_seed(seed)
    skip = _3D_ONLY if layout == "2d" else _2D_ONLY
    weights = {}
    for name, (d_in, d_out, experts) in config.lora_module_shapes().items():
        if name.endswith(skip) or only not in name:
            continue
        lead = (experts,) if experts else ()
        a = torch.randn(*lead, rank, d_in, generator=gen) * 0.3
        b = torch.randn(*lead, d_out, rank, generator=gen) * 0.3
        weights[name] = LoraWeights(a, b)
    return weights


def merge_into(ref, weights: dict[str, LoraWeights], inter: int) -> None:
    """W += b @ a in the transformers model (experts fused there: gate_up_proj, down_proj)."""
    params = dict(ref.named_parameters())
    with torch.no_grad():
        for name, w in weights.items():
            delta = w.b @ w.a
            module, proj = name.rsplit(".", 1)
            if not module.endswith("experts"):
                params[f"model.{name}.weight"] += delta
                continue
            rows = {"gate_proj": slice(0, inter), "up_proj": slice(inter, None)}.get(proj)
            target = "down_proj" if proj == "down_proj" else "gate_up_proj"
            params[f"model.{module}.{target}"][:, rows or slice(None)] += delta


def merged_reference(path, weights, config):
    ref = load_reference(path)
    merge_into(ref, weights, config.moe_intermediate_size)
    return ref


def run_batch(session: PagedSession, slots: tuple[int, ...]) -> list[torch.Tensor]:
    """Prefill all PROMPTS in one step, then decode DECODE; logits per sequence [L, V]."""
    steps = [session.step([(i, p, s) for i, (p, s) in enumerate(zip(PROMPTS, slots))])]
    for token in DECODE:
        steps.append(session.step([(i, [token], s) for i, s in enumerate(slots)]))
    return [torch.cat([step[i] for step in steps]) for i in range(len(PROMPTS))]


# The base checkpoint's expert layout does not matter to slots: one 3d base suffices.
@pytest.mark.parametrize("arch,fused", [(a, False) for a in ARCHS] + [("qwen3_moe", True)])
def test_mixed_2d_3d_and_base_batch_matches_merged_reference(checkpoint, arch, fused):
    path = checkpoint(arch, fused)
    model, _ = load_model(path, max_loras=2, max_lora_rank=MAX_RANK)
    config = model.config
    adapters = [random_adapter(config, "2d", 2, seed=1), random_adapter(config, "3d", 4, seed=2)]
    model.write_lora_slot(0, adapters[0])
    model.write_lora_slot(1, adapters[1])
    ours = run_batch(PagedSession(model), slots=(0, 1, -1))
    refs = [merged_reference(path, a, config) for a in adapters] + [load_reference(path)]
    base = reference_logits(refs[2], PROMPTS[0] + list(DECODE))
    for i, (logits, ref) in enumerate(zip(ours, refs)):
        expected = reference_logits(ref, PROMPTS[i] + list(DECODE))
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    merged = reference_logits(refs[0], PROMPTS[0] + list(DECODE))
    assert (merged - base).abs().max() > 0.1, "the adapter must change the logits"


def test_rewriting_a_slot_zeroes_modules_the_new_adapter_does_not_target(checkpoint):
    path = checkpoint("qwen2_moe")
    model, _ = load_model(path, max_loras=1, max_lora_rank=MAX_RANK)
    model.write_lora_slot(0, random_adapter(model.config, "2d", 8, seed=3))
    attention_only = random_adapter(model.config, "2d", 3, seed=4, only="self_attn")
    model.write_lora_slot(0, attention_only)
    ours = run_batch(PagedSession(model), slots=(0, 0, 0))
    ref = merged_reference(path, attention_only, model.config)
    for prompt, logits in zip(PROMPTS, ours):
        expected = reference_logits(ref, prompt + list(DECODE))
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_cleared_slot_gives_base_logits(checkpoint):
    path = checkpoint("olmoe")
    model, _ = load_model(path, max_loras=2, max_lora_rank=MAX_RANK)
    model.write_lora_slot(1, random_adapter(model.config, "3d", 4, seed=5))
    model.clear_lora_slot(1)
    ours = run_batch(PagedSession(model), slots=(1, 1, -1))
    ref = load_reference(path)
    for prompt, logits in zip(PROMPTS, ours):
        expected = reference_logits(ref, prompt + list(DECODE))
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_write_casts_to_the_model_dtype(checkpoint):
    model, _ = load_model(checkpoint("mixtral"), max_loras=1, max_lora_rank=4,
                          dtype=torch.bfloat16)
    model.write_lora_slot(0, random_adapter(model.config, "3d", 4, seed=6))
    a_slots = model.model.layers[0].self_attn.qkv_proj.a_slots
    assert a_slots.dtype == torch.bfloat16 and a_slots.abs().sum() > 0


@pytest.mark.parametrize("case", ["rank", "unknown", "slot", "shape", "mixed_layouts"])
def test_bad_slot_writes_raise_value_error(checkpoint, case):
    model, _ = load_model(checkpoint("qwen3_moe"), max_loras=2, max_lora_rank=4)
    weights, slot = random_adapter(model.config, "2d", 2, seed=7), 0
    if case == "rank":
        weights = random_adapter(model.config, "2d", 5, seed=7)
    elif case == "unknown":
        weights["layers.0.mlp.lm_head"] = weights["layers.0.self_attn.q_proj"]
    elif case == "slot":
        slot = 2
    elif case == "shape":
        w = weights["layers.0.self_attn.k_proj"]
        weights["layers.0.self_attn.k_proj"] = LoraWeights(w.a, torch.zeros(48, 2))
    else:
        weights.update(random_adapter(model.config, "3d", 2, seed=8, only="gate_up"))
    with pytest.raises(ValueError):
        model.write_lora_slot(slot, weights)


def test_model_without_slots_refuses_lora_writes(checkpoint):
    model, _ = load_model(checkpoint("qwen3_moe"))
    with pytest.raises(ValueError, match="out of range"):
        model.write_lora_slot(0, {})
