"""Read a PEFT LoRA adapter directory into a LoraAdapter checked against the model.

Every tensor key is parsed (engine.lora.peft_keys) into a canonical target and paired with its
partner; each pair is checked against ModelConfig.lora_module_shapes() and becomes LoraWeights
with the scale (alpha/r, or alpha/sqrt(r) with use_rslora; per target through rank_pattern /
alpha_pattern) folded into b. Weights stay float32 on CPU.
- 2D per-expert pairs are stacked into a [E, r, D_in], b [E, D_out, r]. An expert missing from the
  file gets zero A and B (no delta), as PEFT leaves it; experts of unequal rank are zero-padded.
- 3D fused pairs unfold with A rows expert-major (A.view(E, r, in)[e]) and B columns rank-major
  (B.view(out, r, E)[:, :, e]). PEFT <= 0.18 could write them transposed: detected from shapes.
  A tensor that fits both readings (hidden_size == 2I for gate_up, == I for down) is settled by
  the file's other 3D tensors or by peft_version >= 0.19.1, else refused. Nothing is guessed.
- Megatron-Bridge: stacked tensors (lora_A [E, r, in]) have one reading (peft_keys); files of
  its save_hf_adapter (no peft_version, target_parameters per layer) are transposed with B
  columns expert-major (B.view(in, E, r)[:, e]) and are read so, or refused if not transposed.
Every problem raises AdapterLoadError naming the key or module (AdapterNotFound: no such path).
Files are opened only through engine.lora.files: confined to the allowed roots after resolving
links, and fingerprinted as read (a re-read must match the fingerprint of the validating read).
The numeric limits (finite after scaling, a bounded delta) are in engine.lora.validate.
"""

from __future__ import annotations

import io
import logging
import pickle
from collections import defaultdict

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from loramux.engine.config import ModelConfig
from loramux.engine.errors import AdapterLoadError
from loramux.engine.lora.files import AdapterFiles, Fingerprint
from loramux.engine.lora.peft_keys import (LoraHyper, LoraPair, check_expert_rows, dim_names,
                                   fused_orientations, pair_up, peft_version_at_least,
                                   positional_candidates, read_config, unfold_fused)
from loramux.engine.lora.shared_a import share_gate_up_a
from loramux.engine.lora.validate import check_adapter
from loramux.engine.lora.weights import ExpertLayout, LoraAdapter, LoraWeights

logger = logging.getLogger(__name__)

# the first PEFT release writing 3D LoRA in the docs/adapter-formats.md layout
_ONE_ORIENTATION_SINCE = (0, 19, 1)


def read_adapter(name: str, path: str, model_config: ModelConfig, max_rank: int,
                 is_3d_lora_weight: bool | None = None, native_layout: str | None = None,
                 allow_mixed: bool = True, dtype: torch.dtype = torch.float32,
                 base_model: str | None = None, allowed_roots: tuple[str, ...] = (),
                 expected: Fingerprint | None = None) -> LoraAdapter:
    """Read, check and normalize the PEFT adapter at `path` for `model_config`.

    is_3d_lora_weight: None = trust detection; True/False must agree with what was detected
                       (an adapter without expert LoRA agrees with both).
    native_layout:     the base checkpoint's expert layout ("2d" per-expert, "3d" fused); with
                       allow_mixed False an adapter of the other expert layout is refused.
    dtype, base_model: the serving dtype and checkpoint (engine.lora.validate.check_adapter).
    allowed_roots:     every file read must resolve (links followed) under one of these.
    expected:          a re-read: the fingerprint of the read that validated the adapter, which
                       the files must still match (engine.lora.files).
    """
    if native_layout not in (None, "2d", "3d"):
        raise ValueError(f"native_layout must be '2d', '3d' or None, got {native_layout!r}")
    files = _adapter_files(name, path, allowed_roots, expected)
    config = read_config(files.read("adapter_config.json"), path)
    hyper = LoraHyper.from_config(config)
    tensors, file_format = _read_tensors(files)
    builder = _WeightBuilder(model_config, hyper, max_rank)
    weights, shared = share_gate_up_a(builder.build(pair_up(tensors, f"adapter {path}")))
    _check_layout(builder.layout, is_3d_lora_weight, native_layout, allow_mixed)
    check_adapter(name, weights, config.get("base_model_name_or_path"), dtype, base_model)
    meta = {"format": file_format, "peft_version": hyper.peft_version,
            "num_targets": len(weights), **builder.summary, "shared_gate_up_a_layers": shared}
    logger.info("adapter %s read from %s: %s", name, path, meta)
    return LoraAdapter(name=name, path=str(path), weights=weights,
                       expert_layout=builder.layout, rank=max(w.rank for w in weights.values()),
                       meta=meta, fingerprint=files.fingerprint)


