"""Shared by the adapter tests: tiny models with their ModelConfig, and a LoraAdapter folded
into a transformers model (the reader's output in the oracle's terms)."""

from __future__ import annotations

import copy
from functools import lru_cache

import torch

from loramux.engine.config import ModelConfig
from loramux.engine.lora.weights import LoraAdapter
from tests.tiny import tiny_model


@lru_cache(maxsize=None)
def tiny(arch: str, **overrides) -> tuple[torch.nn.Module, ModelConfig]:
    """A tiny transformers model (never mutated by the tests) and the engine's view of it."""
    model = tiny_model(arch, **overrides)
    return model, ModelConfig.from_dict(model.config.to_dict())


def fold_adapter(hf_model, adapter: LoraAdapter):
    """A copy of the model with W += b @ a of every target (scale is already in b)."""
    model = copy.deepcopy(hf_model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, weights in adapter.weights.items():
            delta = weights.b @ weights.a  # [D_out, D_in] or [E, D_out, D_in]
            layer_moe, _, proj = name.rpartition(".")
            if layer_moe.endswith("experts") and proj in ("gate_proj", "up_proj"):
                gate_up = params[f"model.{layer_moe}.gate_up_proj"]
                half = gate_up.shape[1] // 2
                (gate_up[:, :half] if proj == "gate_proj" else gate_up[:, half:]).add_(delta)
            elif layer_moe.endswith("experts"):
                params[f"model.{name}"].add_(delta)
            else:
                params[f"model.{name}.weight"].add_(delta)
    return model


def max_weight_diff(model, other) -> float:
    other_params = dict(other.named_parameters())
    return max((p - other_params[n]).abs().max().item() for n, p in model.named_parameters())


def assert_same_weights(model, expected, atol: float = 1e-5) -> None:
    diff = max_weight_diff(model, expected)
    assert diff <= atol, f"merged weights differ by {diff:.3g} (atol {atol})"
