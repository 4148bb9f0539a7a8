"""One A for gate and up: 2D expert LoRA whose gate and up A are the same tensor, stored once.

Megatron's per-expert linear_fc1 LoRA has a single A for the fused gate/up projection; its HF
exports (ms-swift / mcore-bridge, Megatron-Bridge) copy that A into both `gate_proj.lora_A` and
`up_proj.lora_A` of every expert. Such a pair is exactly a 3D-form gate_up LoRA (one A, B rows
[:I] gate and [I:] up), which the MoE slot holds with one shrink instead of two. The adapter's
expert layout stays what its files are ("2d"): only its storage changes.
"""

from __future__ import annotations

import torch

from loramux.engine.lora.weights import LoraWeights

_GATE, _UP, _FUSED = ".experts.gate_proj", ".experts.up_proj", ".experts.gate_up_proj"


def share_gate_up_a(weights: dict[str, LoraWeights]) -> tuple[dict[str, LoraWeights], int]:
    """Merge each layer's 2D gate/up LoRA whose A are identical (every expert, same rank) into
    one gate_up LoRA; returns the weights and how many layers were merged."""
    out, merged = dict(weights), 0
    for name, gate in weights.items():
        if not name.endswith(_GATE):
            continue
        layer = name.removesuffix(_GATE)
        up = weights.get(layer + _UP)
        if up is None or up.a.shape != gate.a.shape or not torch.equal(up.a, gate.a):
            continue
        del out[name], out[layer + _UP]
        out[layer + _FUSED] = LoraWeights(a=gate.a, b=torch.cat((gate.b, up.b), dim=1))
        merged += 1
    return out, merged
