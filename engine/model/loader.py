"""Fill a built model from a Hugging Face safetensors checkpoint (single file or sharded).

The plan is derived from the model's own parameters, so it cannot drift from the model and
does not depend on LoRA buffers (vLLM shipped loaders that broke when LoRA renamed expert
parameters). Each parameter maps to the disk keys that compose it:
    self_attn.qkv_proj.{weight,bias}  <- self_attn.{q,k,v}_proj.*            (rows concatenated)
    *.gate_up_proj.weight             <- *.{gate,up}_proj.weight             (rows concatenated)
    mlp.experts.w_gate_up [E, 2I, H]  <- 2d: mlp.experts.e.{gate,up}_proj.weight [I, H] each
                                         3d: mlp.experts.gate_up_proj [E, 2I, H]
    mlp.experts.w_down [E, H, I]      <- 2d: mlp.experts.e.down_proj.weight
                                         3d: mlp.experts.down_proj
    anything else                     <- the same name
Mixtral's `block_sparse_moe.` and `experts.e.w1/w3/w2` are read as `mlp.` and gate/up/down.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open
from tqdm import tqdm

from engine.errors import ModelLoadError
from engine.model.decoder import MoeForCausalLM
from engine.model.layers import RMSNorm
from engine.model.lora_linear import LoraLinear
from engine.model.moe import MoeExperts

logger = logging.getLogger(__name__)

_MIXTRAL_EXPERT = re.compile(r"(\.experts\.\d+\.)w([123])\.")
_MIXTRAL_NAMES = {"1": "gate_proj", "2": "down_proj", "3": "up_proj"}
_FUSED_EXPERT_KEY = re.compile(r"\.mlp\.experts\.(gate_up_proj|down_proj)$")
# Tensors some checkpoints carry that the served model does not use (multi-token-prediction
# heads, precomputed RoPE tables): skipped by name, with a log line, never loaded elsewhere.
_IGNORED_EXTRA = re.compile(r"^(model\.)?mtp\.|\.rotary_emb\.inv_freq$")


class Target(NamedTuple):
    """Where one disk tensor goes: model parameter name and the index of its region."""

    param: str
    index: tuple


def normalize_key(key: str) -> str:
    """A disk key in the Qwen/OLMoE spelling (Mixtral `block_sparse_moe` and w1/w2/w3 mapped)."""
    key = key.replace(".block_sparse_moe.", ".mlp.")
    return _MIXTRAL_EXPERT.sub(lambda m: m.group(1) + _MIXTRAL_NAMES[m.group(2)] + ".", key)


def _slices(prefix: str, suffix: str, names: tuple[str, ...],
            widths: tuple[int, ...]) -> dict[str, tuple]:
    """Disk keys of fused output slices -> row slice of each in the fused parameter."""
    out, start = {}, 0
    for name, width in zip(names, widths):
        out[f"{prefix}{name}.{suffix}"] = (slice(start, start + width),)
        start += width
    return out


def _linear_keys(name: str, module: LoraLinear) -> dict[str, tuple]:
    """Disk keys of a (possibly fused) linear's weight or bias."""
    prefix, suffix = name.rsplit(".", 1)
    owner = prefix.rsplit(".", 1)[0] + "."
    if prefix.endswith("qkv_proj"):
        return _slices(owner, suffix, ("q_proj", "k_proj", "v_proj"), module.out_splits)
    if prefix.endswith("gate_up_proj"):
        return _slices(owner, suffix, ("gate_proj", "up_proj"), module.out_splits)
    return {name: ()}


def _expert_keys(name: str, module: MoeExperts, layout: str) -> dict[str, tuple]:
    """Disk keys of w_gate_up / w_down in the checkpoint's expert layout."""
    prefix, param = name.rsplit(".", 1)  # prefix = model.layers.L.mlp.experts
    fused = "gate_up_proj" if param == "w_gate_up" else "down_proj"
    if layout == "3d":
        return {f"{prefix}.{fused}": ()}
    inter, keys = module.inter, {}
    for e in range(module.w_down.shape[0]):
        if param == "w_down":
            keys[f"{prefix}.{e}.down_proj.weight"] = (e,)
        else:
            keys[f"{prefix}.{e}.gate_proj.weight"] = (e, slice(0, inter))
            keys[f"{prefix}.{e}.up_proj.weight"] = (e, slice(inter, 2 * inter))
    return keys


def checkpoint_plan(model: MoeForCausalLM, layout: str) -> dict[str, Target]:
    """Every disk key the model needs (normalized spelling) -> where it goes."""
    modules = dict(model.named_modules())
    plan: dict[str, Target] = {}
    for name, _ in model.named_parameters():  # a tied lm_head appears once, as embed_tokens
        module = modules[name.rsplit(".", 1)[0]]
        if isinstance(module, MoeExperts):
            keys = _expert_keys(name, module, layout)
        elif isinstance(module, LoraLinear):
            keys = _linear_keys(name, module)
        else:
            keys = {name: ()}
        plan.update({key: Target(name, index) for key, index in keys.items()})
    return plan


