"""Per-step LoRA batch metadata, built once per step and read by every LoRA op."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class LoraMeta:
    """Which GPU adapter slot each token of the step uses, and the tokens grouped by slot.

    Running example: 4 slots, tokens use slots [1, 1, -1, 3, 1] (-1 = base model, no LoRA).
      token_slot    = [1, 1, -1, 3, 1]  # [T] int32 on the compute device
      sorted_tokens = [0, 1, 4, 3, 2]   # [T] int32: token rows grouped by slot (stable), -1 last
      slot_start    = [0, 0, 3, 3, 4]   # [S + 1] int32: slot s owns sorted_tokens[s_0:s_1]
                                        #   with s_0, s_1 = slot_start[s], slot_start[s + 1]
      has_lora      = True              # host-side: lets ops return without a device sync
      num_slots     = 4                 # S, the slot dimension of every LoRA weight buffer
      num_active    = 2                 # host-side: distinct slots in use (picks kernel modes)

    The three device tensors are views of one int32 buffer (one host-to-device copy per step);
    `copy_` refreshes a CUDA-graph captured meta in place. Capture with has_lora True: a replay whose tokens are all -1
    is still right (every LoRA program exits), one captured without LoRA launches nothing.
    """

    token_slot: torch.Tensor
    has_lora: bool
    num_slots: int
    sorted_tokens: torch.Tensor
    slot_start: torch.Tensor
    num_active: int

    @classmethod
    def build(cls, token_slot: list[int], num_slots: int, device: torch.device) -> LoraMeta:
        assert all(-1 <= s < num_slots for s in token_slot), "token slots must be in [-1, S)"
        num_tokens = len(token_slot)
        order = sorted(range(num_tokens), key=lambda t: (token_slot[t] < 0, token_slot[t]))
        counts = [0] * (num_slots + 1)
        for s in token_slot:
            if s >= 0:
                counts[s + 1] += 1
        for s in range(num_slots):
            counts[s + 1] += counts[s]
        packed = torch.tensor(token_slot + order + counts, dtype=torch.int32)
        packed = packed.to(device, non_blocking=True)
        return cls(
            token_slot=packed[:num_tokens],
            has_lora=any(s >= 0 for s in token_slot),
            num_slots=num_slots,
            sorted_tokens=packed[num_tokens : 2 * num_tokens],
            slot_start=packed[2 * num_tokens :],
            num_active=len({s for s in token_slot if s >= 0}),
        )

    def copy_(self, other: LoraMeta) -> None:
        """Refresh this meta's device buffers in place from a meta of the same T and S."""
        assert self.num_slots == other.num_slots, "slot count differs"
        assert self.token_slot.numel() == other.token_slot.numel(), "token count differs"
        self.token_slot.copy_(other.token_slot)
        self.sorted_tokens.copy_(other.sorted_tokens)
        self.slot_start.copy_(other.slot_start)
        self.has_lora = other.has_lora
        self.num_active = other.num_active
