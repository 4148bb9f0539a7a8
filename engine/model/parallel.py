"""Which part of the weights one rank holds (tensor / expert parallelism), and the all_reduce
that sums the ranks' partial outputs.

With N ranks (tensor_parallel_size), rank r holds the r-th contiguous part of:
    attention heads (query heads; KV heads too, or one KV head shared by N/G ranks when G < N)
    the intermediate dim of dense and shared-expert MLPs
    routed experts: their intermediate dim (TP), or whole experts by id (EP)
Column-parallel layers (qkv, gate_up) hold their part of the output rows, row-parallel ones
(o_proj, down_proj) the matching input columns, so each rank's output of a block is a partial
sum that one all_reduce per block completes. Embedding, lm_head, norms and routers are
replicated. The world is the default torch.distributed group (engine/worker/parallel.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from loramux.engine.config import ModelConfig


@dataclass(frozen=True, slots=True)
class Shard:
    rank: int = 0
    size: int = 1
    expert_parallel: bool = False

    @property
    def active(self) -> bool:
        return self.size > 1

    def part(self, n: int) -> torch.Tensor:
        """This rank's indices of n items split evenly (n % size == 0, checked at start-up)."""
        k = n // self.size
        return torch.arange(self.rank * k, (self.rank + 1) * k)

    def kv_heads(self, num_kv_heads: int) -> torch.Tensor:
        """This rank's KV heads: its part, or the one KV head its query heads read when there
        are fewer KV heads than ranks (size % num_kv_heads == 0: replicated on size / G ranks)."""
        if num_kv_heads >= self.size:
            return self.part(num_kv_heads)
        return torch.tensor([self.rank * num_kv_heads // self.size])

    def experts(self, num_experts: int) -> torch.Tensor:
        """The routed experts this rank computes: all (TP), or its part by id (EP)."""
        return self.part(num_experts) if self.expert_parallel else torch.arange(num_experts)

    def expert_inter(self, inter: int) -> torch.Tensor:
        """The expert intermediate indices this rank holds: its part (TP), or all (EP)."""
        return torch.arange(inter) if self.expert_parallel else self.part(inter)


def rows_of(units: torch.Tensor, width: int, offset: int = 0) -> torch.Tensor:
    """The rows of units (heads, ...) of `width` rows each, in a tensor whose first unit starts
    at row `offset`: [offset + u * width + j for u in units for j < width]."""
    return (offset + units[:, None] * width + torch.arange(width)[None, :]).flatten()


_reduces = 0  # all_reduce calls made by this process (a rank), for the shard report


def all_reduce(x: torch.Tensor, shard: Shard) -> torch.Tensor:
    """Sum x over the ranks in place (nothing with one rank); returns x."""
    global _reduces
    if shard.active:
        dist.all_reduce(x)
        _reduces += 1
    return x


def reduce_count() -> int:
    return _reduces


def check_shardable(config: ModelConfig, size: int, expert_parallel: bool) -> None:
    """Raise ValueError naming the first dimension `size` ranks cannot split evenly."""
    if size == 1:
        return
    if config.qk_norm == "full":
        raise ValueError(f"{config.architecture} normalizes q and k over all heads at once; "
                         "tensor parallelism does not split that norm (use -tp 1)")
    G = config.num_kv_heads
    dims = [("num_attention_heads", config.num_heads)]
    if G >= size or size % G:
        dims.append(("num_key_value_heads", G))
    if config.num_experts:
        dims.append(("num_experts (expert parallelism)", config.num_experts) if expert_parallel
                    else ("moe_intermediate_size", config.moe_intermediate_size))
        if config.shared_expert_intermediate_size:
            dims.append(("shared_expert_intermediate_size",
                         config.shared_expert_intermediate_size))
    if any(not config.is_moe_layer(i) for i in range(config.num_layers)):
        dims.append(("intermediate_size", config.intermediate_size))
    if (la := config.linear_attention) is not None:
        dims += [("linear_num_key_heads", la.num_key_heads),
                 ("linear_num_value_heads", la.num_value_heads)]
    for name, n in dims:
        if n % size:
            raise ValueError(f"tensor_parallel_size {size} does not divide {config.architecture}"
                             f"'s {name} ({n})" + (f"; with {G} KV heads it must also be a "
                                                  "multiple of them" if name.startswith(
                                                      "num_key_value") else ""))