def _adapter_files(name: str, path: str, allowed_roots: tuple[str, ...],
                   expected: Fingerprint | None) -> AdapterFiles:
    files = AdapterFiles(name, path, allowed_roots, expected)
    if not files.exists("adapter_config.json"):
        raise AdapterLoadError(f"{path} has no adapter_config.json: not a PEFT adapter directory")
    return files


def _read_tensors(files: AdapterFiles) -> tuple[dict[str, torch.Tensor], str]:
    """adapter_model.safetensors (preferred) or adapter_model.bin, as finite float32 tensors."""
    for file_name, load in (("adapter_model.safetensors", _load_safetensors),
                            ("adapter_model.bin", _load_bin)):
        if files.exists(file_name):
            raw = load(file_name, files.read(file_name))
            return {key: _as_float32(key, t) for key, t in raw.items()}, file_name.split(".")[-1]
    raise AdapterLoadError(f"{files.path} has no adapter_model.safetensors or adapter_model.bin")


def _load_safetensors(file_name: str, data: bytes) -> dict[str, torch.Tensor]:
    try:
        return dict(sorted(load_safetensors(data).items()))  # safe_open's key order
    except SafetensorError as err:
        raise AdapterLoadError(f"{file_name} is corrupt or truncated: {err}") from err


def _load_bin(file_name: str, data: bytes) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as err:
        raise AdapterLoadError(f"{file_name} is corrupt or not a weights-only torch file: "
                               f"{str(err).splitlines()[0]}") from err
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise AdapterLoadError(f"{file_name} does not hold a dict of tensors")
    return state


def _as_float32(key: str, tensor: torch.Tensor) -> torch.Tensor:
    if not tensor.is_floating_point():
        raise AdapterLoadError(f"{key} has dtype {tensor.dtype}; LoRA weights are floating point")
    tensor = tensor.to(torch.float32)
    if not torch.isfinite(tensor).all():
        raise AdapterLoadError(f"{key} contains NaN or Inf values")
    return tensor


def _check_layout(layout: ExpertLayout | None, is_3d: bool | None, native_layout: str | None,
                  allow_mixed: bool) -> None:
    if layout is None:
        return
    if is_3d is not None and is_3d != (layout == "3d"):
        raise AdapterLoadError(
            f"is_3d_lora_weight={is_3d} contradicts the adapter files, which hold "
            f"{layout.upper()} expert LoRA (detected from tensor names and shapes)")
    if not allow_mixed and native_layout is not None and layout != native_layout:
        raise AdapterLoadError(
            f"the adapter's expert LoRA is {layout.upper()} but the base checkpoint's experts are "
            f"{native_layout.upper()}; start the server with --enable-mixed-moe-lora-format")


