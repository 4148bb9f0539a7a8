"""Test adapters written to disk: real PEFT 3D adapters, hand-written 2D ones, and broken ones.

Everything here reads and writes files by its own small code (docs/adapter-formats.md
section 2), never through engine.lora, so it can serve as an oracle for the reader. Shapes:
E experts, r rank, H hidden, I expert intermediate size. Deltas are large enough to move
greedy tokens.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import peft
import torch
from peft.utils.other import get_pattern_key
from safetensors.torch import load_file, save_file

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
MIXTRAL_MLP = ("w1", "w3", "w2")  # gate, up, down
EXPERTS_3D = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
PREFIX = "base_model.model."

GDN = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "in_proj_qkvz", "in_proj_ba",
       "out_proj")  # Gated DeltaNet projections (Qwen3.5: split, Qwen3-Next: grouped)
_LAYERS = r"model\.(?:language_model\.)?layers\.\d+"
_2D_EXPERT = re.compile(rf"^({_LAYERS})\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)$")
_3D_EXPERTS = re.compile(rf"^({_LAYERS}\.mlp\.experts)(\.base_layer)?$")


def make_peft_3d_adapter(hf_model, path, r: int = 4, alpha: float = 8, *,
                         target_modules=ATTENTION, target_parameters=EXPERTS_3D, seed: int = 0,
                         **lora_kwargs) -> Path:
    """A real PEFT adapter (target_parameters on the fused experts) with random A and B."""
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(target_modules) or None,
                             target_parameters=list(target_parameters) or None, **lora_kwargs)
    model = peft.get_peft_model(copy.deepcopy(hf_model), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(_random(tuple(param.shape), "lora_A" in name, generator))
    model.save_pretrained(path)
    return Path(path)


def peft_merged(hf_model, adapter_dir):
    """PEFT's own merge_and_unload of an adapter directory into a copy of the model."""
    return peft.PeftModel.from_pretrained(copy.deepcopy(hf_model), adapter_dir).merge_and_unload()


def make_2d_adapter(hf_model, path, r: int = 4, alpha: float = 8, seed: int = 0, *,
                    target_modules=ATTENTION + MLP + MIXTRAL_MLP + GDN, experts=None,
                    megatron: bool = False, **config_fields) -> Path:
    """Per-expert (2D) adapter in the format PEFT + transformers 4 writes
    (docs/adapter-formats.md 2.1).

    Targets every Linear and every expert projection whose last name is in target_modules
    (Mixtral experts as block_sparse_moe.experts.e.w1/w3/w2); `experts` limits which experts get
    LoRA; rank_pattern / alpha_pattern / use_rslora in config_fields are honoured.
    megatron: as ms-swift / mcore-bridge export Megatron LoRA: each expert's up A is a copy of
    its gate A, and the Gated DeltaNet input projections of a layer share one A.
    """
    config = _config(r, alpha, **config_fields)
    generator = torch.Generator().manual_seed(seed)
    tensors, used = {}, set()
    for name, (d_out, d_in) in _2d_targets(hf_model, experts):
        if name.rsplit(".", 1)[-1] in target_modules:
            rank, _ = _rank_scale(config, name)
            tensors[f"{PREFIX}{name}.lora_A.weight"] = _random((rank, d_in), True, generator)
            tensors[f"{PREFIX}{name}.lora_B.weight"] = _random((d_out, rank), False, generator)
            used.add(name.rsplit(".", 1)[-1])
    if megatron:
        _share_megatron_a(tensors)
    return _write(path, {**config, "target_modules": sorted(used)}, tensors)


def _share_megatron_a(tensors: dict[str, torch.Tensor]) -> None:
    """Copy gate A into up A, and in_proj_qkv's A into in_proj_z/b/a (one fused A in Megatron)."""
    copies = {"up_proj.lora_A": "gate_proj.lora_A", "in_proj_z.lora_A": "in_proj_qkv.lora_A",
              "in_proj_b.lora_A": "in_proj_qkv.lora_A", "in_proj_a.lora_A": "in_proj_qkv.lora_A"}
    for key in list(tensors):
        for dst, src in copies.items():
            if dst in key and key.replace(dst, src) in tensors:
                tensors[key] = tensors[key.replace(dst, src)].clone()


