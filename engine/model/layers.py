"""Small building blocks shared by the decoder: RMSNorms, rotary embedding, gated MLP.

Shape letters: T tokens, H hidden, D head dim, I intermediate size.
"""

from __future__ import annotations

import logging
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from loramux.engine.model.lora_linear import LoraLinear, empty_param
from loramux.engine.model.parallel import Shard
from loramux.kernels import LoraMeta, reference

logger = logging.getLogger(__name__)


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dim, computed in float32 (transformers' order;
    kernels.reference.rms_norm).

    zero_centred (Qwen3.5, Qwen3-Next): x / rms(x) * (1 + weight), the product in float32; the
    checkpoints store weights around 0, so loading them into the plain form would be wrong.
    """

    def __init__(self, dim: int, eps: float, dtype: torch.dtype, device: torch.device,
                 zero_centred: bool = False) -> None:
        super().__init__()
        self.weight = empty_param(dim, dtype=dtype, device=device)
        self.eps, self.zero_centred = eps, zero_centred

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., dim] -> [..., dim] in x's dtype."""
        return reference.rms_norm(x, self.weight, self.eps, self.zero_centred)

    def add_norm(self, ops: ModuleType, x: torch.Tensor,
                 residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """ops.fused_add_rms_norm: x [T, dim] (+ residual) -> (normed, new residual)."""
        return ops.fused_add_rms_norm(x, residual, self.weight, self.eps, self.zero_centred)


class GatedRMSNorm(RMSNorm):
    """weight * rmsnorm(x) * silu(z) (Gated DeltaNet's output norm, weights around 1)."""

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """x, z [..., dim] -> [..., dim] in x's dtype."""
        return (super().forward(x) * F.silu(z.float())).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Default RoPE (no scaling) over the first `dim` dims of a head (all of them, or a
    partial_rotary_factor of them): inv_freq[i] = theta ** (-2i / dim), applied by
    ops.qk_norm_rope from each token's position."""

    def __init__(self, dim: int, theta: float, device: torch.device) -> None:
        super().__init__()
        exponent = torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim
        self.register_buffer("inv_freq", 1.0 / (theta ** exponent), persistent=False)


class GatedMlp(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up fused into one LoRA-capable linear.

    prefix: canonical LoRA prefix, "layers.L.mlp." (dense) or "layers.L.mlp.shared_expert.".
    Under tensor parallelism it holds its rank's part of the intermediate dim (gate_up
    column-parallel, down row-parallel) and returns a partial sum (the caller reduces).
    """

    def __init__(self, hidden: int, inter: int, prefix: str, *, ops: ModuleType,
                 max_loras: int, max_rank: int, dtype: torch.dtype,
                 device: torch.device, shard: Shard = Shard()) -> None:
        super().__init__()
        kw = {"bias": False, "ops": ops, "max_loras": max_loras, "max_rank": max_rank,
              "dtype": dtype, "device": device}
        self.ops = ops
        part = shard.part(inter) if shard.active else None
        self.inter = inter // shard.size
        rows = None if part is None else {prefix + "gate_proj": part, prefix + "up_proj": part}
        self.gate_up_proj = LoraLinear(
            hidden, ((prefix + "gate_proj", self.inter), (prefix + "up_proj", self.inter)),
            slice_rows=rows, **kw)
        self.down_proj = LoraLinear(self.inter, ((prefix + "down_proj", hidden),),
                                    in_cols=part, **kw)

    def forward(self, x: torch.Tensor, lora: LoraMeta | None) -> torch.Tensor:
        """x [T, H] -> [T, H] (a partial sum under tensor parallelism)."""
        gate_up = self.gate_up_proj(x, lora)  # [T, 2I]
        return self.down_proj(self.ops.silu_and_mul(gate_up), lora)
