"""Fill a built model from a Hugging Face safetensors checkpoint (single file or sharded).

The plan is derived from the model's own parameters, so it cannot drift from the model and
does not depend on LoRA buffers (vLLM shipped loaders that broke when LoRA renamed expert
parameters). Each parameter maps to the disk keys that compose it:
    self_attn.qkv_proj.{weight,bias}  <- self_attn.{q,k,v}_proj.*            (rows concatenated)
    *.gate_up_proj.weight             <- *.{gate,up}_proj.weight             (rows concatenated)
    linear_attn.in_proj.weight        <- linear_attn.in_proj_{qkv,z,b,a}.weight (Qwen3.5), or
                                         in_proj_{qkvz,ba}.weight un-grouped (Qwen3-Next)
    mlp.experts.w_gate_up [E, 2I, H]  <- 2d: mlp.experts.e.{gate,up}_proj.weight [I, H] each
                                         3d: mlp.experts.gate_up_proj [E, 2I, H]
    mlp.experts.w_down [E, H, I]      <- 2d: mlp.experts.e.down_proj.weight
                                         3d: mlp.experts.down_proj
    anything else                     <- the same name
Under tensor / expert parallelism (engine/model/parallel.py) each rank reads only its part of
every tensor: the row gathers of its heads and intermediate rows, `cut` of its input columns
or experts, and no key of another rank's experts.
Disk names are normalized first: `.base_layer` segments dropped (a PEFT-wrapped model's names),
`model.language_model.` / `language_model.model.` read as `model.` (ConditionalGeneration),
Mixtral's `block_sparse_moe.` and `experts.e.w1/w3/w2` as `mlp.` and gate/up/down. Qwen3-VL-MoE's
hub files store fused experts transposed ([E, H, 2I], [E, I, H]); they are told apart by shape,
and a square tensor (H == 2I or H == I) by the writer: transformers >= 5 saves [E, 2I, H].
Skipped with one log line per kind: MTP heads (`mtp.*`), RoPE tables and, for
ConditionalGeneration checkpoints, the vision tower (`model.visual.*`).
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

from loramux.engine.architectures import ARCHITECTURES
from loramux.engine.config import ModelConfig
from loramux.engine.errors import ModelLoadError
from loramux.engine.model.decoder import MoeForCausalLM
from loramux.engine.model.layers import RMSNorm
from loramux.engine.model.lora_linear import LoraLinear
from loramux.engine.model.moe import MoeExperts

logger = logging.getLogger(__name__)

_MIXTRAL_EXPERT = re.compile(r"(\.experts\.\d+\.)w([123])\.")
_MIXTRAL_NAMES = {"1": "gate_proj", "2": "down_proj", "3": "up_proj"}
_FUSED_EXPERT_KEY = re.compile(r"\.mlp\.experts\.(gate_up_proj|down_proj)$")
_BASE_LAYER = re.compile(r"\.base_layer(?=\.|$)")
_LANGUAGE_MODEL = re.compile(r"^(model\.language_model\.|language_model\.model\.)")
_PEFT_TENSOR = re.compile(r"\.lora_(A|B|embedding_A|embedding_B|magnitude_vector)\b")
# Tensors some checkpoints carry that the served model does not use (multi-token-prediction
# heads, precomputed RoPE tables): skipped by name, with a log line, never loaded elsewhere.
_IGNORED_EXTRA = re.compile(r"^(model\.)?mtp\.|\.rotary_emb\.inv_freq$")
_VISION = re.compile(r"^(model\.)?visual\.")


class Target(NamedTuple):
    """Where one disk tensor goes: model parameter name and the index of its region.
    rows: gather applied to the disk tensor's rows first (ours[j] = disk[rows[j]]);
    transposable: a fused expert tensor that may be stored [E, in, out], `full` its shape
    [E, out, in] before this rank's cut;
    cut: (dim, ids) gathers of this rank's part, after rows and orientation."""

    param: str
    index: tuple
    rows: torch.Tensor | None = None
    transposable: bool = False
    full: tuple[int, ...] | None = None
    cut: tuple[tuple[int, torch.Tensor], ...] = ()