def split_3d_to_2d(src_dir, dst_dir, *, mixtral_names: bool = False) -> Path:
    """A 3D adapter as the equal 2D one: gate and up share A, B rows [:I] gate, [I:] up."""
    config, tensors = read_adapter_files(src_dir)
    gate, up, down = MIXTRAL_MLP if mixtral_names else MLP
    moe = "block_sparse_moe" if mixtral_names else "mlp"
    out, patterns = {}, {"rank_pattern": {}, "alpha_pattern": {}}
    for module, (a, b) in _pairs(tensors).items():
        name = _fused_name(config, module)
        if name is None:
            out.update(_pair_tensors(module, a, b))
            continue
        rank, alpha = _rank_alpha(config, name)
        a_e, b_e = unfold_3d(a, b, rank)
        layer = module.split(".mlp.")[0]
        split = {gate: (0, b.shape[0] // 2), up: (b.shape[0] // 2, b.shape[0])} \
            if name.endswith("gate_up_proj") else {down: (0, b.shape[0])}
        for e in range(a_e.shape[0]):
            for proj, (lo, hi) in split.items():
                expert = f"{layer}.{moe}.experts.{e}.{proj}"
                out.update(_pair_tensors(expert, a_e[e], b_e[e, lo:hi]))
                patterns["rank_pattern"][re.escape(expert)] = rank
                patterns["alpha_pattern"][re.escape(expert)] = alpha
    targets = sorted(set(config.get("target_modules") or ()) | {gate, up, down})
    for field in patterns:  # explicit names first: PEFT takes the first pattern that matches
        patterns[field].update(config.get(field) or {})
    config = {**config, **patterns, "target_parameters": None, "target_modules": targets}
    return _write(dst_dir, config, out)


def merged_reference(hf_model, adapter_dir):
    """A copy of the transformers model with every delta of the adapter folded into its weights.

    Reads 2D (per-expert) and 3D (PEFT target_parameters) files itself, per docs/adapter-formats.md.
    """
    config, tensors = read_adapter_files(adapter_dir)
    model = copy.deepcopy(hf_model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for module, (a, b) in _pairs(tensors).items():
            _fold(params, config, module, a, b)
    return model


def read_adapter_files(adapter_dir) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json, tensors) of an adapter directory (.safetensors or .bin)."""
    adapter_dir = Path(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    file = adapter_dir / "adapter_model.safetensors"
    if file.is_file():
        return config, load_file(file)
    return config, torch.load(adapter_dir / "adapter_model.bin", weights_only=True)


def unfold_3d(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A [E*r, in] (rows expert-major), B [out, r*E] (columns rank-major) -> a [E, r, in],
    b [E, out, r]: docs/adapter-formats.md 2.2."""
    num_experts = a.shape[0] // rank
    return (a.reshape(num_experts, rank, -1),
            b.reshape(b.shape[0], rank, num_experts).permute(2, 0, 1))


def fold_3d(a_e: torch.Tensor, b_e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of unfold_3d: [E, r, in], [E, out, r] -> A [E*r, in], B [out, r*E]."""
    num_experts, rank, _ = a_e.shape
    return (a_e.reshape(num_experts * rank, -1).contiguous(),
            b_e.permute(1, 2, 0).reshape(b_e.shape[1], rank * num_experts).contiguous())


def write_transposed_vintage(src_dir, dst_dir, peft_version: str = "0.18.0") -> Path:
    """The 3D adapter as PEFT <= 0.18 wrote it on [E, out, in] weights: per expert B_e @ A_e is
    the transposed delta, so A' [E*r, D_out] holds B_e^T and B' [D_in, r*E] holds A_e^T."""
    config, tensors = read_adapter_files(src_dir)
    out = {}
    for module, (a, b) in _pairs(tensors).items():
        name = _fused_name(config, module)
        if name is not None:
            a_e, b_e = unfold_3d(a, b, _rank_alpha(config, name)[0])
            a, b = fold_3d(b_e.transpose(1, 2), a_e.transpose(1, 2))
        out.update(_pair_tensors(module, a, b))
    return _write(dst_dir, {**config, "peft_version": peft_version}, out)


def write_megatron_bridge_stacked(src_dir, dst_dir, *, names: str = "fused") -> Path:
    """The 3D adapter as Megatron-Bridge exports it stacked (architectures.md 4.2): names
    "fused" (its streaming export: experts.gate_up_proj.lora_A [E, r, in], lora_B [E, out, r])
    or "positional" (stack_3d_moe: vLLM's experts(.base_layer).lora_A [E, r, in], lora_B
    [out, r, E])."""
    config, tensors = read_adapter_files(src_dir)
    out = {}
    for module, (a, b) in _pairs(tensors).items():
        name = _fused_name(config, module)
        if name is not None:
            a, b = unfold_3d(a, b, _rank_alpha(config, name)[0])  # [E, r, in], [E, out, r]
            if names == "fused":
                module = name
            else:
                b = b.permute(1, 2, 0)
        out.update(_pair_tensors(module, a.contiguous(), b.contiguous()))
    return _write(dst_dir, config, out)


def write_megatron_bridge_saved(src_dir, dst_dir) -> Path:
    """The 3D adapter as Megatron-Bridge's save_hf_adapter writes it (architectures.md 4.2):
    lora_A = cat_e(B_e^T) [E*r, out], lora_B = cat_e(A_e^T, dim=1) [in, E*r] (expert-major
    columns), no peft_version, target_parameters one full path per layer."""
    config, tensors = read_adapter_files(src_dir)
    out, per_layer = {}, set()
    for module, (a, b) in _pairs(tensors).items():
        name = _fused_name(config, module)
        if name is not None:
            a_e, b_e = unfold_3d(a, b, _rank_alpha(config, name)[0])
            a = b_e.transpose(1, 2).reshape(-1, b_e.shape[1])  # rows: expert e's B_e^T
            b = torch.cat(list(a_e.transpose(1, 2)), dim=1)  # columns: expert e's A_e^T
            per_layer.add(name)
        out.update(_pair_tensors(module, a, b))
    config = {k: v for k, v in config.items() if k != "peft_version"}
    return _write(dst_dir, {**config, "target_parameters": sorted(per_layer)}, out)


def save_as_bin(src_dir, dst_dir) -> Path:
    """The same adapter with adapter_model.bin (torch.save) instead of safetensors."""
    config, tensors = read_adapter_files(src_dir)
    dst_dir = Path(dst_dir)
    dst_dir.mkdir(parents=True, exist_ok=True)
    (dst_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))
    torch.save(tensors, dst_dir / "adapter_model.bin")
    return dst_dir


# --- internals -----------------------------------------------------------------------------

def _random(shape: tuple[int, ...], is_a: bool, generator: torch.Generator) -> torch.Tensor:
    """A: std 1/sqrt(D_in) (like PEFT's init); B: std 0.5 (PEFT inits B to zero: no delta)."""
    std = shape[-1] ** -0.5 if is_a else 0.5
    return torch.randn(shape, generator=generator) * std


def _config(r: int, alpha: float, **fields) -> dict:
    return {"peft_type": "LORA", "peft_version": peft.__version__, "r": r, "lora_alpha": alpha,
            "bias": "none", "use_dora": False, "use_rslora": False, "modules_to_save": None,
            "rank_pattern": {}, "alpha_pattern": {}, "target_parameters": None,
            "base_model_name_or_path": None, **fields}


def _write(path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.clone().contiguous() for k, v in tensors.items()},
              path / "adapter_model.safetensors")
    return path


def _2d_targets(hf_model, experts=None):
    """(transformers-4 module name, (D_out, D_in)) of every Linear and every expert projection."""
    mixtral = hf_model.config.model_type == "mixtral"
    for name, module in hf_model.named_modules():
        if isinstance(module, torch.nn.Linear):
            yield name, tuple(module.weight.shape)
        elif isinstance(getattr(module, "gate_up_proj", None), torch.nn.Parameter):
            num_experts, two_i, hidden = module.gate_up_proj.shape
            prefix = name.replace("mlp.experts", "block_sparse_moe.experts") if mixtral else name
            projs = MIXTRAL_MLP if mixtral else MLP
            shapes = ((two_i // 2, hidden), (two_i // 2, hidden), (hidden, two_i // 2))
            for e in range(num_experts) if experts is None else experts:
                yield from ((f"{prefix}.{e}.{p}", s) for p, s in zip(projs, shapes))


def _pairs(tensors: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module name (without the PEFT prefix) -> (lora_A, lora_B)."""
    names = [k.removeprefix(PREFIX).removesuffix(".lora_A.weight") for k in tensors
             if k.endswith(".lora_A.weight")]
    return {n: (tensors[f"{PREFIX}{n}.lora_A.weight"], tensors[f"{PREFIX}{n}.lora_B.weight"])
            for n in names}


def _pair_tensors(module: str, a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
    return {f"{PREFIX}{module}.lora_A.weight": a, f"{PREFIX}{module}.lora_B.weight": b}


def _fused_param(config: dict, module: str) -> str | None:
    """Which fused parameter a 3D key names (None for any other module): the inner of two nested
    wrappers is gate_up_proj, the outer down_proj; a lone wrapper is the one target parameter."""
    match = _3D_EXPERTS.match(module)
    if match is None:
        return None
    targets = [t.rsplit(".", 1)[1] for t in config["target_parameters"]]
    return "gate_up_proj" if match[2] or targets == ["gate_up_proj"] else "down_proj"


def _fused_name(config: dict, module: str) -> str | None:
    """The PEFT name of a 3D key's parameter (model.layers.L.mlp.experts.gate_up_proj), or None."""
    param = _fused_param(config, module)
    return None if param is None else f"{_3D_EXPERTS.match(module)[1]}.{param}"


def _rank_alpha(config: dict, name: str) -> tuple[int, float]:
    rank_key = get_pattern_key((config.get("rank_pattern") or {}).keys(), name)
    alpha_key = get_pattern_key((config.get("alpha_pattern") or {}).keys(), name)
    return ((config.get("rank_pattern") or {}).get(rank_key, config["r"]),
            (config.get("alpha_pattern") or {}).get(alpha_key, config["lora_alpha"]))


def _rank_scale(config: dict, name: str) -> tuple[int, float]:
    rank, alpha = _rank_alpha(config, name)
    return rank, alpha / (rank ** 0.5 if config.get("use_rslora") else rank)


def _fold(params: dict, config: dict, module: str, a, b) -> None:
    """Add scale * B @ A of one adapter module to the transformers 5 parameter it adapts."""
    if match := _2D_EXPERT.match(module):
        layer, expert, proj = match[1], int(match[2]), match[3]
        _, scale = _rank_scale(config, module)
        gate_up = params[f"{layer}.mlp.experts.gate_up_proj"][expert]  # [2I, H]: gate, then up
        half = gate_up.shape[0] // 2
        rows = {"gate_proj": slice(0, half), "w1": slice(0, half),
                "up_proj": slice(half, None), "w3": slice(half, None)}
        if proj in rows:
            gate_up[rows[proj]] += scale * b @ a
        else:
            params[f"{layer}.mlp.experts.down_proj"][expert] += scale * b @ a
    elif (name := _fused_name(config, module)) is not None:
        rank, scale = _rank_scale(config, name)
        a_e, b_e = unfold_3d(a, b, rank)
        params[name] += scale * b_e @ a_e
    else:
        params[f"{module}.weight"] += _rank_scale(config, module)[1] * b @ a
