"""PEFT tensor keys and config patterns -> loramux's canonical LoRA target names.

Key forms (after the PEFT prefix `base_model.model.` and the model's own `model.`, or
`model.language_model.` / `language_model.model.` of ConditionalGeneration models):
  dense       layers.L.self_attn.q_proj.lora_A.weight             -> layers.L.self_attn.q_proj
  2D expert   layers.L.mlp.experts.e.gate_proj.lora_A.weight       -> layers.L.mlp.experts.gate_proj
              layers.L.block_sparse_moe.experts.e.w1.lora_A.weight (Mixtral: w1/w3/w2 gate/up/down)
  3D named    layers.L.mlp.experts.gate_up_proj.lora_A.weight      (Megatron-Bridge; folded as PEFT,
              or stacked: lora_A [E, r, in], lora_B [E, out, r])
  3D by depth layers.L.mlp.experts(.base_layer)*.lora_A.weight     (PEFT target_parameters: one
              nested wrapper per targeted parameter, so the key names a depth, not a parameter;
              Megatron-Bridge's stack_3d_moe writes them stacked: lora_B [out, r, E])
`.base_layer` segments anywhere else in a module path are dropped (some exporters keep them).
Also: adapter_config.json (read_config, LoraHyper), pair_up, and the 3D fold (unfold_fused).
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Literal

import torch

from loramux.engine.errors import AdapterLoadError
from loramux.engine.lora.validate import check_scale, is_number, is_rank

logger = logging.getLogger(__name__)

KeyKind = Literal["dense", "expert", "fused", "positional"]
Patterns = tuple[tuple[re.Pattern, float], ...]  # compiled rank_pattern / alpha_pattern

# Fused expert parameters in registration order on every supported experts module (transformers
# 5): PEFT wraps targeted parameters in this order, the first one innermost.
FUSED_PARAMS = ("gate_up_proj", "down_proj")
CONFIG_MAX_BYTES = 1 << 20  # adapter_config.json cap (PEFT writes a few KB)

_MIXTRAL_PROJ = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<path>.+)\.lora_(?P<part>[AB])\.weight$")
_BASE_LAYER = re.compile(r"\.base_layer(?=\.|$)")
_TRAILING_BASE = re.compile(r"(?:\.base_layer)+$")
# the text model's layers: model.layers, or model.language_model.layers / language_model.model.
# layers (ConditionalGeneration checkpoints, as PEFT and vLLM name them)
_IN_LAYERS = re.compile(r"^(?:model\.)?(?:language_model\.)?(?:model\.)?(?P<rest>layers\.\d+\..+)$")
_EXPERTS = re.compile(r"^(?P<layer>layers\.\d+)\.(?:mlp|block_sparse_moe)\.experts(?P<tail>\..+)?$")
_EXPERT_PROJ = re.compile(r"^\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj|w1|w3|w2)$")
_FUSED_PROJ = re.compile(r"^\.(?P<proj>gate_up_proj|down_proj)$")
_PER_LAYER = re.compile(r"(?:^|\.)layers\.\d+\.")
_STACKABLE = ("fused", "positional")  # key kinds whose tensors may come stacked [E, ...]

_UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA (use_dora)",
    "lora_bias": "LoRA bias terms (lora_bias)",
    "layer_replication": "layer_replication",
    "trainable_token_indices": "trainable token embeddings (trainable_token_indices)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
}
# The config.json field behind each dimension of a target, for error messages: (D_in, D_out).
_DIM_NAMES = {
    "self_attn.q_proj": ("hidden_size", "num_attention_heads*head_dim"),
    "self_attn.k_proj": ("hidden_size", "num_key_value_heads*head_dim"),
    "self_attn.v_proj": ("hidden_size", "num_key_value_heads*head_dim"),
    "self_attn.o_proj": ("num_attention_heads*head_dim", "hidden_size"),
    "mlp.gate_proj": ("hidden_size", "intermediate_size"),
    "mlp.up_proj": ("hidden_size", "intermediate_size"),
    "mlp.down_proj": ("intermediate_size", "hidden_size"),
    "mlp.shared_expert.gate_proj": ("hidden_size", "shared_expert_intermediate_size"),
    "mlp.shared_expert.up_proj": ("hidden_size", "shared_expert_intermediate_size"),
    "mlp.shared_expert.down_proj": ("shared_expert_intermediate_size", "hidden_size"),
    "mlp.experts.gate_proj": ("hidden_size", "moe_intermediate_size"),
    "mlp.experts.up_proj": ("hidden_size", "moe_intermediate_size"),
    "mlp.experts.down_proj": ("moe_intermediate_size", "hidden_size"),
    "mlp.experts.gate_up_proj": ("hidden_size", "2*moe_intermediate_size"),
    "linear_attn.in_proj_qkv": ("hidden_size", "2*linear_num_key_heads*linear_key_head_dim + "
                                               "linear_num_value_heads*linear_value_head_dim"),
    "linear_attn.in_proj_z": ("hidden_size", "linear_num_value_heads*linear_value_head_dim"),
    "linear_attn.in_proj_b": ("hidden_size", "linear_num_value_heads"),
    "linear_attn.in_proj_a": ("hidden_size", "linear_num_value_heads"),
    "linear_attn.in_proj_qkvz": ("hidden_size", "2*linear_num_key_heads*linear_key_head_dim + "
                                                "2*linear_num_value_heads*linear_value_head_dim"),
    "linear_attn.in_proj_ba": ("hidden_size", "2*linear_num_value_heads"),
    "linear_attn.out_proj": ("linear_num_value_heads*linear_value_head_dim", "hidden_size"),
}


@dataclass(frozen=True)
class LoraKey:
    """One parsed tensor key. module: the canonical target (for "positional", the experts module
    whose parameter `depth` decides later); peft_name: the name PEFT matches rank_pattern /
    alpha_pattern against (model.layers.0.mlp.experts.3.w1; "positional" gets `.param` later)."""

    kind: KeyKind
    module: str
    part: str  # "A" or "B"
    peft_name: str
    expert: int | None = None  # kind "expert" only
    depth: int = 0  # kind "positional" only: number of trailing .base_layer segments


def parse_key(key: str) -> LoraKey:
    """Parse one safetensors key; anything but lora_A / lora_B weights is refused."""
    match = _KEY.match(key)
    if match is None:
        raise AdapterLoadError(
            f"tensor {key!r} is not a LoRA weight (expected keys ending in lora_A.weight or "
            "lora_B.weight; embeddings, DoRA magnitudes, biases and full modules are not served)")
    path, part = match["path"], match["part"]
    trailing = _TRAILING_BASE.search(path)
    depth = trailing.group().count(".base_layer") if trailing else 0
    clean = _BASE_LAYER.sub("", path)
    in_layers = _IN_LAYERS.match(clean)
    rest = in_layers["rest"] if in_layers else clean.removeprefix("model.")
    experts = _EXPERTS.match(rest)
    if experts is None:
        return LoraKey("dense", rest, part, clean)
    layer, tail = experts["layer"], experts["tail"] or ""
    if not tail:
        return LoraKey("positional", f"{layer}.mlp.experts", part, clean, depth=depth)
    if proj := _EXPERT_PROJ.match(tail):
        name = _MIXTRAL_PROJ.get(proj["proj"], proj["proj"])
        return LoraKey("expert", f"{layer}.mlp.experts.{name}", part, clean,
                       expert=int(proj["e"]))
    if proj := _FUSED_PROJ.match(tail):
        return LoraKey("fused", f"{layer}.mlp.experts.{proj['proj']}", part, clean)
    return LoraKey("dense", rest, part, clean)


def fused_targets(target_parameters: list[str] | None) -> tuple[str, ...]:
    """The fused parameters named in target_parameters, in registration order. Entries are
    suffixes of parameter paths ("mlp.experts.down_proj", or bare "down_proj" as PEFT writes
    after converting a 2D adapter). Raises AdapterLoadError for any other parameter (router...).
    """
    named = set()
    for entry in target_parameters or ():
        module, _, param = entry.rpartition(".")
        on_experts = module in ("", "experts") or module.endswith(".experts")
        if param not in FUSED_PARAMS or not on_experts:
            raise AdapterLoadError(
                f"target_parameters entry {entry!r} is not supported: loramux serves 3D LoRA on "
                f"experts.{FUSED_PARAMS[0]} and experts.{FUSED_PARAMS[1]} only")
        named.add(param)
    return tuple(p for p in FUSED_PARAMS if p in named)


def positional_candidates(module: str, depths: set[int],
                          targets: tuple[str, ...]) -> dict[int, tuple[str, ...]]:
    """Depth -> the fused parameters a positional key at that depth may be.

    Two wrappers: the inner one (depth 1) is gate_up_proj, the outer one down_proj. A lone
    wrapper is the single parameter target_parameters names, else either (decided by shape).
    """
    if depths == {0, 1}:
        return {1: (FUSED_PARAMS[0],), 0: (FUSED_PARAMS[1],)}
    if depths == {0}:
        return {0: targets if len(targets) == 1 else FUSED_PARAMS}
    raise AdapterLoadError(
        f"{module} has 3D LoRA wrappers at nesting depths {sorted(depths)}; loramux serves "
        f"{FUSED_PARAMS[0]} and {FUSED_PARAMS[1]} only (at most two nested wrappers)")


def fused_orientations(a_cols: int, b_rows: int, d_in: int, d_out: int) -> set[str]:
    """The readings of a 3D pair (lora_A [E*r, a_cols], lora_B [b_rows, r*E]) that fit a
    parameter of (D_in, D_out): "standard" (A [E*r, D_in], B [D_out, r*E], PEFT >= 0.19.1)
    and/or "transposed" (A [E*r, D_out], B [D_in, r*E], PEFT <= 0.18 on [E, out, in] weights)."""
    readings = {"standard": (d_in, d_out), "transposed": (d_out, d_in)}
    return {name for name, dims in readings.items() if dims == (a_cols, b_rows)}


def check_expert_rows(key: str, rows: int, cols: int, num_experts: int, rank: int) -> None:
    """lora_A rows and lora_B columns of a 3D pair must both be num_experts * rank."""
    if rows != cols:
        raise AdapterLoadError(f"{key}: lora_A has {rows} rows but lora_B has {cols} columns; "
                               "both must be num_experts * r")
    if rows != num_experts * rank:
        guess = f" ({rows // rank} experts of rank {rank}?)" if rows % rank == 0 else ""
        raise AdapterLoadError(
            f"{key}: lora_A has {rows} rows{guess}, expected num_experts x r = {num_experts} x "
            f"{rank} = {num_experts * rank}: the model has {num_experts} experts (num_experts) and "
            f"adapter_config.json gives this target rank {rank}")


def unfold_fused(a: torch.Tensor, b: torch.Tensor, num_experts: int, rank: int,
                 orientation: str, expert_major_b: bool = False,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """A [E*r, X] (rows expert-major), B [Y, r*E] (columns rank-major, or expert-major as
    Megatron-Bridge's save_hf_adapter packs them) -> a [E, r, D_in], b [E, D_out, r].
    A transposed file holds B_e @ A_e = delta_e^T, so a_e = B_e^T, b_e = A_e^T."""
    a3 = a.reshape(num_experts, rank, a.shape[1])  # A.view(E, r, in)[e]
    if expert_major_b:
        b3 = b.reshape(b.shape[0], num_experts, rank).permute(1, 0, 2)  # B.view(out, E, r)[:, e]
    else:
        b3 = b.reshape(b.shape[0], rank, num_experts).permute(2, 0, 1)  # B.view(out, r, E)[..., e]
    if orientation == "transposed":
        a3, b3 = b3.transpose(1, 2), a3.transpose(1, 2)
    return a3.contiguous(), b3.contiguous()


def pattern_value(patterns: Patterns, peft_name: str, default: float) -> float:
    """rank_pattern / alpha_pattern lookup as PEFT does it: the first key (in file order) that
    matches the end of the name at a dot boundary, as a regular expression."""
    return next((value for regex, value in patterns if regex.match(peft_name)), default)


def dim_names(module: str) -> tuple[str, str]:
    """The config fields behind (D_in, D_out) of a canonical target, for error messages."""
    return _DIM_NAMES.get(module.split(".", 2)[-1], ("in-features", "out-features"))


def peft_version_at_least(version: str | None, minimum: tuple[int, ...]) -> bool:
    """True when a `peft_version` string such as "0.19.1.dev0" is at least `minimum`."""
    numbers = re.findall(r"\d+", version or "")[: len(minimum)]
    return len(numbers) == len(minimum) and tuple(map(int, numbers)) >= minimum


def read_config(raw: bytes, root: str) -> dict:
    """adapter_config.json's bytes, refused when it asks for anything beyond plain LoRA deltas."""
    if len(raw) > CONFIG_MAX_BYTES:  # unparsed: parsing holds the GIL, stalling the engine
        raise AdapterLoadError(f"adapter_config.json in {root} is larger than "
                               f"{CONFIG_MAX_BYTES} bytes; PEFT writes a few KB")
    try:
        config = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterLoadError(f"adapter_config.json in {root} is not valid JSON: {err}") from err
    except RecursionError as err:
        raise AdapterLoadError(f"adapter_config.json in {root} is nested too deeply") from err
    if not isinstance(config, dict):
        raise AdapterLoadError(f"adapter_config.json in {root} is not a JSON object")
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise AdapterLoadError(f"peft_type {config['peft_type']!r}: loramux serves LoRA only")
    if config.get("modules_to_save"):
        raise AdapterLoadError(f"modules_to_save {config['modules_to_save']} replaces whole "
                               "modules; loramux serves LoRA deltas only")
    if config.get("bias", "none") != "none":
        raise AdapterLoadError(f"bias={config['bias']!r} trains base biases; it must be 'none'")
    for option, what in _UNSUPPORTED_OPTIONS.items():
        if config.get(option):
            raise AdapterLoadError(f"{what} is not supported ({option}={config[option]!r})")
    return config


@dataclass(frozen=True)
class LoraHyper:
    """The adapter_config.json fields that set each target's rank and scale."""

    r: int
    alpha: float
    rank_pattern: Patterns
    alpha_pattern: Patterns
    use_rslora: bool
    fused_targets: tuple[str, ...]  # fused expert parameters named in target_parameters
    peft_version: str | None
    # Megatron-Bridge's save_hf_adapter: no peft_version (PEFT always writes one) and
    # target_parameters naming each layer's parameter (PEFT users name them once)
    megatron_bridge: bool = False

    @classmethod
    def from_config(cls, config: dict) -> LoraHyper:
        r, alpha = config.get("r"), config.get("lora_alpha")
        if not is_rank(r) or not is_number(alpha):
            raise AdapterLoadError(f"adapter_config.json: r must be a positive integer and "
                                   f"lora_alpha a finite number, found r={r!r:.40}, "
                                   f"lora_alpha={alpha!r:.40}")
        targets = config.get("target_parameters")
        per_layer = any(_PER_LAYER.search(str(t)) for t in targets or ())
        return cls(r, float(alpha), _patterns(config, "rank_pattern", is_rank),
                   _patterns(config, "alpha_pattern", is_number), bool(config.get("use_rslora")),
                   fused_targets(targets), config.get("peft_version"),
                   per_layer and config.get("peft_version") is None)

    def rank_and_scale(self, peft_name: str) -> tuple[int, float]:
        r = int(pattern_value(self.rank_pattern, peft_name, self.r))
        alpha = float(pattern_value(self.alpha_pattern, peft_name, self.alpha))
        scale = alpha / (math.sqrt(r) if self.use_rslora else r)
        check_scale(peft_name, r, alpha, scale)
        return r, scale


def _patterns(config: dict, name: str, is_valid) -> Patterns:
    """A rank_pattern / alpha_pattern object, compiled the way PEFT matches it."""
    patterns = config.get(name) or {}
    wrong = ([(k, v) for k, v in patterns.items() if not is_valid(v)][:1]
             if isinstance(patterns, dict) else [("", patterns)])
    if wrong:
        valid = "positive integers" if name == "rank_pattern" else "finite numbers"
        raise AdapterLoadError(f"adapter_config.json: {name} must map regexes to {valid}, found "
                               f"{wrong[0][0]!r:.40}: {wrong[0][1]!r:.40}")
    try:
        return tuple((re.compile(rf"(.*\.)?({key})$"), value) for key, value in patterns.items())
    except re.error as err:
        raise AdapterLoadError(f"adapter_config.json: a {name} key is not a regex: {err}") from err


@dataclass
class LoraPair:
    """lora_A and lora_B of one target (of one expert, for a 2D expert target)."""

    key: LoraKey
    names: dict[str, str] = field(default_factory=dict)  # "A"/"B" -> file key, for messages
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    stacked: bool = False  # 3D expert LoRA written as [E, ...] tensors (one reading only)

    @property
    def a(self) -> torch.Tensor:  # [r, D_in] (2D) or [E*r, D_in] (3D)
        return self.tensors["A"]

    @property
    def b(self) -> torch.Tensor:  # [D_out, r] (2D) or [D_out, r*E] (3D)
        return self.tensors["B"]


def pair_up(tensors: dict[str, torch.Tensor], source: str) -> list[LoraPair]:
    """Group tensors into lora_A/lora_B pairs; a lone half or a duplicate is refused."""
    pairs: dict[tuple, LoraPair] = {}
    for key, tensor in tensors.items():
        parsed = parse_key(key)
        if tensor.dim() != 2 and not (tensor.dim() == 3 and parsed.kind in _STACKABLE):
            raise AdapterLoadError(f"{key} has shape {list(tensor.shape)}: not a matrix (only "
                                   "3D expert LoRA may be stacked per expert)")
        pair = pairs.setdefault((parsed.kind, parsed.module, parsed.expert, parsed.depth),
                                LoraPair(parsed))
        if parsed.part in pair.names:
            raise AdapterLoadError(f"{pair.names[parsed.part]} and {key} map to the same weight")
        pair.names[parsed.part], pair.tensors[parsed.part] = key, tensor
    for pair in pairs.values():
        if len(pair.names) == 1:
            (part, key), = pair.names.items()
            raise AdapterLoadError(f"{key} has no lora_{'B' if part == 'A' else 'A'} partner")
        _flatten_stacked(pair)
    if not pairs:
        raise AdapterLoadError(f"{source} holds no LoRA tensors")
    return list(pairs.values())


def _flatten_stacked(pair: LoraPair) -> None:
    """Stacked 3D expert LoRA (Megatron-Bridge: lora_A [E, r, in] with lora_B [E, out, r] from
    its streaming export or [out, r, E] from stack_3d_moe) -> the folded PEFT form (A [E*r, in]
    rows expert-major, B [out, r*E] columns rank-major), marked as read in one way only."""
    a, b = pair.a, pair.b
    if a.dim() == b.dim() == 2:
        return
    shapes = f"lora_A {list(a.shape)}, lora_B {list(b.shape)}"
    if a.dim() != 3 or b.dim() != 3:
        raise AdapterLoadError(f"{pair.names['A']}: {shapes}: stacked 3D expert LoRA needs "
                               "both tensors stacked")
    num_experts, rank, _ = a.shape
    readings = []
    if b.shape[0] == num_experts and b.shape[2] == rank:  # [E, out, r]
        readings.append(b.permute(1, 2, 0))
    if b.shape[1] == rank and b.shape[2] == num_experts:  # [out, r, E]
        readings.append(b)
    if len(readings) != 1:
        raise AdapterLoadError(
            f"{pair.names['A']}: {shapes}: "
            + ("lora_B fits both [E, out, r] and [out, r, E]" if readings else
               "lora_B must be [E, out, r] or [out, r, E] for lora_A [E, r, in]"))
    pair.tensors["A"] = a.reshape(num_experts * rank, a.shape[2])
    pair.tensors["B"] = readings[0].reshape(readings[0].shape[0], rank * num_experts)
    pair.stacked = True