def _checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / f for f in sorted(set(weight_map.values()))]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise ModelLoadError(f"{path} has neither model.safetensors nor "
                         "model.safetensors.index.json")


def _disk_keys(files: list[Path]) -> dict[str, Path]:
    """Every tensor key on disk -> its file (reads headers only)."""
    keys: dict[str, Path] = {}
    for file in files:
        if not file.is_file():
            raise ModelLoadError(f"checkpoint shard {file.name} is missing from {file.parent}")
        with safe_open(file, framework="pt") as f:
            keys.update(dict.fromkeys(f.keys(), file))
    return keys


def _iter_tensors(files: list[Path], total: int) -> Iterator[tuple[str, torch.Tensor]]:
    with tqdm(total=total, desc="Loading weights", unit="tensor", disable=None) as bar:
        for file in files:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    yield key, f.get_tensor(key)
                    bar.update(1)


def detect_layout(keys: list[str]) -> str:
    """"3d" when experts are stored fused (gate_up_proj / down_proj), else "2d"."""
    return "3d" if any(_FUSED_EXPERT_KEY.search(normalize_key(k)) for k in keys) else "2d"


def _skip_reason(key: str, model: MoeForCausalLM) -> str | None:
    if _IGNORED_EXTRA.search(key):
        return "not used by the served model"
    if key == "lm_head.weight" and model.config.tie_word_embeddings:
        return "tie_word_embeddings is set: lm_head is embed_tokens"
    return None


def _copy(model_params: dict, target: Target, key: str, tensor: torch.Tensor) -> None:
    region = model_params[target.param].data[target.index]
    if region.shape != tensor.shape:
        raise ModelLoadError(f"tensor {key} has shape {tuple(tensor.shape)}, expected "
                             f"{tuple(region.shape)} for this config.json")
    region.copy_(tensor)


def load_checkpoint(model: MoeForCausalLM, path: Path) -> str:
    """Load every tensor of the checkpoint at `path`; returns its expert layout."""
    files = _checkpoint_files(path)
    disk = _disk_keys(files)
    layout = detect_layout(list(disk))
    plan = checkpoint_plan(model, layout)
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for key, tensor in _iter_tensors(files, len(disk)):
        norm = normalize_key(key)
        target = plan.get(norm)
        if target is None:
            reason = _skip_reason(key, model)
            if reason is None:
                raise ModelLoadError(f"unexpected tensor {key} in {disk[key].name}: "
                                     f"no such weight in {model.config.architecture}")
            logger.info("skipping %s (%s)", key, reason)
            continue
        if norm in loaded:
            raise ModelLoadError(f"tensor {norm} appears twice (as {key})")
        _copy(params, target, key, tensor)
        loaded.add(norm)
    missing = sorted(set(plan) - loaded)
    if missing:
        raise ModelLoadError(f"tensor {missing[0]} missing from {path} "
                             f"({len(missing)} missing, {layout} expert layout)")
    return layout


@torch.no_grad()
def init_dummy(model: MoeForCausalLM, seed: int = 0) -> None:
    """Random weights: normal(0, 0.02), RMSNorm weights 1, biases 0, routers std H**-0.5 so
    that router logits are spread (top-k without near-ties)."""
    gen = torch.Generator(device=model.device).manual_seed(seed)
    router_std = model.config.hidden_size ** -0.5
    for name, param in model.named_parameters():
        if name.endswith(".bias"):
            param.zero_()
        else:
            std = router_std if name.endswith("mlp.gate.weight") else 0.02
            param.normal_(0.0, std, generator=gen)
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.weight.fill_(1.0)


@torch.no_grad()
def load_weights(model: MoeForCausalLM, path: str | Path, load_format: str = "auto") -> str:
    """Fill `model` from the checkpoint directory `path`.

    load_format: "auto"/"safetensors" reads the files; "dummy" writes random weights and reads
    nothing. Returns the native expert layout: "2d" (per-expert keys on disk) or "3d" (fused
    gate_up_proj/down_proj); "2d" for dummy weights (the hub convention).
    Raises ModelLoadError naming a missing, unexpected or wrongly shaped tensor.
    """
    if load_format == "dummy":
        init_dummy(model)
        return "2d"
    if load_format not in ("auto", "safetensors"):
        raise ModelLoadError(f"unknown load_format {load_format!r}; "
                             "choose auto, safetensors or dummy")
    layout = load_checkpoint(model, Path(path))
    logger.info("loaded %s weights from %s (%s expert layout)", model.config.architecture,
                path, layout)
    return layout
