"""A linear layer of fused output slices (q/k/v, gate/up) with per-slot LoRA buffers.

The base weight is one matrix whose output rows are the slices concatenated (weights are
concatenated at load). With S = max_loras > 0 slots of rank R, the layer owns zeroed buffers
    a_slots [S, n*R, D_in]   R-block j holds the A of slice j (rank r <= R, zero-padded)
    b_slots [S, D_out, R]    rows of slice j hold its B (columns [:r])
and adds `ops.lora_delta` to the base output for the tokens whose slot is >= 0.

Tensor parallelism (engine/model/parallel.py) reuses the layer for either half of a pair:
column-parallel (qkv, gate_up) holds some output rows of each slice, given as `slice_rows` and
slice widths (A replicated, B rows gathered like the base rows); row-parallel (o_proj,
down_proj) holds the input columns `in_cols` of the weight and of A (B replicated), so its
output, LoRA delta included, is a partial sum that the caller's all_reduce completes; the bias
is added by one rank only (`add_bias`).
"""

from __future__ import annotations

import logging
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from loramux.engine.lora.weights import LoraWeights
from loramux.kernels import LoraMeta

logger = logging.getLogger(__name__)


def empty_param(*shape: int, dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    """An uninitialized inference-only parameter (the loader fills it)."""
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


def check_rank(name: str, weights: LoraWeights, max_rank: int) -> int:
    """The adapter rank of one module; raises ValueError above the slot rank R."""
    rank = weights.rank
    if rank > max_rank:
        raise ValueError(f"LoRA rank {rank} of {name} exceeds max_lora_rank {max_rank}")
    return rank


def copy_into(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    """dst.copy_(src) after checking shapes; casts to dst's dtype and device."""
    if dst.shape != src.shape:
        raise ValueError(f"LoRA tensor of {name} has shape {tuple(src.shape)}, "
                         f"expected {tuple(dst.shape)}")
    dst.copy_(src)


class LoraLinear(nn.Module):
    """y = x @ W.T + bias, plus each token's slot LoRA delta.

    Shape: weight [D_out, D_in], bias [D_out]; D_out = sum of slice widths.
    slices: (canonical LoRA name, width) of each output slice, in row order, for example
    (("layers.0.self_attn.q_proj", 64), ("layers.0.self_attn.k_proj", 32), ...).
    slice_rows: for a slice whose rows we hold in another order than the checkpoint (Qwen3-Next's
    head-grouped projections), the gather ours[j] = checkpoint[rows[j]]; applied to base weights
    at load and to adapter B rows here.
    split_gemm: one GEMM per slice, as the checkpoint's separate linears compute it. The Gated
    DeltaNet projections use it: a fused GEMM's other blocking changes the last bits in fp32,
    which the recurrence amplifies past the 1e-4 logit agreement with transformers.
    in_cols: the checkpoint's input columns this layer holds (row-parallel), D_in of them.
    add_bias: False on all ranks but one of a row-parallel layer (the bias is summed once).
    """

    def __init__(self, d_in: int, slices: tuple[tuple[str, int], ...], *, bias: bool,
                 ops: ModuleType, max_loras: int, max_rank: int, dtype: torch.dtype,
                 device: torch.device, slice_rows: dict[str, torch.Tensor] | None = None,
                 split_gemm: bool = False, in_cols: torch.Tensor | None = None,
                 add_bias: bool = True) -> None:
        super().__init__()
        self.slice_rows, self.split_gemm = slice_rows or {}, split_gemm
        self.in_cols, self.add_bias = in_cols, add_bias
        self.slice_names = tuple(name for name, _ in slices)
        self.out_splits = tuple(width for _, width in slices)
        d_out = sum(self.out_splits)
        self.weight = empty_param(d_out, d_in, dtype=dtype, device=device)
        self.bias = empty_param(d_out, dtype=dtype, device=device) if bias else None
        self.ops = ops
        self.max_rank = max_rank
        if max_loras > 0:
            n = len(slices)
            self.register_buffer("a_slots", torch.zeros(
                max_loras, n * max_rank, d_in, dtype=dtype, device=device), persistent=False)
            self.register_buffer("b_slots", torch.zeros(
                max_loras, d_out, max_rank, dtype=dtype, device=device), persistent=False)

    def forward(self, x: torch.Tensor, lora: LoraMeta | None) -> torch.Tensor:
        """x [T, D_in] -> [T, D_out]."""
        bias = self.bias if self.add_bias else None
        if self.split_gemm:
            biases = (None,) * len(self.out_splits) if bias is None else \
                bias.split(self.out_splits)
            y = torch.cat([F.linear(x, w, b) for w, b in
                           zip(self.weight.split(self.out_splits), biases)], dim=-1)
        else:
            y = F.linear(x, self.weight, bias)
        if lora is not None and lora.has_lora:
            self.ops.lora_delta(y, x, self.a_slots, self.b_slots, lora, self.out_splits)
        return y

    def clear_slot(self, slot: int) -> None:
        self.a_slots[slot].zero_()
        self.b_slots[slot].zero_()

    def write_slot(self, slot: int, weights: dict[str, LoraWeights]) -> None:
        """Copy the slices this adapter targets into `slot`; the other slices are zeroed."""
        self.clear_slot(slot)
        start = 0
        for j, (name, width) in enumerate(zip(self.slice_names, self.out_splits)):
            w = weights.get(name)
            if w is not None:
                r = check_rank(name, w, self.max_rank)
                block = j * self.max_rank
                a = w.a if self.in_cols is None else w.a[:, self.in_cols]
                copy_into(self.a_slots[slot, block:block + r], a, name)
                b = w.b[self.slice_rows[name]] if name in self.slice_rows else w.b
                copy_into(self.b_slots[slot, start:start + width, :r], b, name)
            start += width
