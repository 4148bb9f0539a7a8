"""One generic MoE decoder for every supported architecture (engine/architectures.py).

They differ only in flags of ModelConfig: q/k norm ("per_head" / "full"), clip_qkv, qkv
bias, a shared expert, dense MLP layers (mlp_only_layers / decoder_sparse_step), top-k
renormalization, tied embeddings and the RoPE theta; hybrids (Qwen3.5, Qwen3-Next) add Gated
DeltaNet layers (layer_types), a gated q_proj, partial RoPE and zero-centred norms. Parameter
names follow the Hugging Face checkpoints (`model.layers.L.self_attn...`), with q/k/v fused into
`qkv_proj`, gate/up into `gate_up_proj`, the GDN input projections into `linear_attn.in_proj`
and the experts into `mlp.experts.w_gate_up` / `w_down` (see loader.py).
"""

from __future__ import annotations

import logging
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from loramux.engine.model.forward import ForwardContext
from loramux.engine.config import ModelConfig
from loramux.engine.lora.weights import LoraWeights
from loramux.engine.memory.specs import MemoryModule
from loramux.engine.model.attention import Attention
from loramux.engine.model.gdn import GatedDeltaNet
from loramux.engine.model.layers import GatedMlp, RMSNorm
from loramux.engine.model.lora_linear import LoraLinear
from loramux.engine.model.moe import MoeExperts, SparseMoe
from loramux.engine.model.parallel import Shard, all_reduce

logger = logging.getLogger(__name__)