def normalize_key(key: str) -> str:
    """A disk key in the Qwen/OLMoE spelling of a CausalLM (see the module docstring)."""
    key = _LANGUAGE_MODEL.sub("model.", _BASE_LAYER.sub("", key))
    key = key.replace(".block_sparse_moe.", ".mlp.")
    return _MIXTRAL_EXPERT.sub(lambda m: m.group(1) + _MIXTRAL_NAMES[m.group(2)] + ".", key)


def _linear_keys(name: str, module: LoraLinear) -> dict[str, Target]:
    """Disk keys of a linear's weight or bias: one per output slice (q/k/v, gate/up, the GDN
    input projections), each named after its slice, under the linear's owner module."""
    if len(module.slice_names) == 1:
        cut = () if module.in_cols is None or name.endswith(".bias") else ((1, module.in_cols),)
        return {name: Target(name, (), cut=cut)}
    prefix, suffix = name.rsplit(".", 1)
    owner = prefix.rsplit(".", 1)[0] + "."
    keys, start = {}, 0
    for slice_name, width in zip(module.slice_names, module.out_splits):
        key = f"{owner}{slice_name.rsplit('.', 1)[1]}.{suffix}"
        keys[key] = Target(name, (slice(start, start + width),),
                           module.slice_rows.get(slice_name))
        start += width
    return keys


def _expert_keys(name: str, module: MoeExperts, layout: str,
                 transposable: bool) -> dict[str, Target | None]:
    """Disk keys of w_gate_up / w_down in the checkpoint's expert layout; None for the keys of
    experts another rank holds (expert parallelism)."""
    prefix, param = name.rsplit(".", 1)  # prefix = model.layers.L.mlp.experts
    gate_up = param == "w_gate_up"
    experts, inter = module.expert_ids, module.inter_ids
    cut_inter = module.inter < module.full_inter
    if layout == "3d":
        E, I, H = module.num_experts, module.full_inter, module.w_down.shape[1]
        cut = []
        if len(experts) < E:
            cut.append((0, experts))
        if cut_inter:
            cut.append((1, module.gate_up_ids) if gate_up else (2, inter))
        return {f"{prefix}.{'gate_up_proj' if gate_up else 'down_proj'}":
                Target(name, (), transposable=transposable,
                       full=(E, 2 * I, H) if gate_up else (E, H, I), cut=tuple(cut))}
    projs = ("gate_proj", "up_proj") if gate_up else ("down_proj",)
    keys: dict[str, Target | None] = {f"{prefix}.{e}.{proj}.weight": None
                                      for e in range(module.num_experts) for proj in projs}
    n, rows = module.inter, inter if cut_inter else None
    for i, e in enumerate(experts.tolist()):
        if gate_up:
            keys[f"{prefix}.{e}.gate_proj.weight"] = Target(name, (i, slice(0, n)), rows)
            keys[f"{prefix}.{e}.up_proj.weight"] = Target(name, (i, slice(n, 2 * n)), rows)
        else:
            keys[f"{prefix}.{e}.down_proj.weight"] = Target(
                name, (i,), cut=((1, inter),) if cut_inter else ())
    return keys


def checkpoint_plan(model: MoeForCausalLM, layout: str) -> dict[str, Target | None]:
    """Every disk key the model needs (normalized spelling) -> where it goes (None: another
    rank's expert, skipped)."""
    modules = dict(model.named_modules())
    transposable = ARCHITECTURES[model.config.architecture].fused_experts_transposed
    plan: dict[str, Target] = {}
    for name, _ in model.named_parameters():  # a tied lm_head appears once, as embed_tokens
        module = modules[name.rsplit(".", 1)[0]]
        if isinstance(module, MoeExperts):
            plan.update(_expert_keys(name, module, layout, transposable))
        elif isinstance(module, LoraLinear):
            plan.update(_linear_keys(name, module))
        else:
            rows = getattr(module, "shard_rows", {}).get(name.rsplit(".", 1)[1])
            plan[name] = Target(name, (), rows)
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
    """Every tensor key on disk -> its file (reads headers only). A checkpoint saved from an
    unmerged PEFT model (base weights beside lora_* tensors) is refused."""
    keys: dict[str, Path] = {}
    for file in files:
        if not file.is_file():
            raise ModelLoadError(f"checkpoint shard {file.name} is missing from {file.parent}")
        with safe_open(file, framework="pt") as f:
            keys.update(dict.fromkeys(f.keys(), file))
    peft = next((key for key in keys if _PEFT_TENSOR.search(key)), None)
    if peft is not None:
        raise ModelLoadError(
            f"{peft} in {keys[peft].name}: this checkpoint is an unmerged PEFT model (base weights "
            "plus LoRA tensors); merge it (merge_and_unload) or serve the base checkpoint with "
            "the adapter loaded separately")
    return keys


