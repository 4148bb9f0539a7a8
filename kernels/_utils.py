"""Small helpers shared by the Triton launchers: sizes and per-device facts."""

from __future__ import annotations

import functools

import torch
import triton

cdiv = triton.cdiv
next_power_of_2 = triton.next_power_of_2


def dot_width(n: int, cap: int) -> int:
    """A tl.dot block width for an n-wide dimension: a power of two in [16, cap]."""
    return max(16, min(cap, next_power_of_2(n)))


@functools.lru_cache(maxsize=8)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Multiprocessors of a CUDA device; 4 elsewhere (the interpreter), to keep grids small."""
    if device.type != "cuda":
        return 4
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def split_count(num_programs: int, num_tiles: int, device: torch.device) -> int:
    """How many programs to split num_tiles output tiles over so the grid fills the device."""
    want = cdiv(2 * num_sms(device), max(1, num_programs))
    return max(1, min(num_tiles, want))
