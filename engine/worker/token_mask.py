"""Token bitmasks of structured outputs, applied to logits rows on the device before sampling.

A plan's sampling row may carry an int32 bitmask [ceil(V / 32)] (engine/structured.py fills it
on the host): bit j of word i allows token 32 i + j. Disallowed tokens get -inf, so greedy
argmax, the sampling filters and the draw all choose among the allowed tokens, and logprobs are
those of the masked distribution (as vLLM's). Runs on logits, after any CUDA graph.
"""

from __future__ import annotations

import torch


def apply_token_masks(logits: torch.Tensor, masks: list[torch.Tensor | None]) -> None:
    """Mask rows of logits [B, V] in place; masks[i] is row i's bitmask, or None (free row)."""
    rows = [i for i, mask in enumerate(masks) if mask is not None]
    if not rows:
        return
    vocab = logits.shape[1]
    words = torch.stack([masks[i] for i in rows]).to(logits.device, non_blocking=True)
    shifts = torch.arange(32, device=logits.device, dtype=torch.int32)
    allowed = ((words[:, :, None] >> shifts) & 1).bool().flatten(1)  # [M, 32 * W]
    if allowed.shape[1] < vocab:  # tokens past the bitmask are never allowed
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]))
    index = torch.tensor(rows, device=logits.device)
    logits[index] = logits[index].masked_fill(~allowed[:, :vocab], float("-inf"))
