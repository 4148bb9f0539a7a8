"""loramux kernels: Triton ops for CUDA and their torch twins for CPU, chosen once per engine."""

from __future__ import annotations

from types import ModuleType

import torch

from loramux.kernels.meta import LoraMeta, LoraMetaBuffers
from loramux.kernels.reference import MoeLora

__all__ = ["LoraMeta", "LoraMetaBuffers", "MoeLora", "select_ops"]


def select_ops(device: torch.device, backend: str = "auto") -> ModuleType:
    """The op module the engine uses: `lora_delta`, `fused_experts`, the paged attentions, the
    Gated DeltaNet ops and the fused elementwise ops (`fused_add_rms_norm`, `qk_norm_rope`,
    `route`, `silu_and_mul`) with the twins' signatures, and CUDA_GRAPH_SAFE (whether a CUDA
    graph may capture them).

    backend: "auto" (Triton on CUDA, torch elsewhere), "torch" or "triton".
    """
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "torch"
    if backend == "torch":
        from loramux.kernels import reference

        return reference
    if backend == "triton":
        from loramux.kernels import triton_ops

        return triton_ops
    raise ValueError(f"unknown kernel backend {backend!r}; choose auto, torch or triton")
