"""Gated DeltaNet linear attention (the "linear_attention" layers of Qwen3.5-MoE and Qwen3-Next).

Per token: one fused LoRA-capable projection gives qkv (C = 2*Kd + Vd channels), z [Vd], b and
a [HV]; qkv goes through a depthwise causal conv (K taps, SiLU) and splits into q, k [HK, Dk] and
v [HV, Dv]; beta = sigmoid(b), g = -exp(A_log) * softplus(a + dt_bias) (log decay, float32);
ops.gated_delta_rule runs the recurrence; the output is RMSNormGated(o, z) per value head, then
out_proj. Each sequence keeps a fixed state: the conv window [C, K-1] (model dtype) and the
recurrent state [HV, Dk, Dv] (mamba_ssm_dtype, float32 in the released models).

Projection rows are held as [q | k | v | z | b | a], each over heads in order. Qwen3.5 stores them
that way in four tensors (in_proj_qkv, in_proj_z, in_proj_b, in_proj_a). Qwen3-Next stores two,
grouped per key head: in_proj_qkvz rows [q_g, k_g, v_g, z_g] for each key head g (v_g, z_g
covering its HV/HK value heads) and in_proj_ba rows [b_g, a_g]; `grouped_rows` gives the row
gather that un-groups them, applied to the base weights at load and to each adapter's B.
"""

from __future__ import annotations

import dataclasses
import logging
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from loramux.engine.architectures import LinearAttention
from loramux.engine.model.forward import ForwardContext
from loramux.engine.config import ModelConfig, parse_dtype
from loramux.engine.memory.specs import StateSpec, StateTensor
from loramux.engine.model.layers import GatedRMSNorm
from loramux.engine.model.lora_linear import LoraLinear, empty_param
from loramux.engine.model.parallel import Shard, rows_of
from loramux.kernels import LoraMeta

logger = logging.getLogger(__name__)

STATE_KIND = "gated_deltanet"  # one slot pool for every GDN layer of the model


def grouped_rows(la: LinearAttention) -> tuple[torch.Tensor, torch.Tensor]:
    """Row gathers (ours[j] = disk[rows[j]]) of Qwen3-Next's in_proj_qkvz and in_proj_ba."""
    groups, per = la.num_key_heads, la.num_value_heads // la.num_key_heads
    dk, dv = la.key_head_dim, la.value_head_dim
    qkvz = torch.arange(la.conv_dim + la.value_dim).view(groups, 2 * dk + 2 * per * dv)
    parts = qkvz.split((dk, dk, per * dv, per * dv), dim=1)
    ba = torch.arange(2 * la.num_value_heads).view(groups, 2 * per).split((per, per), dim=1)
    return torch.cat([p.flatten() for p in parts]), torch.cat([p.flatten() for p in ba])


class CausalConv(nn.Module):
    """The depthwise conv's weight, [C, 1, K] as checkpoints store it (no bias); under tensor
    parallelism the channels `shard_rows` of the checkpoint's."""

    def __init__(self, channels: int, taps: int, dtype: torch.dtype, device: torch.device,
                 rows: torch.Tensor | None = None) -> None:
        super().__init__()
        self.weight = empty_param(channels, 1, taps, dtype=dtype, device=device)
        self.shard_rows = {} if rows is None else {"weight": rows}


def shard_rows(la: LinearAttention, shard: Shard) -> dict[str, torch.Tensor]:
    """This rank's rows of each projection (its key heads' q and k, its value heads' v, z, b, a),
    as row gathers from the checkpoint's tensors; "qkv" is also the conv's channels."""
    kh, vh = shard.part(la.num_key_heads), shard.part(la.num_value_heads)
    dk, dv, HV = la.key_head_dim, la.value_head_dim, la.num_value_heads
    qkv = torch.cat([rows_of(kh, dk), rows_of(kh, dk, la.key_dim),
                     rows_of(vh, dv, 2 * la.key_dim)])
    z = rows_of(vh, dv)
    if la.projection == "split":
        return {"qkv": qkv, "in_proj_qkv": qkv, "in_proj_z": z, "in_proj_b": vh,
                "in_proj_a": vh, "heads": vh}
    qkvz, ba = grouped_rows(la)  # un-grouped order [q | k | v | z], [b | a]
    return {"qkv": qkv, "in_proj_qkvz": qkvz[torch.cat([qkv, la.conv_dim + z])],
            "in_proj_ba": ba[torch.cat([vh, HV + vh])], "heads": vh}


