"""Small helpers shared by the Triton launchers: sizes and per-device facts."""

from __future__ import annotations

import functools

import torch
import triton

MAX_RANK = 256  # widest LoRA rank block the kernels hold in registers

cdiv = triton.cdiv
next_power_of_2 = triton.next_power_of_2


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: exact fp32 ("ieee") for fp32 operands, whose default on the GPU
    is TF32 (~1e-3 relative error, enough to flip fp32 greedy tokens); the native path else."""
    return "ieee" if dtype == torch.float32 else "tf32"


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


def split_count(num_programs: int, num_tiles: int, device: torch.device, per_sm: int) -> int:
    """Into how many chunks to split num_tiles output tiles so that num_programs busy programs
    become about per_sm programs per multiprocessor."""
    want = cdiv(per_sm * num_sms(device), max(1, num_programs))
    return max(1, min(num_tiles, want))


def shrink_block_k(rows: int, element_size: int, k_in: int) -> int:
    """K step of a shrink loop that loads `rows` rows (x rows plus A rows) per step: as wide as
    64 KiB per pipeline stage allows (a short dependent chain), at most 512 and the K size."""
    fit = 1 << max(4, (65536 // (rows * element_size)).bit_length() - 1)
    return dot_width(k_in, min(512, fit))
