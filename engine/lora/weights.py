"""The normalized, format-independent form of a loaded adapter, as slots consume it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from loramux.engine.lora.files import Fingerprint

ExpertLayout = Literal["2d", "3d"]


@dataclass
class LoraWeights:
    """One target module's LoRA with its scale already folded into B.

    Dense module:   a [r, D_in],    b [D_out, r]      delta W = b @ a
    Expert module:  a [E, r, D_in], b [E, D_out, r]   delta W_e = b[e] @ a[e]
    Canonical names (engine.config.ModelConfig.lora_module_shapes):
      layers.L.self_attn.{q,k,v,o}_proj, layers.L.mlp.{gate,up,down}_proj (dense MLP),
      layers.L.mlp.shared_expert.{gate,up,down}_proj,
      layers.L.mlp.experts.{gate,up,down}_proj (2D), layers.L.mlp.experts.gate_up_proj (3D:
      one A shared by gate and up, B rows [:I] gate and [I:] up), layers.L.mlp.experts.down_proj.
    """

    a: torch.Tensor
    b: torch.Tensor

    @property
    def rank(self) -> int:
        return self.a.shape[-2]


@dataclass
class LoraAdapter:
    """An adapter read from disk and checked against the model, held in CPU memory."""

    name: str
    path: str
    weights: dict[str, LoraWeights]
    expert_layout: ExpertLayout | None  # None: the adapter has no expert LoRA
    rank: int  # the largest rank of any module
    meta: dict = field(default_factory=dict)  # peft_version, target_modules... for logs
    fingerprint: Fingerprint = ()  # the files read (engine.lora.files), checked on re-reads

    @property
    def num_bytes(self) -> int:
        return sum(w.a.numel() * w.a.element_size() + w.b.numel() * w.b.element_size()
                   for w in self.weights.values())