class GatedDeltaNet(nn.Module):
    """One Gated DeltaNet layer; `mix` runs a step's tokens from given states. Under tensor
    parallelism it holds its rank's key and value heads (projection rows, conv channels,
    dt_bias / A_log, states; out_proj row-parallel) and returns a partial sum."""

    def __init__(self, config: ModelConfig, layer: int, *, ops: ModuleType, max_loras: int,
                 max_rank: int, dtype: torch.dtype, device: torch.device,
                 shard: Shard = Shard()) -> None:
        super().__init__()
        full = config.linear_attention
        la = dataclasses.replace(full, num_key_heads=full.num_key_heads // shard.size,
                                 num_value_heads=full.num_value_heads // shard.size)
        self.la, self.ops = la, ops  # this rank's heads
        H, HV, Vd = config.hidden_size, la.num_value_heads, la.value_dim
        p = f"layers.{layer}.linear_attn."
        kw = {"bias": False, "ops": ops, "max_loras": max_loras, "max_rank": max_rank,
              "dtype": dtype, "device": device}
        picked = shard_rows(full, shard) if shard.active else {}
        if la.projection == "grouped":
            slices = ((p + "in_proj_qkvz", la.conv_dim + Vd), (p + "in_proj_ba", 2 * HV))
            rows = dict(zip((name for name, _ in slices), grouped_rows(la)))
        else:
            slices = ((p + "in_proj_qkv", la.conv_dim), (p + "in_proj_z", Vd),
                      (p + "in_proj_b", HV), (p + "in_proj_a", HV))
            rows = None
        if picked:
            rows = {name: picked[name.rsplit(".", 1)[1]] for name, _ in slices}
        self.in_proj = LoraLinear(H, slices, slice_rows=rows, split_gemm=True, **kw)
        self.conv1d = CausalConv(la.conv_dim, la.conv_kernel, dtype, device, picked.get("qkv"))
        self.dt_bias = empty_param(HV, dtype=dtype, device=device)
        self.A_log = empty_param(HV, dtype=dtype, device=device)
        self.shard_rows = {"dt_bias": picked["heads"], "A_log": picked["heads"]} if picked \
            else {}
        self.norm = GatedRMSNorm(la.value_head_dim, config.rms_norm_eps, dtype, device)
        self.out_proj = LoraLinear(Vd, ((p + "out_proj", H),),
                                   in_cols=rows_of(picked["heads"], la.value_head_dim)
                                   if picked else None, **kw)
        self.dtype = dtype
        self.conv_state: torch.Tensor | None = None  # [num_slots + 1, C, K-1]
        self.recurrent_state: torch.Tensor | None = None  # [num_slots + 1, HV, Dk, Dv]

    def memory_spec(self) -> StateSpec:
        """Per sequence: the conv window (model dtype) and the recurrent state
        (mamba_ssm_dtype), whatever the sequence's length."""
        la = self.la
        return StateSpec(STATE_KIND, (
            StateTensor("conv", (la.conv_dim, la.conv_kernel - 1), self.dtype),
            StateTensor("recurrent", (la.num_value_heads, la.key_head_dim, la.value_head_dim),
                        parse_dtype(la.state_dtype))))

    def bind_memory(self, tensors: dict[str, torch.Tensor]) -> None:
        """This layer's state tensors {"conv", "recurrent"}, one row per state slot."""
        self.conv_state, self.recurrent_state = tensors["conv"], tensors["recurrent"]

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """x [T, H] -> [T, H]: reads each sequence's state slot (zeros for a fresh sequence),
        runs `mix` and writes the new states back."""
        meta, attn = ctx.states[STATE_KIND], ctx.attn
        slots = meta.slots.long()
        conv, recurrent = self.conv_state[slots], self.recurrent_state[slots]
        fresh = [i for i, is_fresh in enumerate(meta.fresh_host) if is_fresh]
        if fresh:
            conv[fresh], recurrent[fresh] = 0, 0
        out, conv, recurrent = self.mix(x, ctx.lora, conv, recurrent, attn.query_start,
                                        attn.query_lens_host)
        self.conv_state.index_copy_(0, slots, conv.to(self.conv_state.dtype))
        self.recurrent_state.index_copy_(0, slots, recurrent.to(self.recurrent_state.dtype))
        return out

    def mix(self, x: torch.Tensor, lora: LoraMeta | None, conv_state: torch.Tensor,
            recurrent_state: torch.Tensor, query_start: torch.Tensor,
            query_lens: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, H], the tokens of N sequences in order (lengths query_lens, offsets
        query_start [N+1]), each resuming from conv_state [N, C, K-1] and recurrent_state
        [N, HV, Dk, Dv] (zeros for a new sequence) -> (out [T, H], new conv, new recurrent)."""
        la, T = self.la, x.shape[0]
        HV = la.num_value_heads
        mixed, z, b, a = self.in_proj(x, lora).split((la.conv_dim, la.value_dim, HV, HV), -1)
        mixed, conv_state = self.ops.causal_conv1d(mixed, self.conv1d.weight[:, 0], conv_state,
                                                   query_start, query_lens)
        q, k, v = mixed.split((la.key_dim, la.key_dim, la.value_dim), dim=-1)
        q = q.reshape(T, la.num_key_heads, la.key_head_dim)
        k = k.reshape(T, la.num_key_heads, la.key_head_dim)
        v = v.reshape(T, HV, la.value_head_dim)
        beta = b.sigmoid()
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)
        out, recurrent_state = self.ops.gated_delta_rule(q, k, v, g, beta, recurrent_state,
                                                         query_start, query_lens)
        out = self.norm(out, z.reshape(T, HV, la.value_head_dim)).reshape(T, la.value_dim)
        return self.out_proj(out, lora), conv_state, recurrent_state