def _iter_tensors(files: list[Path], total: int) -> Iterator[tuple[str, torch.Tensor]]:
    with tqdm(total=total, desc="Loading weights", unit="tensor", disable=None) as bar:
        for file in files:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    yield key, f.get_tensor(key)
                    bar.update(1)


def detect_layout(keys: list[str]) -> str:
    """"3d" when the served layers' experts are stored fused (gate_up_proj / down_proj), else
    "2d" (extras such as MTP layers may differ: Qwen3.5 stores them per expert)."""
    served = (normalize_key(k) for k in keys)
    return "3d" if any(_FUSED_EXPERT_KEY.search(k) for k in served
                       if not _IGNORED_EXTRA.search(k)) else "2d"


def _skip_reason(key: str, config: ModelConfig) -> str | None:
    if _IGNORED_EXTRA.search(key):
        return "not used by the served model"
    if _VISION.search(key) and ARCHITECTURES[config.architecture].text_config:
        return "vision tower: loramux serves the text model"
    if key == "lm_head.weight" and config.tie_word_embeddings:
        return "tie_word_embeddings is set: lm_head is embed_tokens"
    return None


def _written_transposed(config: ModelConfig) -> bool:
    """Whether a square fused expert tensor is [E, in, out]: hub Qwen3-VL-MoE files are, what
    transformers >= 5 writes is not (it converts them at load and saves [E, out, in])."""
    major = re.match(r"\d+", config.transformers_version or "")
    return not (major and int(major.group()) >= 5)


def _copy(model_params: dict, target: Target, key: str, tensor: torch.Tensor,
          config: ModelConfig) -> None:
    region = model_params[target.param].data[target.index]
    if target.rows is not None:
        tensor = tensor[target.rows]
    if target.transposable and tensor.dim() == 3:
        flipped = tensor.transpose(1, 2)
        square = flipped.shape == tensor.shape
        if (square and _written_transposed(config)) or (not square
                                                        and flipped.shape == target.full):
            tensor = flipped
    for dim, ids in target.cut:
        tensor = tensor.index_select(dim, ids)
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
    skipped: dict[str, list[str]] = {}
    for key, tensor in _iter_tensors(files, len(disk)):
        norm = normalize_key(key)
        target = plan.get(norm)
        if target is None and norm in plan:
            skipped.setdefault("experts of other ranks", []).append(key)
            continue
        if target is None:
            reason = _skip_reason(norm, model.config)
            if reason is None:
                raise ModelLoadError(f"unexpected tensor {key} in {disk[key].name}: "
                                     f"no such weight in {model.config.architecture}")
            skipped.setdefault(reason, []).append(key)
            continue
        if norm in loaded:
            raise ModelLoadError(f"tensor {norm} appears twice (as {key})")
        _copy(params, target, key, tensor, model.config)
        loaded.add(norm)
    for reason, keys in skipped.items():
        logger.info("skipped %d tensors (%s), such as %s", len(keys), reason, keys[0])
    missing = sorted({key for key, target in plan.items() if target is not None} - loaded)
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
        if isinstance(module, RMSNorm):  # the identity: 1, or 0 for a zero-centred norm
            module.weight.fill_(0.0 if module.zero_centred else 1.0)


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
