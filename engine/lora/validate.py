"""Checks of an adapter beyond its file format: numeric limits, and the base model it names.

A LoRA delta is a correction of the base weights: trained adapters have delta entries far below
1, and base checkpoints have weight entries below about 10. An adapter outside the limits
below is broken or hostile, and one whose delta is not finite once scaled would write NaN or
Inf into its requests' activations and KV blocks. Each limit is checked when an adapter is read
and refused with AdapterLoadError naming the target and the value:
- r and rank_pattern values are positive integers, lora_alpha and alpha_pattern values finite
  numbers (JSON booleans are neither; Python's json reads NaN and Infinity);
- each target's scale, alpha / r (alpha / sqrt(r) with use_rslora), has |scale| <= MAX_SCALE;
- every entry of A and of the scaled B is finite in the serving dtype (float16 ends at 65504);
- every entry of the delta scale * B @ A has magnitude <= MAX_DELTA. Checked cheaply per target
  (per expert) by the Cauchy-Schwarz bound |delta_ij| <= ||B_i,:|| * ||A_:,j||, and computed
  exactly (in float64, in chunks) only for the experts whose bound exceeds MAX_DELTA.
What passes can still overflow at run time on some input; the attention and the sampler keep
such a request's non-finite values from reaching any other request.
An adapter trained on another base model (base_model_name_or_path) is served with a warning when
its shapes fit, as vLLM serves it.
"""

from __future__ import annotations

import logging
import math

import torch

from loramux.engine.errors import AdapterLoadError
from loramux.engine.lora.weights import LoraWeights

logger = logging.getLogger(__name__)

MAX_SCALE = 1e4  # |alpha / r|: common adapters use 0.5 to 16
MAX_DELTA = 1e3  # |(scale * B @ A)_ij|: 100 x the largest base weight entries seen in practice
_CHUNK = 1 << 22  # delta entries computed at once when the bound is exceeded (32 MiB of float64)


def is_rank(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def is_number(value) -> bool:
    """A finite int or float; booleans, NaN, Infinity and ints beyond float range are not."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def check_scale(peft_name: str, rank: int, alpha: float, scale: float) -> None:
    if not abs(scale) <= MAX_SCALE:
        raise AdapterLoadError(
            f"adapter_config.json: lora_alpha {alpha:g} with rank {rank} gives {peft_name} a "
            f"LoRA scale of {scale:g}, beyond loramux's limit of {MAX_SCALE:g} in magnitude "
            "(lora_alpha or alpha_pattern is far too large)")


def check_adapter(name: str, weights: dict[str, LoraWeights], trained_on,
                  dtype: torch.dtype, base_model: str | None) -> None:
    """The weight limits in `dtype`, then the base-model warning (trained_on: the config's
    base_model_name_or_path; base_model: the served checkpoint's path or name)."""
    for module, w in weights.items():
        _check_weights(module, w, dtype)
    if isinstance(trained_on, str) and trained_on and base_model \
            and _last(trained_on) != _last(base_model):
        logger.warning("adapter %s was trained on %r (base_model_name_or_path) but the server "
                       "serves %r; loading it because its shapes fit", name, trained_on,
                       _last(base_model))


def _last(path: str) -> str:
    """Names compare by their last path component, case-insensitively (org/ and dirs dropped)."""
    return path.rstrip("/").rpartition("/")[2].lower()


def _check_weights(module: str, w: LoraWeights, dtype: torch.dtype) -> None:
    top = torch.finfo(dtype).max
    for part, tensor in (("lora_A", w.a), ("lora_B x scale", w.b)):
        biggest = tensor.abs().max().item() if tensor.numel() else 0.0
        if not biggest <= top:
            raise AdapterLoadError(
                f"{module}: {part} has an entry of magnitude {biggest:g}, which is not finite in "
                f"the serving dtype {str(dtype).removeprefix('torch.')} (largest {top:g}): "
                "lora_alpha or the weights are far too large")
    biggest = _delta_beyond_bound(w)
    if biggest > MAX_DELTA:
        raise AdapterLoadError(
            f"{module}: its LoRA delta (scale x lora_B @ lora_A) has an entry of magnitude "
            f"{biggest:g}, beyond loramux's limit of {MAX_DELTA:g} (trained adapters stay far "
            "below 1): lora_alpha or the weights are far too large")


def _delta_beyond_bound(w: LoraWeights) -> float:
    """The largest |b[e] @ a[e]| entry over the experts whose Cauchy-Schwarz bound exceeds
    MAX_DELTA (0 when none does); a dense target is one expert. a [E, r, I], b [E, O, r]."""
    a, b = w.a.reshape(-1, *w.a.shape[-2:]), w.b.reshape(-1, *w.b.shape[-2:])
    bound = b.double().norm(dim=2).amax(dim=1) * a.double().norm(dim=1).amax(dim=1)  # [E]
    biggest = 0.0
    for expert in torch.nonzero(bound > MAX_DELTA).flatten().tolist():
        a_e, b_e = a[expert].double(), b[expert].double()
        rows = max(1, _CHUNK // max(1, a_e.shape[1]))
        for start in range(0, b_e.shape[0], rows):
            biggest = max(biggest, (b_e[start:start + rows] @ a_e).abs().max().item())
    return biggest