class _WeightBuilder:
    """Turns lora_A/lora_B pairs into canonical LoraWeights, checking each against the model.

    layout and summary describe what was found (expert layout, 3D orientation, zero experts).
    """

    def __init__(self, model_config: ModelConfig, hyper: LoraHyper, max_rank: int):
        self.model_config, self.hyper, self.max_rank = model_config, hyper, max_rank
        self.shapes = model_config.lora_module_shapes()  # name -> (D_in, D_out, E)
        self.layout: ExpertLayout | None = None
        self.summary: dict = {"expert_layout": None}

    def build(self, pairs: list[LoraPair]) -> dict[str, LoraWeights]:
        by_kind: dict[str, list[LoraPair]] = defaultdict(list)
        for pair in pairs:
            by_kind[pair.key.kind].append(pair)
        fused = by_kind["fused"] + by_kind["positional"]
        if by_kind["expert"] and fused:
            raise AdapterLoadError(
                f"the adapter mixes 2D per-expert LoRA ({by_kind['expert'][0].names['A']}) with 3D "
                f"fused expert LoRA ({fused[0].names['A']}); one adapter must use one layout")
        weights = {p.key.module: self._dense(p) for p in by_kind["dense"]}
        weights.update(self._experts_2d(by_kind["expert"]))
        weights.update(self._experts_3d(fused))
        return weights

    def _target(self, module: str, key: str, has_experts: bool) -> tuple[int, int, int]:
        """(D_in, D_out, E) of a canonical target the model must have."""
        if module not in self.shapes:
            raise AdapterLoadError(
                f"{key}: the model ({self.model_config.architecture}, "
                f"{self.model_config.num_layers} layers) has no LoRA target {module}")
        d_in, d_out, num_experts = self.shapes[module]
        if (num_experts > 0) != has_experts:
            shared = (" (one LoRA shared by all experts, as Megatron-Bridge's "
                      "experts_shared_outer_loras exports it, is not served: export with "
                      "expand_shared_outer)" if num_experts else "")
            raise AdapterLoadError(f"{key}: {module} is {'an' if num_experts else 'not an'} "
                                   f"expert target, but the key {'lacks' if num_experts else 'has'}"
                                   f" an expert index{shared}")
        return d_in, d_out, num_experts

    def _check_rank(self, rank: int, module: str) -> None:
        if rank > self.max_rank:
            raise AdapterLoadError(f"{module} has LoRA rank {rank}, above the server's limit "
                                   f"{self.max_rank} (--max-lora-rank)")

    def _check_matrices(self, pair: LoraPair, module: str, d_in: int, d_out: int) -> float:
        """Check a [r, D_in] / [D_out, r] pair against the model and config; returns its scale."""
        (in_name, out_name), name_a = dim_names(module), pair.names["A"]
        if pair.a.shape[0] != pair.b.shape[1]:
            raise AdapterLoadError(f"{name_a}: lora_A has rank {pair.a.shape[0]} but its lora_B "
                                   f"has rank {pair.b.shape[1]}")
        for part, found, expected, what in (("A", pair.a.shape[1], d_in, in_name),
                                            ("B", pair.b.shape[0], d_out, out_name)):
            if found != expected:
                raise AdapterLoadError(f"{pair.names[part]}: shape {list(pair.tensors[part].shape)}"
                                       f" does not match the model: expected {what} = {expected},"
                                       f" found {found}")
        rank, scale = self.hyper.rank_and_scale(pair.key.peft_name)
        self._check_rank(pair.a.shape[0], module)
        if pair.a.shape[0] != rank:
            raise AdapterLoadError(f"{name_a}: rank {pair.a.shape[0]} differs from the rank "
                                   f"{rank} adapter_config.json gives it (r / rank_pattern)")
        return scale

    def _dense(self, pair: LoraPair) -> LoraWeights:
        d_in, d_out, _ = self._target(pair.key.module, pair.names["A"], has_experts=False)
        scale = self._check_matrices(pair, pair.key.module, d_in, d_out)
        return LoraWeights(a=pair.a, b=pair.b * scale)

    def _experts_2d(self, pairs: list[LoraPair]) -> dict[str, LoraWeights]:
        by_module: dict[str, dict[int, LoraPair]] = defaultdict(dict)
        for pair in pairs:
            by_module[pair.key.module][pair.key.expert] = pair
        if pairs:
            self.layout, self.summary = "2d", {"expert_layout": "2d", "zero_experts": {}}
        return {module: self._stack_2d(module, experts) for module, experts in by_module.items()}

    def _stack_2d(self, module: str, experts: dict[int, LoraPair]) -> LoraWeights:
        """Per-expert pairs -> a [E, r, D_in], b [E, D_out, r]; absent experts stay zero."""
        some_key = next(iter(experts.values())).names["A"]
        d_in, d_out, num_experts = self._target(module, some_key, has_experts=True)
        factors = {}
        for expert, pair in sorted(experts.items()):
            if expert >= num_experts:
                raise AdapterLoadError(f"{pair.names['A']}: expert {expert} does not exist, the "
                                       f"model has {num_experts} experts (num_experts)")
            factors[expert] = (pair.a, pair.b * self._check_matrices(pair, module, d_in, d_out))
        rank = max(a.shape[0] for a, _ in factors.values())
        a, b = torch.zeros(num_experts, rank, d_in), torch.zeros(num_experts, d_out, rank)
        for expert, (a_e, b_e) in factors.items():
            a[expert, : a_e.shape[0]], b[expert, :, : b_e.shape[1]] = a_e, b_e
        if len(factors) < num_experts:
            self.summary["zero_experts"][module] = sorted(set(range(num_experts)) - set(factors))
        return LoraWeights(a=a, b=b)

    def _experts_3d(self, pairs: list[LoraPair]) -> dict[str, LoraWeights]:
        """3D pairs: name each (depth, target_parameters, shape), then unfold in one orientation."""
        if not pairs:
            return {}
        candidates = self._fused_candidates(pairs)
        orientation = self._orientation([fits for _, _, fits in candidates])
        expert_major_b = self._megatron_bridge_file(candidates, orientation)
        self.layout = "3d"
        weights: dict[str, LoraWeights] = {}
        for pair, experts, fits in candidates:
            (param,) = [p for p, o in fits if o == orientation]
            module = f"{experts}.{param}"
            if module in weights:
                raise AdapterLoadError(f"{pair.names['A']} is a second LoRA for {module}")
            weights[module] = self._unfold(pair, module, param, orientation,
                                           expert_major_b and not pair.stacked)
        return weights

    def _megatron_bridge_file(self, candidates: list, orientation: str) -> bool:
        """Whether the folded 3D pairs come from Megatron-Bridge's save_hf_adapter, whose B
        columns are expert-major; such a file that is not transposed is refused."""
        folded = [pair for pair, _, _ in candidates if not pair.stacked]
        if not (self.hyper.megatron_bridge and folded):
            return False
        if orientation != "transposed":
            raise AdapterLoadError(
                f"{folded[0].names['A']}: adapter_config.json looks like a Megatron-Bridge "
                "save_hf_adapter export (no peft_version, target_parameters per layer), which "
                "stores 3D expert LoRA transposed with expert-major columns, but these tensors "
                "are not transposed; refusing rather than guessing their packing (re-export "
                "with PEFT, or add the peft_version that wrote the file)")
        self.summary.update(producer="Megatron-Bridge", b_columns="expert-major")
        return True

    def _fused_candidates(self, pairs: list[LoraPair]) -> list[tuple[LoraPair, str, set]]:
        """(pair, experts module, {(parameter, orientation)} its shapes fit) for each 3D pair."""
        depths: dict[str, set[int]] = defaultdict(set)
        for pair in pairs:
            if pair.key.kind == "positional":
                depths[pair.key.module].add(pair.key.depth)
        by_depth = {module: positional_candidates(module, found, self.hyper.fused_targets)
                    for module, found in depths.items()}
        candidates = []
        for pair in pairs:
            if pair.key.kind == "positional":
                experts, params = pair.key.module, by_depth[pair.key.module][pair.key.depth]
            else:
                experts, _, param = pair.key.module.rpartition(".")
                params = (param,)
            candidates.append((pair, experts, self._fits(pair, experts, params)))
        return candidates

    def _fits(self, pair: LoraPair, experts: str, params: tuple[str, ...]) -> set[tuple[str, str]]:
        fits, expected = set(), []
        for param in params:
            d_in, d_out, _ = self._target(f"{experts}.{param}", pair.names["A"], has_experts=True)
            found = fused_orientations(pair.a.shape[1], pair.b.shape[0], d_in, d_out)
            if pair.stacked:  # [E, r, in] / [E, out, r]: no transposed reading
                found &= {"standard"}
            fits |= {(param, orientation) for orientation in found}
            in_name, out_name = dim_names(f"{experts}.{param}")
            expected.append(f"{param}: lora_A [E*r, {d_in}] ({in_name}) and lora_B "
                            f"[{d_out}, r*E] ({out_name})")
        if not fits:
            raise AdapterLoadError(
                f"{pair.names['A']}: shapes lora_A {list(pair.a.shape)}, lora_B "
                f"{list(pair.b.shape)} do not match the model: expected {' or '.join(expected)}, "
                "or their transpose as PEFT <= 0.18 wrote it")
        return fits

    def _orientation(self, fits: list[set[tuple[str, str]]]) -> str:
        """The one reading ("standard" / "transposed") that fits every 3D pair of the file."""
        common = set.intersection(*({orientation for _, orientation in f} for f in fits))
        if len(common) == 2 and peft_version_at_least(self.hyper.peft_version,
                                                      _ONE_ORIENTATION_SINCE):
            common = {"standard"}
        elif len(common) == 2 and self.hyper.megatron_bridge:  # it writes transposed only
            common = {"transposed"}
        if len(common) != 1:
            raise AdapterLoadError(
                "cannot tell whether the 3D expert LoRA is stored transposed (as PEFT <= 0.18 "
                "could write it): "
                + ("its tensors disagree" if not common else
                   f"its shapes fit both readings for this model (hidden_size "
                   f"{self.model_config.hidden_size}, moe_intermediate_size "
                   f"{self.model_config.moe_intermediate_size}) and peft_version "
                   f"{self.hyper.peft_version!r} does not settle it")
                + "; re-save the adapter with PEFT >= 0.19.1")
        self.summary = {"expert_layout": "3d", "orientation": next(iter(common))}
        return self.summary["orientation"]

    def _unfold(self, pair: LoraPair, module: str, param: str, orientation: str,
                expert_major_b: bool) -> LoraWeights:
        num_experts = self.shapes[module][2]
        peft_name = pair.key.peft_name + ("" if pair.key.kind == "fused" else f".{param}")
        rank, scale = self.hyper.rank_and_scale(peft_name)
        self._check_rank(rank, module)
        check_expert_rows(pair.names["A"], pair.a.shape[0], pair.b.shape[1], num_experts, rank)
        a, b = unfold_fused(pair.a, pair.b, num_experts, rank, orientation, expert_major_b)
        return LoraWeights(a=a, b=b * scale)
