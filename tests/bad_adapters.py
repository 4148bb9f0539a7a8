"""Broken copies of good test adapters: one writer per kind of problem a user can cause.

Each kind in BAD_KINDS breaks a good adapter directory (2D or 3D) in exactly one way; the
reader's tests and the server's tests check that each is refused with a message naming it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from tests.adapters import (_2D_EXPERT, PREFIX, _fused_name, _pair_tensors, _pairs, _rank_alpha,
                            _write, fold_3d, read_adapter_files, unfold_3d)

BAD_KINDS = (
    "not_an_adapter", "invalid_json", "no_weights", "truncated_safetensors",
    "corrupt_safetensors", "nan_weights", "inf_weights", "use_dora", "modules_to_save", "bias",
    "missing_lora_b", "unknown_module", "non_lora_key", "unsupported_target_parameter",
    "wrong_hidden_size", "wrong_num_experts", "wrong_intermediate_size", "rank_mismatch",
    "rank_too_high", "nan_alpha", "huge_alpha", "huge_alpha_pattern", "bool_rank",
    "bool_rank_pattern", "overflowing_delta", "huge_delta",
)


def write_bad_adapter(kind: str, good_dir, dst_dir) -> Path:
    """A copy of a good adapter (2D or 3D) broken in one way, `kind` from BAD_KINDS."""
    dst_dir = Path(dst_dir)
    shutil.copytree(good_dir, dst_dir)
    if kind in _FILE_BREAKERS:
        _FILE_BREAKERS[kind](dst_dir / "adapter_model.safetensors", dst_dir / "adapter_config.json")
        return dst_dir
    config, tensors = read_adapter_files(dst_dir)
    if kind in _CONFIG_BREAKERS:
        config = {**config, **_CONFIG_BREAKERS[kind](config)}
    else:
        tensors = _TENSOR_BREAKERS[kind](config, tensors)
    return _write(dst_dir, config, tensors)



def _first_key(tensors: dict, *fragments: str) -> str:
    return next(k for k in tensors if any(f in k for f in fragments))


def _resize(tensor: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """Cut or zero-pad one dimension to `size`."""
    if size <= tensor.shape[dim]:
        return tensor.narrow(dim, 0, size).clone()
    pad = list(tensor.shape)
    pad[dim] = size - tensor.shape[dim]
    return torch.cat([tensor, torch.zeros(pad)], dim)


def _poison(value: float):
    def breaker(config, tensors):
        key = _first_key(tensors, "lora_B")
        tensors[key] = tensors[key].clone()
        tensors[key][0, 0] = value
        return tensors
    return breaker


def _scale_first_pair(factor_a: float, factor_b: float):
    """Finite tensors with a huge delta: the first lora_A and lora_B multiplied."""
    def breaker(config, tensors):
        key = _first_key(tensors, "lora_B")
        for k, factor in ((key.replace("lora_B", "lora_A"), factor_a), (key, factor_b)):
            tensors[k] = tensors[k] * factor
        return tensors
    return breaker


def _drop_expert(config, tensors):
    """3D: one expert fewer in every fused pair; 2D: an extra expert beyond the model's."""
    for module, (a, b) in _pairs(tensors).items():
        if (name := _fused_name(config, module)) is not None:
            a_e, b_e = unfold_3d(a, b, _rank_alpha(config, name)[0])
            tensors.update(_pair_tensors(module, *fold_3d(a_e[:-1], b_e[:-1])))
        elif match := _2D_EXPERT.match(module):
            extra = module.replace(f".experts.{match[2]}.", ".experts.64.")
            tensors.update(_pair_tensors(extra, a, b))
    return tensors


def _wrong_intermediate(config, tensors):
    key = _first_key(tensors, "experts.lora_A", "down_proj.lora_A", "w2.lora_A")
    tensors[key] = _resize(tensors[key], 1, tensors[key].shape[1] + 4)
    return tensors


def _rank_too_high(config, tensors, rank: int = 64):
    """Every pair zero-padded to rank 64 (same deltas), r = 64 in the config (no rank_pattern)."""
    for module, (a, b) in _pairs(tensors).items():
        if _fused_name(config, module) is None:
            tensors.update(_pair_tensors(module, _resize(a, 0, rank), _resize(b, 1, rank)))
            continue
        a_e, b_e = unfold_3d(a, b, config["r"])
        a, b = fold_3d(_resize(a_e, 1, rank), _resize(b_e, 2, rank))
        tensors.update(_pair_tensors(module, a, b))
    config["r"] = rank
    return tensors


def _drop_lora_b(config, tensors):
    del tensors[_first_key(tensors, "lora_B")]
    return tensors


def _add_pair(source: str, target: str):
    def breaker(config, tensors):
        a, b = _pairs(tensors)[next(m for m in _pairs(tensors) if m.endswith(source))]
        tensors.update(_pair_tensors(target, a, b))
        return tensors
    return breaker


_FILE_BREAKERS = {
    "not_an_adapter": lambda weights, config: config.unlink(),
    "invalid_json": lambda weights, config: config.write_text(config.read_text()[:-20]),
    "no_weights": lambda weights, config: weights.unlink(),
    "truncated_safetensors": lambda weights, config: weights.write_bytes(
        weights.read_bytes()[:-100]),
    "corrupt_safetensors": lambda weights, config: weights.write_bytes(
        b"\x10\x00\x00\x00" + b"not json" * 8),
}
_CONFIG_BREAKERS = {
    "use_dora": lambda config: {"use_dora": True},
    "modules_to_save": lambda config: {"modules_to_save": ["lm_head"]},
    "bias": lambda config: {"bias": "all"},
    "unsupported_target_parameter": lambda config: {
        "target_parameters": [*(config.get("target_parameters") or ()), "mlp.gate.weight"]},
    "rank_mismatch": lambda config: {"r": config["r"] * 2},
    "nan_alpha": lambda config: {"lora_alpha": float("nan")},  # json writes and reads NaN
    "huge_alpha": lambda config: {"lora_alpha": 1e300},
    "huge_alpha_pattern": lambda config: {"alpha_pattern": {"q_proj": 1e9}},
    "bool_rank": lambda config: {"r": True},
    "bool_rank_pattern": lambda config: {"rank_pattern": {"q_proj": True}},
}
_TENSOR_BREAKERS = {
    "nan_weights": _poison(float("nan")),
    "inf_weights": _poison(float("inf")),
    "missing_lora_b": _drop_lora_b,
    "unknown_module": _add_pair("layers.0.self_attn.q_proj", "model.layers.99.self_attn.q_proj"),
    "non_lora_key": lambda config, t: {**t, f"{PREFIX}model.embed_tokens.lora_embedding_A":
                                       torch.zeros(4, 512)},
    "wrong_hidden_size": lambda config, t: {**t, (k := _first_key(t, "q_proj.lora_A")):
                                            _resize(t[k], 1, t[k].shape[1] + 8)},
    "wrong_num_experts": _drop_expert,
    "wrong_intermediate_size": _wrong_intermediate,
    "rank_too_high": _rank_too_high,
    "overflowing_delta": _scale_first_pair(1e30, 1e30),  # B @ A beyond float32 (and float64 x r)
    "huge_delta": _scale_first_pair(1.0, 1e6),
}
