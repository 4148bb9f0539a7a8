"""The sparse MoE block: router, routed experts (with MoE-LoRA slots), optional shared expert.

Experts hold w_gate_up [E, 2I, H] (gate rows then up rows) and w_down [E, H, I] whatever the
disk layout. Their LoRA slot buffers follow kernels.MoeLora: a 2D adapter (one A/B per expert
per projection) puts gate A in R-block 0 and up A in R-block 1 (up_block = 1); a 3D adapter
(one A shared by gate and up) puts it in R-block 0 (up_block = 0). B rows [:I] are gate, [I:] up.
Shape letters: T tokens, H hidden, E experts, K top-k, I expert intermediate, S slots, R rank.
"""

from __future__ import annotations

import logging
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from loramux.engine.config import ModelConfig
from loramux.engine.lora.weights import LoraWeights
from loramux.engine.model.layers import GatedMlp
from loramux.engine.model.lora_linear import check_rank, copy_into, empty_param
from loramux.engine.model.parallel import Shard
from loramux.kernels import LoraMeta, MoeLora

logger = logging.getLogger(__name__)


def _moe_lora_buffers(num_slots: int, num_experts: int, hidden: int, inter: int, rank: int,
                      dtype: torch.dtype, device: torch.device) -> MoeLora:
    """Zeroed MoE-LoRA slot buffers (see kernels.MoeLora for the layout)."""
    def zeros(*shape: int) -> torch.Tensor:
        return torch.zeros(num_slots, num_experts, *shape, dtype=dtype, device=device)
    up_block = torch.zeros(num_slots, dtype=torch.int32, device=device)
    return MoeLora(zeros(2 * rank, hidden), zeros(2 * inter, rank), up_block,
                   zeros(rank, inter), zeros(hidden, rank))


class MoeExperts(nn.Module):
    """E SiLU-gated experts applied through ops.fused_experts, with MoE-LoRA slots.

    prefix: canonical LoRA prefix "layers.L.mlp.experts.".
    Under tensor parallelism (engine/model/parallel.py) it holds `expert_ids` (all, or with
    expert parallelism this rank's part) and `inter_ids` of each (its part of I under TP, all
    under EP), base weights and slot buffers alike: w_gate_up [E_r, 2I_r, H], w_down
    [E_r, H, I_r], B of gate_up and A of down cut like them. Its output is a partial sum: the
    caller's all_reduce adds the other ranks' intermediate parts or experts. With expert
    parallelism a pair whose expert another rank holds is routed to -1, which fused_experts
    skips (it contributes zero here).
    """

    def __init__(self, num_experts: int, hidden: int, inter: int, prefix: str, *,
                 ops: ModuleType, max_loras: int, max_rank: int, dtype: torch.dtype,
                 device: torch.device, shard: Shard = Shard()) -> None:
        super().__init__()
        self.expert_ids, self.inter_ids = shard.experts(num_experts), shard.expert_inter(inter)
        self.num_experts, self.full_inter, self.inter = num_experts, inter, len(self.inter_ids)
        self.gate_up_ids = torch.cat([self.inter_ids, inter + self.inter_ids])  # rows of 2I
        self.expert_parallel = shard.expert_parallel and shard.active
        self.prefix, self.max_rank = prefix, max_rank
        E = len(self.expert_ids)
        self.w_gate_up = empty_param(E, 2 * self.inter, hidden, dtype=dtype, device=device)
        self.w_down = empty_param(E, hidden, self.inter, dtype=dtype, device=device)
        self.ops = ops
        self.lora: MoeLora | None = None
        if max_loras > 0:
            self.lora = _moe_lora_buffers(max_loras, E, hidden, self.inter, max_rank,
                                          dtype, device)
            for name, buffer in self.lora._asdict().items():
                self.register_buffer(name, buffer, persistent=False)

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                lora: LoraMeta | None) -> torch.Tensor:
        """x [T, H], topk_weights [T, K], topk_ids [T, K] (global expert ids) -> [T, H]."""
        if self.expert_parallel:
            local = topk_ids - int(self.expert_ids[0])
            held = (local >= 0) & (local < self.w_down.shape[0])
            topk_ids = torch.where(held, local, -1)
        return self.ops.fused_experts(x, self.w_gate_up, self.w_down, topk_weights, topk_ids,
                                      self.lora, lora)

    def clear_slot(self, slot: int) -> None:
        for buffer in self.lora:
            buffer[slot].zero_()

    def _held(self, t: torch.Tensor, dim: int, ids: torch.Tensor) -> torch.Tensor:
        """An adapter tensor [E, ...] cut to this rank's experts and, along dim, to ids."""
        return t[self.expert_ids].index_select(dim, ids)

    def write_slot(self, slot: int, weights: dict[str, LoraWeights]) -> None:
        """Copy this layer's expert LoRA (2D or 3D) into `slot`; absent parts are zero."""
        self.clear_slot(slot)
        p = self.prefix
        fused = weights.get(p + "gate_up_proj")
        gate, up = weights.get(p + "gate_proj"), weights.get(p + "up_proj")
        if fused is not None and (gate is not None or up is not None):
            raise ValueError(f"{p}gate_up_proj (3D) cannot be combined with 2D gate/up LoRA")
        if fused is not None:
            self._write_gate_up(slot, p + "gate_up_proj", fused, 0, slice(None),
                                self.gate_up_ids)
        else:
            self.lora.up_block[slot] = 1
            for name, w, block, rows in ((p + "gate_proj", gate, 0, slice(0, self.inter)),
                                         (p + "up_proj", up, 1, slice(self.inter, None))):
                if w is not None:
                    self._write_gate_up(slot, name, w, block, rows, self.inter_ids)
        down = weights.get(p + "down_proj")
        if down is not None:
            r = check_rank(p + "down_proj", down, self.max_rank)
            copy_into(self.lora.a_down[slot, :, :r], self._held(down.a, 2, self.inter_ids),
                      p + "down_proj")
            copy_into(self.lora.b_down[slot, :, :, :r], down.b[self.expert_ids],
                      p + "down_proj")

    def _write_gate_up(self, slot: int, name: str, w: LoraWeights, block: int,
                       rows: slice, src_rows: torch.Tensor) -> None:
        """A [E, r, H] into R-block `block` of a_gate_up; B [E, n, r] rows `src_rows` into
        `rows` of b_gate_up (this rank's experts only)."""
        r = check_rank(name, w, self.max_rank)
        start = block * self.max_rank
        copy_into(self.lora.a_gate_up[slot, :, start:start + r], w.a[self.expert_ids], name)
        copy_into(self.lora.b_gate_up[slot, :, rows, :r], self._held(w.b, 1, src_rows), name)


