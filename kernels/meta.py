"""Per-step LoRA batch metadata, built once per step and read by every LoRA op."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class LoraMeta:
    """Which GPU adapter slot each token of the step uses.

    Running example: 4 slots, tokens use slots [1, 1, -1, 3, 1] (-1 = base model, no LoRA).
      token_slot = [1, 1, -1, 3, 1]     # [T] int32 on the compute device
      has_lora   = True                 # host-side: lets ops return without a device sync
      num_slots  = 4                    # S, the slot dimension of every LoRA weight buffer
    """

    token_slot: torch.Tensor
    has_lora: bool
    num_slots: int

    @classmethod
    def build(cls, token_slot: list[int], num_slots: int, device: torch.device) -> LoraMeta:
        has_lora = any(s >= 0 for s in token_slot)
        slots = torch.tensor(token_slot, dtype=torch.int32).to(device, non_blocking=True)
        return cls(slots, has_lora, num_slots)
