"""bench_kernels.py --fused-ops: each fused elementwise op against the torch sequence it
replaces (its twin, the model's former code), at Qwen3-30B-A3B shapes in bf16.

Bytes: each input read once, each output written once; % of 4.3 TB/s (H200 HBM3e). The torch
qk_norm_rope row builds its cos / sin tables in every call, which the former model did once a
step for all layers (a few small kernels of that row are therefore shared by 48 layers).
"""

from __future__ import annotations

import torch

from benchmarks._timing import graph_time_us
from loramux.kernels import reference, triton_ops

TOKENS = (1, 64, 256, 8192)
PEAK_BYTES_PER_S = 4.3e12
H, N, G, D, E, K, I = 2048, 32, 4, 128, 128, 8, 768


def _bf16(*shape, shift=0.0):
    return (torch.randn(shape, device="cuda") + shift).bfloat16()


def _cases(num_tokens):
    """(op name, bytes moved, args) per fused op at this token count."""
    t = num_tokens
    x, residual, weight = _bf16(t, H), _bf16(t, H), _bf16(H, shift=1.0)
    qkv = _bf16(t, (N + 2 * G) * D)
    q = qkv[:, :N * D].view(t, N, D)
    k = qkv[:, N * D:(N + G) * D].view(t, G, D)
    positions = torch.randint(0, 4096, (t,), device="cuda")
    inv_freq = 1.0 / 1e6 ** (torch.arange(0, D, 2, device="cuda").float() / D)
    norm_w = (_bf16(D, shift=1.0), _bf16(D, shift=1.0))
    return [
        ("fused_add_rms_norm", 2 * (4 * t * H + H), (x, residual, weight, 1e-6, False)),
        ("qk_norm_rope", 2 * (2 * t * (N + G) * D + 2 * D) + 8 * t + 2 * D,
         (q, k, positions, inv_freq, *norm_w, 1e-6, False)),
        ("route", t * (2 * E + K * (2 + 8)), (_bf16(t, E), K, True, torch.bfloat16)),
        ("silu_and_mul", 2 * 3 * t * I, (_bf16(t, 2 * I),)),
    ]


def fused_op_rows():
    """One row per (op, tokens): fused and torch-sequence times, bytes, % of peak."""
    rows = []
    for num_tokens in TOKENS:
        for name, num_bytes, args in _cases(num_tokens):
            fused = graph_time_us(lambda: getattr(triton_ops, name)(*args))
            torch_us = graph_time_us(lambda: getattr(reference, name)(*args))
            roof = num_bytes / PEAK_BYTES_PER_S * 1e6
            rows.append(dict(op="fused_op", name=name, tokens=num_tokens, bytes=num_bytes,
                             fused_us=fused, torch_us=torch_us, roof_us=roof))
    return rows


def fmt(row):
    return (f"| {row['name']} | {row['tokens']} | {row['bytes'] / 1e3:.1f} "
            f"| {row['fused_us']:.1f} ({row['roof_us'] / max(row['fused_us'], 1e-9):.0%}) "
            f"| {row['torch_us']:.1f} ({row['roof_us'] / max(row['torch_us'], 1e-9):.0%}) "
            f"| {row['torch_us'] / max(row['fused_us'], 1e-9):.1f}x |")