class DecoderLayer(nn.Module):
    """Pre-norm token mixer (attention or Gated DeltaNet) then pre-norm MLP (sparse MoE or
    dense), each with a residual.

    The residual stream travels beside the layer outputs (vLLM's layout): each norm is one
    ops.fused_add_rms_norm that first adds the previous sublayer's output to the residual, so a
    layer makes two such calls and the final norm adds the last MLP output.
    """

    def __init__(self, config: ModelConfig, layer: int, **kw) -> None:
        super().__init__()
        self.ops, self.shard = kw["ops"], kw["shard"]
        dtype, device = kw["dtype"], kw["device"]
        eps, H, zero = config.rms_norm_eps, config.hidden_size, config.hybrid
        self.input_layernorm = RMSNorm(H, eps, dtype, device, zero_centred=zero)
        self.is_linear = config.is_linear_attention(layer)
        if self.is_linear:
            self.linear_attn = GatedDeltaNet(config, layer, **kw)
        else:
            self.self_attn = Attention(config, layer, **kw)
        self.post_attention_layernorm = RMSNorm(H, eps, dtype, device, zero_centred=zero)
        if config.is_moe_layer(layer):
            self.mlp = SparseMoe(config, layer, **kw)
        else:
            self.mlp = GatedMlp(H, config.intermediate_size, f"layers.{layer}.mlp.", **kw)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None,
                ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H]: the previous layer's MLP output (the embeddings, with residual None);
        residual [T, H]: the stream before x was added. -> (this layer's MLP output, the
        stream before it), the stream being x + residual of the transformers layer. Under
        tensor parallelism the mixer and the MLP each return a partial sum, completed by one
        all_reduce each."""
        h, residual = self.input_layernorm.add_norm(self.ops, x, residual)
        h = self.linear_attn(h, ctx) if self.is_linear else self.self_attn(h, ctx)
        h, residual = self.post_attention_layernorm.add_norm(self.ops, all_reduce(h, self.shard),
                                                             residual)
        return all_reduce(self.mlp(h, ctx.lora), self.shard), residual


class DecoderModel(nn.Module):
    """Embedding, decoder layers and final norm: `model.*` in the checkpoints."""

    def __init__(self, config: ModelConfig, **kw) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         dtype=kw["dtype"], device=kw["device"])
        self.layers = nn.ModuleList(DecoderLayer(config, i, **kw)
                                    for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, kw["dtype"], kw["device"],
                            zero_centred=config.hybrid)


class MoeForCausalLM(nn.Module):
    """The served model: forward over a step's tokens, logits for chosen rows, KV and LoRA slots.

    Build it with `build_model`, fill it with `load_weights`, then bind every module of
    `memory_modules()` to its memory (engine/memory/specs.py) before the first forward. LoRA
    slot buffers exist only when max_loras > 0.
    """

    def __init__(self, config: ModelConfig, *, ops: ModuleType, max_loras: int, max_rank: int,
                 dtype: torch.dtype, device: torch.device, shard: Shard = Shard()) -> None:
        super().__init__()
        self.config, self.dtype, self.device = config, dtype, device
        self.max_loras, self.max_lora_rank = max_loras, max_rank
        self.shard = shard
        kw = {"ops": ops, "max_loras": max_loras, "max_rank": max_rank, "dtype": dtype,
              "device": device, "shard": shard}
        self.ops = ops
        self.model = DecoderModel(config, **kw)
        if config.tie_word_embeddings:
            self.lm_head = self.model.embed_tokens
        else:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False,
                                     dtype=dtype, device=device)
        self.requires_grad_(False)
        self._lora_modules = [m for m in self.modules() if isinstance(m, (LoraLinear, MoeExperts))]
        self._lora_names = frozenset(config.lora_module_shapes())

    def forward(self, input_ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """input_ids [T] int64 -> final-normed hidden states [T, H]."""
        assert ctx.lora is None or not ctx.lora.has_lora or self.max_loras > 0, \
            "a step uses LoRA slots but the model was built with max_loras=0"
        x, residual = self.model.embed_tokens(input_ids), None
        for layer in self.model.layers:
            x, residual = layer(x, residual, ctx)
        return self.model.norm.add_norm(self.ops, x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, H] -> logits [B, V] float32."""
        return F.linear(hidden, self.lm_head.weight).float()

    def memory_modules(self) -> list[MemoryModule]:
        """The modules with per-sequence memory, in module order (attention's paged KV cache,
        a recurrent layer's state): each declares `memory_spec()` and takes `bind_memory`."""
        return [m for m in self.modules() if callable(getattr(m, "memory_spec", None))]

    def adapter_slot_bytes(self) -> int:
        """Device bytes of one adapter slot over every LoRA-capable module."""
        if not self.max_loras:
            return 0
        return sum(b.numel() * b.element_size() for m in self._lora_modules
                   for b in m.buffers(recurse=False)) // self.max_loras

    def write_lora_slot(self, slot: int, weights: dict[str, LoraWeights]) -> None:
        """Load one adapter's weights (canonical names, scale folded into B) into `slot`.

        Every LoRA-capable module is written: modules the adapter does not target are zeroed.
        Raises ValueError for an unknown module name, a rank above max_lora_rank or a bad shape.
        """
        self._check_slot(slot)
        unknown = sorted(set(weights) - self._lora_names)
        if unknown:
            raise ValueError(f"no LoRA-capable module named {unknown[0]!r} in this model "
                             f"({len(unknown)} unknown names)")
        for module in self._lora_modules:
            module.write_slot(slot, weights)

    def clear_lora_slot(self, slot: int) -> None:
        self._check_slot(slot)
        for module in self._lora_modules:
            module.clear_slot(slot)

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.max_loras:
            raise ValueError(f"LoRA slot {slot} out of range [0, {self.max_loras})")


def build_model(config: ModelConfig, dtype: torch.dtype, device: torch.device, ops: ModuleType,
                max_loras: int = 0, max_lora_rank: int = 0,
                shard: Shard = Shard()) -> MoeForCausalLM:
    """An unloaded model on `device` (weights uninitialized; LoRA slot buffers zeroed).

    ops: the kernels.select_ops(device) module, chosen once here for every layer.
    shard: the part of the weights this rank holds (engine/model/parallel.py).
    """
    if max_loras > 0 and max_lora_rank < 1:
        raise ValueError(f"max_lora_rank must be >= 1 when max_loras > 0, got {max_lora_rank}")
    device = torch.device(device)
    logger.info("building %s: %d layers, %d experts, dtype %s, %d LoRA slots of rank %d",
                config.architecture, config.num_layers, config.num_experts, dtype, max_loras,
                max_lora_rank)
    return MoeForCausalLM(config, ops=ops, max_loras=max_loras, max_rank=max_lora_rank,
                          dtype=dtype, device=device, shard=shard).eval()
