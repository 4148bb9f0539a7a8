"""Self-attention over a paged KV cache (CPU and CUDA).

Each step writes the new tokens' K/V into the cache at `slot_mapping`, then every sequence's
queries (the last q_len positions of a seq_len context) attend over the K/V gathered from its
block table. Decode-only steps (one query per sequence) go to ops.paged_decode_attention,
steps with prefill to ops.paged_prefill_attention (causal masking bottom-right aligned:
prefill, chunked prefill and decode rows alike); each is a Triton kernel or its torch twin.
GQA: query head h reads KV head h // (num_heads // num_kv_heads).
Shape letters: T tokens, N query heads, G KV heads, D head dim, L context length.
"""

from __future__ import annotations

import logging
from types import ModuleType

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from loramux.engine.model.forward import ForwardContext
from loramux.engine.config import ModelConfig
from loramux.engine.memory.specs import PagedKV
from loramux.engine.model.layers import RMSNorm, RotaryEmbedding
from loramux.engine.model.lora_linear import LoraLinear
from loramux.engine.model.parallel import Shard, rows_of

logger = logging.getLogger(__name__)

# cuDNN's SDPA builds an execution plan for every new shape, and decode grows the context by a
# token every step; the flash / memory-efficient kernels need no plan.
_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store k, v [T, G, D] at flat slots [T] of caches [num_blocks, block_size, G, D]."""
    k_cache.view(-1, *k.shape[1:]).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, *v.shape[1:]).index_copy_(0, slot_mapping, v)


class Attention(nn.Module):
    """qkv projection (fused, LoRA-capable), optional q/k RMSNorm and clip, RoPE, paged
    attention, o projection.

    q/k norm: "per_head" (Qwen3-MoE, over D; fused with RoPE in ops.qk_norm_rope) or "full"
    (OLMoE, over all heads before reshape, by ops.fused_add_rms_norm without a residual; RoPE
    alone then).
    Gated (hybrids: Qwen3.5, Qwen3-Next): q_proj gives per head [query (D); gate (D)], the
    q/k norms are zero-centred, and the attention output is multiplied by sigmoid(gate).
    Under tensor parallelism it holds its rank's heads (engine/model/parallel.py) and returns
    o_proj's partial sum; the caller's all_reduce completes it.
    """

    def __init__(self, config: ModelConfig, layer: int, *, ops: ModuleType, max_loras: int,
                 max_rank: int, dtype: torch.dtype, device: torch.device,
                 shard: Shard = Shard()) -> None:
        super().__init__()
        D = self.head_dim = config.head_dim
        heads, kv_heads = shard.part(config.num_heads), shard.kv_heads(config.num_kv_heads)
        self.num_heads, self.num_kv_heads = len(heads), len(kv_heads)  # this rank's
        self.scale = config.head_dim ** -0.5
        self.clip = config.clip_qkv
        self.ops = ops
        self.gated = config.hybrid
        q_out, kv_out = self.num_heads * D, self.num_kv_heads * D
        q_width = 2 * q_out if self.gated else q_out
        p = f"layers.{layer}.self_attn."
        kw = {"ops": ops, "max_loras": max_loras, "max_rank": max_rank, "dtype": dtype,
              "device": device}
        rows = in_cols = None
        if shard.active:  # heads of this rank: rows of q (query and gate per head), k, v
            rows = {p + "q_proj": rows_of(heads, q_width // self.num_heads),
                    p + "k_proj": rows_of(kv_heads, D), p + "v_proj": rows_of(kv_heads, D)}
            in_cols = rows_of(heads, D)
        self.qkv_proj = LoraLinear(
            config.hidden_size,
            ((p + "q_proj", q_width), (p + "k_proj", kv_out), (p + "v_proj", kv_out)),
            bias=config.attention_bias, slice_rows=rows, **kw)
        o_bias = config.attention_bias and config.architecture != "Qwen2MoeForCausalLM"
        self.o_proj = LoraLinear(q_out, ((p + "o_proj", config.hidden_size),), bias=o_bias,
                                 in_cols=in_cols, add_bias=shard.rank == 0, **kw)
        self.qk_norm = config.qk_norm
        if config.qk_norm != "none":
            per_head = config.qk_norm == "per_head"
            q_dim, k_dim = (self.head_dim, self.head_dim) if per_head else (q_out, kv_out)
            norm = {"eps": config.rms_norm_eps, "dtype": dtype, "device": device,
                    "zero_centred": config.hybrid}
            self.q_norm, self.k_norm = RMSNorm(q_dim, **norm), RMSNorm(k_dim, **norm)
        self.rotary = RotaryEmbedding(config.rotary_dim, config.rope_theta, device)
        self.dtype = dtype
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def memory_spec(self) -> PagedKV:
        return PagedKV(self.num_kv_heads, self.head_dim, self.dtype)

    def bind_memory(self, tensors: dict[str, torch.Tensor]) -> None:
        """The paged caches {"k", "v"}, each [num_blocks, block_size, G, D]."""
        self.k_cache, self.v_cache = tensors["k"], tensors["v"]

    def _project(self, x: torch.Tensor, ctx: ForwardContext) -> tuple[torch.Tensor, ...]:
        """x [T, H] -> q [T, N, D], k [T, G, D] (normed, rotated), v [T, G, D], and the output
        gate [T, N*D] (None unless gated)."""
        qkv = self.qkv_proj(x, ctx.lora)
        q, k, v = qkv.split(self.qkv_proj.out_splits, dim=-1)
        gate = None
        if self.gated:
            q, gate = q.view(-1, self.num_heads, 2 * self.head_dim).chunk(2, dim=-1)
            gate = gate.reshape(-1, self.num_heads * self.head_dim)
        if self.qk_norm == "full":
            q, k = (norm.add_norm(self.ops, t, None)[0] for norm, t in
                    ((self.q_norm, q), (self.k_norm, k)))
        if self.clip is not None:
            q, k, v = (t.clamp(-self.clip, self.clip) for t in (q, k, v))
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        per_head = self.qk_norm == "per_head"
        q, k = self.ops.qk_norm_rope(
            q, k, ctx.positions, self.rotary.inv_freq,
            self.q_norm.weight if per_head else None, self.k_norm.weight if per_head else None,
            self.q_norm.eps if per_head else 0.0, per_head and self.q_norm.zero_centred)
        return q, k, v.view(-1, self.num_kv_heads, self.head_dim), gate

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """x [T, H] -> [T, H] (a partial sum under tensor parallelism); writes this step's K/V
        into the bound cache."""
        q, k, v, gate = self._project(x, ctx)
        attn = ctx.attn
        write_kv(self.k_cache, self.v_cache, k, v, attn.slot_mapping)
        with sdpa_kernel(_SDPA_BACKENDS):
            if attn.is_decode:
                out = self.ops.paged_decode_attention(q, self.k_cache, self.v_cache,
                                                      attn.block_tables, attn.seq_lens, self.scale)
            else:
                out = self.ops.paged_prefill_attention(
                    q, self.k_cache, self.v_cache, attn.block_tables, attn.query_start,
                    attn.seq_lens, max(attn.query_lens_host), self.scale)
        out = out.flatten(1)
        if gate is not None:
            out = out * torch.sigmoid(gate)
        return self.o_proj(out, ctx.lora)
