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

    The three device tensors are views of one preallocated int32 buffer (LoraMetaBuffers: one
    host-to-device copy per step). Capture a CUDA graph with has_lora True: a replay whose
    tokens are all -1 is still right (every LoRA program exits), one captured without LoRA
    launches nothing.
    """

    token_slot: torch.Tensor
    has_lora: bool
    num_slots: int
    sorted_tokens: torch.Tensor
    slot_start: torch.Tensor
    num_active: int

    @classmethod
    def build(cls, token_slot: list[int], num_slots: int,
              device: torch.device | str) -> LoraMeta:
        """A meta in buffers of its own (tests, benchmarks); the engine fills LoraMetaBuffers."""
        return LoraMetaBuffers(len(token_slot), num_slots, device).fill(token_slot)


class LoraMetaBuffers:
    """Preallocated host and device int32 buffers that `fill` writes a step's LoraMeta into.

    Layout for T tokens: [slot_start S + 1 | token_slot T | sorted_tokens T], so two fills with
    the same T give metas with the same addresses: a CUDA graph captured with one replays with
    the other's data. One host-to-device copy per fill, from pinned memory on CUDA; the caller
    must not fill again before the device has read the previous fill (the engine syncs every
    step).
    """

    def __init__(self, max_tokens: int, num_slots: int, device: torch.device | str) -> None:
        device = torch.device(device)
        size = num_slots + 1 + 2 * max_tokens
        self.num_slots = num_slots
        self.max_tokens = max_tokens
        self._host = torch.zeros(size, dtype=torch.int32, pin_memory=device.type == "cuda")
        self._dev = torch.zeros(size, dtype=torch.int32, device=device)

    def fill(self, token_slot: list[int]) -> LoraMeta:
        num_slots, num_tokens = self.num_slots, len(token_slot)
        assert num_tokens <= self.max_tokens, f"{num_tokens} tokens > {self.max_tokens}"
        assert all(-1 <= s < num_slots for s in token_slot), "token slots must be in [-1, S)"
        order = sorted(range(num_tokens), key=lambda t: (token_slot[t] < 0, token_slot[t]))
        counts = [0] * (num_slots + 1)
        for s in token_slot:
            if s >= 0:
                counts[s + 1] += 1
        for s in range(num_slots):
            counts[s + 1] += counts[s]
        used = num_slots + 1 + 2 * num_tokens
        self._host[:used].copy_(torch.tensor(counts + token_slot + order, dtype=torch.int32))
        packed = self._dev[:used]
        packed.copy_(self._host[:used], non_blocking=True)
        start = num_slots + 1
        return LoraMeta(
            token_slot=packed[start : start + num_tokens],
            has_lora=any(s >= 0 for s in token_slot),
            num_slots=num_slots,
            sorted_tokens=packed[start + num_tokens :],
            slot_start=packed[:start],
            num_active=len({s for s in token_slot if s >= 0}),
        )