class SparseMoe(nn.Module):
    """Router + routed experts (+ Qwen2-MoE's shared expert behind a sigmoid gate). Under
    tensor parallelism the router is replicated and the output is a partial sum (experts and
    shared expert alike), completed by the caller's one all_reduce."""

    def __init__(self, config: ModelConfig, layer: int, *, ops: ModuleType, max_loras: int,
                 max_rank: int, dtype: torch.dtype, device: torch.device,
                 shard: Shard = Shard()) -> None:
        super().__init__()
        H, E = config.hidden_size, config.num_experts
        kw = {"ops": ops, "max_loras": max_loras, "max_rank": max_rank, "dtype": dtype,
              "device": device, "shard": shard}
        self.top_k, self.renormalize = config.top_k, config.norm_topk_prob
        self.ops = ops
        self.gate = nn.Linear(H, E, bias=False, dtype=dtype, device=device).requires_grad_(False)
        self.experts = MoeExperts(E, H, config.moe_intermediate_size,
                                  f"layers.{layer}.mlp.experts.", **kw)
        self.shared_expert: GatedMlp | None = None
        if config.shared_expert_intermediate_size:
            self.shared_expert = GatedMlp(H, config.shared_expert_intermediate_size,
                                          f"layers.{layer}.mlp.shared_expert.", **kw)
            self.shared_expert_gate = nn.Linear(H, 1, bias=False, dtype=dtype,
                                                device=device).requires_grad_(False)

    def forward(self, x: torch.Tensor, lora: LoraMeta | None) -> torch.Tensor:
        """x [T, H] -> [T, H] (a partial sum under tensor parallelism)."""
        topk_weights, topk_ids = self.ops.route(self.gate(x), self.top_k, self.renormalize,
                                                x.dtype)
        out = self.experts(x, topk_weights, topk_ids, lora)
        if self.shared_expert is not None:
            shared = self.shared_expert(x, lora)
            out = out + F.sigmoid(self.shared_expert_gate(x)) * shared
        return out
